"""The `blastscan` command line: parses, calls the library, prints. No logic of its own."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from blastscan import __version__
from blastscan.data.audit import AuditReport, audit, report_summary
from blastscan.data.manifest import read_manifest, write_manifest
from blastscan.data.registry import ReaderOptions, reader_names
from blastscan.data.scan import scan
from blastscan.data.splits import make_split, read_splits, write_splits
from blastscan.errors import BlastscanError

app = typer.Typer(help="Leukemia detection in blood smear images: data, training, evaluation.", no_args_is_help=True)
data_app = typer.Typer(help="Dataset readers, splits, audit and image cache.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)

FormatName = StrEnum("FormatName", {name: name for name in ["auto", *reader_names()]})  # type: ignore[misc]


def fail(exc: BlastscanError) -> typer.Exit:
    """Print a library error as one line and exit non-zero."""
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def command(group: typer.Typer, name: str | None = None) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a CLI command with the one error and logging policy every command shares: a library error is one
    line on stderr and exit 2; Lightning's start-up chatter is hidden (its warnings still show)."""

    def decorate(function: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(function)
        def run(*args: object, **kwargs: object) -> None:
            logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
            try:
                function(*args, **kwargs)
            except BlastscanError as exc:
                raise fail(exc) from None

        return group.command(name)(run)

    return decorate


def say(text: str) -> None:
    """A progress line from a long-running workflow."""
    console.print(f"[bold]>[/] {text}", highlight=False)


class _SayHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        say(record.getMessage())


@contextmanager
def library_log(name: str) -> Iterator[None]:
    """Show the library logger `name`'s INFO lines as progress lines while the block runs."""
    logger, handler = logging.getLogger(name), _SayHandler()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


#: `--device` on every command that runs a model.
DeviceOption = Annotated[
    str, typer.Option(help="Where the model runs: auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps.")
]


#: `--backend` on the commands that score images.
BackendOption = Annotated[
    str,
    typer.Option(
        help="How the network runs: auto (ONNX Runtime on the CPU when installed, else torch; torch on a GPU), "
        "onnx or torch. An exported model folder always runs on ONNX Runtime."
    ),
]
#: `--int8` on the commands that take an exported model folder.
Int8Option = Annotated[bool, typer.Option("--int8", help="Use the export folder's model.int8.onnx.")]
SiteOption = Annotated[
    str | None,
    typer.Option(help="A site profile (`blastscan calibrate --site NAME`): its threshold and temperature instead."),
]


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A Rich progress bar; yields the callback the library calls with the number of items done."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


@command(app)
def version() -> None:
    """Print the blastscan version."""
    console.print(__version__)


@command(app)
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to write.")] = Path("runs/demo"),
    data: Annotated[
        Path | None, typer.Option(help="Run on this dataset folder or lab CSV instead of synthetic cells.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the synthetic data and the split.")] = 0,
    epochs: Annotated[int | None, typer.Option(help="Cap the training epochs (default: the preset's).")] = None,
) -> None:
    """Run the whole pipeline on generated SYNTHETIC smear cells (or on --data) and write a run folder."""
    from blastscan.workflows.demo import run_demo

    if data is None:
        console.print(
            "[bold yellow]SYNTHETIC DATA[/]: procedurally drawn cells, not patients; pass --data for real data"
        )
    result = run_demo(out, data=data, seed=seed, epochs=epochs, stage=say)
    console.print(
        f"{result.images} images: " + ", ".join(f"{k}: {v}" for k, v in result.class_counts.items()), highlight=False
    )
    table = Table(title=f"{result.split_level}-level split")
    labels = sorted({label for row in result.split_counts.values() for label in row})
    table.add_column("split")
    for label in labels:
        table.add_column(label, justify="right")
    for split, row in sorted(result.split_counts.items()):
        table.add_row(split, *(str(row.get(label, 0)) for label in labels))
    console.print(table)
    console.print("audit: " + ", ".join(f"{k} {v}" for k, v in result.audit.items()), highlight=False)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)
    auroc = "n/a" if result.best_val_auroc is None else f"{result.best_val_auroc:.3f}"
    console.print(
        f"trained {result.model} for {result.epochs} epochs: best validation AUROC {auroc} (epoch {result.best_epoch})",
        highlight=False,
    )
    if result.test_roc_auc is not None:
        low, high = result.test_roc_auc_ci or (float("nan"), float("nan"))
        console.print(
            f"test split (patients never seen in training): AUROC {result.test_roc_auc:.3f} "
            f"(95% CI {low:.3f}-{high:.3f}); report: {result.report}",
            highlight=False,
        )
    if result.field_analysis is not None:
        found = result.field_analysis
        console.print(
            f"smear field {found['field']}: {found['cells_found']} leukocytes found "
            f"({found['leukocytes_drawn']} drawn), "
            f"{found['blasts_called']} called blast ({found['blasts_drawn']} drawn) -> {found['smear_call']}; "
            f"review page: {found['page']}",
            highlight=False,
        )
    if result.export is not None:
        exported = result.export
        checks = "parity checks passed" if exported["checks_passed"] else "a parity check FAILED (see parity.json)"
        console.print(
            f"exported: {exported['folder']} (model.onnx {exported['model_mb']} MB, model.int8.onnx "
            f"{exported['int8_mb']} MB; {checks}); serve it with `blastscan serve {exported['folder']}`",
            highlight=False,
        )
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    console.print(f"run folder: {result.run_dir} ({timings})", highlight=False)
    if result.synthetic:
        console.print("[bold yellow]SYNTHETIC DATA[/]: these numbers describe cartoons, not patients")


@command(app)
def train(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Experiment YAML (see configs/).")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key, e.g. --set trainer.max_epochs=5.")
    ] = None,
    resume: Annotated[Path | None, typer.Option(help="Resume the run in this folder from its last checkpoint.")] = None,
    devices: Annotated[int | None, typer.Option(help="Processes / GPUs for data-parallel training.")] = None,
    strategy: Annotated[str | None, typer.Option(help="Lightning strategy, e.g. ddp.")] = None,
    freeze_backbone: Annotated[
        bool | None, typer.Option("--freeze-backbone/--train-backbone", help="Train only the classifier head.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Train a leukemic-vs-normal classifier and write a self-describing run folder."""
    from blastscan.runs import RunFolder
    from blastscan.training.config import load_config
    from blastscan.workflows.train import train as train_run

    overrides = list(set_ or [])
    if devices is not None:
        overrides.append(f"trainer.devices={devices}")
    if strategy is not None:
        overrides.append(f"trainer.strategy={strategy}")
    if freeze_backbone is not None:
        overrides.append(f"model.freeze_backbone={str(freeze_backbone).lower()}")
    if resume is not None:
        loaded = RunFolder(resume).config(overrides)
    elif config is not None:
        loaded = load_config(config, overrides)
    else:
        raise BlastscanError("pass --config configs/<name>.yaml, or --resume runs/<name>")
    with library_log("blastscan.training"):  # which data path the run takes, and why
        result = train_run(loaded, resume=resume is not None, progress_bar=progress, run_dir=resume)
    best = "n/a" if result.best_score is None else f"{result.best_score:.4f}"
    stop = "stopped early" if result.stopped_early else "ran all epochs"
    console.print(
        f"run {result.run_dir}: {result.epochs} epochs ({stop}) on {result.world_size} process(es); "
        f"best {result.monitor} {best} "
        f"at epoch {result.best_epoch}; weights in {RunFolder(result.run_dir).weights_path}",
        highlight=False,
    )


@command(app)
def evaluate(
    run: Annotated[Path, typer.Argument(help="A run folder made by `blastscan train`.")],
    data: Annotated[
        Path | None, typer.Option(help="Score every image of this dataset / lab CSV / manifest (external).")
    ] = None,
    split: Annotated[str, typer.Option(help="The run's own split to score when --data is not given.")] = "test",
    tta: Annotated[bool, typer.Option(help="Also score with test-time augmentation (8 flips/rotations).")] = False,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals.")] = 1000,
    explain_images: Annotated[
        int, typer.Option(help="Images sampled for the CAM localisation figure (0: no Grad-CAM at all).")
    ] = 200,
    device: DeviceOption = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
) -> None:
    """Score a trained run: metrics with 95% CIs, calibration, patient level, figures and an HTML report."""
    from blastscan.workflows.evaluate import evaluate_run

    with console.status("scoring"):
        result = evaluate_run(
            run,
            data=data,
            split=split,
            tta=tta,
            n_boot=bootstrap,
            explain=explain_images > 0,
            explain_images=explain_images,
            device=device,
            batch_size=batch_size,
        )
    print_metrics(result.metrics, title=f"{run.name} on {result.dataset} ({result.split})")
    if result.tta_metrics:
        print_metrics(result.tta_metrics, title="with test-time augmentation")
    stages = ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in result.seconds.items())
    console.print(f"time: {stages}", highlight=False)
    console.print(f"wrote {result.out_dir} (metrics.json, predictions.csv, figures, report.html)", highlight=False)


@command(app)
def calibrate(
    run: Annotated[Path, typer.Argument(help="A run folder made by `blastscan train`.")],
    data: Annotated[Path, typer.Option(help="Labelled cells from the new site (dataset folder, lab CSV, manifest).")],
    site: Annotated[str, typer.Option(help="The site profile's name (what predict/analyze/serve --site take).")],
    target_specificity: Annotated[float, typer.Option(help="The specificity the site threshold must reach.")] = 0.95,
    sample_size: Annotated[
        int | None,
        typer.Option(help="Draw this many cells from DATA as the sample and judge the profile on the rest."),
    ] = None,
    method: Annotated[str, typer.Option(help="Threshold fit: gaussian (smooth, for few cells) or empirical.")] = (
        "gaussian"
    ),
    repeats: Annotated[int, typer.Option(help="With --sample-size: draw the sample this many times (seeds).")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the first sample draw.")] = 0,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals.")] = 1000,
    device: DeviceOption = "auto",
) -> None:
    """Refit a run's threshold and temperature on a small labelled sample from a new site; store it as a site
    profile (the run's own stays) and report how far the operating point moved."""
    from blastscan.workflows.calibrate import calibrate_site

    with console.status("scoring the site's cells"):
        result = calibrate_site(
            run, data, site, target_specificity=target_specificity, sample_size=sample_size, method=method,
            repeats=repeats, seed=seed, n_boot=bootstrap, device=device,
        )  # fmt: skip
    console.print(result.markdown_path.read_text(), highlight=False, markup=False)
    console.print(f"wrote {result.profile_path} (use it with --site {site}) and {result.report_path}", highlight=False)


@command(app, "evaluate-ood")
def evaluate_ood(
    run: Annotated[Path, typer.Argument(help="A run folder made by `blastscan train`.")],
    in_data: Annotated[
        Path | None, typer.Option("--in", help="In-domain images (default: the run's own test split).")
    ] = None,
    out_data: Annotated[
        list[Path] | None,
        typer.Option("--out", help="Other datasets (default: every other labelled cell dataset in BLASTSCAN_DATA)."),
    ] = None,
    synthetic: Annotated[int, typer.Option(help="Synthetic cells to add as an out-of-distribution set.")] = 200,
    photographs: Annotated[int, typer.Option(help="Non-cell photograph crops to add (scikit-image's).")] = 200,
    max_images: Annotated[int, typer.Option(help="At most this many images per dataset (a seeded sample).")] = 2000,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals.")] = 1000,
    device: DeviceOption = "auto",
) -> None:
    """Measure the out-of-distribution flag (AUROC of in-domain vs other datasets, synthetic cells, photographs,
    per method) and abstention (accuracy vs coverage); writes RUN/eval/ood/."""
    from blastscan.workflows.evaluate_ood import evaluate_ood as run_evaluate_ood

    result = run_evaluate_ood(
        run, in_data=in_data, out_data=out_data or None, synthetic=synthetic, photographs=photographs,
        max_images=max_images, n_boot=bootstrap, device=device, progress=say,
    )  # fmt: skip
    console.print((result.out_dir / "ood.md").read_text(), highlight=False, markup=False)
    console.print(f"wrote {result.out_dir} (ood.json, ood.md, ood_scores.png, selective_prediction.png)")


@command(app)
def patients(
    data: Annotated[Path, typer.Option(help="Cells with patient_id, diagnosis, age, gender, cell_type (DeepAPL).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("patients"),
    folds: Annotated[int, typer.Option(help="Stratified folds by patient.")] = 5,
    repeats: Annotated[int, typer.Option(help="Repeats of the K-fold split (other seeds).")] = 5,
    positive: Annotated[str, typer.Option(help="The diagnosis called positive.")] = "APL",
    images: Annotated[bool, typer.Option(help="Also the image models (ImageNet Lite0 cell embeddings).")] = True,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples (patients) for the 95% intervals.")] = 1000,
    mil_epochs: Annotated[int, typer.Option(help="Training epochs of the attention-MIL models (fixed).")] = 30,
    final: Annotated[
        str,
        typer.Option(
            help="The model fitted on every patient and saved to OUT/model: a model name from the table, 'auto' "
            "(image, mean-pooled; clinical with --no-images) or 'none'."
        ),
    ] = "auto",
    gallery_cells: Annotated[int, typer.Option(help="Cells per patient in the attention galleries (0: none).")] = 8,
    predict: Annotated[
        Path | None,
        typer.Option(help="Apply this saved model (OUT/model of an earlier run) to the patients of --data instead."),
    ] = None,
    backbone: Annotated[
        Path | None,
        typer.Option(
            help="A trained run whose network embeds the cells instead of the ImageNet Lite0; refused when its data "
            "holds any cell or patient of --data."
        ),
    ] = None,
) -> None:
    """Patient-level diagnosis from a patient's cells plus age and sex, compared by repeated cross-validation by
    patient (thresholds chosen inside the training folds); with --predict, a saved model scores a new cohort."""
    from blastscan.workflows.patients import patients as run_patients
    from blastscan.workflows.patients import predict_patients

    if predict is not None:
        scored = predict_patients(predict, data, out, n_boot=bootstrap, progress=say)
        console.print(scored.table.to_string(index=False), highlight=False, markup=False)
        if scored.metrics is not None:
            m = scored.metrics
            console.print(
                f"AUROC {m['auroc']:.3f} ({m['auroc_ci'][0]:.3f}-{m['auroc_ci'][1]:.3f}), sensitivity "
                f"{m['sensitivity']:.3f}, specificity {m['specificity']:.3f} over {m['patients']} patients"
            )
        console.print(f"wrote {scored.out} (predictions.csv{', metrics.json' if scored.metrics else ''})")
        return
    result = run_patients(
        data, out, folds=folds, repeats=repeats, positive=positive, images=images, n_boot=bootstrap, progress=say,
        mil_epochs=mil_epochs, final=None if final == "none" else final, gallery_cells=gallery_cells,
        backbone=backbone,
    )  # fmt: skip
    console.print((result.out / "patients.md").read_text(), highlight=False, markup=False)
    saved = f", model/ ({result.final_name})" if result.final_model else ""
    console.print(
        f"wrote {result.out} (patients.md, patients.csv, scores.csv, patients.json, patients.png, calibration.png"
        f"{', galleries/' if (result.out / 'galleries').is_dir() else ''}{saved})",
        highlight=False,
    )


def print_metrics(metrics: dict, title: str) -> None:
    """The headline metrics with their intervals."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% CI", justify="right")
    from blastscan.workflows.experiments import KEY_METRICS

    for key in KEY_METRICS:
        value = metrics.get(key)
        low, high = (metrics.get("ci") or {}).get(key) or (None, None)
        shown = "n/a" if value is None or value != value else f"{value:.3f}"
        table.add_row(key, shown, "" if low is None else f"{low:.3f} - {high:.3f}")
    console.print(table)
    threshold = metrics.get("threshold") or float("nan")
    extra = f"threshold {threshold:.3f} (chosen on validation); images {metrics.get('n_images')}"
    if metrics.get("n_patients"):
        extra += f", patients {metrics['n_patients']}"
    console.print(extra, highlight=False)


@command(app)
def crossval(
    config: Annotated[Path, typer.Option("--config", "-c", help="Experiment YAML.")],
    folds: Annotated[int, typer.Option(help="Number of grouped folds.")] = 5,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key.")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples per fold.")] = 1000,
    device: DeviceOption = "auto",
) -> None:
    """K-fold grouped cross-validation; a mean +- sd table and a box plot (re-running reuses finished folds)."""
    from blastscan.training.config import load_config
    from blastscan.workflows.experiments import crossval as run_crossval

    result = run_crossval(
        load_config(config, list(set_ or [])),
        folds=folds,
        n_boot=bootstrap,
        log=say,
        device=device,
    )
    table = Table(title=f"{folds}-fold cross-validation")
    for column in ("metric", "mean", "sd"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for metric, mean, sd in result.summary.itertuples(index=False):
        table.add_row(metric, f"{mean:.3f}", f"{sd:.3f}")
    console.print(table)
    console.print(f"wrote {result.out_dir} (crossval.md, crossval_folds.csv, crossval_boxplot.png)", highlight=False)


@command(app)
def transfer(
    config: Annotated[Path, typer.Option("--config", "-c", help="Experiment YAML (model, training).")],
    dataset: Annotated[
        list[str] | None,
        typer.Option(
            "--dataset",
            "-d",
            help="A labelled cell dataset (folder, lab CSV or manifest; repeatable). Default: every one of a known "
            "layout under $BLASTSCAN_DATA.",
        ),
    ] = None,
    variant: Annotated[
        list[str] | None,
        typer.Option(
            help="plain, stain-jitter, reinhard, crop, mask, strong-stain, mask-reinhard-strong "
            "(repeatable). Default: all but stain-jitter."
        ),
    ] = None,
    leave_one_out: Annotated[
        bool, typer.Option(help="Also train on all datasets but one and test on the one left out.")
    ] = True,
    audit: Annotated[bool, typer.Option(help="Run the shortcut audit on every model.")] = True,
    explain_images: Annotated[int, typer.Option(help="Images per model for the CAM-in-cell share (0: none).")] = 100,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key.")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples per evaluation.")] = 1000,
    device: DeviceOption = "auto",
) -> None:
    """The external-validation matrix: every variant trained on each dataset (and on all but one), tested on the
    others, with CIs, a shortcut audit and the CAM-in-cell share per model."""
    from blastscan.data.registry import find_cell_datasets
    from blastscan.training.config import DataConfig, load_config
    from blastscan.workflows.transfer import DEFAULT_VARIANTS
    from blastscan.workflows.transfer import transfer as run_transfer

    roots: list[str] = list(dataset or [])
    if not roots:
        data_dir = DataConfig(root="$BLASTSCAN_DATA").resolved_root()
        found = find_cell_datasets(data_dir) if data_dir.is_dir() else []
        say(f"datasets under {data_dir}: " + (", ".join(f"{p} ({n})" for n, p in found) or "none"))
        roots = [str(p) for _, p in found]
    result = run_transfer(
        load_config(config, list(set_ or [])),
        roots,
        variants=variant or list(DEFAULT_VARIANTS),
        leave_one_out=leave_one_out,
        audit=audit,
        n_boot=bootstrap,
        explain_images=explain_images,
        log=say,
        device=device,
    )
    console.print((result.out_dir / "transfer.md").read_text(), highlight=False)
    console.print(f"wrote {result.out_dir} (transfer.md, transfer.csv, models.csv, heatmaps)", highlight=False)


@command(app)
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders with evaluations.")],
    evaluation: Annotated[str | None, typer.Option(help="Only this eval folder, e.g. deepapl-test.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the table here (.md and .csv beside it).")] = None,
) -> None:
    """One table of the key metrics with 95% CIs across runs."""
    from blastscan.workflows.experiments import compare as run_compare
    from blastscan.workflows.experiments import comparison_markdown

    table = run_compare(runs, evaluation)
    markdown = comparison_markdown(table)
    console.print(markdown, highlight=False)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(markdown)
        table.to_csv(out.with_suffix(".csv"), index=False)
        console.print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.csv')}", highlight=False)


@command(app)
def baselines(
    data: Annotated[Path, typer.Option(help="Manifest CSV (from `blastscan data scan` or a run folder).")],
    splits: Annotated[Path, typer.Option(help="Split CSV with train/val/test (e.g. runs/<name>/splits.csv).")],
    out: Annotated[Path, typer.Option(help="Output folder for the table, bar chart and segmentation figure.")],
    cnn: Annotated[Path | None, typer.Option(help="A trained run: adds the CNN and its embeddings (hybrid).")] = None,
    image_size: Annotated[int, typer.Option(help="Working resolution of the features.")] = 128,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals.")] = 1000,
    device: DeviceOption = "auto",
) -> None:
    """Classical ML (SVM, RF, KNN, LR on handcrafted features) vs CNN vs hybrid CNN-features + classifiers."""
    from blastscan.workflows.baselines import run_baselines

    result = run_baselines(
        data,
        splits,
        out,
        cnn_run=cnn,
        image_size=image_size,
        n_boot=bootstrap,
        log=say,
        device=device,
    )
    console.print(result.markdown.read_text(), highlight=False)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)
    console.print(f"wrote {result.out_dir} (baselines.md, baselines.csv, baselines_bar.png, segmentation.png)")


@command(app)
def explain(
    run: Annotated[Path, typer.Argument(help="A run folder made by `blastscan train`.")],
    images: Annotated[list[Path], typer.Argument(help="Images to explain.")],
    method: Annotated[str, typer.Option(help="gradcam, gradcam++, scorecam or eigencam.")] = "gradcam",
    out: Annotated[Path, typer.Option(help="Folder for the overlays.")] = Path("explanations"),
    feature_maps: Annotated[bool, typer.Option(help="Also write early/middle/late activation-map grids.")] = False,
    device: DeviceOption = "auto",
) -> None:
    """Per image: the original, the class-activation overlay for 'leukemic', and the predicted probability."""
    from blastscan.explain.cam import explain_images, feature_map_grid
    from blastscan.inference import Predictor

    predictor = Predictor.from_run(run, device=device, backend="torch")
    records = explain_images(predictor, images, out, method=method)
    grids = []
    if feature_maps:
        grids = [feature_map_grid(predictor, image, out / f"{image.stem}_feature_maps.png") for image in images]
    for record in records:
        console.print(f"{record.image}: p(leukemic) = {record.probability:.3f} -> {record.overlay}", highlight=False)
    for grid in grids:
        console.print(f"feature maps: {grid}", highlight=False)
    console.print(f"wrote {out} (explanations.csv)", highlight=False)


class RateColumn(ProgressColumn):
    """Images per second of a Rich progress task."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:.1f} img/s", style="progress.data.speed")


@command(app)
def predict(
    run: Annotated[
        Path, typer.Argument(help="A run folder (`blastscan train`) or an exported model folder (`blastscan export`).")
    ],
    inputs: Annotated[
        list[str], typer.Argument(help="Image files, folders (recursive), globs, lab CSVs or manifests, in any mix.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Predictions CSV to write.")] = Path("predictions.csv"),
    device: DeviceOption = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    tta: Annotated[bool, typer.Option(help="Average the 8 flips/rotations of each image.")] = False,
    workers: Annotated[int, typer.Option(help="Image-decoding threads.")] = 2,
    backend: BackendOption = "auto",
    int8: Int8Option = False,
    site: SiteOption = None,
    review_band: Annotated[
        float,
        typer.Option(
            help="Call `review` instead of 1/0 when the probability is this close to the threshold (0: never)."
        ),
    ] = 0.0,
    review_ood: Annotated[
        bool, typer.Option(help="Call `review` for images flagged out of distribution (unlike the training cells).")
    ] = False,
) -> None:
    """Score images with a trained run or exported model: path, probability, call (at the validation-chosen
    threshold, or `review`) and the out-of-distribution flag."""
    from blastscan.workflows.predict import count_sources
    from blastscan.workflows.predict import predict as run_predict

    total = count_sources(inputs)
    with Progress(
        TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), RateColumn(), TimeElapsedColumn(),
        console=err_console, transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task("scoring", total=total)
        result = run_predict(
            run, inputs, out, device=device, batch_size=batch_size, tta=tta, workers=workers,
            progress=lambda n: bar.advance(task, n), backend=backend, int8=int8, site=site,
            review_band=review_band, review_ood=review_ood,
        )  # fmt: skip
    for path, reason in result.failures[:20]:
        err_console.print(f"[yellow]skipped[/] {path}: {reason}", highlight=False, soft_wrap=True)
    if result.failures:
        more = f" ({len(result.failures) - 20} more)" if len(result.failures) > 20 else ""
        err_console.print(
            f"[bold yellow]warning:[/] {len(result.failures)} unreadable image(s) skipped{more}; "
            f"listed in {result.skipped_file}",
            highlight=False,
            soft_wrap=True,
        )
    if result.no_cell:
        err_console.print(
            f"[bold yellow]warning:[/] no cell found to frame in {result.no_cell} image(s): scored whole, flagged "
            "cell_found = 0 in the CSV; review them by eye",
            highlight=False,
            soft_wrap=True,
        )
    if result.out_of_distribution:
        err_console.print(
            f"[bold yellow]warning:[/] {result.out_of_distribution} of {result.scored} image(s) look unlike the "
            "training cells (out_of_distribution = 1): their probabilities may be wrong; review them, or calibrate "
            "the model for this site (`blastscan calibrate`)",
            highlight=False,
            soft_wrap=True,
        )
    elif result.ood_note:
        err_console.print(f"[yellow]note:[/] {result.ood_note}", highlight=False, soft_wrap=True)
    chosen = f"site profile {site}" if site else "the run's validation split"
    review = f", {result.review} to review" if result.review else ""
    console.print(
        f"wrote {result.out}: {result.scored} images, {result.positive} called positive{review} at threshold "
        f"{result.threshold:.4f} (chosen on {chosen}); {result.images_per_second:.1f} img/s",
        highlight=False,
    )


@command(app)
def analyze(
    run: Annotated[
        Path, typer.Argument(help="A run folder (`blastscan train`) or an exported model folder (`blastscan export`).")
    ],
    fields: Annotated[list[str], typer.Argument(help="Smear field images, folders (recursive) or globs.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (one sub-folder per field).")] = Path(
        "fields"
    ),
    device: DeviceOption = "auto",
    cell_threshold: Annotated[
        float | None, typer.Option(help="Blast probability threshold (default: the run's validation-chosen one).")
    ] = None,
    smear_threshold: Annotated[
        float, typer.Option(help="Blast share (0-1) at which a smear is called leukemic (see evaluate-fields).")
    ] = 0.2,
    red_cell_diameter: Annotated[
        float | None, typer.Option(help="Red-cell diameter in pixels, when known (default: measured per field).")
    ] = None,
    backend: BackendOption = "auto",
    int8: Int8Option = False,
    site: SiteOption = None,
) -> None:
    """Find every leukocyte in smear fields, score each, count blasts and call each smear."""
    from blastscan.workflows.analyze import analyze as run_analyze
    from blastscan.workflows.predict import count_sources

    total = count_sources(fields)
    with progress_bar("analysing fields", total) as advance:
        result = run_analyze(
            run, fields, out, device=device, cell_threshold=cell_threshold, smear_threshold=smear_threshold,
            red_cell_diameter=red_cell_diameter, progress=advance, backend=backend, int8=int8, site=site,
        )  # fmt: skip
    for path, reason in result.failures:
        err_console.print(f"[yellow]not analysed[/] {path}: {reason}", highlight=False, soft_wrap=True)
    for row in result.rows:
        share = "-" if row["blast_percentage"] is None else f"{row['blast_percentage']:.1f}%"
        console.print(
            f"{row['field']}: {row['leukocytes_counted']} leukocytes, {row['blasts']} blasts ({share}) -> "
            f"{row['smear_call']}",
            highlight=False,
        )
    console.print(
        f"wrote {result.out} ({len(result.rows)} field(s), {len(result.failures)} not analysed; index.html, "
        f"summary.csv) in {result.seconds:.1f} s",
        highlight=False,
    )


class ExportFormat(StrEnum):
    onnx = "onnx"


@command(app)
def export(
    run: Annotated[Path, typer.Argument(help="A run folder made by `blastscan train` (with its dataset reachable).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The export folder to write.")],
    format: Annotated[ExportFormat, typer.Option("--format", help="The model format.")] = ExportFormat.onnx,
    int8: Annotated[bool, typer.Option("--int8", help="Also write a statically quantised model.int8.onnx.")] = False,
    calibration: Annotated[int, typer.Option(help="Training-split images that calibrate the INT8 model.")] = 256,
    parity_images: Annotated[
        int | None, typer.Option(help="Test images the parity check scores (default: the whole test split).")
    ] = None,
) -> None:
    """Export a run as a deployable ONNX model folder (model.onnx, model.int8.onnx, preprocessing.json, model
    card) and measure its parity with the torch model on the run's test split."""
    from blastscan.workflows.export import export_run

    result = export_run(run, out, int8=int8, calibration=calibration, parity_images=parity_images, progress=say)
    table = Table("model", "AUROC (95% CI)", "accuracy", "sensitivity", "specificity", title="test split")
    for name, m in result.parity["models"].items():
        low, high = m["auroc_ci95"]
        table.add_row(
            name, f"{m['auroc']:.4f} ({low:.4f}-{high:.4f})", f"{m['accuracy']:.3f}", f"{m['sensitivity']:.3f}",
            f"{m['specificity']:.3f}",
        )  # fmt: skip
    console.print(table)
    for name, check in result.parity["checks"].items():
        mark = "[green]passed[/]" if check["passed"] else "[bold red]FAILED[/]"
        console.print(f"{name} ({check['tolerance']}): {mark}", highlight=False)
    console.print(f"wrote {result.folder.path} in {result.seconds:.0f} s", highlight=False)
    if not result.passed:
        err_console.print(
            "[bold yellow]warning:[/] a parity check failed (see parity.json); the model was written but check it "
            "before deploying it",
            highlight=False,
        )
        raise typer.Exit(code=1)


@command(app)
def serve(
    model: Annotated[
        Path, typer.Argument(help="An exported model folder (`blastscan export`), an .onnx file in one, or a run.")
    ],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body, MB (413 beyond).")] = 20.0,
    max_image_pixels: Annotated[int, typer.Option(help="Largest image, width x height (refused beyond).")] = 40_000_000,
    max_files: Annotated[int, typer.Option(help="Most cell crops in one request.")] = 64,
    device: DeviceOption = "auto",
    backend: BackendOption = "auto",
    int8: Int8Option = False,
    site: SiteOption = None,
) -> None:
    """Serve a model over HTTP: the web page at /, the API under /v1 (documented at /docs), /healthz."""
    from blastscan.deploy.service import ServiceLimits
    from blastscan.workflows.serve import serve as run_service

    size = int(max_upload_mb * 1024 * 1024)
    limits = ServiceLimits(
        max_upload_bytes=size, max_file_bytes=size, max_image_pixels=max_image_pixels, max_files=max_files
    )
    console.print(f"serving {model} on http://{host}:{port} (page at /, API docs at /docs)", highlight=False)
    run_service(model, host, port, limits, device=device, backend=backend, int8=int8, site=site)


@command(app, "evaluate-fields")
def evaluate_fields(
    data: Annotated[Path, typer.Argument(help="ALL-IDB1 or BCCD folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("field-eval"),
    run: Annotated[
        list[Path] | None,
        typer.Option(
            help="A run (repeatable): also score blast finding and the smear call; each field is scored by "
            "the first run that has not seen it."
        ),
    ] = None,
    cross_fit_config: Annotated[
        Path | None,
        typer.Option(
            help="A training config (e.g. ALL-IDB2): train one run per fold of fields, each leaving out "
            "its fold's fields (data.leave_out_fields), and score each fold with its run."
        ),
    ] = None,
    cross_fit_folds: Annotated[int, typer.Option(help="Folds of field groups for --cross-fit-config.")] = 2,
    only_unseen: Annotated[
        bool, typer.Option(help="Evaluate only the fields some run's training crops were not cut from.")
    ] = False,
    folds: Annotated[int, typer.Option(help="Cross-validation folds for the smear threshold.")] = 5,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals.")] = 1000,
    device: DeviceOption = "auto",
) -> None:
    """Score leukocyte detection (ALL-IDB1 centroids, BCCD boxes) and, with runs, blast and smear calls."""
    from blastscan.workflows.evaluate_fields import evaluate_fields as run_evaluate_fields

    with progress_bar("evaluating fields", None) as advance:
        result = run_evaluate_fields(
            data, out, run or [], cross_fit_config=cross_fit_config, cross_fit_folds=cross_fit_folds,
            device=device, only_unseen=only_unseen, folds=folds, n_boot=bootstrap, progress=advance,
        )  # fmt: skip
    for line in _field_metric_lines(result.metrics):
        console.print(line, highlight=False)
    written = ", ".join(str(path) for path in result.files.values())
    console.print(f"wrote {written}", highlight=False)


def _interval(ci: list[float] | None) -> str:
    return f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else ""


def _field_metric_lines(metrics: dict) -> list[str]:
    """The headline figures of `evaluate-fields` (field_metrics.json has them all)."""
    lines = [f"{metrics['dataset']}: {metrics['fields']} field(s)"]
    if "detection_ap50" in metrics:
        ap = metrics["detection_ap50"]
        lines.append(
            f"WBC detection AP@0.5 {ap['ap']:.3f}{_interval(ap.get('ap_ci'))}; precision {ap['precision']:.3f}, "
            f"recall {ap['recall']:.3f} ({ap['truth']} boxes, {ap['found']} found)"
        )
    if "detection" in metrics:
        d, ci = metrics["detection"], metrics.get("detection_ci", {})
        lines.append(
            f"leukocyte detection ({metrics['marks']['leukocyte']} marks, {metrics['marks']['platelet']} platelet "
            f"marks set apart): precision {d['precision']:.3f}{_interval(ci.get('precision'))}, recall "
            f"{d['recall']:.3f}{_interval(ci.get('recall'))}, F1 {d['f1']:.3f}{_interval(ci.get('f1'))}"
        )
    if "blast_finding" in metrics:
        b = metrics["blast_finding"]
        lines.append(f"blast finding: precision {b['precision']:.3f}, recall {b['recall']:.3f}")
    smear = metrics.get("smear_level") or {}
    if "skipped" in smear:
        lines.append(f"smear level: skipped ({smear['skipped']})")
    elif smear:
        ci = smear["ci"]
        lines.append(
            f"smear call ({smear['folds']}-fold CV over field groups): accuracy {smear['accuracy']:.3f}"
            f"{_interval(ci['accuracy'])}, sensitivity {smear['recall']:.3f}{_interval(ci['recall'])}, specificity "
            f"{smear['specificity']:.3f}{_interval(ci['specificity'])}; AUROC of the blast share "
            f"{smear['roc_auc_blast_share']:.3f}{_interval(smear['roc_auc_ci'])}; recommended --smear-threshold "
            f"{smear['recommended_smear_threshold']:.3f}"
        )
    if smear.get("fields_without_leukocytes"):
        lines.append(f"smear level: {smear['fields_without_leukocytes']} field(s) without a leukocyte have no call")
    if metrics.get("fields_left_out_as_seen_in_training"):
        lines.append(f"left out (seen in training): {', '.join(metrics['fields_left_out_as_seen_in_training'])}")
    return lines


@command(app, "audit-shortcuts")
def audit_shortcuts(
    run: Annotated[Path, typer.Argument(help="A run folder made by `blastscan train`.")],
    split: Annotated[str, typer.Option(help="The run's split to audit.")] = "test",
    out: Annotated[Path | None, typer.Option(help="Output folder (default RUN/eval/shortcuts-SPLIT).")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals.")] = 1000,
    device: DeviceOption = "auto",
) -> None:
    """Re-score with the cell removed and with the background removed, and fit a background-only probe."""
    from blastscan.workflows.shortcuts import shortcut_audit

    report = shortcut_audit(
        run,
        split=split,
        out_dir=out,
        n_boot=bootstrap,
        log=say,
        device=device,
    )
    console.print(report.files["markdown"].read_text(), highlight=False)
    console.print(f"wrote {report.files['markdown'].parent}", highlight=False)


@command(data_app, "scan")
def data_scan(
    root: Annotated[Path, typer.Argument(help="Dataset folder (or a lab CSV file).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Manifest CSV to write.")] = Path("manifest.csv"),
    format: Annotated[FormatName, typer.Option("--format", "-f", help="Dataset layout.")] = FormatName.auto,  # type: ignore[attr-defined]
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Leave unreadable images out, with a warning.")] = False,
    cell_types: Annotated[
        Path | None, typer.Option(help="DeepAPL: JSON file mapping cell type -> leukemic/normal/exclude.")
    ] = None,
    labels_csv: Annotated[Path | None, typer.Option(help="C-NMC renamed test set: its labels CSV.")] = None,
    csv_root: Annotated[Path | None, typer.Option(help="Lab CSV: folder its relative paths start from.")] = None,
) -> None:
    """Read a dataset folder into a manifest (one row per image), checking that every image decodes."""
    try:
        mapping = json.loads(cell_types.read_text()) if cell_types else None
    except (OSError, json.JSONDecodeError) as exc:
        raise BlastscanError(f"{cell_types}: cannot read the cell-type mapping ({exc})") from None
    options = ReaderOptions(cell_type_labels=mapping, labels_csv=labels_csv, csv_root=csv_root)
    with progress_bar("decoding images", total=None) as advance:
        result = scan(root, format=str(format.value), options=options, skip_bad=skip_bad, progress=advance)
    write_manifest(result.manifest, out)
    how = "recognised as" if result.auto_detected else "read as"
    console.print(f"{root}: {how} [bold]{result.reader}[/] ({result.manifest.root})")
    for bad in result.bad_files:
        err_console.print(f"[yellow]warning:[/] left out {bad.path}: {bad.reason}", highlight=False)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)
    counts = ", ".join(f"{k}: {v}" for k, v in result.manifest.class_counts().items())
    patients = result.manifest.table["patient_id"].nunique() if result.manifest.has_patients else "none recorded"
    console.print(f"wrote {out}: {len(result.manifest)} images ({counts}); patients: {patients}")


@command(data_app, "split")
def data_split(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV from `blastscan data scan`.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Split CSV to write [default: splits.csv].")] = None,
    train: Annotated[float, typer.Option(help="Training fraction.")] = 0.7,
    val: Annotated[float, typer.Option(help="Validation fraction.")] = 0.15,
    test: Annotated[float, typer.Option(help="Test fraction.")] = 0.15,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same split.")] = 0,
    folds: Annotated[int | None, typer.Option(help="Make K grouped folds instead of train/val/test.")] = None,
    root: Annotated[Path | None, typer.Option(help="Dataset root, if it moved since the scan.")] = None,
) -> None:
    """Stratified split grouped by patient (or by duplicate cluster when patients are unknown)."""
    from blastscan.runs import RunFolder  # a split file has one name everywhere: the run folder's

    out = out if out is not None else Path(RunFolder.SPLITS)
    loaded = read_manifest(manifest, root=root)
    with console.status("grouping and splitting"):
        result = make_split(loaded, train=train, val=val, test=test, seed=seed, folds=folds)
    write_splits(result, out)
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    table = Table(title=f"{result.level}-level split, seed {seed} ({result.metadata['groups']} groups)")
    counts = result.counts()
    table.add_column("split")
    for label in counts.columns:
        table.add_column(str(label), justify="right")
    for split, row in counts.iterrows():
        table.add_row(str(split), *(str(int(v)) for v in row))
    console.print(table)
    console.print(f"wrote {out}")


@command(data_app, "audit")
def data_audit(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV from `blastscan data scan`.")],
    splits: Annotated[Path | None, typer.Option(help="Split CSV to check for leaks.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full audit as JSON.")] = None,
    near_threshold: Annotated[int, typer.Option(help="pHash distance counted as a near duplicate.")] = 10,
    root: Annotated[Path | None, typer.Option(help="Dataset root, if it moved since the scan.")] = None,
) -> None:
    """Unreadable files, duplicates, class balance and split leakage; exits 1 when the split leaks."""
    loaded = read_manifest(manifest, root=root)
    split_result = read_splits(splits, loaded) if splits else None
    with progress_bar("fingerprinting images", total=len(loaded)) as advance:
        report = audit(loaded, split_result, near_threshold=near_threshold, progress=advance)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(report.model_dump_json(indent=2))
    print_audit(report)
    if json_out:
        console.print(f"wrote {json_out}")
    if report.leaks:
        err_console.print("[bold red]LEAK:[/] the split puts one patient or duplicate cluster on two sides")
        raise typer.Exit(code=1)


@command(data_app, "cache")
def data_cache(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV from `blastscan data scan`.")],
    size: Annotated[int, typer.Option(help="Side of the square training resolution, in pixels.")] = 224,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache folder (default: $BLASTSCAN_CACHE or .cache).")] = None,
    workers: Annotated[int, typer.Option(help="Decoding threads.")] = 2,
    root: Annotated[Path | None, typer.Option(help="Dataset root, if it moved since the scan.")] = None,
) -> None:
    """Decode and resize every image once into the memory-mapped cache that training reads."""
    from blastscan.data.cache import ImageCache

    loaded = read_manifest(manifest, root=root)
    cache = ImageCache(loaded, size=size, cache_dir=cache_dir)
    with progress_bar("decoding into the cache", total=len(loaded)) as advance:
        stats = cache.build(workers=workers, progress=advance)
    console.print(
        f"cache {cache.path}: {stats.decoded} decoded, {stats.reused} reused, {stats.seconds:.1f}s", highlight=False
    )


def print_audit(report: AuditReport) -> None:
    """The audit as a short table and the findings worth reading."""
    table = Table(title=f"audit of {report.dataset} ({report.manifest_rows} images)")
    table.add_column("check")
    table.add_column("result", justify="right")
    for key, value in report_summary(report).items():
        table.add_row(key, str(value))
    table.add_row("classes", ", ".join(f"{k}: {v}" for k, v in report.class_counts.items()))
    table.add_row("image sizes", ", ".join(f"{k} ({v})" for k, v in list(report.image_sizes.items())[:4]))
    console.print(table)
    for bad in report.unreadable:
        console.print(f"unreadable: {bad.path}: {bad.reason}", highlight=False)
    for dup in report.duplicates[:30]:
        where = f" [{dup.first_split} / {dup.second_split}]" if dup.first_split else ""
        console.print(
            f"{dup.kind} duplicate (distance {dup.distance:g}): {dup.first} ~ {dup.second}{where}", highlight=False
        )
    if len(report.duplicates) > 30:
        console.print(f"... and {len(report.duplicates) - 30} more duplicate pairs (see --json)")
    for conflict in report.label_conflicts:
        console.print(f"label conflict: {conflict.first} and {conflict.second} are the same image", highlight=False)
    for leak in report.patient_leaks:
        console.print(f"patient {leak.patient_id} in splits {', '.join(leak.splits)}", highlight=False)
    if report.split_counts:
        console.print("per split: " + "; ".join(f"{s}: {c}" for s, c in sorted(report.split_counts.items())))
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)


def main() -> None:  # pragma: no cover - the console-script entry point
    app()
