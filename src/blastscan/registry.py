"""One small registry for every pluggable kind of thing: dataset readers, models, weight sources, stain methods,
losses, schedulers, CAM methods, classifiers and inference backends.

A registry imports nothing: each package's `__init__` imports its plugin modules, and each plugin registers itself
with `@REGISTRY.register("name", **meta)`. Config validation and CLI choices read `names()`, so a new plugin is
one file and nothing else to edit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from blastscan.errors import BlastscanError, ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind, each with optional metadata (a description, defaults, flags)."""

    def __init__(self, kind: str, error: type[BlastscanError] = ConfigError) -> None:
        """`kind` names the entries in messages ("stain method"); `error` is the exception `get` raises."""
        self.kind = kind
        self.error = error
        self._entries: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator: register the decorated class or function as `name`, with `meta`."""

        def add(entry: T) -> T:
            self.add(name, entry, **meta)
            return entry

        return add

    def add(self, name: str, entry: T, **meta: Any) -> None:
        """Register `entry` as `name`; a name is registered once."""
        if name in self._entries:
            raise ValueError(f"a {self.kind} named {name!r} is already registered")
        self._entries[name] = entry
        self._meta[name] = dict(meta)

    def get(self, name: str) -> T:
        """The entry registered as `name`; an unknown name raises `error` listing the choices."""
        try:
            return self._entries[name]
        except KeyError:
            raise self.error(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}") from None

    def meta(self, name: str) -> dict[str, Any]:
        """The metadata `name` was registered with."""
        self.get(name)
        return self._meta[name]

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        """(name, entry) pairs in name order."""
        return ((name, self._entries[name]) for name in self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
