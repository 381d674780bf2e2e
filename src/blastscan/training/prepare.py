"""Everything a run needs before the first step: manifest, split (audited), class targets, image cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blastscan.data.audit import AuditReport, audit
from blastscan.data.cache import ImageCache
from blastscan.data.crop_sources import CropSource, field_images, locate_crop_sources
from blastscan.data.manifest import Manifest, class_targets
from blastscan.data.parallel import threaded_map
from blastscan.data.scan import load_or_scan
from blastscan.data.sources import split_sources
from blastscan.data.splits import SplitResult, make_split, read_splits
from blastscan.errors import ConfigError, TrainingError
from blastscan.imaging.cell_focus import CellFocus
from blastscan.imaging.preprocess import prepare_image, prepared_cache
from blastscan.imaging.stain import create_stain_method, foreground_mask
from blastscan.training.config import TrainConfig

SPLITS = ("train", "val", "test")


@dataclass
class PreparedData:
    """A run's data: the manifest, its audited split, class targets (1 = positive label) and the cache."""

    manifest: Manifest
    splits: SplitResult
    audit: AuditReport
    targets: np.ndarray
    split_rows: dict[str, np.ndarray]
    cache: ImageCache
    stain_state: dict | None
    crop_sources: list[CropSource] | None = None  # where every crop was cut from (with data.leave_out_fields)

    def class_counts(self, split: str = "train") -> list[int]:
        """Images of class 0 and class 1 in `split`."""
        counts = np.bincount(self.targets[self.split_rows[split]], minlength=2)
        return [int(c) for c in counts]


def _split_rows(splits: SplitResult) -> dict[str, np.ndarray]:
    names = splits.table["split"].astype(str).to_numpy()
    unknown = sorted(set(names) - set(SPLITS))
    if unknown:
        raise ConfigError(f"the split file has splits {unknown}; training needs train/val/test (not --folds)")
    return {name: np.flatnonzero(names == name) for name in SPLITS}


def _check_classes(targets: np.ndarray, rows: dict[str, np.ndarray], positive_label: str) -> None:
    for split in ("train", "val"):
        counts = np.bincount(targets[rows[split]], minlength=2)
        for cls, count in enumerate(counts):
            if count == 0:
                name = positive_label if cls == 1 else f"not {positive_label}"
                raise TrainingError(
                    f"the {split} split has no images of class {cls} ({name}); re-split with another seed or "
                    "other fractions, or add data"
                )


def _reference_image(
    manifest: Manifest, rows: np.ndarray, size: int, focus: CellFocus, workers: int, limit: int = 64
) -> np.ndarray:
    """The training image whose mean foreground colour is nearest the median: a typical stain to normalise to.

    Images are prepared as the cache prepares them but never with a `mask` focus's neutral fill (the stain is
    fitted on the cell and its real surround; the fill comes after normalisation)."""
    fit_focus = CellFocus("crop", focus.margin) if focus.mode == "mask" else focus
    paths = manifest.absolute_paths()
    sample = rows[np.linspace(0, len(rows) - 1, min(limit, len(rows))).astype(int)]
    images = threaded_map(lambda row: prepare_image(paths[int(row)], size, None, fit_focus), sample, workers)
    colours = []
    for image in images:
        mask = foreground_mask(image)
        colours.append(image[mask].mean(axis=0) if mask.any() else np.full(3, np.inf))
    colours_array = np.array(colours)
    median = np.median(colours_array[np.isfinite(colours_array).all(axis=1)], axis=0)
    return images[int(np.argmin(np.linalg.norm(colours_array - median, axis=1)))]


def focus_note(focus: CellFocus, cache: ImageCache, rows: dict[str, np.ndarray]) -> str | None:
    """How many images of each split had no cell to frame (and were used whole), or None without a cell focus."""
    if not focus.active:
        return None
    missed = ~cache.row_flags()
    counts = ", ".join(f"{split} {int(missed[r].sum())} of {len(r)}" for split, r in rows.items())
    return f"cell focus ({focus.mode}): no cell found, so the image was used whole, in {counts}"


def _without_rows(
    config: TrainConfig, manifest: Manifest, splits: SplitResult | None, keep: np.ndarray, key: str, dropped: list[str]
) -> tuple[Manifest, SplitResult]:
    """The manifest without the rows `keep` is False for (`dropped` recorded under `key` in its metadata), and its
    split: the split file's rows kept, or a split made afresh from the reduced manifest."""
    reduced = Manifest(
        table=manifest.table[keep].reset_index(drop=True),
        root=manifest.root,
        format=manifest.format,
        metadata={**manifest.metadata, key: dropped},
    )
    if config.data.splits and splits is not None:
        kept_splits = SplitResult(
            table=splits.table[keep].reset_index(drop=True),
            metadata={**splits.metadata, "rows": int(keep.sum()), key: dropped},
            warnings=splits.warnings,
        )
    else:
        split_cfg = config.data.split
        kept_splits = make_split(reduced, split_cfg.train, split_cfg.val, split_cfg.test, seed=split_cfg.seed)
    return reduced, kept_splits


def _drop_label_conflicts(
    config: TrainConfig, manifest: Manifest, splits: SplitResult, report: AuditReport
) -> tuple[Manifest, SplitResult]:
    """Without `data.drop_label_conflicts`, refuse a manifest where one image carries two labels; with it, the
    manifest and split without every row of such an image (which label is right cannot be known)."""
    conflicts = report.label_conflicts
    named = "; ".join(f"{c.first} and {c.second} ({c.kind}, distance {c.distance:g})" for c in conflicts[:5])
    more = f"; and {len(conflicts) - 5} more" if len(conflicts) > 5 else ""
    if not config.data.drop_label_conflicts:
        raise TrainingError(
            f"{len(conflicts)} pair(s) of duplicate images carry different labels, so the run would learn both "
            f"answers for one picture: {named}{more}. Fix the labels (see `blastscan data audit`), or set "
            "data.drop_label_conflicts: true to leave these images out"
        )
    dropped = sorted({c.first for c in conflicts} | {c.second for c in conflicts})
    keep = ~manifest.table["path"].astype(str).isin(dropped).to_numpy()
    return _without_rows(config, manifest, splits, keep, "dropped_label_conflicts", dropped)


def _crops_from_fields(config: TrainConfig, manifest: Manifest, workers: int) -> tuple[np.ndarray, list[CropSource]]:
    """Where every manifest image was cut from among the fields of `data.fields_root`, and which rows to keep: those
    not cut from a field of `data.leave_out_fields`."""
    left_out = {p.name for p in config.data.left_out_field_paths()}  # checked first: a wrong name fails at once
    sources = locate_crop_sources(
        manifest.absolute_paths(), field_images(config.data.resolved_fields_root()), workers=workers
    )
    keep = np.array([s.field not in left_out for s in sources], dtype=bool)
    return keep, sources


def _multi_source(config: TrainConfig) -> tuple[Manifest, SplitResult]:
    """The combined manifest of `data.root` and `data.extra_sources` and its per-source split (or `data.splits`)."""
    if config.data.leave_out_fields:
        raise ConfigError(
            "data.leave_out_fields works on one ALL-IDB2 source; it cannot be combined with extra_sources"
        )
    manifests = [
        load_or_scan(root, config.data.format if i == 0 else "auto")
        for i, root in enumerate(config.data.resolved_sources())
    ]
    split_cfg = config.data.split
    manifest, splits = split_sources(manifests, split_cfg.train, split_cfg.val, split_cfg.test, split_cfg.seed)
    if config.data.splits:
        splits = read_splits(Path(config.data.splits).expanduser(), manifest)
    return manifest, splits


def prepare_data(config: TrainConfig, workers: int = 2) -> PreparedData:
    """Load or scan the dataset, load or make the split, audit it (a leak stops the run), fill the cache."""
    split_cfg = config.data.split
    if config.data.extra_sources:
        manifest, splits = _multi_source(config)
    else:
        manifest = load_or_scan(config.data.resolved_root(), config.data.format)
        splits = read_splits(Path(config.data.splits).expanduser(), manifest) if config.data.splits else None
    sources = None
    if config.data.leave_out_fields:
        keep, sources = _crops_from_fields(config, manifest, workers)
        left_out = manifest.table["path"].astype(str)[~keep].tolist()
        manifest, splits = _without_rows(config, manifest, splits, keep, "left_out_field_crops", left_out)
    if splits is None:
        splits = make_split(manifest, split_cfg.train, split_cfg.val, split_cfg.test, seed=split_cfg.seed)
    report = audit(manifest, splits)
    if report.label_conflicts:
        manifest, splits = _drop_label_conflicts(config, manifest, splits, report)
        dropped = manifest.metadata["dropped_label_conflicts"]
        report = audit(manifest, splits)
        report.notes.append(
            f"left out {len(dropped)} image(s) whose duplicates carry another label (data.drop_label_conflicts): "
            + ", ".join(dropped)
        )
    if sources is not None:
        left_out, located = manifest.metadata["left_out_field_crops"], sum(s.field is not None for s in sources)
        report.notes.append(
            f"left out {len(left_out)} image(s) cut from the smear field(s) {', '.join(config.data.leave_out_fields)} "
            f"(data.leave_out_fields; {located} of {len(sources)} images were located in a field, the run folder "
            "records where)"
        )
    if report.leaks:
        raise TrainingError(
            f"the split leaks ({len(report.patient_leaks)} patient(s) and {len(report.duplicate_leaks)} duplicate "
            "pair(s) straddle splits; see `blastscan data audit`); no result from it would be honest"
        )
    targets = class_targets(manifest, config.data.positive_label)
    rows = _split_rows(splits)
    _check_classes(targets, rows, config.data.positive_label)

    size, cache_dir, focus = config.data.image_size, config.data.cache_dir, config.data.focus()
    normalizer, stain_state = None, None
    if config.data.stain_normalization != "none":
        normalizer = create_stain_method(config.data.stain_normalization)
        normalizer.fit(_reference_image(manifest, rows["train"], size, focus, workers))
        stain_state = normalizer.to_dict()
    cache = prepared_cache(manifest, size, normalizer, stain_state, cache_dir, workers, focus)
    note = focus_note(focus, cache, rows)
    if note is not None:
        report.notes.append(note)
    return PreparedData(manifest, splits, report, targets, rows, cache, stain_state, sources)
