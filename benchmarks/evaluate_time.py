"""`evaluate --tta` of a run against the time of its bare forward passes, and the share spent on explanations.

    python benchmarks/evaluate_time.py [--run runs/NAME] [--size 224] [--explain-images 200] [--device auto]

Without `--run`, a DeepAPL run at `--size` px is made from configs/deepapl_efficientnet_lite0.yaml with one short
epoch (two training batches): the weights do not matter for timing, the model and the image size do. Then, in one
process on one device:
  bare       the run's network alone (channels_last, inference mode) on prepared images already in memory, img/s;
             the bare time of evaluate is the forwards evaluate needs ((val + test) x 8 views; the plain score is the
             first view) divided by that rate
  evaluate   `evaluate_run(tta=True)`, with its stage times (scoring, metrics, figures, explanations, report)
Targets (issue 9): evaluate <= 3x its bare forwards; explanations <= 15% of evaluate. Writes JSON (default
benchmarks/results/evaluate_time.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from blastscan.inference import Predictor
from blastscan.runs import RunFolder
from blastscan.training.config import load_config
from blastscan.workflows.evaluate import evaluate_run
from blastscan.workflows.train import train

REPO_ROOT = Path(__file__).resolve().parent.parent


def _make_run(size: int, workdir: Path) -> Path:
    overrides = [
        f"data.image_size={size}",
        f"runs_dir={workdir}",
        f"data.cache_dir={workdir / 'cache'}",
        "name=deepapl_timing",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
    ]
    config = load_config(REPO_ROOT / "configs" / "deepapl_efficientnet_lite0.yaml", overrides)
    return train(config, progress_bar=False).run_dir


@torch.inference_mode()
def bare_rate(predictor: Predictor, prepared: np.ndarray, repeats: int = 3) -> float:
    """Median img/s of the bare network on a normalised batch already on the device."""
    x = predictor.to_input(prepared)
    rates = []
    for _ in range(repeats + 1):  # the first pass warms up kernel selection and is dropped
        start = time.perf_counter()
        with predictor._autocast():
            for i in range(0, len(x), predictor.batch_size):
                predictor.model(x[i : i + predictor.batch_size])
        if predictor.device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(len(x) / (time.perf_counter() - start))
    return float(np.median(rates[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--explain-images", type=int, default=200)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "evaluate_time.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run or _make_run(args.size, Path(tmp))
        run = RunFolder.open(run_dir)
        manifest = run.manifest()
        rows = {split: run.rows(split, manifest) for split in ("val", "test")}
        predictor = Predictor.from_run(run, device=args.device)
        cache = predictor.image_cache(manifest, run.config().data.cache_dir)
        sample = np.ascontiguousarray(cache.array()[rows["test"][: 4 * predictor.batch_size]])
        rate = bare_rate(predictor, sample)
        forwards = 8 * (len(rows["val"]) + len(rows["test"]))
        result = evaluate_run(
            run_dir, tta=True, n_boot=args.bootstrap, explain_images=args.explain_images, device=args.device
        )
    total = sum(result.seconds.values())
    bare_seconds = forwards / rate
    report = {
        "benchmark": "evaluate_time",
        "run": str(run_dir) if args.run else f"DeepAPL, EfficientNet-Lite0 at {args.size} px (timing run)",
        "image_size": predictor.image_size,
        "device": str(predictor.device),
        "gpu": torch.cuda.get_device_name() if predictor.device.type == "cuda" else None,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "images": {split: len(r) for split, r in rows.items()},
        "bare_img_per_s": round(rate, 1),
        "bare_forwards": forwards,
        "bare_seconds": round(bare_seconds, 1),
        "evaluate_seconds": round(total, 1),
        "stages_seconds": {k: round(v, 1) for k, v in result.seconds.items()},
        "evaluate_over_bare": round(total / bare_seconds, 3),
        "explanations_share": round(result.seconds.get("explanations", 0.0) / total, 3),
        "explain_images": args.explain_images,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
