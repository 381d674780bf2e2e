"""Requests per second and latency of the HTTP service under 100 concurrent clients, and its memory across requests.

The service runs in a subprocess exactly as it would be deployed (`open_analyzer(run)` -> `create_app` -> uvicorn on
a loopback port, default limits, the access log unconfigured). The benchmark's clients run in this process on
asyncio (one httpx.AsyncClient, one connection per client), so on a small machine they share its cores with the
server: the figures are for client and server on one host.

Phases, each `--seconds` long with `--clients` clients sending back to back (a request begun before the end is
waited for and counted):
  cells   POST /v1/cells, one cell crop per request (a real ALL-IDB2 crop from $BLASTSCAN_DATA, else a SYNTHETIC
          cell)
  fields  POST /v1/fields, one smear field per request (`--field` path, else a SYNTHETIC 640x480 field drawn by
          `draw_field`; a 2592x1944 ALL-IDB1 field takes about a second of CPU each)
Per phase: requests, errors (non-200 or a broken connection), requests/s, latency p50/p95/p99/max in ms. Memory:
the server's resident memory (VmRSS in /proc/<pid>/status) once the model is loaded, after a warm-up, and after the
load phases plus cell requests topping them up to at least `--rss-requests`; and its peak (VmHWM). Writes JSON
(default benchmarks/results/service_load.json).

A trained model is required (nothing is trained here): a run folder, or the export folder `blastscan export` makes
of one (what a laboratory deploys; it runs on ONNX Runtime).

    python benchmarks/service_load.py --run runs/<run> [--seconds 20] [--clients 100] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from blastscan.data.synthetic import draw_cell, draw_field

REPO_ROOT = Path(__file__).resolve().parent.parent

_SERVER = """
import sys
import uvicorn
from blastscan.deploy.service import create_app
from blastscan.workflows.analyze import open_analyzer

analyzer, card = open_analyzer(sys.argv[1], device=sys.argv[2])
uvicorn.run(create_app(analyzer, card), host="127.0.0.1", port=int(sys.argv[3]), log_level="warning",
            access_log=False)
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _memory_mb(pid: int, field: str = "VmRSS") -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return round(int(re.search(field + r":\s+(\d+) kB", text).group(1)) / 1024, 1)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def cell_upload() -> tuple[str, bytes, str]:
    """(file name, bytes, what it is) of the crop every cell request sends."""
    data = Path(os.environ.get("BLASTSCAN_DATA", REPO_ROOT.parent / "shared" / "datasets"))
    crops = sorted((data / "ALL_IDB" / "ALL_IDB2" / "img").glob("*.tif"))
    if crops:
        return crops[0].name, crops[0].read_bytes(), "real ALL-IDB2 crop (257x257 TIFF)"
    image = draw_cell("blast", np.random.default_rng(0), size=128)
    return "SYNTHETIC-cell.png", _png(image), "SYNTHETIC cell (128x128 PNG)"


def field_upload(path: Path | None) -> tuple[str, bytes, str]:
    """(file name, bytes, what it is) of the field every field request sends."""
    if path is not None:
        with Image.open(path) as probe:
            size = f"{probe.width}x{probe.height}"
        return path.name, path.read_bytes(), f"{path.name} ({size})"
    field = draw_field(np.random.default_rng(0), 640, 480, kinds=["blast", "lymphocyte", "neutrophil"])
    return "SYNTHETIC-field.png", _png(field.image), "SYNTHETIC field (640x480 PNG)"


def _summary(latencies: list[float], errors: int, seconds: float) -> dict[str, Any]:
    ms = sorted(1000 * t for t in latencies)

    def percentile(q: float) -> float | None:
        return round(ms[min(len(ms) - 1, int(q * len(ms)))], 1) if ms else None

    return {
        "requests": len(latencies) + errors,
        "ok": len(latencies),
        "errors": errors,
        "seconds": round(seconds, 2),
        "requests_per_s": round(len(latencies) / seconds, 2),
        "p50_ms": percentile(0.50),
        "p95_ms": percentile(0.95),
        "p99_ms": percentile(0.99),
        "max_ms": percentile(1.0),
        "mean_ms": round(statistics.fmean(ms), 1) if ms else None,
    }


async def load(
    url: str, path: str, upload: tuple[str, str, bytes], clients: int, seconds: float, count: int = 0
) -> dict[str, Any]:
    """`clients` clients sending `upload` ((form field, file name, bytes)) to `path` back to back for `seconds`, or
    until `count` requests in all have been sent; their figures (`_summary`)."""
    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    started = time.perf_counter()
    deadline = started + seconds
    issued = 0

    def more() -> bool:
        return issued < count if count else time.perf_counter() < deadline

    async def client(session: httpx.AsyncClient) -> None:
        nonlocal issued
        field, name, data = upload
        while more():
            issued += 1
            begun = time.perf_counter()
            try:
                answer = await session.post(path, files={field: (name, data)})
            except httpx.HTTPError as exc:
                errors.append(type(exc).__name__)
                continue
            if answer.status_code == 200:
                latencies.append(time.perf_counter() - begun)
            else:
                errors.append(str(answer.status_code))

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    report = _summary(latencies, len(errors), time.perf_counter() - started)
    if errors:
        report["error_kinds"] = sorted(set(errors))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="A run folder or an export folder (blastscan export).")
    parser.add_argument("--seconds", type=float, default=20.0, help="Length of each load phase.")
    parser.add_argument("--clients", type=int, default=100, help="Concurrent clients.")
    parser.add_argument("--rss-requests", type=int, default=1000, help="Requests between the two RSS readings.")
    parser.add_argument("--field", type=Path, default=None, help="The field image to send (default: SYNTHETIC).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "service_load.json")
    args = parser.parse_args()

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-c", _SERVER, str(args.run), args.device, str(port)])
    try:
        opened = time.perf_counter()
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the service exited with status {server.returncode}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        cell_name, cell_data, cell_kind = cell_upload()
        field_name, field_data, field_kind = field_upload(args.field)
        cells = ("files", cell_name, cell_data)
        fields = ("file", field_name, field_data)
        report: dict[str, Any] = {
            "benchmark": "service_load",
            "run": str(args.run),
            "device": args.device,
            "model": httpx.get(f"{url}/v1/model").json().get("model"),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg()[0],
            "clients": args.clients,
            "seconds_per_phase": args.seconds,
            "cell_upload": cell_kind,
            "field_upload": field_kind,
            "startup_s": round(time.perf_counter() - opened, 2),
        }
        memory = {"rss_mb_loaded": _memory_mb(server.pid)}
        asyncio.run(load(url, "/v1/cells", cells, 8, 0, count=40))  # warm-up: first calls, thread pools, caches
        asyncio.run(load(url, "/v1/fields", fields, 2, 0, count=4))
        memory["rss_mb_before"] = _memory_mb(server.pid)
        done = 0
        for name, upload, path in (("cells", cells, "/v1/cells"), ("fields", fields, "/v1/fields")):
            report[name] = asyncio.run(load(url, path, upload, args.clients, args.seconds))
            done += report[name]["requests"]
            memory[f"rss_mb_after_{name}"] = _memory_mb(server.pid)
            figures = report[name]
            print(f"{name:<6} {figures['requests_per_s']:>7.1f} req/s  p50 {figures['p50_ms']} ms  p95 "
                  f"{figures['p95_ms']} ms  p99 {figures['p99_ms']} ms  errors {figures['errors']}")  # fmt: skip
        if done < args.rss_requests:
            report["top_up"] = asyncio.run(load(url, "/v1/cells", cells, args.clients, 0, args.rss_requests - done))
            done += report["top_up"]["requests"]
        memory.update(
            requests_between=done, rss_mb_after=_memory_mb(server.pid), peak_rss_mb=_memory_mb(server.pid, "VmHWM")
        )
        report["memory"] = memory
        print(f"server RSS: {memory['rss_mb_loaded']} MB loaded, {memory['rss_mb_before']} MB after warm-up, "
              f"{memory['rss_mb_after']} MB after {done} more requests (peak {memory['peak_rss_mb']} MB)")  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
