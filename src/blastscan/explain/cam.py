"""Grad-CAM family heat maps and feature-map grids for any model `blastscan.models.create` builds.

The CAMs themselves come from pytorch-grad-cam; this module chooses the layer to explain, feeds it a run's
normalised images, and draws the results. Every map is (H, W) float in [0, 1] at the model's input size; a map of
zeros means no region of the image supports the target class at that layer.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, ScoreCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from blastscan.data.images import load_rgb, resize_rgb
from blastscan.errors import ConfigError
from blastscan.inference.torch_backend import TorchPredictor
from blastscan.models.custom_cnn import BlastscanCNN
from blastscan.registry import Registry

#: The CAM methods `compute_cams` accepts, by name (pytorch-grad-cam classes, so added rather than decorated).
CAM_METHODS: Registry[type[BaseCAM]] = Registry("CAM method")
CAM_METHODS.add("gradcam", GradCAM)
CAM_METHODS.add("gradcam++", GradCAMPlusPlus)
CAM_METHODS.add("scorecam", ScoreCAM)
CAM_METHODS.add("eigencam", EigenCAM)

#: Overlays and originals are drawn no larger than this on their longer side.
MAX_DISPLAY_SIDE = 512
DPI = 120
_PROBE_SIZES = (64, 224)


@dataclass(frozen=True)
class ExplanationRecord:
    """One explained image: its leukemic probability, the CAM at the model's input size, and the files drawn."""

    image: Path
    probability: float
    method: str
    cam: np.ndarray
    original: Path
    overlay: Path


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _probe_outputs(model: nn.Module, modules: dict[str, nn.Module]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, output shape) of `modules` in the order their forward calls finished, on a random probe image."""
    finished: list[tuple[str, tuple[int, ...]]] = []

    def hook(name: str):
        def record(_module, _inputs, output) -> None:
            if isinstance(output, torch.Tensor):
                finished.append((name, tuple(output.shape)))

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    was_training = model.training
    model.eval()  # batch-norm in training mode refuses a batch of one 1x1 map
    try:
        for size in _PROBE_SIZES:
            finished.clear()
            try:
                with torch.no_grad():
                    model(torch.rand(1, 3, size, size, device=_device(model)))
                return finished
            except RuntimeError:  # too small for this architecture: try a larger probe
                continue
        return []
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def _is_spatial(shape: tuple[int, ...]) -> bool:
    return len(shape) == 4 and shape[-1] > 1 and shape[-2] > 1


def target_layer(model: nn.Module) -> nn.Module:
    """The last convolutional feature layer of `model`, the layer Grad-CAM explains.

    The rule, first match wins, each candidate kept only if a probe forward shows it outputs a 4-D map larger than
    1 x 1 (so a head convolution after global pooling, as in MobileNetV3, is never chosen):
    the custom CNN's last block (`features[-1]`); a ResNet's `layer4[-1]`; a DenseNet's `features.norm5` (the
    final batch-norm + ReLU); an EfficientNet's `bn2` (batch-norm + activation after `conv_head`), then
    `conv_head`; a MobileNet's `blocks[-1]`. Otherwise, the module whose 4-D, larger-than-1x1 output was computed
    last in the forward pass (the root excluded). Raises ConfigError when no module outputs such a map.
    """
    candidates: list[nn.Module] = []
    if isinstance(model, BlastscanCNN):
        candidates.append(model.features[-1])
    if isinstance(getattr(model, "layer4", None), nn.Sequential):
        candidates.append(model.layer4[-1])
    features = getattr(model, "features", None)
    if isinstance(features, nn.Module) and isinstance(getattr(features, "norm5", None), nn.Module):
        candidates.append(features.norm5)
    for name in ("bn2", "conv_head"):
        if isinstance(getattr(model, name, None), nn.Module):
            candidates.append(getattr(model, name))
    if isinstance(getattr(model, "blocks", None), nn.Sequential) and len(model.blocks):
        candidates.append(model.blocks[-1])

    named = {name: module for name, module in model.named_modules() if name}
    by_id = {id(module): name for name, module in named.items()}
    probed = _probe_outputs(model, named)
    shapes = dict(probed)
    for candidate in candidates:
        if _is_spatial(shapes.get(by_id.get(id(candidate), ""), ())):
            return candidate
    spatial = [name for name, shape in probed if _is_spatial(shape)]
    if not spatial:
        raise ConfigError(
            f"{type(model).__name__}: no layer outputs a 2-D feature map, so there is nothing for a CAM to explain"
        )
    return named[spatial[-1]]


def compute_cams(
    model: nn.Module,
    images_normalised: torch.Tensor,
    method: str = "gradcam",
    target_class: int = 1,
    layer: nn.Module | None = None,
) -> np.ndarray:
    """(B, H, W) float32 maps in [0, 1] of where `model` sees class `target_class` in a normalised (B, 3, H, W)
    batch, by CAM `method` (a name in CAM_METHODS) on `layer` (default: `target_layer(model)`).

    The model's training mode is restored afterwards and its parameter gradients are cleared.
    """
    cam_method = CAM_METHODS.get(method)  # an unknown name raises ConfigError listing the choices
    if images_normalised.ndim != 4 or images_normalised.shape[1] != 3:
        raise ConfigError(f"CAMs need a (B, 3, H, W) batch, got shape {tuple(images_normalised.shape)}")
    if len(images_normalised) == 0:
        return np.zeros((0, *images_normalised.shape[-2:]), dtype=np.float32)
    layer = target_layer(model) if layer is None else layer
    was_training = model.training
    # An input that requires grad keeps the graph alive even when the whole backbone is frozen.
    images = images_normalised.detach().float().to(_device(model)).requires_grad_(True)
    targets = [ClassifierOutputTarget(target_class)] * len(images)
    try:
        with torch.enable_grad(), cam_method(model=model, target_layers=[layer]) as cam:
            if method == "scorecam":
                cam.batch_size = 32
                with contextlib.redirect_stderr(io.StringIO()):  # ScoreCAM draws a tqdm bar; the library is silent
                    maps = cam(input_tensor=images, targets=targets)
            else:
                maps = cam(input_tensor=images, targets=targets)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return np.clip(np.nan_to_num(np.asarray(maps, dtype=np.float32)), 0.0, 1.0)


def _display_image(image: np.ndarray) -> np.ndarray:
    """`image` shrunk (aspect kept) so that its longer side is at most MAX_DISPLAY_SIDE."""
    height, width = image.shape[:2]
    scale = MAX_DISPLAY_SIDE / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS), dtype=np.uint8)


def cam_overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: `cam` stretched to `image`'s size and laid over it as a jet heat map."""
    height, width = image.shape[:2]
    mask = cv2.resize(np.asarray(cam, dtype=np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    return show_cam_on_image(image.astype(np.float32) / 255.0, np.clip(mask, 0.0, 1.0), use_rgb=True)


def model_inputs(predictor: TorchPredictor, images: Sequence[np.ndarray]) -> torch.Tensor:
    """The normalised batch the predictor's network sees: resized, stain-normalised as in training."""
    return predictor.to_input(np.stack([predictor.prepare(image) for image in images]))


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 1
    while stem in used:
        n += 1
        stem = f"{path.stem}_{n}"
    used.add(stem)
    return stem


def explain_images(
    run_dir: str | Path | TorchPredictor,
    image_paths: Sequence[str | Path],
    out_dir: str | Path,
    method: str = "gradcam",
    device: str = "auto",
) -> list[ExplanationRecord]:
    """Explain the leukemic class for each image with the model of `run_dir` (a run folder, or its Predictor).

    Writes `<stem>_original.png` and `<stem>_<method>.png` (the CAM over the image) per image (a repeated stem
    gets `_2`, `_3`, ...) and `explanations.csv` (image, probability, method, files: the two file names joined by
    ";") into `out_dir`; returns one record per image, in order. Images larger than MAX_DISPLAY_SIDE are drawn
    shrunk.
    """
    CAM_METHODS.get(method)  # fail before loading the model: an unknown name raises ConfigError listing the choices
    predictor = (
        run_dir if isinstance(run_dir, TorchPredictor) else TorchPredictor.from_run(run_dir, device, backend="torch")
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layer = target_layer(predictor.model)
    suffix = method.replace("+", "p")  # "gradcam++" -> "gradcampp": no "+" in file names
    records: list[ExplanationRecord] = []
    used: set[str] = set()
    for path in map(Path, image_paths):
        image = load_rgb(path)
        batch = model_inputs(predictor, [image])
        probability = float(predictor.forward(batch, tta=False).softmax(dim=1)[0, 1])
        cam = compute_cams(predictor.model, batch, method=method, target_class=1, layer=layer)[0]
        # With a cell focus the CAM covers the framed cell: show that frame, so the overlay lines up.
        display = _display_image(predictor.focus.frame(image).image if predictor.focus.active else image)
        stem = _unique_stem(path, used)
        original, overlay = out_dir / f"{stem}_original.png", out_dir / f"{stem}_{suffix}.png"
        Image.fromarray(display).save(original)
        Image.fromarray(cam_overlay(display, cam)).save(overlay)
        records.append(ExplanationRecord(path, probability, method, cam, original, overlay))
    with (out_dir / "explanations.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "probability", "method", "files"])
        for record in records:
            files = f"{record.original.name};{record.overlay.name}"
            writer.writerow([str(record.image), f"{record.probability:.6f}", record.method, files])
    return records


def _save(fig: Figure, out: str | Path) -> Path:
    # Figure without pyplot: no global state, nothing to close.
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, facecolor="white")
    return out


def _bare_axis(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def feature_map_grid(
    run_dir_or_model: str | Path | TorchPredictor | nn.Module,
    image_path: str | Path,
    out: str | Path,
    n_maps: int = 8,
    image_size: int | None = None,
) -> Path:
    """A PNG of what an early, a middle and a late convolution of the model compute on one image.

    The layers are the first, middle and last of the Conv2d modules in the order the forward pass runs them,
    counting only those whose output is larger than 1 x 1 (squeeze-excitation and post-pooling convolutions are
    left out). Each row shows the `n_maps` most active channels (by mean activation), each map scaled to its own
    range, and is labelled with the layer's name and size. A bare nn.Module is fed `image_size` pixels (default:
    its `pretrained_cfg` input size, else 224) normalised with its `pretrained_cfg` mean/std (else ImageNet's).
    """
    if n_maps < 1:
        raise ConfigError(f"n_maps must be at least 1, got {n_maps}")
    image = load_rgb(image_path)
    if isinstance(run_dir_or_model, nn.Module):
        model = run_dir_or_model
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = image_size or int(cfg.get("input_size", (3, 224, 224))[-1])
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1)
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1)
        pixels = torch.from_numpy(np.array(resize_rgb(image, size))).permute(2, 0, 1)[None].float() / 255.0
        batch = ((pixels - mean) / std).to(_device(model))
    else:
        predictor = (
            run_dir_or_model
            if isinstance(run_dir_or_model, TorchPredictor)
            else TorchPredictor.from_run(run_dir_or_model, backend="torch")
        )
        model = predictor.model
        batch = model_inputs(predictor, [image])

    convs = {name: module for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}
    order: list[str] = []
    maps: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module, _inputs, output) -> None:
            if _is_spatial(tuple(output.shape)) and name not in maps:
                order.append(name)
                maps[name] = output[0].detach().float().cpu()

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in convs.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not order:
        raise ConfigError(f"{type(model).__name__}: no convolution outputs a 2-D feature map to draw")
    picks = list(dict.fromkeys([order[0], order[len(order) // 2], order[-1]]))
    labels = ["early", "middle", "late"] if len(picks) == 3 else ["early", "late"][: len(picks)]

    columns = n_maps + 1
    fig = Figure(figsize=(1.3 * columns, 1.5 * len(picks)), layout="constrained")
    axes = fig.subplots(len(picks), columns, squeeze=False)
    shown = resize_rgb(image, batch.shape[-1])
    for row, (name, label) in enumerate(zip(picks, labels, strict=True)):
        activation = maps[name]
        channels = activation.mean(dim=(1, 2)).argsort(descending=True)[:n_maps].tolist()
        axes[row, 0].imshow(shown)
        _bare_axis(axes[row, 0])
        channels_total, height, width = activation.shape
        axes[row, 0].set_ylabel(f"{label}\n{name}\n{height}x{width}, {channels_total} ch", fontsize=7)
        for col in range(1, columns):
            ax = axes[row, col]
            _bare_axis(ax)
            if col - 1 < len(channels):
                channel = channels[col - 1]
                ax.imshow(activation[channel].numpy(), cmap="viridis")
                ax.set_title(f"ch {channel}", fontsize=7)
            else:
                ax.axis("off")
    fig.suptitle(f"Feature maps: {Path(image_path).name}", fontsize=9)
    return _save(fig, out)


def overlay_grid(items: Sequence[tuple[np.ndarray, np.ndarray | None, str]], out: str | Path, columns: int = 4) -> Path:
    """A PNG gallery, one panel per item (image, cam, title), e.g. the most confident TP / TN / FP / FN.

    `image` is (H, W, 3) uint8 RGB; `cam` is an (h, w) map in [0, 1] of any size (stretched to the image), or None
    to show the image alone; `title` goes above the panel. No items draws a panel that says so.
    """
    columns = max(1, min(columns, len(items))) if items else 1
    rows = max(1, math.ceil(len(items) / columns))
    fig = Figure(figsize=(2.4 * columns, 2.6 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for index, ax in enumerate(axes.flat):
        _bare_axis(ax)
        if index >= len(items):
            ax.axis("off")
            continue
        image, cam, title = items[index]
        image = _display_image(np.asarray(image, dtype=np.uint8))
        ax.imshow(image if cam is None else cam_overlay(image, cam))
        ax.set_title(title, fontsize=8)
    if not items:
        axes[0, 0].axis("on")
        axes[0, 0].text(0.5, 0.5, "no images to show", ha="center", va="center", transform=axes[0, 0].transAxes)
    return _save(fig, out)
