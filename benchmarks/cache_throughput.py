"""Images per second: decoding the original files every epoch vs reading the on-disk image cache.

For ALL-IDB2 and DeepAPL, in the same run and alternating passes:
  (a) decode: load_rgb + resize_rgb from the original file, as a naive Dataset does every epoch;
  (b) cache:  read each row of a built ImageCache;
both then turn the image into a float32 (3, size, size) array in [0, 1], as a DataLoader's transform would.
Also measured: the one-off build time, a re-build that finds everything valid, and (b) with the cache file
evicted from the OS page cache first (best effort: posix_fadvise). The source files are read once before timing,
so (a) is not slowed by the disk: the comparison favours the naive path. Everything runs in one process and one
thread per pass; only the build uses --workers threads.

    python benchmarks/cache_throughput.py [--data DIR] [--size 224] [--limit N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import PIL

from blastscan.data.cache import ImageCache
from blastscan.data.images import load_rgb, resize_rgb
from blastscan.data.manifest import Manifest
from blastscan.data.scan import scan

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Dataset folder under --data, and how many images to use when --limit is not given (None: all).
DATASETS: dict[str, tuple[str, int | None]] = {
    "ALL-IDB2": ("ALL_IDB/ALL_IDB2", None),
    "DeepAPL": ("DeepAPL", 1000),
}


@dataclass
class Result:
    dataset: str
    images: int
    size: int
    workers: int
    build_seconds: float
    build_images_per_s: float
    rebuild_check_seconds: float
    decode_images_per_s: float
    cache_images_per_s: float
    cache_cold_images_per_s: float | None
    speedup: float
    cache_bytes: int


def subset(manifest: Manifest, limit: int | None) -> Manifest:
    """`limit` rows spread evenly over the manifest (so every class and patient range is represented)."""
    if limit is None or limit >= len(manifest):
        return manifest
    rows = np.linspace(0, len(manifest) - 1, num=limit).round().astype(int)
    table = manifest.table.iloc[rows].reset_index(drop=True)
    return Manifest(table=table, root=manifest.root, format=manifest.format, metadata=manifest.metadata)


def to_tensor_ready(image: np.ndarray, out: np.ndarray) -> np.ndarray:
    """HWC uint8 -> CHW float32 in [0, 1], written into `out` (what ToTensor does, minus torch)."""
    np.multiply(image.transpose(2, 0, 1), np.float32(1 / 255), out=out)
    return out


def decode_pass(paths: list[Path], size: int) -> float:
    out = np.empty((3, size, size), np.float32)
    start = time.perf_counter()
    for path in paths:
        to_tensor_ready(resize_rgb(load_rgb(path, min_side=size), size), out)
    return len(paths) / (time.perf_counter() - start)


def cache_pass(cache: ImageCache) -> float:
    out = np.empty((3, cache.size, cache.size), np.float32)
    start = time.perf_counter()
    for i in range(len(cache)):
        to_tensor_ready(cache[i], out)
    return len(cache) / (time.perf_counter() - start)


def evict_from_page_cache(path: Path) -> bool:
    """Ask the kernel to drop `path`'s pages from the page cache; False where that cannot be asked."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def measure(name: str, manifest: Manifest, size: int, workers: int, repeats: int, cache_root: Path) -> Result:
    paths = manifest.absolute_paths()
    for path in paths:  # warm the page cache: measure decoding, not the disk
        path.read_bytes()

    cache = ImageCache(manifest, size=size, cache_dir=cache_root / name)
    stats = cache.build(workers=workers)
    check = ImageCache(manifest, size=size, cache_dir=cache_root / name).build(workers=workers)

    decode_rates, cache_rates = [], []
    for _ in range(repeats):  # alternate, so load from other processes hits both alike
        decode_rates.append(decode_pass(paths, size))
        cache_rates.append(cache_pass(cache))

    cold_rates = []
    data_file = cache.path / "data.npy"
    for _ in range(repeats):
        del cache  # mapped pages cannot be evicted
        if not evict_from_page_cache(data_file):
            break
        cache = ImageCache(manifest, size=size, cache_dir=cache_root / name)
        cache.build(workers=workers)  # all rows valid: only stats the sources
        cold_rates.append(cache_pass(cache))
    else:
        del cache

    decode_rate, cache_rate = statistics.median(decode_rates), statistics.median(cache_rates)
    return Result(
        dataset=name,
        images=len(manifest),
        size=size,
        workers=workers,
        build_seconds=round(stats.seconds, 3),
        build_images_per_s=round(stats.decoded / stats.seconds, 1),
        rebuild_check_seconds=round(check.seconds, 4),
        decode_images_per_s=round(decode_rate, 1),
        cache_images_per_s=round(cache_rate, 1),
        cache_cold_images_per_s=round(statistics.median(cold_rates), 1) if cold_rates else None,
        speedup=round(cache_rate / decode_rate, 1),
        cache_bytes=data_file.stat().st_size,
    )


def print_table(results: list[Result]) -> None:
    header = (
        f"{'dataset':<9} {'images':>6} {'size':>4} {'build s':>8} {'build img/s':>11} {'decode img/s':>12} "
        f"{'cache img/s':>11} {'cold img/s':>10} {'cache/decode':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        cold = f"{r.cache_cold_images_per_s:.0f}" if r.cache_cold_images_per_s is not None else "n/a"
        print(
            f"{r.dataset:<9} {r.images:>6} {r.size:>4} {r.build_seconds:>8.2f} {r.build_images_per_s:>11.0f} "
            f"{r.decode_images_per_s:>12.0f} {r.cache_images_per_s:>11.0f} {cold:>10} {r.speedup:>11.1f}x"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("BLASTSCAN_DATA", REPO_ROOT.parent / "shared" / "datasets")),
        help="folder holding ALL_IDB/ and DeepAPL/ (default: $BLASTSCAN_DATA or ../shared/datasets)",
    )
    parser.add_argument("--size", type=int, default=224, help="training resolution (default 224)")
    parser.add_argument(
        "--limit", type=int, default=None, help="images per dataset (default: all of ALL-IDB2, 1000 of DeepAPL)"
    )
    parser.add_argument("--workers", type=int, default=2, help="decoding threads for the build (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of each reader; the median is kept")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "cache_throughput.json")
    args = parser.parse_args(argv)

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = []
    with tempfile.TemporaryDirectory(prefix="blastscan-cache-bench-") as tmp:
        for name, (folder, default_limit) in DATASETS.items():
            root = args.data / folder
            if not root.is_dir():
                print(f"{name}: {root} not found, skipped", file=sys.stderr)
                continue
            manifest = subset(scan(root, verify=False).manifest, args.limit or default_limit)
            results.append(measure(name, manifest, args.size, args.workers, args.repeats, Path(tmp)))
    if not results:
        print(f"no dataset found under {args.data}; pass --data or set BLASTSCAN_DATA", file=sys.stderr)
        return 1

    print_table(results)
    payload = {
        "benchmark": "cache_throughput",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "config": {"size": args.size, "limit": args.limit, "workers": args.workers, "repeats": args.repeats},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pillow": PIL.__version__,
            "platform": platform.platform(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "results": [asdict(r) for r in results],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
