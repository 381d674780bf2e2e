"""`scan`: turn a dataset folder into a manifest, checking that every image decodes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from blastscan.data.images import inspect_image
from blastscan.data.manifest import MANIFEST_MAGIC, Manifest, order_columns, read_manifest
from blastscan.data.parallel import threaded_map
from blastscan.data.registry import ReaderOptions, detect_format, get_reader
from blastscan.errors import DatasetError


@dataclass
class BadFile:
    """An image that could not be decoded, and why."""

    path: Path
    reason: str


@dataclass
class ScanResult:
    """The manifest, which reader made it, and what was left out."""

    manifest: Manifest
    reader: str
    auto_detected: bool
    bad_files: list[BadFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _check_images(paths: list[Path], workers: int, progress: Callable[[int], None] | None) -> list[object]:
    """Decode each image (threads: Pillow releases the GIL while decoding); an `ImageInfo` or a `BadFile` each."""

    def check(path: Path) -> object:
        try:
            return inspect_image(path)
        except DatasetError as exc:
            return BadFile(path=path, reason=str(exc).removeprefix(f"{path}: "))

    return threaded_map(check, paths, workers, progress)


def scan(
    root: str | Path,
    format: str = "auto",
    options: ReaderOptions | None = None,
    skip_bad: bool = False,
    verify: bool = True,
    workers: int = 4,
    progress: Callable[[int], None] | None = None,
) -> ScanResult:
    """Read the dataset at `root` into a manifest.

    `format="auto"` recognises the layout. With `verify`, every image is decoded once: unreadable ones raise a
    `DatasetError` that lists all of them, or, with `skip_bad`, are left out and listed in `bad_files`.
    Nothing under `root` is written.
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: no such file or folder; pass the folder that holds the dataset")
    options = options or ReaderOptions()
    if format == "auto":
        reader, located = detect_format(root)
    else:
        reader = get_reader(format)
        located = reader.locate(root)
        if located is None:
            hint = reader.explain_miss(root)
            why = f": {hint}" if hint else f" ({reader.description})"
            raise DatasetError(f"{root}: does not look like the {reader.name} layout{why}")
    result_notes: list[str] = []
    rows = reader.rows(located, options, result_notes)
    image_root = reader.image_root(located, options)
    if not rows:
        raise DatasetError(f"{located}: the {reader.name} layout is there but holds no images")
    table = pd.DataFrame(rows)
    if "dataset" not in table:
        table["dataset"] = reader.name
    if "patient_id" not in table:
        table["patient_id"] = pd.NA
    patient = table["patient_id"].astype("string")
    # Without patient IDs each image starts as its own group; `split` merges duplicates into shared groups.
    table["group_id"] = patient.where(patient.notna() & (patient != ""), table["path"].astype("string"))

    bad: list[BadFile] = []
    if verify:
        infos = _check_images([image_root / p for p in table["path"]], workers, progress)
        good_mask = [not isinstance(i, BadFile) for i in infos]
        bad = [i for i in infos if isinstance(i, BadFile)]
        table["width"] = [getattr(i, "width", pd.NA) for i in infos]
        table["height"] = [getattr(i, "height", pd.NA) for i in infos]
        table["mode"] = [getattr(i, "mode", pd.NA) for i in infos]
        if bad and not skip_bad:
            listed = "; ".join(f"{b.path}: {b.reason}" for b in bad[:5])
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            raise DatasetError(
                f"{len(bad)} unreadable image(s) under {located}: {listed}{more}. "
                "Replace them, or pass --skip-bad to leave them out"
            )
        table = table[good_mask].reset_index(drop=True)
        if table.empty:
            raise DatasetError(f"{image_root}: none of the images could be decoded")
    manifest = Manifest(table=order_columns(table), root=image_root, format=reader.name)
    return ScanResult(
        manifest=manifest, reader=reader.name, auto_detected=format == "auto", bad_files=bad, notes=result_notes
    )


def is_manifest(path: Path) -> bool:
    """Whether `path` is a manifest CSV written by `blastscan data scan` (it starts with the manifest's magic line)."""
    if not path.is_file() or path.suffix.lower() != ".csv":
        return False
    with path.open(encoding="utf-8", errors="replace") as fh:
        return fh.readline().startswith(MANIFEST_MAGIC)


def load_or_scan(root: str | Path, format: str = "auto") -> Manifest:
    """The manifest at `root` if it is one, otherwise the manifest of scanning the dataset (folder or lab CSV) there."""
    root = Path(root)
    if is_manifest(root):
        return read_manifest(root)
    return scan(root, format=format).manifest
