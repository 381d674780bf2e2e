"""`audit-shortcuts`: does a run's model read the leukocyte, or the slide around it?

The masks, views, background probe features and report figures live in `blastscan.explain.shortcuts`; this module
runs them over a run's splits with the run's `Predictor` and writes the results.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from blastscan.evaluation.metrics import metrics_with_ci, threshold_for_specificity, youden_threshold
from blastscan.explain.shortcuts import (
    CONDITIONS,
    DILATE_PX,
    PROBE,
    ShortcutReport,
    auroc_chart,
    background_colour,
    example_rows,
    examples_figure,
    remove_background,
    remove_cell,
    segment_rows,
    shortcut_markdown,
)
from blastscan.imaging.segmentation import WORKING_SIZE
from blastscan.inference import Predictor, probabilities
from blastscan.runs import RunFolder, write_json


def shortcut_audit(
    run_dir: str | Path,
    split: str = "test",
    out_dir: str | Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    probe_c: float = 1.0,
    n_examples: int = 4,
    workers: int = 4,
    log: Callable[[str], None] | None = None,
    device: str = "auto",
) -> ShortcutReport:
    """Score `run_dir`'s model on its `split` as is, with the cell removed and with the background removed, and a
    background-only probe trained on the train split; write shortcuts.json, shortcuts.md, shortcuts.png and
    shortcut_examples.png to `out_dir` (default `run_dir/eval/shortcuts-<split>`).

    Thresholds (Youden and 95% specificity) come from the validation split: the model's on the original validation
    images, the probe's on its validation scores. Intervals are bootstraps over patients when known, else images.
    `probe_c` is the probe's inverse L2 strength; `log` receives progress lines.
    """
    started = time.perf_counter()
    say = log or (lambda _message: None)
    run = RunFolder.open(run_dir)
    run_dir = run.path
    config = run.config()
    manifest = run.manifest()
    rows = {name: run.rows(name, manifest) for name in ("train", "val", split)}
    targets = run.class_targets(manifest)
    patients = run.patient_ids(manifest)
    out_dir = Path(out_dir) if out_dir is not None else run.shortcuts_dir(split)
    out_dir.mkdir(parents=True, exist_ok=True)

    predictor = Predictor.from_run(run, device=device)
    size = predictor.image_size
    cache = predictor.image_cache(manifest, config.data.cache_dir)
    say(f"segmenting {sum(len(r) for r in rows.values())} images")
    segmented = {name: segment_rows(manifest, chosen, size, workers, predictor) for name, chosen in rows.items()}

    # The neutral colour that replaces the background: the median glass colour of the training images, so the
    # cell-only view carries no per-image glass colour.
    train_images = cache.array()[rows["train"]]
    glass = [
        background_colour(image, mask)
        for image, mask, ok in zip(train_images, segmented["train"].masks, segmented["train"].ok, strict=True)
        if ok
    ]
    neutral = np.median(np.stack(glass), axis=0) if glass else np.full(3, 255.0)

    val_logits = predictor.logits_of_rows(cache, rows["val"])
    p_val, y_val = probabilities(val_logits), targets[rows["val"]]
    threshold, threshold_95 = youden_threshold(y_val, p_val), threshold_for_specificity(y_val, p_val, 0.95)

    test_rows, test_seg = rows[split], segmented[split]
    y_test = targets[test_rows]
    groups = patients[test_rows] if patients is not None else None
    originals = cache.array()[test_rows]
    views = {
        "original": originals,
        "cell_removed": np.stack(
            [remove_cell(im, m, neutral) for im, m in zip(originals, test_seg.masks, strict=True)]
        ),
        "background_removed": np.stack(
            [remove_background(im, m, neutral) for im, m in zip(originals, test_seg.masks, strict=True)]
        ),
    }
    conditions: dict[str, dict[str, Any]] = {}
    for name in CONDITIONS:
        say(f"scoring {name}")
        p = probabilities(predictor.logits_prepared(views[name]))
        conditions[name] = metrics_with_ci(y_test, p, threshold, threshold_95, groups, n_boot, seed)

    say("training the background-only probe")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=probe_c, max_iter=5000))
    probe.fit(segmented["train"].features, targets[rows["train"]])
    p_probe_val = probe.predict_proba(segmented["val"].features)[:, 1]
    p_probe = probe.predict_proba(test_seg.features)[:, 1]
    conditions[PROBE] = metrics_with_ci(
        y_test,
        p_probe,
        youden_threshold(y_val, p_probe_val),
        threshold_for_specificity(y_val, p_probe_val, 0.95),
        groups,
        n_boot,
        seed,
    )

    picks = example_rows(y_test, n_examples)
    examples = {name: views[name][picks] for name in CONDITIONS} | {"cell_mask": test_seg.masks[picks]}
    n_unsegmented = int((~test_seg.ok).sum())
    report = ShortcutReport(
        out_dir=out_dir,
        run_dir=run_dir,
        split=split,
        n_images=len(test_rows),
        n_unsegmented=n_unsegmented,
        conditions=conditions,
        seconds=0.0,
        examples=examples,
    )
    paths = manifest.table["path"].astype(str).to_numpy()
    report.files["examples"] = examples_figure(
        out_dir / "shortcut_examples.png", examples, y_test[picks], test_seg.ok[picks]
    )
    report.files["chart"] = auroc_chart(out_dir / "shortcuts.png", report)
    report.seconds = time.perf_counter() - started
    details = {
        "run": str(run_dir),
        "split": split,
        "n_images": len(test_rows),
        "n_unsegmented": n_unsegmented,
        "unsegmented_paths": paths[test_rows][~test_seg.ok].tolist(),
        "n_unsegmented_train_val": {n: int((~segmented[n].ok).sum()) for n in ("train", "val")},
        "masking": {
            "segmentation": f"segment_cell at {WORKING_SIZE} px, cell mask dilated by {DILATE_PX} px",
            "cell_removed": "pixels in the cell mask set to the image's own median background colour",
            "background_removed": "pixels outside the cell mask set to the train split's median glass colour",
            "neutral_colour": neutral.tolist(),
            "unsegmented": "kept unmasked in every view",
        },
        "thresholds": {"chosen_on": "validation, original images", "youden": threshold, "spec95": threshold_95},
        "probe": {
            "features": "background RGB mean/sd/percentiles, colour histograms, gradient and Laplacian energy",
            "model": f"StandardScaler + LogisticRegression(C={probe_c})",
            "trained_on": "train",
            "threshold_on": "val",
        },
        "conditions": conditions,
        "seconds": report.seconds,
    }
    report.files["json"] = write_json(out_dir / "shortcuts.json", details)
    report.files["markdown"] = out_dir / "shortcuts.md"
    report.files["markdown"].write_text(shortcut_markdown(report))
    say(f"done in {report.seconds:.1f} s")
    return report
