"""The service on a real loopback socket for the tests (uvicorn in a background thread), and the tests' limits."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from blastscan.deploy.service import ServiceLimits

MIB = 1024 * 1024
#: Small limits, so that going over them costs the tests a few megabytes, not twenty.
LIMITS = ServiceLimits(max_upload_bytes=4 * MIB, max_file_bytes=3 * MIB, max_files=8, max_image_pixels=20_000_000)


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """`app` under uvicorn on a free loopback port, in a background thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
