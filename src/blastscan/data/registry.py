"""One door for dataset readers: each reader module registers itself here, and `scan` picks one.

A reader knows one folder layout. `locate(root)` says where under `root` its layout starts (or None when the
layout is not there), and `rows(located, options, notes)` lists one dict per image, with `path` relative to the
located folder. Adding a dataset means adding one module under `blastscan/data/readers/` whose reader class is
decorated with `@READERS.register(name)`. This module imports no reader: `blastscan.data` imports them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from blastscan.errors import DatasetError
from blastscan.registry import Registry


class ReaderOptions(BaseModel):
    """Options a reader may use; each reader reads only the ones that concern it."""

    model_config = ConfigDict(extra="forbid")

    #: DeepAPL: cell type -> "leukemic", "normal" or "exclude"; None means the reader's default mapping.
    cell_type_labels: dict[str, str] | None = None
    #: C-NMC preliminary-test layout: the labels CSV (found automatically when None).
    labels_csv: Path | None = None
    #: Lab CSV: the folder its relative paths start from (the CSV's own folder when None).
    csv_root: Path | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


class DatasetReader(ABC):
    """A reader for one dataset layout."""

    #: The `--format` name: the name it is registered under in `READERS`.
    name: ClassVar[str]
    #: One line for `--help` and for the message that says which reader `auto` chose.
    description: ClassVar[str]
    #: Generic readers (a lab's folder-per-class) are tried by `auto` only when no specific one matches.
    generic: ClassVar[bool] = False
    #: True for layouts of labelled single-cell images (what `find_cell_datasets` looks for).
    single_cells: ClassVar[bool] = False

    @abstractmethod
    def locate(self, root: Path) -> Path | None:
        """The folder under (or at) `root` where this layout starts, or None when `root` is not this layout."""

    @abstractmethod
    def rows(self, located: Path, options: ReaderOptions, notes: list[str]) -> list[dict[str, Any]]:
        """One dict per image with at least path (relative to `located`), label and patient_id.

        Anything the user should know (images left out, a guess made) is appended to `notes` as a sentence.
        """

    def image_root(self, located: Path, options: ReaderOptions) -> Path:
        """The folder that `rows`' paths are relative to (the manifest's root); `located` unless overridden."""
        return located

    def explain_miss(self, root: Path) -> str | None:
        """When `locate(root)` found nothing but the layout is nearly there: a sentence saying what is missing."""
        return None


#: Every dataset reader, by its `--format` name; each module under `blastscan/data/readers/` registers its
#: reader classes with `@READERS.register(name)`, and `blastscan.data` imports them all.
READERS: Registry[type[DatasetReader]] = Registry("dataset format", error=DatasetError)


def reader_names() -> list[str]:
    """Names accepted by `--format` (besides `auto`)."""
    return READERS.names()


def get_reader(name: str) -> DatasetReader:
    """The reader registered as `name`."""
    if name not in READERS:
        raise DatasetError(f"unknown dataset format {name!r}; choose one of auto, {', '.join(READERS.names())}")
    return READERS.get(name)()


def detect_format(root: Path) -> tuple[DatasetReader, Path]:
    """Pick the reader whose layout `root` has; fails with a message that lists what was found."""
    readers = [get_reader(name) for name in READERS.names()]
    specific = [(r, loc) for r in readers if not r.generic and (loc := r.locate(root)) is not None]
    if len(specific) == 1:
        return specific[0]
    if len(specific) > 1:
        found = "; ".join(f"{loc} ({r.name})" for r, loc in specific)
        raise DatasetError(f"{root}: holds more than one dataset: {found}. Scan one folder at a time or pass --format")
    generic = [(r, loc) for r in readers if r.generic and (loc := r.locate(root)) is not None]
    if generic:
        return generic[0]
    hints = [hint for r in readers if (hint := r.explain_miss(root))]
    if hints:
        raise DatasetError(f"{root}: no known dataset layout found: {'; '.join(hints)}")
    raise DatasetError(
        f"{root}: no known dataset layout found. Expected one of: "
        + "; ".join(f"{r.name}: {r.description}" for r in readers)
        + ". Pass --format to name one"
    )


def find_cell_datasets(data_dir: Path, depth: int = 2) -> list[tuple[str, Path]]:
    """Every labelled single-cell dataset of a known layout at or under `data_dir` (up to `depth` folders down), as
    (reader name, located folder), each once (the deepest folder where it is found), in path order. Generic layouts
    (a lab's folders) are not guessed at: name them explicitly."""
    readers = [get_reader(name) for name in READERS.names()]
    cell_readers = [r for r in readers if r.single_cells and not r.generic]
    folders, frontier = [data_dir], [data_dir]
    for _ in range(depth):
        frontier = [child for folder in frontier for child in sorted(folder.iterdir()) if child.is_dir()]
        folders.extend(frontier)
    found: dict[Path, str] = {}
    for folder in folders:
        for reader in cell_readers:
            located = reader.locate(folder)
            if located is not None:
                found.setdefault(located.resolve(), reader.name)
    # A layout that reads files at any depth (C-NMC) is also "found" at every folder above a copy of it: keep the
    # most specific folder, so one dataset is not counted again from its parents.
    specific = {path: name for path, name in found.items() if not any(path in other.parents for other in found)}
    return sorted(((name, path) for path, name in specific.items()), key=lambda item: str(item[1]))
