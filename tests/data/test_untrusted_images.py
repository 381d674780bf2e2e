"""Images that claim too many pixels (decompression bombs) get one clean error naming the file, in every command
and every thread, and `--skip-bad` skips them; the limit is one number the user can raise."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from blastscan.cli import app
from blastscan.data.images import MAX_IMAGE_PIXELS, PIXEL_LIMIT_ENV, load_rgb
from blastscan.data.manifest import read_manifest
from blastscan.errors import DatasetError

runner = CliRunner()


def write_bomb(path: Path, width: int, height: int) -> Path:
    """A valid PNG header claiming `width` x `height` pixels, with one tiny IDAT: tiny on disk, huge if decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def _said(result) -> str:
    return " ".join(result.output.split())


def _folder_dataset(root: Path, bombs: int = 0) -> Path:
    rng = np.random.default_rng(0)
    for label in ("all", "hem"):
        (root / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / label / f"cell{i}.png")
    for i in range(bombs):
        write_bomb(root / "all" / f"bomb{i}.png", 12_000, 12_000)
    return root


def test_a_bomb_is_refused_before_decoding_with_the_file_and_the_limit_named(tmp_path: Path) -> None:
    bomb = write_bomb(tmp_path / "bomb.png", 40_000, 40_000)
    with pytest.raises(DatasetError, match=r"bomb\.png: 40000x40000 = 1,600,000,000 pixels") as caught:
        load_rgb(bomb)
    assert PIXEL_LIMIT_ENV in str(caught.value) and f"{MAX_IMAGE_PIXELS:,}" in str(caught.value)


def test_the_limit_is_adjustable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "wide.png"
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(image)
    monkeypatch.setenv(PIXEL_LIMIT_ENV, "500")
    with pytest.raises(DatasetError, match="600 pixels is more than the 500"):
        load_rgb(image)
    monkeypatch.setenv(PIXEL_LIMIT_ENV, "600")
    assert load_rgb(image).shape == (20, 30, 3)
    monkeypatch.setenv(PIXEL_LIMIT_ENV, "lots")
    with pytest.raises(DatasetError, match="not a number of pixels"):
        load_rgb(image)


@pytest.mark.parametrize("attempt", range(4))
def test_scan_refuses_bombs_cleanly_from_every_decoding_thread(tmp_path: Path, attempt: int) -> None:
    root = _folder_dataset(tmp_path / "data", bombs=4)
    result = runner.invoke(app, ["data", "scan", str(root), "--format", "folder", "--out", str(tmp_path / "m.csv")])
    assert (result.exit_code == 2 and result.exception is None) or isinstance(result.exception, SystemExit)
    said = _said(result)
    assert "4 unreadable image(s)" in said and "bomb0.png" in said and "Traceback" not in said
    skipped = runner.invoke(
        app, ["data", "scan", str(root), "--format", "folder", "--skip-bad", "--out", str(tmp_path / "m.csv")]
    )
    assert skipped.exit_code == 0, skipped.output
    assert len(read_manifest(tmp_path / "m.csv")) == 12 and "bomb3.png" in _said(skipped)


def test_cache_and_audit_give_one_line_errors_for_a_file_that_became_a_bomb(tmp_path: Path) -> None:
    root = _folder_dataset(tmp_path / "data")
    manifest = tmp_path / "m.csv"
    assert runner.invoke(app, ["data", "scan", str(root), "--format", "folder", "--out", str(manifest)]).exit_code == 0
    write_bomb(root / "all" / "cell0.png", 40_000, 40_000)
    cache = runner.invoke(app, ["data", "cache", str(manifest), "--size", "32", "--cache-dir", str(tmp_path / "c")])
    assert cache.exit_code == 2 and "cell0.png" in _said(cache) and "decompression bomb" in _said(cache)
    audit = runner.invoke(app, ["data", "audit", str(manifest)])
    assert audit.exit_code in (0, 1) and "cell0.png" in _said(audit)  # listed as unreadable, not a traceback
