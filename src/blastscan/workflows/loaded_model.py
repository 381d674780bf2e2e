"""A trained model as `predict`, `analyze` and `serve` take it: a run folder, or an exported model folder.

`load_model(path)` gives one `LoadedModel` either way: the `Predictor` (for a run: the backend `auto` picks; for
an export: ONNX Runtime on model.onnx, or model.int8.onnx when the path names it or `int8` is set), the
validation-chosen thresholds and calibration temperature (or a site profile's, with `site`), the in-distribution
profile that flags unfamiliar images, the cell framing whole fields need, and a public model card. An export
folder is read with no torch and no dataset: everything it needs is in its preprocessing.json and ood.safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blastscan import __version__
from blastscan.errors import ConfigError
from blastscan.inference import Predictor, calibrated_threshold
from blastscan.inference.onnx_backend import OnnxPredictor
from blastscan.inference.ood import OodProfile
from blastscan.runs import ExportFolder, RunFolder, check_site_name
from blastscan.smear.framing import Framing, measure_framing
from blastscan.workflows.in_distribution import ensure_ood_profile
from blastscan.workflows.thresholds import ensure_operating_points

__all__ = ["LoadedModel", "load_model", "run_framing"]


def run_framing(run: RunFolder) -> Framing:
    """How the run's training images frame their cell (measured on a sample of its training split)."""
    manifest = run.manifest()
    paths = manifest.absolute_paths()
    rows = run.rows("train", manifest)
    return measure_framing([paths[i] for i in rows])


@dataclass
class LoadedModel:
    """A model ready to score: predictor, thresholds (chosen on validation), framing, public card."""

    path: Path
    name: str
    source: str  # "run" or "export"
    predictor: Predictor
    points: dict[str, Any]
    card: dict[str, Any] = field(default_factory=dict)
    run: RunFolder | None = None
    _framing: Framing | None = None
    #: The site profile in use (`blastscan calibrate`), or None for the run's own validation-chosen points.
    site: str | None = None
    #: Why there is no out-of-distribution flag, when there is none ("" when there is one).
    ood_note: str = ""

    @property
    def threshold(self) -> float:
        """The cell threshold (Youden's J, chosen on the validation split or the site's sample), on the
        temperature-scaled probabilities the predictor reports."""
        return calibrated_threshold(float(self.points["threshold"]), self.predictor.temperature)

    @property
    def threshold_95_specificity(self) -> float | None:
        """The 95%-specificity threshold, on the same scale as `threshold`."""
        value = self.points.get("threshold_95_specificity")
        return None if value is None else calibrated_threshold(float(value), self.predictor.temperature)

    @property
    def ood(self) -> OodProfile | None:
        return self.predictor.ood

    def framing(self) -> Framing:
        """The training images' framing: stored in an export; measured on a run's training images once."""
        if self._framing is None:
            if self.run is None:
                raise ConfigError(f"{self.path}: no framing recorded; re-export the model")
            self._framing = run_framing(self.run)
        return self._framing


def _public_card(model: LoadedModel, details: dict[str, Any]) -> dict[str, Any]:
    predictor = model.predictor
    return {
        "name": details.get("name"),
        "model": model.name,
        "source": model.source,
        "backend": predictor.backend,
        "model_file": getattr(predictor, "model_file", None) and Path(predictor.model_file).name,
        "classes": details.get("classes"),
        "image_size": predictor.image_size,
        "mean": list(predictor.spec.mean),
        "std": list(predictor.spec.std),
        "stain_normalisation": (predictor.spec.stain_state or {}).get("method"),
        "threshold": model.threshold,
        "threshold_95_specificity": model.threshold_95_specificity,
        "threshold_chosen_on": model.points.get("chosen_on"),
        "temperature": model.predictor.temperature,
        "site": model.site,
        "out_of_distribution": model.ood.summary() if model.ood is not None else None,
        "out_of_distribution_note": model.ood_note or None,
        "weights_sha256": details.get("weights_sha256"),
        "blastscan_version": __version__,
    }


def _site_points(sites: dict[str, Any], site: str, where: Path, tta: bool) -> dict[str, Any]:
    """A site profile's operating point (plain scores only) out of `sites`, or a ConfigError naming the known ones."""
    check_site_name(site)
    if tta:
        raise ConfigError(f"--site {site}: a site profile is fitted on plain scores; score without --tta")
    if site not in sites:
        raise ConfigError(
            f"{where}: no site profile {site!r} (known: {', '.join(sorted(sites)) or 'none'}); make it with "
            f"`blastscan calibrate RUN --data SAMPLE --site {site}` (and export the run again)"
        )
    return sites[site]


def _load_export(
    folder_path: Path,
    model_file: str | None,
    int8: bool,
    tta: bool,
    device: str,
    options: dict[str, Any],
    site: str | None = None,
) -> LoadedModel:
    export = ExportFolder.open(folder_path)
    if model_file is None:
        model_file = export.model_file(int8).name
    predictor = OnnxPredictor.from_export(export, model_file=model_file, device=device, tta=tta, **options)
    pre = export.preprocessing()
    key = "thresholds_tta" if tta else ("thresholds_int8" if model_file == export.MODEL_INT8 else None)
    if key == "thresholds_tta" and not pre.get(key):
        raise ConfigError(
            f"{export.path}: exported without TTA thresholds; score without --tta, or evaluate the run with --tta "
            "and export it again"
        )
    if key is not None and not pre.get(key):
        key = None  # an INT8 model exported before it had thresholds of its own: the float32 ones
    if key is None and not isinstance(pre.get("threshold"), int | float):
        raise ConfigError(f"{export.preprocessing_path}: no threshold; the file is incomplete, re-export the model")
    points = (
        pre[key]
        if key
        else {
            "threshold": pre["threshold"],
            "threshold_95_specificity": pre.get("threshold_95_specificity"),
            "chosen_on": pre.get("threshold_chosen_on", "validation split"),
        }
    )
    if site is not None:
        points = _site_points(pre.get("sites") or {}, site, export.preprocessing_path, tta)
    predictor.temperature = float(points.get("temperature", 1.0))
    ood_note = ""
    if export.ood_profile_path.is_file():
        predictor.ood = OodProfile.load(export.ood_profile_path)
    else:
        ood_note = f"{export.path}: exported without ood.safetensors; export the run again for the flag"
    framing = pre.get("framing") or {}
    model = LoadedModel(
        export.path,
        export.name,
        "export",
        predictor,
        points,
        _framing=Framing(float(framing["cell_fraction"]), int(framing["measured_on"]), str(framing["source"]))
        if framing
        else None,
        site=site,
        ood_note=ood_note,
    )
    details = {**pre.get("model", {}), "classes": pre.get("output", {}).get("classes")}
    model.card = _public_card(model, details)
    return model


def load_model(
    path: str | Path,
    *,
    device: str = "auto",
    backend: str = "auto",
    int8: bool = False,
    tta: bool = False,
    site: str | None = None,
    **options: Any,
) -> LoadedModel:
    """The model at `path`: a run folder, an export folder, or an .onnx file in an export folder.

    `int8` picks an export's model.int8.onnx; `site` a site profile's threshold and temperature (`blastscan
    calibrate`) instead of the run's own; `options` go to the Predictor (batch_size, workers, threads)."""
    path = Path(path)
    export = ExportFolder.named_by(path)
    if export is not None:
        return _load_export(*export, int8, tta, device, options, site)
    if int8:
        raise ConfigError(f"{path}: --int8 needs an export folder; make one with `blastscan export {path} --int8`")
    run = RunFolder.open(path, need=("model_card", "weights"))
    predictor = Predictor.from_run(run, device=device, backend=backend, tta=tta, **options)
    points = ensure_operating_points(run, predictor, tta=tta)
    if site is not None:
        points = _site_points(run.site_profiles(), site, run.path, tta)
    predictor.temperature = float(points.get("temperature", 1.0))
    predictor.ood, ood_note = ensure_ood_profile(run, predictor)
    model = LoadedModel(run.path, run.name, "run", predictor, points, run=run, site=site, ood_note=ood_note)
    card = run.model_card()
    model.card = _public_card(model, {"name": card.get("name"), "classes": card.get("classes")})
    return model
