"""Training configuration: YAML files validated by pydantic, with `--set key=value` overrides.

An unknown key anywhere is an error that names it (pydantic `extra="forbid"`), so a typo never silently falls
back to a default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from blastscan.data.crop_sources import default_fields_root, resolve_fields
from blastscan.data.registry import READERS
from blastscan.errors import ConfigError, DatasetError
from blastscan.imaging.augment import AugmentConfig
from blastscan.imaging.cell_focus import DEFAULT_MARGIN, CellFocus, CellFocusMode
from blastscan.imaging.stain import STAIN_METHODS
from blastscan.registry import Registry
from blastscan.training.losses import LOSSES
from blastscan.training.schedulers import SCHEDULERS

#: Where `$BLASTSCAN_DATA` points when the variable is not set (the shared datasets beside the repository).
DEFAULT_DATA_DIR = "../shared/datasets"
#: `data.device_cache`: auto (the split on the device on CUDA when it fits), on (on any device when it fits), off.
DeviceCacheMode = Literal["auto", "on", "off"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def _registered(registry: Registry[Any], value: str, *also: str) -> str:
    """`value` when it names an entry of `registry` (or one of `also`); a ValueError listing the choices if not."""
    if value in also or value in registry:
        return value
    raise ValueError(f"unknown {registry.kind} {value!r}; choose one of {', '.join([*also, *registry.names()])}")


class SplitConfig(_Strict):
    train: float = 0.7
    val: float = 0.15
    test: float = 0.15
    seed: int = 0


class DataConfig(_Strict):
    root: str = Field(description="Dataset folder, lab CSV, or a manifest CSV; $BLASTSCAN_DATA is expanded.")
    format: str = Field(
        "auto",
        description=f"Reader for `root`: auto or one of {', '.join(READERS.names())} (see `blastscan data scan`).",
    )
    extra_sources: list[str] = Field(
        default_factory=list,
        description="Further datasets (folders, lab CSVs or manifests; $BLASTSCAN_DATA is expanded) trained on "
        "together with `root`: multi-source training. Every row keeps its source in the manifest's `dataset` "
        "column, each source is split by its own patients, and training batches draw every source equally often.",
    )
    splits: str | None = Field(None, description="An existing split file; made from `split` when not given.")
    split: SplitConfig = Field(default_factory=SplitConfig)
    image_size: int = Field(224, ge=32, le=1024, description="Side of the square training images, in pixels.")
    positive_label: str = Field("leukemic", description="The label that is class 1; every other label is class 0.")
    stain_normalization: str = Field(
        "none",
        description=f"Normalise every image to a reference training image before caching: one of "
        f"{', '.join(STAIN_METHODS.names())}.",
    )
    cell_focus: CellFocusMode = Field(
        "none",
        description="Frame every input on its segmented leukocyte: none, crop (a square box around the cell, "
        "`cell_focus_margin` of its extent on each side) or mask (the crop with everything outside the cell set to "
        "neutral grey). Applied the same way in training, evaluation, predict, analyze and export.",
    )
    cell_focus_margin: float = Field(
        DEFAULT_MARGIN, ge=0.0, le=2.0, description="Box margin per side, as a share of the cell's extent."
    )
    drop_label_conflicts: bool = Field(
        False,
        description="Leave out every image whose exact or near duplicate carries another label (the audit's label "
        "conflicts) instead of refusing to train.",
    )
    leave_out_fields: list[str] = Field(
        default_factory=list,
        description="ALL-IDB1 smear fields (stems like Im001_1 or file names) whose cells must not be trained on: "
        "every crop is located in the fields of `fields_root` (normalised cross-correlation, 20-30 s for all of "
        "ALL-IDB2 on 2 cores) and the crops cut from these fields are left out before splitting; the run folder "
        "records where every crop was cut from.",
    )
    fields_root: str | None = Field(
        None,
        description="The ALL-IDB1 folder (with im/) for `leave_out_fields`; $BLASTSCAN_DATA is expanded. Default: "
        "the ALL_IDB1 beside `root` when `root` is ALL-IDB2 in its standard layout (ALL_IDB/ALL_IDB2[/img]).",
    )
    cache_dir: str | None = None
    device_cache: DeviceCacheMode = Field(
        "auto",
        description="Keep the split's uint8 images on the training device and gather every batch there by index "
        "(no DataLoader workers, no per-batch host copy). `auto`: on CUDA, when the training and validation images "
        "fit in `device_cache_share` of the free GPU memory; `on`: on any device, the CPU included, when they fit "
        "there; `off`: never. Otherwise, and always when data-parallel, the DataLoader reads the memory-mapped "
        "cache. Same seed, same batches either way; the run logs which path it took and why.",
    )
    device_cache_share: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="The share of the device's free memory the training and validation images may take "
        "(the rest is for the model, its activations and the optimizer).",
    )

    @field_validator("device_cache", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML reads a bare on / off as a boolean.
        if isinstance(value, bool):
            return "on" if value else "off"
        return value

    @field_validator("leave_out_fields")
    @classmethod
    def _plain_field_names(cls, value: list[str]) -> list[str]:
        bad = [name for name in value if not name.strip() or "/" in name or "\\" in name]
        if bad:
            raise ValueError(f"field names must be file names or stems such as Im001_1, not {bad}")
        return [name.strip() for name in value]

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        return _registered(READERS, value, "auto")

    @field_validator("stain_normalization")
    @classmethod
    def _known_stain_method(cls, value: str) -> str:
        return _registered(STAIN_METHODS, value)

    def resolved_root(self) -> Path:
        """`root` with `$BLASTSCAN_DATA` (default ../shared/datasets) and `~` expanded."""
        return _expand_data_path(self.root)

    def resolved_sources(self) -> list[Path]:
        """`root` and every `extra_sources` entry, expanded like `root`."""
        return [self.resolved_root(), *(_expand_data_path(source) for source in self.extra_sources)]

    def focus(self) -> CellFocus:
        """The cell framing `cell_focus` and `cell_focus_margin` describe."""
        return CellFocus(self.cell_focus, self.cell_focus_margin)

    def resolved_fields_root(self) -> Path:
        """`fields_root` expanded like `root`, or ALL_IDB1 beside an ALL-IDB2 `root`; a ConfigError when neither."""
        if self.fields_root is not None:
            return _expand_data_path(self.fields_root)
        found = default_fields_root(self.resolved_root())
        if found is None:
            raise ConfigError(
                f"data.leave_out_fields: no ALL-IDB1 folder beside data.root ({self.resolved_root()}); set "
                "data.fields_root to the folder of the smear fields"
            )
        return found

    def left_out_field_paths(self) -> list[Path]:
        """The image files of `leave_out_fields` in `resolved_fields_root()`; a ConfigError names those not there."""
        if not self.leave_out_fields:
            return []
        try:
            return resolve_fields(self.resolved_fields_root(), self.leave_out_fields)
        except DatasetError as exc:
            raise ConfigError(f"data.leave_out_fields: {exc}") from None


def _expand_data_path(text: str) -> Path:
    """`text` with `$BLASTSCAN_DATA` (default ../shared/datasets), other variables and `~` expanded."""
    data_dir = os.environ.get("BLASTSCAN_DATA", DEFAULT_DATA_DIR)
    text = text.replace("${BLASTSCAN_DATA}", data_dir).replace("$BLASTSCAN_DATA", data_dir)
    return Path(os.path.expandvars(text)).expanduser()


class ModelConfig(_Strict):
    name: str = "tf_efficientnet_lite0"
    pretrained: str | None = Field("package", description="None, 'hub', 'file:PATH' or 'package'.")
    drop_rate: float = Field(0.3, ge=0, lt=1)
    freeze_backbone: bool = Field(False, description="Train only the head (until `unfreeze_epoch`, if set).")
    unfreeze_epoch: int | None = Field(None, ge=0, description="Staged unfreezing: the epoch the backbone thaws.")
    options: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for the model.")


class LossConfig(_Strict):
    name: str = Field("weighted_ce", description=f"The loss: one of {', '.join(LOSSES.names())}.")
    params: dict[str, Any] = Field(default_factory=dict)
    sampler: Literal["none", "balanced"] = Field("none", description="'balanced' draws classes equally often.")

    @field_validator("name")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        return _registered(LOSSES, value)


class OptimConfig(_Strict):
    lr: float = Field(1e-3, gt=0, description="Adam learning rate (the seed paper's 1e-3).")
    weight_decay: float = Field(0.0, ge=0)
    scheduler: str = Field("none", description=f"Learning-rate schedule: one of {', '.join(SCHEDULERS.names())}.")
    grad_clip: float | None = Field(None, gt=0, description="Clip gradients to this global norm.")
    lr_reference_batch: int | None = Field(
        None,
        ge=1,
        description="Linear scaling rule (Goyal et al. 2017): when set, Adam runs at lr x (batch_size x devices) / "
        "lr_reference_batch, `lr` being the rate tuned at this reference batch. Unset: `lr` as it is, whatever the "
        "batch.",
    )

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        return _registered(SCHEDULERS, value)


class TrainerConfig(_Strict):
    max_epochs: int = Field(30, ge=1)
    patience: int = Field(5, ge=1, description="Early stopping: epochs without improvement of `monitor`.")
    monitor: Literal["val_auroc", "val_loss"] = "val_auroc"
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int | None = Field(
        None,
        ge=1,
        description="Batch of validation and test (no gradients or optimizer state, so it can be larger than "
        "training's); default 4 x batch_size.",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (unused when device-resident).")
    accelerator: str = "auto"
    devices: int = Field(1, ge=1)
    strategy: str = "auto"
    precision: str = "32-true"
    limit_train_batches: float | int | None = None
    log_every_n_steps: int = 10
    channels_last: bool = Field(
        False,
        description="Model weights and batches in channels-last memory format: faster convolutions (1.4x for "
        "EfficientNet-Lite0 on a 2-core CPU, see the README's Training throughput). Off by default so that earlier "
        "runs replay bit for bit.",
    )
    compile: bool = Field(
        False,
        description="torch.compile the network (a warm-up of tens of seconds, then shorter steps on a GPU). When "
        "compiling fails, the run warns and continues in eager mode.",
    )

    def evaluation_batch_size(self) -> int:
        """`eval_batch_size`, or 4 x `batch_size` when it is not set."""
        return self.eval_batch_size or 4 * self.batch_size


class TrainConfig(_Strict):
    """A whole experiment: what to train on, which model, how."""

    name: str = Field(description="Run name: the run folder is `<runs_dir>/<name>`.")
    seed: int = 0
    runs_dir: str = "runs"
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not value or "/" in value or value.startswith("."):
            raise ValueError(f"run name {value!r} must be a plain folder name")
        return value

    def learning_rate(self, world_size: int = 1) -> float:
        """The rate Adam runs at: `optim.lr`, scaled by the global batch over `optim.lr_reference_batch` when set."""
        reference = self.optim.lr_reference_batch
        if reference is None:
            return self.optim.lr
        return self.optim.lr * self.trainer.batch_size * world_size / reference


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` strings (values parsed as YAML: numbers, booleans, lists) to a config tree."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set trainer.max_epochs=5")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"--set {key.strip()}: {raw!r} is not a YAML value ({_first_line(exc)}); quote strings, e.g. "
                f"--set '{key.strip()}=\"text\"'"
            ) from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _first_line(exc: yaml.YAMLError) -> str:
    return str(exc).strip().splitlines()[0]


def read_config_tree(path: str | Path) -> dict[str, Any]:
    """A config YAML file as a tree, read with `yaml.safe_load` (no tags that build Python objects); errors name it."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file; see configs/ for examples") from None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{path}: not valid YAML for blastscan ({_first_line(exc)}); tags such as !!python are refused"
        ) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return tree


def parse_config(tree: dict[str, Any], source: str = "config") -> TrainConfig:
    """Validate a config tree; errors name the key path and what was wrong."""
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: "
            + (
                "unknown key (check the spelling)"
                if err["type"] == "extra_forbidden"
                else err["msg"].removeprefix("Value error, ")
            )
            for err in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config, apply `--set` overrides, validate."""
    tree = read_config_tree(path)
    return parse_config(apply_overrides(tree, overrides or []), source=str(path))
