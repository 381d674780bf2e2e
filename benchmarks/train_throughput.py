"""Images per second of the full training step vs the same model's bare step, side by side in one run.

  full: image cache -> DataLoader (epoch-seeded sampler, uint8 batches) -> BatchAugment (flips, rotations, zoom,
        brightness/contrast, stain jitter, normalisation) -> forward / backward / Adam step
  bare: the same forward / backward / Adam step on a float batch already in memory
  lightning: the full step inside Lightning's fit loop (the module's own `images_per_s`, validation excluded)

The ratio full / bare says whether the data path is the bottleneck (target: >= 0.90). Passes alternate and the
median is reported. Writes JSON (default benchmarks/results/train_throughput.json).

    python benchmarks/train_throughput.py [--config configs/allidb2_efficientnet_lite0.yaml] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from blastscan.models import preprocessing_for
from blastscan.training.config import load_config
from blastscan.training.data import CellDataModule
from blastscan.training.module import CellClassifier
from blastscan.training.prepare import prepare_data

REPO_ROOT = Path(__file__).resolve().parent.parent


def _step(module: CellClassifier, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = module.loss(module(images), labels)
    loss.backward()
    optimizer.step()


def bare_pass(module: CellClassifier, optimizer: torch.optim.Optimizer, batch: tuple, steps: int) -> float:
    """Images/s of forward/backward/step on one in-memory batch."""
    images, labels = batch
    start = time.perf_counter()
    for _ in range(steps):
        _step(module, optimizer, images, labels)
    return steps * len(labels) / (time.perf_counter() - start)


def full_pass(module: CellClassifier, optimizer: torch.optim.Optimizer, loader, steps: int, seed: int) -> float:
    """Images/s of loader -> augmentation -> forward/backward/step."""
    seen = 0
    start = time.perf_counter()
    iterator = iter(loader)
    for step in range(steps):
        try:
            images, labels = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            images, labels = next(iterator)
        generator = torch.Generator().manual_seed(seed + step)
        _step(module, optimizer, module.augment(images, generator=generator, train=True), labels)
        seen += len(labels)
    return seen / (time.perf_counter() - start)


def lightning_pass(config, data, counts, mean, std, steps: int) -> float:
    """The module's logged images/s over one Lightning epoch of `steps` batches (no validation)."""
    module = CellClassifier(config.model_dump(mode="json"), counts, mean, std)
    datamodule = CellDataModule(data.cache, data.split_rows, data.targets, config.trainer.batch_size, 0, config.seed)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            max_epochs=1,
            limit_train_batches=steps,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            default_root_dir=tmp,
        )
        trainer.fit(module, datamodule=datamodule)
    return float(trainer.callback_metrics["images_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "allidb2_efficientnet_lite0.yaml"))
    parser.add_argument("--steps", type=int, default=12, help="training steps per pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "train_throughput.json"))
    args = parser.parse_args()

    config = load_config(args.config)
    torch.manual_seed(config.seed)
    data = prepare_data(config)
    counts = data.class_counts("train")
    pre = preprocessing_for(config.model.name, config.model.pretrained)
    module = CellClassifier(config.model_dump(mode="json"), counts, pre["mean"], pre["std"]).train()
    optimizer = torch.optim.Adam(module.model.parameters(), lr=config.optim.lr)
    datamodule = CellDataModule(data.cache, data.split_rows, data.targets, config.trainer.batch_size, 0, config.seed)
    loader = datamodule.train_dataloader()
    first_images, first_labels = next(iter(loader))
    in_memory = (module.augment(first_images, generator=torch.Generator().manual_seed(0), train=True), first_labels)

    bare_pass(module, optimizer, in_memory, 2)  # warm-up (allocator, oneDNN kernels)
    full_pass(module, optimizer, loader, 2, config.seed)
    bare, full = [], []
    for _ in range(args.repeats):
        bare.append(bare_pass(module, optimizer, in_memory, args.steps))
        full.append(full_pass(module, optimizer, loader, args.steps, config.seed))
    lightning = lightning_pass(config, data, counts, pre["mean"], pre["std"], args.steps)

    result = {
        "benchmark": "train_throughput",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": Path(args.config).name,
        "model": config.model.name,
        "image_size": config.data.image_size,
        "batch_size": config.trainer.batch_size,
        "steps_per_pass": args.steps,
        "bare_images_per_s": round(statistics.median(bare), 1),
        "full_images_per_s": round(statistics.median(full), 1),
        "lightning_images_per_s": round(lightning, 1),
        "full_over_bare": round(statistics.median(full) / statistics.median(bare), 3),
        "lightning_over_bare": round(lightning / statistics.median(bare), 3),
        "all_passes": {"bare": [round(v, 1) for v in bare], "full": [round(v, 1) for v in full]},
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "device": "cpu",
        },
    }
    print(f"{config.model.name} at {config.data.image_size}px, batch {config.trainer.batch_size}:")
    print(f"  bare step           {result['bare_images_per_s']:8.1f} img/s")
    print(f"  full pipeline       {result['full_images_per_s']:8.1f} img/s  ({result['full_over_bare']:.1%} of bare)")
    print(f"  inside Lightning    {result['lightning_images_per_s']:8.1f} img/s  ({result['lightning_over_bare']:.1%})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
