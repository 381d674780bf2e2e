"""`predict`: score any number of images with a trained run and write one CSV row per image.

Inputs are any mix of image files, folders (searched recursively), glob patterns, lab CSVs (a `path` column,
relative to the CSV's folder or absolute) and manifests (`blastscan data scan`). Images stream through the
run's `Predictor` a batch at a time, so memory stays flat however many there are; unreadable images are listed
(and written to `<out>.skipped.csv`) instead of stopping the run. The call is made at the run's decision threshold
chosen on its validation split (Youden's J), which is stored in the run's operating_points.json, or at a site
profile's (`--site`). Probabilities are temperature-scaled (fitted on the same validation split).

Every row also says how familiar the image looks to the network (`ood_score`, `out_of_distribution`: see
`blastscan.inference.ood`). The call is `1`, `0` or, when the user asks for it, `review`: for probabilities within
`review_band` of the threshold, and with `review_ood` for images flagged out of distribution.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from blastscan.data.images import is_image_file
from blastscan.data.manifest import read_manifest
from blastscan.data.scan import is_manifest
from blastscan.errors import ConfigError, DatasetError
from blastscan.workflows.loaded_model import load_model

#: The first line of a predictions CSV starts with this, followed by JSON: the run, threshold and settings.
PREDICTIONS_MAGIC = "# blastscan-predictions "
_GLOB_CHARACTERS = set("*?[")


@dataclass
class PredictResult:
    """What `predict` wrote: the CSV, how many images were scored and called positive, and what was skipped."""

    out: Path
    scored: int
    positive: int
    threshold: float
    seconds: float
    failures: list[tuple[str, str]] = field(default_factory=list)
    skipped_file: Path | None = None
    #: With a cell focus: images in which no cell was found (scored whole; `cell_found` 0 in the CSV).
    no_cell: int = 0
    #: Images called `review` (near the threshold, or out of distribution with review_ood).
    review: int = 0
    #: Images flagged out of distribution (None: the model has no in-distribution profile).
    out_of_distribution: int | None = None
    #: Why there is no out-of-distribution flag ("" when there is one).
    ood_note: str = ""

    @property
    def images_per_second(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else float("nan")


def _walk_images(folder: Path) -> Iterator[str]:
    """Image files under `folder`, recursively, in a stable order, without listing everything first."""
    for current, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(current) / name
            if is_image_file(path):
                yield str(path)


def _csv_paths(path: Path) -> Iterator[str]:
    """The image paths of a manifest (absolute, from its root) or of a lab CSV's `path` column."""
    if is_manifest(path):
        yield from (str(p) for p in read_manifest(path).absolute_paths())
        return
    try:
        chunks = pd.read_csv(path, usecols=["path"], chunksize=10_000, dtype=str)
        for chunk in chunks:
            for value in chunk["path"].fillna(""):
                image = Path(value)
                yield str(image if image.is_absolute() else path.parent / image)
    except ValueError as exc:  # no `path` column
        raise DatasetError(
            f"{path}: a CSV input needs a `path` column (or must be a blastscan manifest): {exc}"
        ) from None


def iter_sources(inputs: Sequence[str | Path]) -> Iterator[str]:
    """Every image path the inputs name, in order: files, folders (recursive), globs, lab CSVs, manifests."""
    for item in inputs:
        text = str(item)
        path = Path(text).expanduser()
        if path.is_dir():
            yield from _walk_images(path)
        elif path.is_file() and path.suffix.lower() == ".csv":
            yield from _csv_paths(path)
        elif path.is_file():
            yield str(path)
        elif _GLOB_CHARACTERS & set(text):
            yield from sorted(p for p in glob.iglob(os.path.expanduser(text), recursive=True) if Path(p).is_file())
        else:
            raise DatasetError(f"{text}: no such file, folder or pattern; pass image files, folders, globs or a CSV")


#: What the `call` column holds when blastscan abstains.
REVIEW = "review"


def calls(p: np.ndarray, threshold: float, review_band: float = 0.0, flagged: np.ndarray | None = None) -> np.ndarray:
    """Per image "1" (positive), "0" (negative) or "review": within `review_band` of `threshold`, or `flagged`."""
    out = np.where(np.asarray(p) >= threshold, "1", "0").astype(object)
    review = np.abs(np.asarray(p) - threshold) < review_band
    if flagged is not None:
        review |= np.asarray(flagged, dtype=bool)
    out[review] = REVIEW
    return out


def check_review_band(review_band: float) -> float:
    """`review_band` when it is a usable half-width in probability (0 <= band < 0.5)."""
    if not 0.0 <= float(review_band) < 0.5:
        raise ConfigError(f"--review-band {review_band}: choose a probability half-width in [0, 0.5), e.g. 0.1")
    return float(review_band)


def count_sources(inputs: Sequence[str | Path]) -> int:
    """How many image paths `iter_sources` will yield (a walk over names only; nothing is decoded)."""
    return sum(1 for _ in iter_sources(inputs))


def predict(
    model_dir: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    device: str = "auto",
    batch_size: int = 64,
    tta: bool = False,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
    backend: str = "auto",
    int8: bool = False,
    site: str | None = None,
    review_band: float = 0.0,
    review_ood: bool = False,
) -> PredictResult:
    """Score every image `inputs` name with a run's or an exported model (`load_model`); write `path, probability,
    call, ood_score, out_of_distribution` rows to `out`.

    The CSV's first line is `# blastscan-predictions {json}`: the run, the model, the threshold and where it came
    from (the run's validation split, or the site profile `site`), the temperature, the out-of-distribution flag's
    method and threshold, TTA and the cell focus; with a focus, a `cell_found` column flags images scored whole
    (no cell framed); with TTA, `tta_spread` is the spread of the 8 views' probabilities. `review_band` and
    `review_ood` make the call `review` instead of 1/0 (see `calls`). It is written as `<out>.part` and renamed
    when complete, so an interrupted run never leaves a file that looks finished. Raises DatasetError when no
    image could be read (the skipped list is written first).
    """
    started = time.perf_counter()
    review_band = check_review_band(review_band)
    model = load_model(
        model_dir, device=device, backend=backend, int8=int8, tta=tta, site=site, batch_size=batch_size,
        workers=workers,
    )  # fmt: skip
    predictor = model.predictor
    threshold = model.threshold
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "run": str(model.path.resolve()),
        "model": model.card.get("name"),
        "threshold": threshold,
        "threshold_from": model.points["chosen_on"],
        "tta": tta,
        "positive_label": (model.card.get("classes") or ["", "positive"])[-1],
        "device": str(predictor.device),
        "backend": predictor.backend,
        "cell_focus": predictor.focus.to_dict(),
        "site": site,
        "temperature": predictor.temperature,
        "out_of_distribution": model.ood.summary() if model.ood is not None else None,
        "out_of_distribution_note": model.ood_note or None,
        "review_band": review_band,
        "review_ood": review_ood,
    }
    focus = predictor.focus.active
    has_ood = model.ood is not None
    partial = out.with_name(out.name + ".part")
    failures: list[tuple[str, str]] = []
    scored = positive = no_cell = review = flagged = 0
    with partial.open("w", newline="") as handle:
        handle.write(PREDICTIONS_MAGIC + json.dumps(header) + "\n")
        writer = csv.writer(handle)
        # With a cell focus, `cell_found` 0 flags images scored whole because no cell could be framed.
        columns = ["path", "probability", "call", "ood_score", "out_of_distribution"]
        writer.writerow(columns + (["cell_found"] if focus else []) + (["tta_spread"] if tta else []))
        for batch in predictor.stream(iter_sources(inputs)):
            p = batch.probabilities
            made = calls(p, threshold, review_band, batch.out_of_distribution if review_ood else None)
            for i, source in enumerate(batch.sources):
                # The shortest exact form: a rounded probability could fall on the other side of the threshold
                # than the call made from it (seen with a strongly temperature-scaled model, p ~ t ~ 0.4996).
                row = [source, repr(float(p[i])), made[i]]
                row += [f"{batch.ood_score[i]:.4f}", int(batch.out_of_distribution[i])] if has_ood else ["", ""]
                row += [int(batch.cell_found[i])] if focus else []
                row += [f"{batch.tta_spread[i]:.4f}"] if tta else []
                writer.writerow(row)
            failures.extend((str(source), reason) for source, reason in batch.failures)
            scored += len(batch.sources)
            positive += int(np.count_nonzero(made == "1"))
            review += int(np.count_nonzero(made == REVIEW))
            flagged += int(np.count_nonzero(batch.out_of_distribution))
            no_cell += int(np.count_nonzero(~batch.cell_found)) if focus else 0
            if progress is not None:
                progress(len(batch.sources) + len(batch.failures))
    skipped_file = None
    if failures:
        skipped_file = out.with_name(out.stem + ".skipped.csv")
        pd.DataFrame(failures, columns=["path", "reason"]).to_csv(skipped_file, index=False)
    if scored == 0:
        partial.unlink()
        if not failures:
            raise DatasetError("no images found in " + ", ".join(map(str, inputs)))
        raise DatasetError(
            f"none of the {len(failures)} images could be read (first: {failures[0][1]}); see {skipped_file}"
        )
    partial.replace(out)
    seconds = time.perf_counter() - started
    return PredictResult(
        out, scored, positive, threshold, seconds, failures, skipped_file, no_cell, review,
        flagged if has_ood else None, model.ood_note,
    )  # fmt: skip


def read_predictions(path: str | Path) -> tuple[dict, pd.DataFrame]:
    """A predictions CSV back: its header (run, threshold, ...) and the table."""
    path = Path(path)
    with path.open() as handle:
        first = handle.readline()
    if not first.startswith(PREDICTIONS_MAGIC):
        raise ConfigError(f"{path}: not a blastscan predictions file (no {PREDICTIONS_MAGIC.strip()!r} line)")
    return json.loads(first[len(PREDICTIONS_MAGIC) :]), pd.read_csv(path, skiprows=1)
