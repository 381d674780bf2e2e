"""Listing the image files of a dataset folder: which are read, which are left out and why, and one file twice.

Readers that walk folders use this so that every layout treats links and stray files the same way:
- a link to a folder is never followed (a link such as `leukemic/up -> ..` would read the other class's images
  under this class's label); it is left out and listed;
- a link to a file is read when the file it points to lies inside the dataset, and left out otherwise;
- a file whose type blastscan does not read (an animated GIF, a text file) is left out and listed;
- hidden files (`.DS_Store`, `._x.png`) are ignored without a note.
`one_row_per_file` then identifies each image by its real path: one file reached twice under one label is kept
once, and one file reached under two labels is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blastscan.data.images import IMAGE_SUFFIXES
from blastscan.errors import DatasetError

#: How many left-out files a note names before it only counts the rest.
NAMED_IN_NOTE = 5


@dataclass
class Listing:
    """Image files found under a folder (sorted, as reached), and the files left out with the reason for each."""

    images: list[Path] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def real_path(path: Path) -> Path:
    """`path` with every link resolved (the file that is actually read)."""
    return Path(os.path.realpath(path))


def is_inside(path: Path, folders: list[Path]) -> bool:
    """Whether `path` (already real) lies inside one of `folders` (already real)."""
    return any(path == folder or path.is_relative_to(folder) for folder in folders)


def list_folder(folder: Path, inside: list[Path], recursive: bool = False) -> Listing:
    """The image files in `folder` (and, with `recursive`, below it), without following links to folders.

    Sub-folders that are not links are returned in `folders` (or walked into, with `recursive`). A link to a file is
    read only when its real path lies inside one of `inside` (the dataset's real folders).
    """
    listing = Listing()
    _walk(folder, inside, recursive, listing)
    return listing


def _walk(folder: Path, inside: list[Path], recursive: bool, listing: Listing) -> None:
    with os.scandir(folder) as entries:
        ordered = sorted(entries, key=lambda e: e.name)
    for entry in ordered:
        path = folder / entry.name
        if entry.name.startswith("."):
            continue
        link = entry.is_symlink()
        if entry.is_dir():
            if link:
                listing.skipped.append((path, f"a link to a folder ({os.readlink(path)}), not followed"))
            elif recursive:
                _walk(path, inside, recursive, listing)
            else:
                listing.folders.append(path)
        elif not entry.is_file():
            reason = "a broken link" if link else "not a regular file"
            listing.skipped.append((path, reason))
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            kind = path.suffix.lower() or "no file ending"
            listing.skipped.append((path, f"not an image type blastscan reads ({kind})"))
        elif link and not is_inside(real_path(path), inside):
            listing.skipped.append((path, f"a link to a file outside the dataset ({real_path(path)})"))
        else:
            listing.images.append(path)


def skipped_note(skipped: list[tuple[Path, str]], root: Path) -> str | None:
    """One sentence that counts the left-out files and names the first few with their reasons (None if none)."""
    if not skipped:
        return None

    def shown(path: Path) -> str:
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)

    named = "; ".join(f"{shown(p)}: {reason}" for p, reason in skipped[:NAMED_IN_NOTE])
    more = f"; and {len(skipped) - NAMED_IN_NOTE} more" if len(skipped) > NAMED_IN_NOTE else ""
    readable = ", ".join(sorted(IMAGE_SUFFIXES))
    return f"left out {len(skipped)} file(s) (images are read from {readable} files): {named}{more}"


def one_row_per_file(rows: list[dict[str, Any]], located: Path, notes: list[str]) -> list[dict[str, Any]]:
    """`rows` with each real file once; a file reached under two labels raises a `DatasetError` naming both paths.

    Rows are compared by the real path of `located / row["path"]`; of the rows that reach one file under one label,
    the first is kept and the others are counted in a note.
    """
    first: dict[Path, dict[str, Any]] = {}
    kept: list[dict[str, Any]] = []
    repeated: list[tuple[str, str]] = []
    for row in rows:
        real = real_path(located / row["path"])
        seen = first.get(real)
        if seen is None:
            first[real] = row
            kept.append(row)
        elif seen["label"] != row["label"]:
            raise DatasetError(
                f"{located / seen['path']} and {located / row['path']} are one file ({real}) under two labels "
                f"({seen['label']}, {row['label']}); remove the link or the extra copy so each image has one class"
            )
        else:
            repeated.append((row["path"], seen["path"]))
    if repeated:
        example = f"{repeated[0][0]} is {repeated[0][1]}"
        notes.append(f"{len(repeated)} image(s) reached twice (through a link) were read once, e.g. {example}")
    return kept
