"""Peak memory and speed of `blastscan predict` on 1,000 and 10,000 image paths: memory must not grow with N.

Trains a tiny custom-CNN run on SYNTHETIC cells (seconds), makes folders of N paths (symbolic links to real
DeepAPL cells from $BLASTSCAN_DATA when present, else to the synthetic cells; nothing is copied), then runs
`blastscan predict RUN FOLDER` for each N in its own process. The process's peak resident memory is reset after
importing blastscan and torch (Linux `clear_refs`), so the figure is the peak while predicting, beside the resident
memory just before (mostly torch).
Writes JSON (default benchmarks/results/predict_memory.json).

    python benchmarks/predict_memory.py [--counts 1000 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from blastscan.data.synthetic import generate_dataset
from blastscan.training.config import parse_config
from blastscan.workflows.train import train

REPO_ROOT = Path(__file__).resolve().parent.parent

_CHILD = """
import json, re, sys, time
from pathlib import Path
from blastscan.workflows.predict import predict

def status_mb(field):
    return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024

Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to now: imports are not counted
before = status_mb("VmRSS")
start = time.perf_counter()
result = predict(sys.argv[1], [sys.argv[2]], sys.argv[3], device="cpu")
print(json.dumps({"scored": result.scored, "seconds": time.perf_counter() - start,
                  "rss_before_mb": before, "peak_rss_mb": status_mb("VmHWM")}))
"""


def _sources(workdir: Path) -> tuple[list[Path], str]:
    data = Path(os.environ.get("BLASTSCAN_DATA", REPO_ROOT.parent / "shared" / "datasets")) / "DeepAPL" / "Data"
    files = sorted(data.rglob("*.jpg"))[:500] if data.is_dir() else []
    if files:
        return files, "DeepAPL cells (360x363 JPEG), linked"
    return sorted((workdir / "data" / "images").rglob("*.png")), "SYNTHETIC cells, linked"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "predict_memory.json")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        generate_dataset(work / "data", n_patients=6, cells_per_patient=10, size=48, seed=0)
        tree = {
            "name": "tiny",
            "runs_dir": str(work / "runs"),
            "data": {"root": str(work / "data" / "labels.csv"), "image_size": 64, "cache_dir": str(work / "cache")},
            "model": {"name": "blastscan_cnn", "pretrained": None, "options": {"widths": [8, 16, 16, 32]}},
            "trainer": {"max_epochs": 1, "batch_size": 16},
        }
        run = train(parse_config(tree), progress_bar=False).run_dir
        sources, kind = _sources(work)
        for count in args.counts:
            folder = work / f"paths-{count}"
            folder.mkdir()
            for i in range(count):
                source = sources[i % len(sources)]
                (folder / f"{i:06d}{source.suffix}").symlink_to(source)
            done = subprocess.run(
                [sys.executable, "-c", _CHILD, str(run), str(folder), str(work / f"predictions-{count}.csv")],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            figures["img_per_s"] = round(figures["scored"] / figures["seconds"], 1)
            results.append({"paths": count, **figures})
            peak, before = figures["peak_rss_mb"], figures["rss_before_mb"]
            print(f"{count:>7} paths: {figures['seconds']:.1f} s, {figures['img_per_s']} img/s, "
                  f"peak RSS while predicting {peak:.0f} MB ({before:.0f} MB before)")  # fmt: skip
    report = {
        "benchmark": "predict_memory",
        "images": kind,
        "model": "blastscan_cnn at 64 px, batch 64, CPU",
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "results": results,
        "peak_rss_ratio_largest_to_smallest": round(results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"], 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"peak RSS ratio {report['peak_rss_ratio_largest_to_smallest']}; wrote {args.out}")


if __name__ == "__main__":
    main()
