"""On-disk image cache: decode each image once at the training size, then read it back memory-mapped.

One cache entry holds one manifest's images (in manifest order) at one size and one preprocessing recipe, in a
folder under the cache dir:

    entry.json   what the entry is: size, preprocessing, the absolute source paths (written once)
    data.npy     (N, size, size, 3) uint8, opened with `numpy.lib.format.open_memmap`
    index.json   per row: the source file's fingerprint (st_size, st_mtime_ns) and whether the row is valid

`build` decodes only rows that are not valid or whose source file changed. The index is replaced atomically and
only after the rows it marks valid are flushed, so a build killed half-way never leaves a row marked valid that
was not fully written. Nothing is ever written under the manifest's root.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import operator
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from numpy.lib import format as npformat
from numpy.lib.format import open_memmap

from blastscan.data.images import load_resized
from blastscan.data.manifest import Manifest
from blastscan.errors import DatasetError

try:  # advisory lock so two processes (e.g. DDP ranks) do not build the same entry at once; POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: Environment variable naming blastscan's cache root; image cache entries go in its `images/` folder.
CACHE_ENV = "BLASTSCAN_CACHE"
#: Where entries go when neither `cache_dir` nor $BLASTSCAN_CACHE is given (relative to the working directory).
DEFAULT_CACHE_DIR = Path(".cache") / "blastscan" / "images"
#: Layout of the entry folder; bump when entry.json / index.json / data.npy change meaning.
CACHE_FORMAT = 1
#: Bump when `load_rgb` / `resize_rgb` change the pixels they return: every entry is then rebuilt.
PREPROCESS_VERSION = 1

_CHECKPOINT_SECONDS = 2.0  # how often a long build records its progress in the index


@dataclass(frozen=True)
class CacheStats:
    """What one `build` did: rows reused as they were, rows decoded, and the wall time it took."""

    reused: int
    decoded: int
    seconds: float


def default_cache_dir() -> Path:
    """`$BLASTSCAN_CACHE/images` when the variable is set, else `.cache/blastscan/images` under the working dir."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().absolute() / "images"
    return Path.cwd() / DEFAULT_CACHE_DIR


def preprocessing(size: int) -> dict[str, Any]:
    """The recipe that turns a source file into a cached row; part of the entry's key."""
    return {
        "version": PREPROCESS_VERSION,
        "decode": f"load_rgb(min_side={size})",
        "resize": f"resize_rgb({size}): Pillow LANCZOS, reducing_gap=3.0, squashed to a square",
        # A different Pillow (libjpeg) can decode a few pixel values differently.
        "pillow": PIL.__version__,
    }


def _fingerprint(path: Path) -> list[int]:
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: file not found; re-scan the dataset or fix the manifest's root") from exc
    return [st.st_size, st.st_mtime_ns]


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(payload, fh, separators=(",", ":"))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class ImageCache:
    """A manifest's images decoded once, resized to `size` x `size` (squashed, no crop), kept on disk as uint8.

    `build()` must run before rows can be read; it is cheap when the entry is already complete (one `stat` per
    file). Rows come back as read-only views into the memory-mapped file. The object pickles without its data,
    so it can be handed to DataLoader worker processes.
    """

    def __init__(
        self,
        manifest: Manifest,
        size: int = 224,
        cache_dir: str | Path | None = None,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        transform_key: dict[str, Any] | None = None,
        decode: Callable[[Path], tuple[np.ndarray, bool]] | None = None,
        decode_key: dict[str, Any] | None = None,
    ) -> None:
        """`transform` (e.g. a fitted stain normaliser's `normalize`) runs on each resized row before it is stored;
        `transform_key` describes it (its fitted state) and becomes part of the entry's key.

        `decode`, instead of `load_resized` + `transform`, turns a source file into its (size, size, 3) row and a
        flag (False: the recipe fell back, e.g. no cell was found to frame); `row_flags()` gives the flags back.
        `decode_key` describes it and becomes part of the key."""
        if int(size) != size or size < 1:
            raise ValueError(f"size must be a positive integer, not {size!r}")
        if len(manifest) == 0:
            raise DatasetError("cannot cache an empty manifest: it has no rows")
        if transform is not None and transform_key is None:
            raise ValueError("a cache transform needs a transform_key that describes it (it is part of the key)")
        if decode is not None and (decode_key is None or transform is not None):
            raise ValueError("a cache decode needs a decode_key that describes it, and replaces any transform")
        self.manifest = manifest
        self.size = int(size)
        self.transform = transform
        self.decode = decode
        root = manifest.root.resolve()
        self.sources: list[Path] = [root / p for p in manifest.table["path"]]
        self.cache_dir = Path(cache_dir).expanduser().absolute() if cache_dir is not None else default_cache_dir()
        resolved = self.cache_dir.resolve()
        if resolved == root or root in resolved.parents:
            raise DatasetError(
                f"{self.cache_dir}: the image cache may not live inside the dataset root {root}; "
                f"pass another cache_dir or set ${CACHE_ENV}"
            )
        self._entry = {
            "format": CACHE_FORMAT,
            "size": self.size,
            "preprocessing": preprocessing(self.size),
            **({"transform": transform_key} if transform_key is not None else {}),
            **({"decode": decode_key} if decode_key is not None else {}),
            "paths": [str(p) for p in self.sources],
        }
        self.key = hashlib.sha256(json.dumps(self._entry, sort_keys=True).encode("utf-8")).hexdigest()
        self.path: Path = self.cache_dir / f"{self.size}px-{len(self.sources)}img-{self.key[:20]}"
        self._built = False
        self._memmap: np.memmap | None = None
        self._rows: np.ndarray | None = None
        self._flags: list[bool] | None = None

    # -- reading -------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> np.ndarray:
        """Row `index` as a read-only (size, size, 3) uint8 view into the memory map; IndexError past the end."""
        self._open_for_reading()
        assert self._rows is not None
        return self._rows[operator.index(index)]

    def __iter__(self) -> Iterator[np.ndarray]:
        self._open_for_reading()
        assert self._rows is not None
        return iter(self._rows)

    def array(self) -> np.ndarray:
        """The whole (N, size, size, 3) uint8 memory map, read-only."""
        self._open_for_reading()
        assert self._memmap is not None
        return self._memmap

    def row_flags(self) -> np.ndarray:
        """(N,) bool: per row, whether its decode recipe did all it meant to (always True without `decode`)."""
        self._open_for_reading()
        assert self._flags is not None
        return np.asarray(self._flags, dtype=bool)

    def __repr__(self) -> str:
        state = "built" if self._built else "not built"
        return f"ImageCache({len(self)} images, {self.size}px, {state}, {self.path})"

    def __getstate__(self) -> dict[str, Any]:
        # A pickled np.memmap carries all its data; workers reopen the file instead.
        state = self.__dict__.copy()
        state["_memmap"] = None
        state["_rows"] = None
        state["transform"] = None  # readers never decode, so workers need no transform
        state["decode"] = None
        return state

    def _open_for_reading(self) -> None:
        if self._rows is not None:
            return
        if not self._built:
            raise DatasetError(
                f"image cache {self.path} ({len(self)} images at {self.size}px) is not built; call build() first"
            )
        try:
            self._memmap = open_memmap(self._data_path, mode="r")
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{self._data_path}: cannot read the image cache ({exc}); call build() again") from exc
        if self._memmap.shape != self._shape or self._memmap.dtype != np.uint8:
            raise DatasetError(f"{self._data_path}: the image cache changed on disk; call build() again")
        self._rows = np.asarray(self._memmap)  # plain ndarray view: indexing it is cheaper than a memmap's

    # -- building ------------------------------------------------------------------------------------------------

    def build(self, workers: int = 2, progress: Callable[[int], None] | None = None) -> CacheStats:
        """Decode the rows that are missing or whose source file changed; reuse the others.

        `progress`, if given, is called with a count of finished rows: once with the number reused, then once per
        decoded row, so the counts add up to `len(self)`. A file that cannot be decoded raises a `DatasetError`
        naming it; rows finished before the error stay valid for the next build.
        """
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers!r}")
        start = time.perf_counter()
        self._close()
        self._built = False
        self.path.mkdir(parents=True, exist_ok=True)
        with self._lock():
            entry_file = self.path / "entry.json"
            if not entry_file.is_file():
                _write_json_atomic(entry_file, self._entry)
            data, fresh = self._open_for_writing()
            fingerprints = [_fingerprint(p) for p in self.sources]
            stored = None if fresh else self._read_index()
            if stored is None:
                valid = [False] * len(self)
                recorded: list[list[int] | None] = [None] * len(self)
                flags = [True] * len(self)
            else:
                recorded, stored_valid, flags = stored
                valid = [v and r == f for v, r, f in zip(stored_valid, recorded, fingerprints, strict=True)]
            todo = [i for i, ok in enumerate(valid) if not ok]
            reused = len(self) - len(todo)
            if progress is not None and reused:
                progress(reused)
            if todo:
                # Rows about to be overwritten must not stay marked valid should this build be killed.
                if stored is None or valid != stored[1]:
                    self._write_index(recorded, valid, flags)
                self._decode_rows(data, todo, fingerprints, recorded, valid, flags, workers, progress)
            del data
        self._flags = flags
        self._built = True
        return CacheStats(reused=reused, decoded=len(todo), seconds=time.perf_counter() - start)

    def _decode_rows(
        self,
        data: np.memmap,
        todo: list[int],
        fingerprints: list[list[int]],
        recorded: list[list[int] | None],
        valid: list[bool],
        flags: list[bool],
        workers: int,
        progress: Callable[[int], None] | None,
    ) -> None:
        size = self.size

        def decode(i: int) -> None:
            # Pillow releases the GIL while decoding and resizing, so threads decode in parallel.
            if self.decode is not None:
                data[i], flags[i] = self.decode(self.sources[i])
                return
            row = load_resized(self.sources[i], size)
            data[i] = self.transform(row) if self.transform is not None else row

        def checkpoint() -> None:
            data.flush()
            self._write_index(recorded, valid, flags)

        last = time.monotonic()
        pool = ThreadPoolExecutor(max_workers=workers)
        futures: dict[Future[None], int] = {}
        try:
            futures = {pool.submit(decode, i): i for i in todo}
            for future in as_completed(futures):
                future.result()
                i = futures[future]
                recorded[i], valid[i] = fingerprints[i], True
                if progress is not None:
                    progress(1)
                if time.monotonic() - last > _CHECKPOINT_SECONDS:
                    checkpoint()
                    last = time.monotonic()
        finally:
            # On success, or on an error / Ctrl-C: stop, wait for running decodes, keep what was finished.
            for future in futures:
                future.cancel()
            pool.shutdown(wait=True)
            checkpoint()

    def _open_for_writing(self) -> tuple[np.memmap, bool]:
        """The entry's data file opened read-write, and whether it was (re)created empty."""
        if self._data_file_is_whole():
            return open_memmap(self._data_path, mode="r+"), False
        # The index must go first: it may not outlive the rows it describes.
        self._index_path.unlink(missing_ok=True)
        self._data_path.unlink(missing_ok=True)
        needed = int(np.prod(self._shape))
        free = shutil.disk_usage(self.path).free
        if free < needed:
            raise DatasetError(
                f"{self.path}: the image cache needs {needed / 1e9:.2f} GB and only {free / 1e9:.2f} GB are free; "
                f"pass another cache_dir or set ${CACHE_ENV}"
            )
        data = open_memmap(self._data_path, mode="w+", dtype=np.uint8, shape=self._shape)
        if hasattr(os, "posix_fallocate"):
            # Reserve the blocks now: a memory-mapped write that hits a full disk kills the process (SIGBUS).
            with self._data_path.open("r+b") as fh:
                try:
                    os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                        return data, True  # the filesystem cannot reserve space; the free-space check must do
                    del data
                    self._data_path.unlink(missing_ok=True)
                    raise DatasetError(
                        f"{self._data_path}: no room for the image cache ({exc}); pass another cache_dir or set "
                        f"${CACHE_ENV}"
                    ) from exc
        return data, True

    def _data_file_is_whole(self) -> bool:
        """True when data.npy has this entry's header and its full length (r+ would silently zero-extend it)."""
        try:
            with self._data_path.open("rb") as fh:
                version = npformat.read_magic(fh)
                read_header = {(1, 0): npformat.read_array_header_1_0, (2, 0): npformat.read_array_header_2_0}
                if version not in read_header:
                    return False
                shape, fortran, dtype = read_header[version](fh)
                offset = fh.tell()
                length = os.fstat(fh.fileno()).st_size
        except (OSError, ValueError):
            return False  # missing, truncated inside the header, or not a .npy file
        expected = (tuple(shape), bool(fortran), np.dtype(dtype)) == (self._shape, False, np.dtype(np.uint8))
        return expected and length == offset + int(np.prod(self._shape))

    def _read_index(self) -> tuple[list[list[int] | None], list[bool], list[bool]] | None:
        """The stored fingerprints, valid flags and row flags, or None when the index is missing or not this
        entry's."""
        try:
            index = json.loads(self._index_path.read_text(encoding="utf-8"))
            if index["format"] != CACHE_FORMAT or index["key"] != self.key:
                return None
            recorded, valid = index["fingerprints"], [bool(v) for v in index["valid"]]
            flags = [bool(v) for v in index.get("flags", [1] * len(valid))]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # the cache is disposable: an unreadable index means rebuild
        if not len(recorded) == len(valid) == len(flags) == len(self):
            return None
        return recorded, valid, flags

    def _write_index(self, recorded: list[list[int] | None], valid: list[bool], flags: list[bool]) -> None:
        _write_json_atomic(
            self._index_path,
            {
                "format": CACHE_FORMAT,
                "key": self.key,
                "fingerprints": recorded,
                "valid": [int(v) for v in valid],
                "flags": [int(v) for v in flags],
            },
        )

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        if fcntl is None:  # pragma: no cover - Windows
            yield
            return
        with (self.path / "lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _close(self) -> None:
        self._memmap = None
        self._rows = None

    @property
    def _shape(self) -> tuple[int, int, int, int]:
        return (len(self), self.size, self.size, 3)

    @property
    def _data_path(self) -> Path:
        return self.path / "data.npy"

    @property
    def _index_path(self) -> Path:
        return self.path / "index.json"
