"""Mapping a function over files in threads (Pillow and hashlib release the GIL while they work)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def threaded_map(
    function: Callable[[T], R], items: Iterable[T], workers: int = 4, progress: Callable[[int], None] | None = None
) -> list[R]:
    """`[function(item) for item in items]`, computed in `workers` threads, in order; `progress(1)` per item."""
    results: list[R] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(function, items):
            results.append(result)
            if progress is not None:
                progress(1)
    return results
