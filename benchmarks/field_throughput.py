"""Fields per second of `blastscan analyze` on whole 2592x1944 smear fields, where the time goes, and peak memory.

Stage timing: `analyze` over real ALL-IDB1 2592x1944 fields from $BLASTSCAN_DATA (`--count`, linked, nothing
copied) and `--synthetic` SYNTHETIC 2592x1944 fields drawn by `draw_field`, with the stage clock `analyze` accepts
(the same calls `blastscan analyze` makes, timed where they run). Stages per field: decode (read + checks), find
(the leukocyte finder), crop (cut + prepare the network inputs), score (the network), count, write (cells.csv,
overlay PNG, summary.json, page.html); once per call: setup (network, framing, threshold) and index (summary.csv,
index.html). The first field carries the network's warm-up; fields/s is reported with and without it.

Memory (`--fields N`): a fresh process streams N fields (the available ones repeated, as links) through `analyze`
and reports its peak resident memory (Linux VmHWM: the whole process, torch and the model included) after 1, 10,
25, 50... fields, to show whether it stays flat, and the resident memory after the imports alone. VmHWM, not
`resource.getrusage` ru_maxrss: a child's ru_maxrss starts from its parent's size at fork, which here is this
benchmark's, grown by the stage timing.

A trained run is required (nothing is trained here). Make one with
`blastscan train configs/deepapl_efficientnet_lite0.yaml` (the default model: EfficientNet-Lite0 at 96 px) or
`blastscan train configs/allidb2_efficientnet_lite0.yaml`. Writes JSON (default
benchmarks/results/field_throughput.json).

    python benchmarks/field_throughput.py --run runs/deepapl_efficientnet_lite0 [--count 8] [--synthetic 2]
        [--fields 100] [--device cpu]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blastscan.data.synthetic import draw_field
from blastscan.workflows.analyze import analyze

REPO_ROOT = Path(__file__).resolve().parent.parent
FIELD_SIZE = (2592, 1944)
PER_FIELD = ("decode", "find", "crop", "score", "count", "write")

_CHILD = """
import json, re, sys, time
from pathlib import Path
from blastscan.workflows.analyze import analyze

def status_mb(field):
    return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024

if sys.argv[5] != "default":
    import torch
    torch.set_num_threads(int(sys.argv[5]))
before = status_mb("VmRSS")
peaks = []
start = time.perf_counter()
result = analyze(sys.argv[1], [sys.argv[2]], sys.argv[3], device=sys.argv[4],
                 progress=lambda n: peaks.append(status_mb("VmHWM")))
print(json.dumps({"fields": len(result.rows), "unreadable": len(result.failures),
                  "seconds": time.perf_counter() - start, "rss_after_imports_mb": before,
                  "peak_rss_mb_after_each_field": peaks, "peak_rss_mb": status_mb("VmHWM")}))
"""


class StageTimes:
    """A StageClock that keeps every duration of every stage, in order: wall-clock and this process's CPU time
    (on a shared machine the CPU time shows what the stage itself costs when other work slows the wall clock)."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}
        self.cpu_seconds: dict[str, list[float]] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        began, began_cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds.setdefault(stage, []).append(time.perf_counter() - began)
            self.cpu_seconds.setdefault(stage, []).append(time.process_time() - began_cpu)


def real_fields(count: int) -> list[Path]:
    """`count` ALL-IDB1 fields of 2592x1944, alternately from ALL patients (`_1`: blasts, crowded) and healthy ones
    (`_0`: one or two leukocytes), in name order."""
    folder = Path(os.environ.get("BLASTSCAN_DATA", REPO_ROOT.parent / "shared" / "datasets")) / "ALL_IDB"
    found: dict[bool, list[Path]] = {True: [], False: []}
    for path in sorted((folder / "ALL_IDB1" / "im").glob("*.jpg")):
        with Image.open(path) as image:
            if image.size == FIELD_SIZE:
                found[path.stem.endswith("_1")].append(path)
    mixed = [path for pair in itertools.zip_longest(found[True], found[False]) for path in pair if path is not None]
    return mixed[:count]


def synthetic_fields(count: int, folder: Path) -> list[Path]:
    """`count` SYNTHETIC 2592x1944 fields (red cells 80 px across, as in ALL-IDB1), written as PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        drawn = draw_field(np.random.default_rng(i), *FIELD_SIZE, red_cell_diameter=80.0)
        path = folder / f"SYN-FIELD-{i:03d}.png"
        Image.fromarray(drawn.image).save(path, compress_level=1)
        paths.append(path)
    return paths


def link_all(paths: list[Path], folder: Path, total: int | None = None) -> Path:
    """A folder of links to `paths` (repeated up to `total`), so one `analyze` call reads them all."""
    folder.mkdir(parents=True)
    for i in range(total or len(paths)):
        source = paths[i % len(paths)]
        (folder / f"{i:04d}-{source.stem}{source.suffix}").symlink_to(source.resolve())
    return folder


def stage_report(times: StageTimes, fields: int) -> dict:
    """Per stage: total, per field (mean wall and CPU), share of the per-field time; fields/s with and without the
    first field (which carries the network's warm-up)."""
    per_field = np.array([times.seconds[stage] for stage in PER_FIELD]).T  # (fields, stages)
    cpu = np.array([times.cpu_seconds[stage] for stage in PER_FIELD]).T
    field_seconds = per_field.sum(axis=1)
    total = float(field_seconds.sum())
    stages = {
        stage: {
            "seconds": round(float(per_field[:, i].sum()), 3),
            "ms_per_field": round(1000 * float(per_field[:, i].mean()), 1),
            "cpu_ms_per_field": round(1000 * float(cpu[:, i].mean()), 1),
            "share": round(float(per_field[:, i].sum()) / total, 3),
        }
        for i, stage in enumerate(PER_FIELD)
    }
    after_first = field_seconds[1:] if fields > 1 else field_seconds
    return {
        "fields": fields,
        "setup_s": round(sum(times.seconds["setup"]), 3),
        "index_s": round(sum(times.seconds["index"]), 3),
        "stages": stages,
        "first_field_s": round(float(field_seconds[0]), 3),
        "median_field_s": round(float(statistics.median(field_seconds)), 3),
        "max_field_s": round(float(field_seconds.max()), 3),
        "median_field_cpu_s": round(float(statistics.median(cpu.sum(axis=1))), 3),
        "fields_per_s": round(fields / total, 3),
        "fields_per_s_after_first": round(len(after_first) / float(after_first.sum()), 3),
    }


def time_stages(run: Path, paths: list[Path], work: Path, name: str, device: str) -> dict:
    """`analyze` over `paths` with a stage clock; the figures, printed and returned."""
    times = StageTimes()
    started = time.perf_counter()
    result = analyze(run, [link_all(paths, work / f"in-{name}")], work / f"out-{name}", device=device, clock=times)
    wall = time.perf_counter() - started
    report = {**stage_report(times, len(result.rows)), "wall_s": round(wall, 2)}
    report["cells_per_field"] = round(statistics.mean(row["cells_found"] for row in result.rows), 1)
    print(f"{name}: {report['fields']} fields, {report['cells_per_field']} cells/field; setup {report['setup_s']} s; "
          f"median field {report['median_field_s']} s (first {report['first_field_s']} s); "
          f"{report['fields_per_s_after_first']} fields/s after the first")  # fmt: skip
    for stage, figures in report["stages"].items():
        print(f"  {stage:<7} {figures['ms_per_field']:>8.1f} ms/field  {100 * figures['share']:5.1f}%  "
              f"(CPU {figures['cpu_ms_per_field']:.1f} ms)")  # fmt: skip
    return report


def stream_memory(run: Path, paths: list[Path], work: Path, fields: int, device: str, threads: int | None) -> dict:
    """Peak RSS of a fresh process streaming `fields` fields through `analyze`."""
    folder = link_all(paths, work / "stream", total=fields)
    threads_arg = "default" if threads is None else str(threads)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(run), str(folder), str(work / "out-stream"), device, threads_arg],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["fields_per_s"] = round(figures["fields"] / figures["seconds"], 3)
    peaks = figures.pop("peak_rss_mb_after_each_field")
    figures["peak_rss_mb_after_fields"] = {
        n: peaks[n - 1] for n in (1, 10, 25, 50, 75, 100, len(peaks)) if n <= len(peaks)
    }
    print(f"stream of {figures['fields']} fields: {figures['seconds']:.1f} s ({figures['fields_per_s']} fields/s); "
          f"peak RSS {figures['peak_rss_mb']:.0f} MB ({figures['rss_after_imports_mb']:.0f} MB after imports); "
          f"peak after n fields: {figures['peak_rss_mb_after_fields']}")  # fmt: skip
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="A trained run folder (see the docstring).")
    parser.add_argument("--count", type=int, default=8, help="Real ALL-IDB1 2592x1944 fields to time.")
    parser.add_argument("--synthetic", type=int, default=2, help="SYNTHETIC 2592x1944 fields to time (0: none).")
    parser.add_argument("--fields", type=int, default=0, help="Also stream this many fields and report peak RSS.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for the network (default: torch's, capped at the cores)."
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "field_throughput.json")
    args = parser.parse_args()
    if args.threads is not None:
        # The Predictor keeps torch's thread count when it is already within the usable cores.
        torch.set_num_threads(args.threads)
    report: dict = {
        "benchmark": "field_throughput",
        "run": str(args.run),
        "device": args.device,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg()[0],
        "field_size": list(FIELD_SIZE),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        real = real_fields(args.count)
        if real:
            report["allidb1"] = time_stages(args.run, real, work, "ALL-IDB1", args.device)
        else:
            print("ALL-IDB1 not found under $BLASTSCAN_DATA: real fields skipped")
        synthetic = synthetic_fields(args.synthetic, work / "synthetic") if args.synthetic else []
        if synthetic:
            report["synthetic"] = time_stages(args.run, synthetic, work, "SYNTHETIC", args.device)
        if args.fields:
            report["stream"] = stream_memory(args.run, real or synthetic, work, args.fields, args.device, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
