"""Mapping a function over files in threads (Pillow and hashlib release the GIL while they work)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: Jobs queued per worker at most: `ThreadPoolExecutor.map` would queue every item up front (about 1.7 KB each, so
#: 1.7 GB for a million files); a bounded window keeps memory flat and the workers busy.
_QUEUED_PER_WORKER = 16


def threaded_map(
    function: Callable[[T], R], items: Iterable[T], workers: int = 4, progress: Callable[[int], None] | None = None
) -> list[R]:
    """`[function(item) for item in items]`, computed in `workers` threads, in order; `progress(1)` per item."""
    results: list[R] = []
    window = max(1, workers) * _QUEUED_PER_WORKER
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= window:
                results.append(pending.popleft().result())
                if progress is not None:
                    progress(1)
        while pending:
            results.append(pending.popleft().result())
            if progress is not None:
                progress(1)
    return results
