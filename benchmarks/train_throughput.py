"""Training images/s side by side in one run: the bare step, blastscan's full step on both data paths, and the
conventional pipeline; then where a Lightning epoch's time goes (data, step, validation).

  bare          forward / backward / Adam on one augmented batch already on the device: the ceiling
  device        blastscan, device-resident: the split uploaded once -> DeviceBatches (gather by index on the
                device) -> BatchAugment (flips, rotations, zoom, brightness/contrast, stain jitter, normalisation)
                -> the step
  loader        blastscan, DataLoader: memory-mapped cache -> DataLoader (epoch-seeded sampler, uint8 batches)
                -> copy to the device -> BatchAugment -> the step
  conventional  what most training scripts do (timm's train.py): an ImageFolder of JPEG files (the same training
                cells, written to a temporary folder), PIL decoding and torchvision transforms (RandomResizedCrop,
                horizontal flip, ColorJitter 0.4, ToTensor, Normalize) in DataLoader workers -> copy -> the step
  lightning     blastscan's Lightning fit on each path, validation included: training images/s and the share of
                the epoch's wall time in data (fetch, copy, augmentation), step and validation (timed with a
                device synchronise at each boundary; the second epoch is reported)

All passes share one model, config and precision (`trainer.precision`, `trainer.channels_last`, `trainer.compile`
apply). `full` is the path blastscan itself takes with the config's `data.device_cache` on this device. Passes
alternate and the median is reported. Writes JSON (default benchmarks/results/train_throughput.json).

    python benchmarks/train_throughput.py [--config configs/allidb2_efficientnet_lite0.yaml] [--device cpu|cuda]
        [--steps 12] [--repeats 3] [--workers 4] [--set trainer.precision=bf16-mixed --set data.image_size=224 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler
from torchvision import datasets, transforms

from blastscan.models import preprocessing_for
from blastscan.training.config import TrainConfig, load_config
from blastscan.training.data import CellDataModule, DeviceBatches, choose_data_path, free_memory, upload_rows
from blastscan.training.module import CellClassifier
from blastscan.training.prepare import PreparedData, prepare_data

REPO_ROOT = Path(__file__).resolve().parent.parent
Batch = tuple[torch.Tensor, torch.Tensor]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    precision = config.trainer.precision
    if precision in ("32-true", "32"):
        return contextlib.nullcontext()
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise SystemExit(f"trainer.precision {precision!r}: this benchmark times 32-true or bf16-mixed")


class Stepper:
    """The training step every pass shares: one model, one optimiser, one precision."""

    def __init__(self, module: CellClassifier, config: TrainConfig, device: torch.device) -> None:
        self.module = module
        self.device = device
        self.autocast = lambda: _autocast(config, device)
        self.optimizer = torch.optim.Adam(module.model.parameters(), lr=config.optim.lr)
        self.seed = config.seed
        self.steps_done = 0

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.module.loss(self.module(images), labels)
        loss.backward()
        self.optimizer.step()

    def blastscan_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """uint8 batch (on any device) -> the device -> BatchAugment -> step, seeded per step as in training."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        generator = torch.Generator().manual_seed(self.seed + self.steps_done)
        self.steps_done += 1
        self.step(self.module.prepare_batch(images, generator), labels)


def _endless(loader) -> Iterator[Batch]:
    while True:
        yield from loader


def timed(run_step: Callable[[Batch], None], batches: Iterator[Batch], steps: int, device: torch.device) -> float:
    """Images/s of `steps` steps, each on the next batch of `batches` (fetching included)."""
    _sync(device)
    seen = 0
    start = time.perf_counter()
    for _ in range(steps):
        images, labels = next(batches)
        run_step((images, labels))
        seen += len(labels)
    _sync(device)
    return seen / (time.perf_counter() - start)


def conventional_loader(data: PreparedData, config: TrainConfig, root: Path, workers: int, steps: int, pin: bool):
    """An ImageFolder of the training cells as JPEG files, read the way timm's train.py reads one; each iteration
    is one epoch of exactly `steps` batches, so no worker prefetches into another pass."""
    rows = data.split_rows["train"]
    for i, row in enumerate(rows):
        folder = root / f"class_{int(data.targets[row])}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.cache.array()[row]).save(folder / f"{i:05d}.jpg", quality=95)
    pre = preprocessing_for(config.model.name, config.model.pretrained)
    size = config.data.image_size
    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(size),  # timm: scale (0.08, 1), ratio (3/4, 4/3), bilinear
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(0.4, 0.4, 0.4),  # timm's default --color-jitter 0.4
            transforms.ToTensor(),
            transforms.Normalize(pre["mean"], pre["std"]),
        ]
    )
    dataset = datasets.ImageFolder(str(root), transform=transform)
    batch = config.trainer.batch_size
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=RandomSampler(dataset, num_samples=steps * batch),
        num_workers=workers,
        pin_memory=pin,
        drop_last=True,
        persistent_workers=workers > 0,
    )


class EpochTimes(L.Callback):
    """Wall time of each training epoch split into data (between steps), step and validation."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.epochs: list[dict[str, float]] = []
        self._mark = 0.0

    def _now(self) -> float:
        _sync(self.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = self._mark = self._now()
        self.epochs.append({"data": 0.0, "step": 0.0, "validation": 0.0, "images": 0})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = self._now()
        self.epochs[-1]["data"] += now - self._mark
        self.epochs[-1]["images"] += len(batch[1])
        self._mark = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = self._now()
        self.epochs[-1]["step"] += now - self._mark
        self._mark = now

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation_start = self._now()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.epochs[-1]["validation"] += self._now() - self._validation_start

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs[-1]["wall"] = self._now() - self._epoch_start


def lightning_pass(config, data, counts, mean, std, steps: int, device: torch.device, mode: str) -> dict:
    """Two Lightning epochs of `steps` batches plus full validation on one data path; the second epoch's times."""
    module = CellClassifier(config.model_dump(mode="json"), counts, mean, std)
    datamodule = CellDataModule(
        data.cache,
        data.split_rows,
        data.targets,
        config.trainer.batch_size,
        config.trainer.num_workers,
        config.seed,
        eval_batch_size=config.trainer.evaluation_batch_size(),
        device_cache=mode,
        device_cache_share=config.data.device_cache_share,
    )
    times = EpochTimes(device)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            max_epochs=2,
            limit_train_batches=steps,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator=device.type,
            devices=[device.index or 0] if device.type == "cuda" else 1,
            precision=config.trainer.precision,
            callbacks=[times],
            default_root_dir=tmp,
        )
        trainer.fit(module, datamodule=datamodule)
    last = times.epochs[-1]
    wall = last["wall"]
    other = wall - last["data"] - last["step"] - last["validation"]
    return {
        "path": datamodule.data_path.describe(),
        "train_images_per_s": round(last["images"] / (wall - last["validation"]), 1),
        "epoch_images_per_s_with_validation": round(last["images"] / wall, 1),
        "validation_images": len(data.split_rows["val"]),
        "seconds": {k: round(v, 3) for k, v in {**last, "other": other}.items() if k != "images"},
        "share": {k: round(v / wall, 3) for k, v in {**last, "other": other}.items() if k not in ("images", "wall")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "allidb2_efficientnet_lite0.yaml"))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--steps", type=int, default=12, help="training steps per pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="conventional loader")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "train_throughput.json"))
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; run with --device cpu")
    config = load_config(args.config, args.overrides)
    torch.manual_seed(config.seed)
    data = prepare_data(config)
    counts = data.class_counts("train")
    pre = preprocessing_for(config.model.name, config.model.pretrained)
    module = CellClassifier(config.model_dump(mode="json"), counts, pre["mean"], pre["std"]).to(device).train()
    stepper = Stepper(module, config, device)

    batch = config.trainer.batch_size
    train_rows = data.split_rows["train"]
    datamodule = CellDataModule(
        data.cache, data.split_rows, data.targets, batch, config.trainer.num_workers, config.seed
    )
    loader_batches = _endless(datamodule.train_dataloader())
    # The device-resident path, whether or not blastscan would choose it here (`full` below says which it does).
    row_bytes = data.cache.array()[0].nbytes
    fits = choose_data_path(len(train_rows) * row_bytes, device, "on", 1.0, 1, free_memory(device)).device_resident
    device_batches = None
    if fits:
        images = upload_rows(data.cache, train_rows, device)
        labels = torch.as_tensor(data.targets[train_rows], device=device)
        sampler = datamodule.train_dataloader().sampler
        device_batches = _endless(DeviceBatches(images, labels, batch, sampler))
    first_images, first_labels = next(loader_batches)
    on_device = (
        module.prepare_batch(first_images.to(device), torch.Generator().manual_seed(0)),
        first_labels.to(device),
    )

    def bare_batches() -> Iterator[Batch]:
        while True:
            yield on_device

    def bare_step(batch: Batch) -> None:
        stepper.step(*batch)

    def blastscan_step(batch: Batch) -> None:
        stepper.blastscan_step(*batch)

    def conventional_step(batch: Batch) -> None:
        images = batch[0].to(device, non_blocking=True, memory_format=_memory_format(config))
        stepper.step(images, batch[1].to(device, non_blocking=True))

    with tempfile.TemporaryDirectory() as tmp:
        conventional = conventional_loader(data, config, Path(tmp), args.workers, args.steps, device.type == "cuda")
        # name -> (step, a fresh source of batches): passes alternate, so the machine's state is shared fairly.
        passes: dict[str, tuple[Callable[[Batch], None], Callable[[], Iterator[Batch]]]] = {
            "bare": (bare_step, bare_batches),
            "loader": (blastscan_step, lambda: loader_batches),
            "conventional": (conventional_step, lambda: iter(conventional)),
        }
        if device_batches is not None:
            passes["device"] = (blastscan_step, lambda: device_batches)
        # Warm-up (allocator, kernels, compilation, worker start-up): a whole conventional epoch, so that no worker
        # is still loading when the timing starts, and two steps of the others.
        for name, (step, batches) in passes.items():
            timed(step, batches(), args.steps if name == "conventional" else 2, device)
        measured: dict[str, list[float]] = {name: [] for name in passes}
        for _ in range(args.repeats):
            for name, (step, batches) in passes.items():
                measured[name].append(timed(step, batches(), args.steps, device))
        conventional = None  # its persistent workers stop before the Lightning passes

    lightning = {"loader": lightning_pass(config, data, counts, pre["mean"], pre["std"], args.steps, device, "off")}
    if device_batches is not None:
        lightning["device"] = lightning_pass(config, data, counts, pre["mean"], pre["std"], args.steps, device, "on")

    median = {name: round(statistics.median(values), 1) for name, values in measured.items()}
    blastscan_path = choose_data_path(
        (len(train_rows) + len(data.split_rows["val"])) * row_bytes,
        device,
        config.data.device_cache,
        config.data.device_cache_share,
        1,
        free_memory(device),
    )
    full = "device" if blastscan_path.device_resident else "loader"
    result = {
        "benchmark": "train_throughput",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": Path(args.config).name,
        "overrides": args.overrides,
        "model": config.model.name,
        "image_size": config.data.image_size,
        "batch_size": batch,
        "eval_batch_size": config.trainer.evaluation_batch_size(),
        "precision": config.trainer.precision,
        "channels_last": config.trainer.channels_last,
        "compile": config.trainer.compile,
        "device": str(device),
        "train_images": len(train_rows),
        "steps_per_pass": args.steps,
        "images_per_s": median,
        "full": full,
        "full_images_per_s": median[full],
        "blastscan_path": blastscan_path.describe(),
        "over_bare": {name: round(value / median["bare"], 3) for name, value in median.items()},
        "full_over_conventional": round(median[full] / median["conventional"], 3),
        "all_passes": {name: [round(v, 1) for v in values] for name, values in measured.items()},
        "lightning": lightning,
        "conventional": {"workers": args.workers, "jpeg_quality": 95, "pin_memory": device.type == "cuda"},
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        },
    }
    print(f"{config.model.name} at {config.data.image_size}px, batch {batch}, {config.trainer.precision}, on {device}:")
    names = {"bare": "bare step", "device": "device-resident", "loader": "DataLoader", "conventional": "conventional"}
    for name, value in median.items():
        mark = "  <- blastscan here" if name == full else ""
        print(f"  {names[name]:16s} {value:8.1f} img/s  ({result['over_bare'][name]:.1%} of bare){mark}")
    for name, run in lightning.items():
        share = run["share"]
        print(
            f"  Lightning, {names[name]:16s} {run['train_images_per_s']:8.1f} img/s; epoch time: "
            f"data {share['data']:.0%}, step {share['step']:.0%}, validation {share['validation']:.0%}, "
            f"other {share['other']:.0%}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def _memory_format(config: TrainConfig) -> torch.memory_format:
    return torch.channels_last if config.trainer.channels_last else torch.preserve_format


if __name__ == "__main__":
    main()
