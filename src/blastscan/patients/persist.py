"""Fitted patient models to and from (description, arrays), for `PatientModelFolder` (safetensors, no pickle).

Each leaf model has `state()` / `from_state()`; late fusion, which holds other models, is taken apart here so that
`models` need not know every kind.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from blastscan.errors import ConfigError
from blastscan.patients.attention import AttentionMILModel
from blastscan.patients.models import (
    CellShareScore,
    ClinicalModel,
    LateFusion,
    MeanPooledModel,
    State,
    logistic_arrays,
    logistic_from_arrays,
)

#: Saved kind name -> model class (the kinds that need the cohort's cell embeddings to predict).
KINDS: dict[str, type] = {
    "clinical": ClinicalModel,
    "cell-share": CellShareScore,
    "mean-pooled": MeanPooledModel,
    "attention-mil": AttentionMILModel,
    "late-fusion": LateFusion,
}
NEEDS_EMBEDDINGS = ("mean-pooled", "attention-mil")


def _kind(model: object) -> str:
    for name, cls in KINDS.items():
        if type(model) is cls:
            return name
    raise ConfigError(f"{type(model).__name__} cannot be saved (known kinds: {', '.join(KINDS)})")


def model_state(model: object) -> State:
    """A fitted patient model as ({"kind", "settings" | "parts"}, arrays)."""
    kind = _kind(model)
    if isinstance(model, LateFusion):
        arrays = logistic_arrays(model.combiner_, "combiner.")
        parts = []
        for i, part in enumerate(model.models_):
            settings, part_arrays = model_state(part)
            parts.append(settings)
            arrays |= {f"part{i}.{key}": value for key, value in part_arrays.items()}
        return {"kind": kind, "parts": parts}, arrays
    settings, arrays = model.state()  # type: ignore[attr-defined]
    return {"kind": kind, "settings": settings}, arrays


def needs_embeddings(description: dict[str, Any]) -> bool:
    """Whether the model of `description` (from `model_state`) reads cell embeddings."""
    if description["kind"] == "late-fusion":
        return any(needs_embeddings(part) for part in description["parts"])
    return description["kind"] in NEEDS_EMBEDDINGS


def model_from_state(description: dict[str, Any], arrays: dict[str, np.ndarray], embeddings: np.ndarray | None) -> Any:
    """The fitted model back from `model_state`, applied to `embeddings` of the cohort it will score."""
    kind = description.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"saved patient model of unknown kind {kind!r} (known: {', '.join(KINDS)})")
    if kind == "late-fusion":
        parts = []
        for i, part in enumerate(description["parts"]):
            prefix = f"part{i}."
            part_arrays = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            parts.append(model_from_state(part, part_arrays, embeddings))
        return LateFusion.fitted(parts, logistic_from_arrays(arrays, "combiner."))
    if kind in NEEDS_EMBEDDINGS:
        if embeddings is None:
            raise ConfigError(f"the saved {kind} model needs the cohort's cell embeddings")
        return KINDS[kind].from_state(description["settings"], arrays, embeddings)  # type: ignore[attr-defined]
    return KINDS[kind].from_state(description["settings"], arrays)  # type: ignore[attr-defined]
