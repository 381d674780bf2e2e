"""`blastscan demo`: the whole pipeline that exists so far, on generated SYNTHETIC cells or on real data.

Each stage writes into the run folder, so the folder describes itself: the data (or where it is), the manifest,
the split, the audit, and a summary that says, for synthetic data, that none of it is real.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blastscan.data.audit import audit, report_summary
from blastscan.data.cache import ImageCache
from blastscan.data.manifest import write_manifest
from blastscan.data.scan import scan
from blastscan.data.splits import make_split, write_splits
from blastscan.data.synthetic import SYNTHETIC_TAG, generate_dataset


@dataclass
class DemoResult:
    """What the demo did and where it put it."""

    run_dir: Path
    synthetic: bool
    data_root: Path
    reader: str
    images: int
    class_counts: dict[str, int]
    split_level: str
    split_counts: dict[str, dict[str, int]]
    audit: dict[str, Any]
    leaks: bool
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        data = asdict(self)
        data["run_dir"], data["data_root"] = str(self.run_dir), str(self.data_root)
        if self.synthetic:
            data = {"WARNING": f"{SYNTHETIC_TAG} data: procedurally drawn cells, not patients", **data}
        return json.dumps(data, indent=2)


def run_demo(
    out: str | Path,
    data: str | Path | None = None,
    seed: int = 0,
    image_size: int = 128,
    stage: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run scan -> split -> audit -> image cache into `out` on `data` (a dataset folder or lab CSV), or on
    synthetic cells.

    `stage` is called with a short description as each stage starts (the CLI shows it).
    """
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    announce = stage or (lambda _: None)
    seconds: dict[str, float] = {}

    def timed(name: str, description: str, work: Callable[[], Any]) -> Any:
        announce(description)
        start = time.perf_counter()
        value = work()
        seconds[name] = round(time.perf_counter() - start, 2)
        return value

    synthetic = data is None
    if synthetic:
        data_root = timed(
            "generate", f"drawing {SYNTHETIC_TAG} smear cells", lambda: generate_dataset(run_dir / "data", seed=seed)
        )
        source: Path = data_root / "labels.csv"
    else:
        source = data_root = Path(data)  # type: ignore[arg-type]
    scanned = timed("scan", f"scanning {source}", lambda: scan(source))
    manifest = scanned.manifest
    write_manifest(manifest, run_dir / "manifest.csv")
    split = timed("split", "splitting by patient or duplicate cluster", lambda: make_split(manifest, seed=seed))
    write_splits(split, run_dir / "splits.csv")
    report = timed("audit", "auditing files, duplicates and the split", lambda: audit(manifest, split))
    (run_dir / "audit.json").write_text(report.model_dump_json(indent=2))
    cache = ImageCache(manifest, size=image_size)
    timed("cache", f"decoding images into the {image_size}px cache", cache.build)

    result = DemoResult(
        run_dir=run_dir,
        synthetic=synthetic,
        data_root=data_root,
        reader=scanned.reader,
        images=len(manifest),
        class_counts=manifest.class_counts(),
        split_level=split.level,
        split_counts={str(k): {str(c): int(v) for c, v in row.items()} for k, row in split.counts().iterrows()},
        audit=report_summary(report),
        leaks=report.leaks,
        seconds=seconds,
        notes=[*scanned.notes, *split.warnings, *report.notes],
    )
    (run_dir / "summary.json").write_text(result.to_json())
    return result
