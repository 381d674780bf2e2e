"""Multi-source datasets: several manifests as one, each row remembering its source, each source split on its own.

Sources keep their identity in the manifest's `dataset` column (the reader's dataset name, or `<name>-<folder>` when
two sources share one), patient and group IDs are prefixed with it (two datasets' `Patient_01` are not one
patient), and paths become relative to the sources' common folder. Every source is split by `make_split` on its
own (patient-level where it names patients, duplicate-grouped where it does not), so combining never lets one
source's patient or duplicate straddle splits, and each source keeps its share in train, val and test.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from blastscan.data.manifest import Manifest
from blastscan.data.splits import SplitResult, make_split, manifest_digest
from blastscan.errors import DatasetError


def source_names(manifests: Sequence[Manifest]) -> list[str]:
    """One distinct name per source: its dataset name, with the folder added where two sources share a name."""
    names = []
    for manifest in manifests:
        datasets = sorted(set(manifest.table["dataset"].astype(str)))
        names.append(datasets[0] if len(datasets) == 1 else manifest.format)
    return [
        f"{name}-{m.root.name}" if names.count(name) > 1 else name for name, m in zip(names, manifests, strict=True)
    ]


def _prefixed(values: pd.Series, source: str) -> pd.Series:
    text = values.fillna("").astype(str)
    return text.where(text == "", source + "/" + text)


def combine_manifests(manifests: Sequence[Manifest]) -> Manifest:
    """One manifest holding every row of `manifests`, in order, rooted at their common folder."""
    if len(manifests) < 2:
        raise DatasetError("combining sources needs at least two datasets")
    roots = [m.root.resolve() for m in manifests]
    if len(set(roots)) < len(roots):
        raise DatasetError(f"data.extra_sources: a dataset is listed twice ({', '.join(map(str, roots))})")
    common = Path(os.path.commonpath(roots))
    names = source_names(manifests)
    tables = []
    for manifest, root, name in zip(manifests, roots, names, strict=True):
        table = manifest.table.copy()
        prefix = os.path.relpath(root, common)
        table["path"] = [str(Path(prefix) / p) if prefix != "." else str(p) for p in table["path"]]
        table["dataset"] = name
        table["patient_id"] = _prefixed(table["patient_id"], name)
        table["group_id"] = _prefixed(table["group_id"], name)
        tables.append(table)
    table = pd.concat(tables, ignore_index=True)
    metadata = {"sources": {name: str(root) for name, root in zip(names, roots, strict=True)}}
    return Manifest(table=table, root=common, format="multi-source", metadata=metadata)


def combine_splits(combined: Manifest, splits: Sequence[SplitResult]) -> SplitResult:
    """The split of `combined` made of each source's own split (in the order the sources were combined)."""
    tables = [s.table.drop(columns="path") for s in splits]
    table = pd.concat(tables, ignore_index=True)
    if len(table) != len(combined):
        raise DatasetError(f"the sources' splits hold {len(table)} rows, the combined manifest {len(combined)}")
    names = list(combined.metadata["sources"])
    sizes = [len(s.table) for s in splits]
    source_of_row = np.repeat(names, sizes)
    table.insert(0, "path", combined.table["path"].to_numpy())
    table["group"] = [f"{name}/{group}" for name, group in zip(source_of_row, table["group"].astype(str), strict=True)]
    levels = {name: s.level for name, s in zip(names, splits, strict=True)}
    metadata = {
        "method": "per-source " + str(splits[0].metadata.get("method", "split")),
        "level": "patient" if set(levels.values()) == {"patient"} else "image",
        "source_levels": levels,
        "seed": splits[0].metadata.get("seed"),
        "fractions": splits[0].metadata.get("fractions"),
        "rows": len(table),
        "manifest_format": combined.format,
        "manifest_sha256": manifest_digest(combined),
    }
    warnings = [f"{name}: {w}" for name, s in zip(names, splits, strict=True) for w in s.warnings]
    return SplitResult(table=table, metadata=metadata, warnings=warnings)


def split_sources(
    manifests: Sequence[Manifest], train: float, val: float, test: float, seed: int
) -> tuple[Manifest, SplitResult]:
    """The combined manifest of `manifests` and its split, each source split by `make_split` on its own."""
    combined = combine_manifests(manifests)
    splits = [make_split(m, train, val, test, seed=seed) for m in manifests]
    return combined, combine_splits(combined, splits)


def source_balanced_weights(sources: np.ndarray, targets: np.ndarray, by_class: bool) -> np.ndarray:
    """Per-row sampling weights under which every source is drawn equally often (and, with `by_class`, every class
    within a source equally often too); they sum to 1."""
    frame = pd.DataFrame({"source": np.asarray(sources).astype(str), "target": np.asarray(targets)})
    keys = ["source", "target"] if by_class else ["source"]
    size = frame.groupby(keys)["source"].transform("size").to_numpy(dtype=float)
    cells = frame.groupby("source")["target"].transform("nunique").to_numpy(dtype=float) if by_class else 1.0
    weights = 1.0 / (size * cells)
    return weights / weights.sum()
