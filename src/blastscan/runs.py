"""`RunFolder`: the only code that knows a run folder's file names.

runs/<name>/
  config.yaml            the resolved config (what `--resume` reads back)
  manifest.csv           the dataset's manifest; splits.csv its train/val/test split; audit.json the split's audit
  stain.json             the fitted stain normaliser (only when the run normalises stain)
  crop_sources.csv       the ALL-IDB1 field each training crop was cut from (only with data.leave_out_fields)
  model.json             the model card: how to rebuild the network and feed it (name, size, mean/std, classes)
  best.safetensors       the best epoch's weights alone (no pickle: evaluation and deployment read only these)
  operating_points.json  decision thresholds chosen on the validation split (written when first needed)
  checkpoints/           last.ckpt (every epoch, for --resume) and best.ckpt (Lightning's)
  metrics.csv            one row per epoch; logs/ (CSV logger) and tensorboard/ hold the raw logs
  training_curves.png, augmentations.png
  eval/<dataset>-<split>/  one folder per evaluation; eval/shortcuts-<split>/ the shortcut audit
  baselines/             `blastscan baselines --cnn RUN --out RUN/baselines`, picked up by the report
  onnx/model-<sha>-f.onnx  the ONNX export of best.safetensors (keyed by its SHA-256), made on first CPU use
  ood.safetensors        the in-distribution profile: training features' class means and precision, flag thresholds
  sites/<name>.json      site profiles (`blastscan calibrate`): threshold and temperature refitted on a site's sample

`PatientModelFolder` is the folder `blastscan patients` saves its final patient-level model in (model/ of its
output): patient_model.safetensors (arrays, and the model description as JSON in its metadata) and
patient_model.json (the same description, for people).

`ExportFolder` is the same for the folder `blastscan export` writes (model.onnx, model.int8.onnx,
preprocessing.json, MODEL_CARD.md, parity.json). This module imports no torch (the slim deployment install reads
run and export folders); the methods that need it (`config`, `load_model`, `write_weights`) import it when called.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import yaml

from blastscan.data.audit import AuditReport
from blastscan.data.crop_sources import CropSource, crop_sources_csv, read_crop_sources
from blastscan.data.manifest import Manifest, class_targets, patient_ids, read_manifest, write_manifest
from blastscan.data.splits import SplitResult, read_splits, write_splits
from blastscan.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from blastscan.training.config import TrainConfig

#: What `RunFolder.open` requires by default: enough to score images with the run's model.
FOR_INFERENCE = ("model_card", "weights")
#: ... and enough to score the run's own splits (evaluate, audit-shortcuts, baselines --cnn).
FOR_EVALUATION = ("config", "manifest", "splits", "model_card", "weights")


def jsonable(value: Any) -> Any:
    """NaN -> None and numpy scalars/arrays -> Python, so JSON files are strict JSON."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def write_json(path: str | Path, value: Any) -> Path:
    """`value` as strict, indented JSON at `path` (parent folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(value), indent=2))
    return path


def write_arrays(path: str | Path, arrays: dict[str, np.ndarray], key: str, header: dict[str, Any]) -> Path:
    """`arrays` as one safetensors file with `header` as JSON under metadata `key`, written to a `.part` file first
    and renamed, so that a reader never takes a half-written file for a finished one."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    tensors = {name: np.ascontiguousarray(value) for name, value in arrays.items()}
    save_file(tensors, str(part), metadata={key: json.dumps(jsonable(header))})
    part.replace(path)
    return path


def read_arrays(path: str | Path, key: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header, arrays) of a file `write_arrays` wrote (nothing is unpickled). FileNotFoundError when it is absent;
    ValueError naming the cause when it is damaged, half-written or has no `key` header."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            header = json.loads((handle.metadata() or {})[key])
            return header, {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - not a dict
    except FileNotFoundError:
        raise
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from None


def check_site_name(site: str) -> str:
    """`site` when it is a usable site-profile name (letters, digits, `-`, `_`, `.`; not starting with `.`)."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", str(site)):
        raise ConfigError(
            f"site name {site!r}: use 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit"
        )
    return str(site)


def file_sha256(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class RunFolder:
    """A run folder: its paths, and its contents read back or written."""

    CONFIG = "config.yaml"
    MANIFEST = "manifest.csv"
    SPLITS = "splits.csv"
    AUDIT = "audit.json"
    STAIN = "stain.json"
    CROP_SOURCES = "crop_sources.csv"
    MODEL_CARD = "model.json"
    WEIGHTS = "best.safetensors"
    OPERATING_POINTS = "operating_points.json"
    METRICS = "metrics.csv"
    CURVES = "training_curves.png"
    AUGMENTATIONS = "augmentations.png"
    CHECKPOINTS = "checkpoints"
    LOGS = "logs"
    TENSORBOARD = "tensorboard"
    EVAL = "eval"
    BASELINES = "baselines"
    ONNX_CACHE = "onnx"
    OOD_PROFILE = "ood.safetensors"
    SITES = "sites"

    _FILES: ClassVar[dict[str, str]] = {
        "config": CONFIG,
        "manifest": MANIFEST,
        "splits": SPLITS,
        "audit": AUDIT,
        "model_card": MODEL_CARD,
        "weights": WEIGHTS,
    }

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def name(self) -> str:
        """The run's name (its folder's name)."""
        return self.path.name

    @classmethod
    def create(cls, path: str | Path) -> RunFolder:
        """A run folder at `path`, made if missing (training fills it)."""
        run = cls(path)
        run.path.mkdir(parents=True, exist_ok=True)
        return run

    @classmethod
    def open(cls, path: str | Path | RunFolder, need: tuple[str, ...] = FOR_EVALUATION) -> RunFolder:
        """The run folder at `path`; raises the one "not a run folder" error, naming what is missing.

        `need` lists what must be there: any of config, manifest, splits, audit, model_card, weights."""
        run = path if isinstance(path, RunFolder) else cls(path)
        if not run.path.is_dir():
            raise ConfigError(f"{run.path}: no such run folder; make one with `blastscan train --config`")
        missing = [cls._FILES[key] for key in need if not (run.path / cls._FILES[key]).is_file()]
        if missing:
            raise ConfigError(
                f"{run.path}: not a finished run folder (missing {', '.join(missing)}); "
                "train one with `blastscan train --config`, or resume this one with `blastscan train --resume`"
            )
        return run

    # ------------------------------------------------------------------------------------------------ paths

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def manifest_path(self) -> Path:
        return self.path / self.MANIFEST

    @property
    def splits_path(self) -> Path:
        return self.path / self.SPLITS

    @property
    def audit_path(self) -> Path:
        return self.path / self.AUDIT

    @property
    def stain_path(self) -> Path:
        return self.path / self.STAIN

    @property
    def crop_sources_path(self) -> Path:
        return self.path / self.CROP_SOURCES

    @property
    def model_card_path(self) -> Path:
        return self.path / self.MODEL_CARD

    @property
    def weights_path(self) -> Path:
        return self.path / self.WEIGHTS

    @property
    def operating_points_path(self) -> Path:
        return self.path / self.OPERATING_POINTS

    def weights_sha256(self) -> str:
        """The SHA-256 of best.safetensors: what names the weights' ONNX export in the run's cache."""
        return file_sha256(self.weights_path)

    def onnx_cache_path(self) -> Path:
        """Where the ONNX export of the current best.safetensors is cached (a retrained run gets a new file)."""
        # "-f": the export with the `features` output; files cached before it had one are simply not reused.
        return self.path / self.ONNX_CACHE / f"model-{self.weights_sha256()[:16]}-f.onnx"

    @property
    def ood_profile_path(self) -> Path:
        """The in-distribution profile (`blastscan.inference.ood.OodProfile`), fitted on the training split."""
        return self.path / self.OOD_PROFILE

    @property
    def sites_dir(self) -> Path:
        return self.path / self.SITES

    def site_path(self, site: str) -> Path:
        """Where `blastscan calibrate --site NAME` keeps the site profile NAME."""
        return self.sites_dir / f"{check_site_name(site)}.json"

    def site_profile(self, site: str) -> dict[str, Any]:
        """The stored site profile NAME (threshold and temperature refitted on that site's labelled sample)."""
        path = self.site_path(site)
        if not path.is_file():
            known = sorted(p.stem for p in self.sites_dir.glob("*.json"))
            raise ConfigError(
                f"{self.path}: no site profile {site!r} (known: {', '.join(known) or 'none'}); make it with "
                f"`blastscan calibrate {self.path} --data SAMPLE --site {site}`"
            )
        return self._read_json(path)

    def site_profiles(self) -> dict[str, dict[str, Any]]:
        """Every stored site profile, by name."""
        return {path.stem: self._read_json(path) for path in sorted(self.sites_dir.glob("*.json"))}

    def write_site_profile(self, site: str, profile: dict[str, Any]) -> Path:
        """Store a site profile (the run's own operating points stay as they are)."""
        return write_json(self.site_path(site), profile)

    @property
    def metrics_path(self) -> Path:
        """Per-epoch training metrics (written at the end of training)."""
        return self.path / self.METRICS

    @property
    def curves_path(self) -> Path:
        return self.path / self.CURVES

    @property
    def augmentations_path(self) -> Path:
        return self.path / self.AUGMENTATIONS

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        """Written at every epoch end; what `--resume` continues from."""
        return self.checkpoints_dir / "last.ckpt"

    @property
    def eval_root(self) -> Path:
        return self.path / self.EVAL

    def eval_dir(self, dataset: str, split: str) -> Path:
        """Where `evaluate` writes the scores of `split` of `dataset`."""
        return self.eval_root / f"{dataset}-{split}"

    def shortcuts_dir(self, split: str) -> Path:
        """Where `audit-shortcuts` writes its findings for `split`."""
        return self.eval_root / f"shortcuts-{split}"

    @property
    def baselines_dir(self) -> Path:
        return self.path / self.BASELINES

    def evaluations(self) -> list[Path]:
        """Every evaluation folder of this run that holds a metrics.json, in name order."""
        return sorted(p.parent for p in self.eval_root.glob("*/metrics.json"))

    # --------------------------------------------------------------------------------------------- contents

    def config(self, overrides: list[str] | None = None) -> TrainConfig:
        """The resolved config the run was started with, with optional `key=value` overrides."""
        from blastscan.training.config import apply_overrides, parse_config, read_config_tree

        path = self.config_path
        if not path.is_file():
            raise ConfigError(f"{self.path}: not a run folder (no {self.CONFIG}); start it with `blastscan train`")
        return parse_config(apply_overrides(read_config_tree(path), overrides or []), source=str(path))

    def manifest(self) -> Manifest:
        """The manifest the run was trained from."""
        return read_manifest(self.manifest_path)

    def splits(self, manifest: Manifest | None = None) -> SplitResult:
        """The run's split, checked against its manifest."""
        return read_splits(self.splits_path, manifest if manifest is not None else self.manifest())

    def split_names(self, manifest: Manifest | None = None) -> np.ndarray:
        """Each manifest row's split name ("train", "val", "test")."""
        return self.splits(manifest).table["split"].astype(str).to_numpy()

    def rows(self, split: str, manifest: Manifest | None = None) -> np.ndarray:
        """Manifest row indices of `split`; an empty or unknown split raises, naming the splits there are."""
        names = self.split_names(manifest)
        rows = np.flatnonzero(names == split)
        if len(rows) == 0:
            raise ConfigError(f"{self.path}: the split {split!r} is empty; choose one of {sorted(set(names))}")
        return rows

    def class_targets(self, manifest: Manifest | None = None) -> np.ndarray:
        """1 where a manifest row carries the run's positive label, else 0."""
        manifest = manifest if manifest is not None else self.manifest()
        return class_targets(manifest, self.config().data.positive_label)

    def patient_ids(self, manifest: Manifest | None = None) -> np.ndarray | None:
        """Each manifest row's patient ID, or None when the dataset records no patients."""
        return patient_ids(manifest if manifest is not None else self.manifest())

    def audit(self) -> AuditReport:
        """The audit of the run's split."""
        return AuditReport.model_validate_json(self.audit_path.read_text())

    def model_card(self) -> dict[str, Any]:
        """model.json: name, options, classes, image_size, mean, std, stain normalisation, class counts."""
        return self._read_json(self.model_card_path)

    def stain_state(self) -> dict[str, Any] | None:
        """The fitted stain normaliser's state, or None when the run does not normalise stain."""
        return self._read_json(self.stain_path) if self.stain_path.is_file() else None

    def crop_sources(self) -> list[CropSource] | None:
        """Where each image was cut from (see `write_crop_sources`), or None when the run did not record it."""
        return read_crop_sources(self.crop_sources_path) if self.crop_sources_path.is_file() else None

    def operating_points(self) -> dict[str, Any] | None:
        """Thresholds chosen on validation (see `write_operating_points`), or None when not yet written."""
        if not self.operating_points_path.is_file():
            return None
        return self._read_json(self.operating_points_path)

    def load_model(self) -> nn.Module:
        """The trained network in eval mode, rebuilt from model.json and best.safetensors (nothing is unpickled)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from blastscan.models import create

        card = self.model_card()
        try:
            model = create(
                card["name"], pretrained=None, num_classes=int(card["num_classes"]), **card.get("options", {})
            )
        except KeyError as exc:
            raise ConfigError(f"{self.model_card_path}: no {exc} field; the model card is incomplete") from None
        if not self.weights_path.is_file():
            raise ConfigError(f"{self.path}: missing {self.WEIGHTS}; is this a finished `blastscan train` run folder?")
        try:
            model.load_state_dict(load_file(self.weights_path))
        except (RuntimeError, SafetensorError) as exc:
            raise ConfigError(
                f"{self.weights_path}: the weights cannot be loaded into {card['name']} ({str(exc)[:300]}); "
                "the file may be damaged or from another run"
            ) from None
        return model.eval()

    def _read_json(self, path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{self.path}: missing {path.name}; is this a finished run folder?") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc}); the file is damaged") from None

    # ---------------------------------------------------------------------------------------------- writing

    def write_inputs(
        self,
        config: TrainConfig,
        manifest: Manifest,
        splits: SplitResult,
        audit: AuditReport,
        model_card: dict[str, Any],
        stain_state: dict[str, Any] | None,
    ) -> None:
        """Everything a run is started from: config, manifest, split, audit, model card, stain state."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        write_manifest(manifest, self.manifest_path)
        write_splits(splits, self.splits_path)
        self.audit_path.write_text(audit.model_dump_json(indent=2))
        if stain_state is not None:
            self.stain_path.write_text(json.dumps(stain_state, indent=2))
        self.model_card_path.write_text(json.dumps(model_card, indent=2))

    def write_weights(self, model: nn.Module) -> Path:
        """The network's weights as best.safetensors."""
        from safetensors.torch import save_file

        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(self.weights_path))
        return self.weights_path

    def write_crop_sources(self, sources: list[CropSource]) -> Path:
        """The field each image was cut from (`blastscan.data.crop_sources.locate_crop_sources`), as CSV."""
        return crop_sources_csv(sources, self.crop_sources_path)

    def write_operating_points(self, points: dict[str, Any]) -> Path:
        """Validation-chosen thresholds, merged into operating_points.json."""
        merged = {**(self.operating_points() or {}), **points}
        return write_json(self.operating_points_path, merged)


class ExportFolder:
    """The folder `blastscan export` writes: a deployable model that needs no run folder and no torch.

    model.onnx           the network, float32, input `image` (N, 3, S, S) normalised, output `logits` (N, 2)
    model.int8.onnx      the same, statically quantised (QDQ, per-channel weights), when exported with --int8
    preprocessing.json   the input contract: size, resize, channel order, mean, std, stain normalisation,
                         classes, the validation-chosen threshold, the cell framing for whole fields
    MODEL_CARD.md        the human-readable card (intended use, data, figures, limits)
    parity.json          the measured agreement of the ONNX models with the torch model
    ood.safetensors      the run's in-distribution profile (the out-of-distribution flag)
    """

    MODEL = "model.onnx"
    MODEL_INT8 = "model.int8.onnx"
    PREPROCESSING = "preprocessing.json"
    MODEL_CARD = "MODEL_CARD.md"
    PARITY = "parity.json"
    OOD_PROFILE = "ood.safetensors"
    #: What preprocessing.json declares itself to be; a reader refuses another format.
    FORMAT = "blastscan-onnx/1"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"ExportFolder({str(self.path)!r})"

    @property
    def name(self) -> str:
        """The exported model's name (its folder's name)."""
        return self.path.name

    @classmethod
    def is_export(cls, path: str | Path) -> bool:
        """True when `path` is a folder holding preprocessing.json (an export, finished or not)."""
        return (Path(path) / cls.PREPROCESSING).is_file()

    @classmethod
    def named_by(cls, path: str | Path) -> tuple[Path, str | None] | None:
        """(export folder, model file name or None) when `path` is an export folder or an .onnx file in one (e.g.
        `DIR/model.int8.onnx`); None when it is neither (a run folder, say)."""
        path = Path(path)
        if path.suffix == ".onnx" and cls.is_export(path.parent):
            return path.parent, path.name
        return (path, None) if cls.is_export(path) else None

    @classmethod
    def open(cls, path: str | Path) -> ExportFolder:
        """The export folder at `path`; raises ConfigError naming what is missing."""
        folder = cls(path)
        if not folder.path.is_dir():
            raise ConfigError(f"{folder.path}: no such folder; make one with `blastscan export RUN --out DIR`")
        missing = [name for name in (cls.PREPROCESSING, cls.MODEL) if not (folder.path / name).is_file()]
        if missing:
            raise ConfigError(
                f"{folder.path}: not an exported model (missing {', '.join(missing)}); "
                "make one with `blastscan export RUN --format onnx --out DIR`"
            )
        return folder

    @property
    def model_path(self) -> Path:
        return self.path / self.MODEL

    @property
    def int8_path(self) -> Path:
        return self.path / self.MODEL_INT8

    @property
    def preprocessing_path(self) -> Path:
        return self.path / self.PREPROCESSING

    @property
    def model_card_path(self) -> Path:
        return self.path / self.MODEL_CARD

    @property
    def parity_path(self) -> Path:
        return self.path / self.PARITY

    @property
    def ood_profile_path(self) -> Path:
        """The run's in-distribution profile, copied beside the model (absent in exports made before it)."""
        return self.path / self.OOD_PROFILE

    def model_file(self, int8: bool = False) -> Path:
        """model.onnx, or model.int8.onnx with `int8` (ConfigError when it was not exported)."""
        path = self.int8_path if int8 else self.model_path
        if not path.is_file():
            raise ConfigError(
                f"{self.path}: no {path.name}; export it with `blastscan export RUN --int8 --out {self.path}`"
            )
        return path

    def preprocessing(self) -> dict[str, Any]:
        """preprocessing.json, checked to be this format."""
        try:
            spec = json.loads(self.preprocessing_path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{self.path}: missing {self.PREPROCESSING}; is this an exported model?") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{self.preprocessing_path}: not valid JSON ({exc}); the file is damaged") from None
        if not isinstance(spec, dict) or spec.get("format") != self.FORMAT:
            raise ConfigError(
                f"{self.preprocessing_path}: format {spec.get('format') if isinstance(spec, dict) else None!r} is "
                f"not {self.FORMAT!r}; re-export the model with this version of blastscan"
            )
        return spec


class PatientModelFolder:
    """The saved patient-level model of `blastscan patients` (see the module docstring)."""

    WEIGHTS = "patient_model.safetensors"
    CARD = "patient_model.json"
    METADATA_KEY = "blastscan_patient_model"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def weights_path(self) -> Path:
        return self.path / self.WEIGHTS

    @property
    def card_path(self) -> Path:
        return self.path / self.CARD

    def write(self, description: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path:
        """The model: `arrays` as tensors, `description` as JSON in the file's metadata and beside it."""
        write_arrays(self.weights_path, arrays, self.METADATA_KEY, description)
        write_json(self.card_path, description)
        return self.path

    def read(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(description, arrays) of a model `write` saved (nothing is unpickled)."""
        try:
            return read_arrays(self.weights_path, self.METADATA_KEY)
        except FileNotFoundError:
            raise ConfigError(
                f"{self.path}: no {self.WEIGHTS}; pass the model/ folder that `blastscan patients --out DIR` wrote"
            ) from None
        except ValueError as exc:
            raise ConfigError(
                f"{self.weights_path}: not a readable patient model ({exc}); the file is damaged or half-written - "
                "run `blastscan patients` again to save it"
            ) from None
