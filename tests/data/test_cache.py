"""The on-disk image cache: correct pixels, reuse, per-row invalidation, crash safety, errors that name the file."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from blastscan.data.cache import CACHE_ENV, ImageCache
from blastscan.data.images import load_rgb, resize_rgb
from blastscan.data.manifest import Manifest
from blastscan.data.scan import scan
from blastscan.errors import DatasetError

SIZE = 16

# name -> (width, height, PIL mode); non-square, greyscale and RGBA included on purpose.
IMAGES: dict[str, tuple[int, int, str]] = {
    "a.png": (40, 30, "RGB"),
    "b.jpg": (50, 50, "RGB"),
    "c.tif": (33, 47, "RGB"),
    "d.bmp": (20, 60, "RGB"),
    "e_grey.png": (25, 25, "L"),
    "f_rgba.png": (30, 18, "RGBA"),
    "g_small.jpg": (8, 12, "RGB"),
}


def _write_image(path: Path, width: int, height: int, mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    # A smooth gradient plus noise: resizing changes it, so a wrong recipe shows up in the pixels.
    yy, xx = np.mgrid[0:height, 0:width]
    base = (xx * 255 // max(width - 1, 1) + yy * 128 // max(height - 1, 1)) % 256
    array = (base[..., None] + rng.integers(0, 40, size=(height, width, channels))) % 256
    array = array.astype(np.uint8)
    Image.fromarray(array[..., 0] if mode == "L" else array, mode=mode).save(path)


def _manifest(root: Path, names: list[str]) -> Manifest:
    table = pd.DataFrame(
        {
            "path": names,
            "label": ["normal"] * len(names),
            "patient_id": [pd.NA] * len(names),
            "group_id": names,
            "dataset": ["test"] * len(names),
        }
    )
    return Manifest(table=table, root=root, format="test")


def _expected(path: Path, size: int = SIZE) -> np.ndarray:
    return resize_rgb(load_rgb(path, min_side=size), size)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture
def dataset(tmp_path: Path) -> Manifest:
    root = tmp_path / "data"
    root.mkdir()
    for seed, (name, (w, h, mode)) in enumerate(IMAGES.items()):
        _write_image(root / name, w, h, mode, seed)
    return _manifest(root, list(IMAGES))


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def test_build_gives_the_same_pixels_as_a_direct_decode(dataset: Manifest, cache_dir: Path) -> None:
    before = _snapshot(dataset.root)
    cache = ImageCache(dataset, size=SIZE, cache_dir=cache_dir)
    seen: list[int] = []
    stats = cache.build(progress=seen.append)
    assert (stats.reused, stats.decoded) == (0, len(IMAGES))
    assert sum(seen) == len(IMAGES)
    assert len(cache) == len(IMAGES)
    assert cache.path.parent == cache_dir
    for i, path in enumerate(dataset.absolute_paths()):
        row = cache[i]
        assert row.shape == (SIZE, SIZE, 3) and row.dtype == np.uint8
        np.testing.assert_array_equal(row, _expected(path))
    whole = cache.array()
    assert whole.shape == (len(IMAGES), SIZE, SIZE, 3)
    assert not whole.flags.writeable and not cache[0].flags.writeable
    np.testing.assert_array_equal(cache[-1], whole[len(IMAGES) - 1])
    with pytest.raises(IndexError):
        cache[len(IMAGES)]
    assert _snapshot(dataset.root) == before, "the dataset root must not be written"


def test_second_build_reuses_every_row(dataset: Manifest, cache_dir: Path) -> None:
    first = ImageCache(dataset, size=SIZE, cache_dir=cache_dir)
    first.build()
    again = ImageCache(dataset, size=SIZE, cache_dir=cache_dir)
    stats = again.build()
    assert (stats.reused, stats.decoded) == (len(IMAGES), 0)
    assert again.path == first.path
    np.testing.assert_array_equal(again.array(), first.array())


@pytest.mark.parametrize("change", ["touch", "rewrite"])
def test_a_changed_file_redecodes_only_its_row(dataset: Manifest, cache_dir: Path, change: str) -> None:
    cache = ImageCache(dataset, size=SIZE, cache_dir=cache_dir)
    cache.build()
    old = cache.array().copy()
    target = dataset.root / "c.tif"
    st = target.stat()
    if change == "rewrite":
        _write_image(target, 33, 47, "RGB", seed=99)
    # Set the mtime explicitly: a coarse filesystem clock could otherwise leave it unchanged.
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    stats = ImageCache(dataset, size=SIZE, cache_dir=cache_dir).build()
    assert (stats.reused, stats.decoded) == (len(IMAGES) - 1, 1)
    cache.build()
    row = list(IMAGES).index("c.tif")
    np.testing.assert_array_equal(cache[row], _expected(target))
    others = [i for i in range(len(IMAGES)) if i != row]
    np.testing.assert_array_equal(cache.array()[others], old[others])
    if change == "rewrite":
        assert not np.array_equal(cache[row], old[row])


def test_size_and_row_order_are_part_of_the_key(dataset: Manifest, cache_dir: Path) -> None:
    small = ImageCache(dataset, size=SIZE, cache_dir=cache_dir)
    large = ImageCache(dataset, size=24, cache_dir=cache_dir)
    reordered = _manifest(dataset.root, list(reversed(IMAGES)))
    backwards = ImageCache(reordered, size=SIZE, cache_dir=cache_dir)
    assert len({small.path, large.path, backwards.path}) == 3
    assert small.build().decoded == len(IMAGES)
    assert large.build().decoded == len(IMAGES)
    assert large[0].shape == (24, 24, 3)
    backwards.build()
    np.testing.assert_array_equal(backwards[0], small[-1])


def test_a_transform_is_applied_and_keyed(dataset: Manifest, cache_dir: Path) -> None:
    plain = ImageCache(dataset, size=SIZE, cache_dir=cache_dir)
    plain.build()
    inverted = ImageCache(
        dataset, size=SIZE, cache_dir=cache_dir, transform=lambda row: 255 - row, transform_key={"invert": 1}
    )
    inverted.build()
    assert inverted.path != plain.path
    np.testing.assert_array_equal(inverted[0], 255 - plain[0])
    with pytest.raises(ValueError, match="transform_key"):
        ImageCache(dataset, size=SIZE, cache_dir=cache_dir, transform=lambda row: row)


def test_rows_cannot_be_read_before_build(dataset: Manifest, cache_dir: Path) -> None:
    cache = ImageCache(dataset, size=SIZE, cache_dir=cache_dir)
    with pytest.raises(DatasetError, match="not built"):
        cache[0]
    with pytest.raises(DatasetError, match="not built"):
        cache.array()


def test_a_lost_or_damaged_index_means_rebuild(dataset: Manifest, cache_dir: Path) -> None:
    cache = ImageCache(dataset, size=SIZE, cache_dir=cache_dir)
    cache.build()
    index = cache.path / "index.json"
    index.unlink()  # killed before the index was ever written
    assert cache.build().decoded == len(IMAGES)
    content = json.loads(index.read_text())
    content["valid"][2] = content["valid"][5] = 0  # killed before these rows were recorded
    index.write_text(json.dumps(content))
    assert cache.build().decoded == 2
    index.write_text('{"format": 1, "key": "tru')  # garbage
    assert cache.build().decoded == len(IMAGES)
    with (cache.path / "data.npy").open("r+b") as fh:
        fh.truncate(200)  # data file cut short
    assert cache.build().decoded == len(IMAGES)
    for i, path in enumerate(dataset.absolute_paths()):
        np.testing.assert_array_equal(cache[i], _expected(path))


def test_an_interrupted_build_keeps_finished_rows_and_completes_later(dataset: Manifest, cache_dir: Path) -> None:
    def stop_after_three(done: list[int] = []) -> None:  # noqa: B006 - a counter across calls
        done.append(1)
        if len(done) == 3:
            raise KeyboardInterrupt

    cache = ImageCache(dataset, size=SIZE, cache_dir=cache_dir)
    with pytest.raises(KeyboardInterrupt):
        cache.build(workers=1, progress=lambda n: stop_after_three())
    with pytest.raises(DatasetError, match="not built"):
        cache[0]
    stats = cache.build()
    assert stats.reused >= 2 and stats.reused + stats.decoded == len(IMAGES)
    for i, path in enumerate(dataset.absolute_paths()):
        np.testing.assert_array_equal(cache[i], _expected(path))


def _build_in_a_child_that_gets_killed(manifest: Manifest, cache_dir: Path, hook: str) -> None:
    """Build in a subprocess that `hook` ends with os._exit (no cleanup, no finally), like a kill -9."""
    script = "\n".join(
        [
            "import os, pickle, sys",
            "import blastscan.data.cache as cache_module",
            "manifest = pickle.loads(sys.stdin.buffer.read())",
            "cache_module._CHECKPOINT_SECONDS = 0.0  # record progress after every row",
            "done = []",
            "def progress(n):",
            "    done.append(n)",
            textwrap.dedent(hook),
            f"cache = cache_module.ImageCache(manifest, size={SIZE}, cache_dir={str(cache_dir)!r})",
            "cache.build(workers=1, progress=progress)",
        ]
    )
    child = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(manifest), capture_output=True)
    assert child.returncode == 9, child.stderr.decode()


def _rows_marked_valid(cache: ImageCache) -> list[int]:
    """The rows the on-disk index calls valid, after checking each holds the right pixels."""
    index = json.loads((cache.path / "index.json").read_text())
    marked = [i for i, v in enumerate(index["valid"]) if v]
    stored = np.load(cache.path / "data.npy", mmap_mode="r")
    paths = cache.manifest.absolute_paths()
    for i in marked:
        np.testing.assert_array_equal(stored[i], _expected(paths[i]))
    return marked


def test_a_killed_build_never_leaves_a_bad_row_marked_valid(dataset: Manifest, cache_dir: Path) -> None:
    # Killed after the fourth row was written, before the index recorded it.
    hook = """
        def progress(n):
            done.append(n)
            if len(done) == 4:
                os._exit(9)
        """
    _build_in_a_child_that_gets_killed(dataset, cache_dir, hook)
    cache = ImageCache(dataset, size=SIZE, cache_dir=cache_dir)
    marked = _rows_marked_valid(cache)
    assert len(marked) == 3
    stats = cache.build()
    assert (stats.reused, stats.decoded) == (3, len(IMAGES) - 3)
    for i, path in enumerate(dataset.absolute_paths()):
        np.testing.assert_array_equal(cache[i], _expected(path))

    # A changed file: killed while re-decoding it. Its old row must not stay marked valid.
    target = dataset.root / "b.jpg"
    _write_image(target, 50, 50, "RGB", seed=42)
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 1_000_000_000))
    _build_in_a_child_that_gets_killed(dataset, cache_dir, "cache_module.load_resized = lambda *a, **k: os._exit(9)")
    marked = _rows_marked_valid(cache)
    assert marked == [i for i, name in enumerate(IMAGES) if name != "b.jpg"]
    assert cache.build().decoded == 1


def test_a_corrupt_file_raises_naming_it_and_keeps_the_rows_before_it(dataset: Manifest, cache_dir: Path) -> None:
    bad = dataset.root / "zz_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    manifest = _manifest(dataset.root, [*IMAGES, bad.name])
    cache = ImageCache(manifest, size=SIZE, cache_dir=cache_dir)
    with pytest.raises(DatasetError, match=r"zz_broken\.png"):
        cache.build(workers=1)
    with pytest.raises(DatasetError, match="not built"):
        cache[0]
    _write_image(bad, 10, 10, "RGB", seed=7)
    stats = cache.build(workers=1)
    assert (stats.reused, stats.decoded) == (len(IMAGES), 1)
    np.testing.assert_array_equal(cache[-1], _expected(bad))


def test_a_missing_file_raises_naming_it(dataset: Manifest, cache_dir: Path) -> None:
    (dataset.root / "d.bmp").unlink()
    with pytest.raises(DatasetError, match=r"d\.bmp: file not found"):
        ImageCache(dataset, size=SIZE, cache_dir=cache_dir).build()


def test_cache_dir_defaults_and_environment(dataset: Manifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert ImageCache(dataset, size=SIZE).path.parent == tmp_path / ".cache" / "blastscan" / "images"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere"))
    assert ImageCache(dataset, size=SIZE).path.parent == tmp_path / "elsewhere" / "images"
    assert ImageCache(dataset, size=SIZE, cache_dir=tmp_path / "mine").path.parent == tmp_path / "mine"


def test_the_cache_may_not_live_inside_the_dataset(dataset: Manifest) -> None:
    with pytest.raises(DatasetError, match="inside the dataset root"):
        ImageCache(dataset, size=SIZE, cache_dir=dataset.root / ".cache")


def test_a_pickled_cache_reopens_its_file_without_carrying_the_data(dataset: Manifest, cache_dir: Path) -> None:
    cache = ImageCache(dataset, size=SIZE, cache_dir=cache_dir)
    cache.build()
    cache[0]  # opens the memory map
    payload = pickle.dumps(cache)
    assert len(payload) < 20_000
    copy = pickle.loads(payload)
    np.testing.assert_array_equal(copy.array(), cache.array())


def test_real_allidb2_at_64px(allidb2_dir: Path, tmp_path: Path) -> None:
    manifest = scan(allidb2_dir, verify=False).manifest
    cache = ImageCache(manifest, size=64, cache_dir=tmp_path / "cache")
    stats = cache.build(workers=2)
    assert (stats.reused, stats.decoded) == (0, len(manifest)) and len(manifest) == 260
    assert cache.array().shape == (260, 64, 64, 3)
    paths = manifest.absolute_paths()
    for i in (0, 77, 259):
        np.testing.assert_array_equal(cache[i], _expected(paths[i], 64))
    assert cache.array().std() > 10  # real pictures, not an empty file
    assert ImageCache(manifest, size=64, cache_dir=tmp_path / "cache").build().reused == 260
