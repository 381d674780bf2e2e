"""How big the slim deployment install is next to the full one: `pip install ".[serve]"` in a fresh venv against
an environment with the full install (by default this repository's .venv, made by `make install`:
`.[full,dev]`; `--full-venv new` builds a fresh `.[full]` venv instead, several GB).

For each: the bytes under site-packages, the number of distributions, whether torch / timm / Lightning are there,
the largest distributions, and the seconds `import blastscan.workflows.serve` takes (what `blastscan serve` loads
before the model). Writes JSON (default benchmarks/results/install_size.json).

    python benchmarks/install_size.py [--full-venv .venv|new] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINING_STACK = ("torch", "timm", "lightning")


def _site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise SystemExit(f"{venv}: no lib/python3*/site-packages; is it a venv?")
    return found[0]


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _make_venv(venv: Path, extra: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", f"{REPO_ROOT}[{extra}]"],
        check=True,
    )
    return time.perf_counter() - started


def measure(venv: Path, label: str) -> dict:
    site = _site_packages(venv)
    listed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True
    )
    names = sorted(row["name"].lower() for row in json.loads(listed.stdout))
    sizes = {child.name: _bytes(child) for child in site.iterdir() if child.is_dir()}
    started = time.perf_counter()
    subprocess.run([str(venv / "bin" / "python"), "-c", "import blastscan.workflows.serve"], check=True)
    return {
        "install": label,
        "venv": str(venv),
        "site_packages_mb": round(_bytes(site) / 1e6, 1),
        "distributions": len(names),
        "training_stack": [name for name in TRAINING_STACK if name in names],
        "largest_mb": {name: round(size / 1e6, 1) for name, size in sorted(sizes.items(), key=lambda x: -x[1])[:8]},
        "import_serve_seconds": round(time.perf_counter() - started, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-venv", default=str(REPO_ROOT / ".venv"), help="an existing full venv, or 'new'")
    parser.add_argument("--keep", type=Path, help="build the venvs here and keep them (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "install_size.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        slim_seconds = _make_venv(root / "slim", "serve")
        slim = {**measure(root / "slim", 'pip install ".[serve]"'), "pip_install_seconds": round(slim_seconds, 1)}
        if args.full_venv == "new":
            full_seconds = _make_venv(root / "full", "full")
            full = {**measure(root / "full", 'pip install ".[full]"'), "pip_install_seconds": round(full_seconds, 1)}
        else:
            full = measure(Path(args.full_venv), "make install (.[full,dev])")
    ratio = round(slim["site_packages_mb"] / full["site_packages_mb"], 3)
    report = {"slim": slim, "full": full, "slim_over_full": ratio}
    for entry in (slim, full):
        print(
            f"{entry['install']:32s} {entry['site_packages_mb']:8.1f} MB  {entry['distributions']:3d} distributions  "
            f"training stack: {entry['training_stack'] or 'none'}  import serve {entry['import_serve_seconds']} s"
        )
    print(f"slim / full = {report['slim_over_full']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
