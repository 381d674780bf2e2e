"""Evaluation figures draw on any input, and the HTML report stands alone, escapes text and renders in Chromium."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydantic import ValidationError

from blastscan.evaluation import figures
from blastscan.evaluation.report import (
    Calibration,
    DataSummary,
    LeakageAudit,
    ModelCard,
    OperatingPoints,
    ReportContent,
    RunInfo,
    format_estimate,
    write_report,
)
from browser import chromium, run_chromium

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROBE_RGB = (255, 0, 255)  # a colour nothing else in the report uses
SECTION_IDS = (
    "run",
    "data",
    "config",
    "metrics",
    "operating-points",
    "calibration",
    "patient-level",
    "tta",
    "figures",
    "errors",
    "model-card",
)
XSS = "<script>alert('x')</script>"


def scores(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0, 1)
    patients = rng.integers(0, 30, n)
    return y, p, patients


def assert_png(path: Path, min_width: int = 300, min_height: int = 150) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("L"))
    assert width >= min_width and height >= min_height, (width, height)
    assert width <= 4000 and height <= 4000, (width, height)
    assert pixels.std() > 5, "the figure is blank"


def write_training_csv(path: Path, columns: tuple[str, ...]) -> Path:
    epochs = np.arange(8)
    table = pd.DataFrame({"epoch": epochs})
    for column in columns:
        start, end = (0.7, 0.2) if column.endswith("loss") else (0.6, 0.95)
        table[column] = np.linspace(start, end, len(epochs))
    table.to_csv(path, index=False)
    return path


def reliability_inputs(y: np.ndarray, p: np.ndarray, bins: int = 10) -> tuple[np.ndarray, ...]:
    index = np.clip((p * bins).astype(int), 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    mean_predicted = np.array([p[index == b].mean() if counts[b] else np.nan for b in range(bins)])
    observed = np.array([y[index == b].mean() if counts[b] else np.nan for b in range(bins)])
    return mean_predicted, observed, counts


# --- figures ---------------------------------------------------------------------------------------------------


def test_every_figure_writes_a_png(tmp_path: Path) -> None:
    y, p, patients = scores()
    rng = np.random.default_rng(1)
    mean_predicted, observed, counts = reliability_inputs(y, p)
    folds = pd.DataFrame({m: rng.uniform(0.8, 0.95, 5) for m in ("roc_auc", "f1", "accuracy")})
    transfer = pd.DataFrame(
        [[0.95, 0.70, np.nan], [0.66, 0.97, 0.81], [0.72, 0.75, 0.92]],
        index=["ALL-IDB2", "C-NMC", "DeepAPL"],
        columns=["ALL-IDB2", "C-NMC", "DeepAPL"],
    )
    cells = [
        {"image": rng.integers(0, 255, (48, 48, 3), dtype=np.uint8), "title": f"p={i / 10:.2f} $x$"} for i in range(6)
    ]
    made = [
        figures.plot_roc(y, p, tmp_path / "roc.png", operating_point=(0.05, 0.7), n_boot=100, groups=patients),
        figures.plot_roc(y, p, tmp_path / "roc_plain.png", n_boot=0),
        figures.plot_precision_recall(y, p, tmp_path / "pr.png"),
        figures.plot_confusion_matrix([[120, 30], [20, 130]], tmp_path / "cm.png", threshold=0.42),
        figures.plot_reliability(mean_predicted, observed, counts, tmp_path / "rel.png", ece=0.08, ece_calibrated=0.02),
        figures.plot_score_distribution(y, p, tmp_path / "scores.png", threshold=0.42),
        figures.plot_training_curves(
            write_training_csv(tmp_path / "m.csv", ("train_loss", "val_loss", "train_acc", "val_acc", "val_auroc")),
            tmp_path / "curves.png",
        ),
        figures.plot_metric_boxplot(folds, tmp_path / "box.png"),
        figures.plot_transfer_heatmap(transfer, tmp_path / "transfer.png", "Cross-dataset AUROC"),
        figures.image_gallery(cells, tmp_path / "nested" / "gallery.png", columns=4),
    ]
    for path in made:
        assert_png(path)


def test_roc_band_is_reproducible_for_a_seed(tmp_path: Path) -> None:
    y, p, patients = scores(120)
    first = figures.plot_roc(y, p, tmp_path / "a.png", n_boot=30, groups=patients, seed=3).read_bytes()
    second = figures.plot_roc(y, p, tmp_path / "b.png", n_boot=30, groups=patients, seed=3).read_bytes()
    assert first == second


@pytest.mark.parametrize("label", [0, 1])
def test_one_class_input_draws_a_figure_instead_of_failing(tmp_path: Path, label: int) -> None:
    y = np.full(20, label)
    p = np.linspace(0, 1, 20)
    for path in (
        figures.plot_roc(y, p, tmp_path / "roc.png", operating_point=(0.1, 0.5), groups=np.arange(20)),
        figures.plot_precision_recall(y, p, tmp_path / "pr.png"),
        figures.plot_score_distribution(y, p, tmp_path / "scores.png", threshold=0.5),
        figures.plot_confusion_matrix([[20, 0], [0, 0]], tmp_path / "cm.png"),
    ):
        assert_png(path, min_height=100)


def test_degenerate_inputs_still_draw(tmp_path: Path) -> None:
    empty = np.array([])
    assert_png(figures.plot_roc(empty, empty, tmp_path / "roc.png"), min_height=100)
    assert_png(figures.plot_score_distribution(empty, empty, tmp_path / "scores.png"), min_height=100)
    assert_png(figures.image_gallery([], tmp_path / "gallery.png"), min_width=200, min_height=80)
    nothing = figures.plot_reliability([np.nan] * 5, [np.nan] * 5, [0] * 5, tmp_path / "rel.png")
    assert_png(nothing)
    only_val = write_training_csv(tmp_path / "val.csv", ("val_loss", "val_auroc"))
    assert_png(figures.plot_training_curves(only_val, tmp_path / "curves.png"))
    no_columns = write_training_csv(tmp_path / "none.csv", ())
    assert_png(figures.plot_training_curves(no_columns, tmp_path / "curves_empty.png"))
    folds = pd.DataFrame({"roc_auc": [0.9]})
    assert_png(figures.plot_metric_boxplot(folds, tmp_path / "box_one.png"), min_width=200)
    assert_png(figures.plot_metric_boxplot(pd.DataFrame({"other": [1]}), tmp_path / "box_none.png"))
    all_nan = pd.DataFrame([[np.nan]], index=["a"], columns=["b"])
    assert_png(figures.plot_transfer_heatmap(all_nan, tmp_path / "transfer.png", "AUROC"), min_width=200)
    gray = [{"image": np.zeros((10, 10), dtype=np.uint8), "title": "gray"}]
    assert_png(figures.image_gallery(gray, tmp_path / "gray.png"), min_width=200)


def test_bad_inputs_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="differ in length"):
        figures.plot_roc([0, 1], [0.5], tmp_path / "x.png")
    with pytest.raises(ValueError, match="square"):
        figures.plot_confusion_matrix([[1, 2, 3]], tmp_path / "x.png")
    with pytest.raises(ValueError, match="NaN"):
        figures.plot_precision_recall([0, 1], [0.1, np.nan], tmp_path / "x.png")


# --- report ----------------------------------------------------------------------------------------------------


def probe_png(path: Path) -> Path:
    Image.new("RGB", (480, 320), PROBE_RGB).save(path)
    return path


@pytest.fixture(scope="module")
def content(tmp_path_factory: pytest.TempPathFactory) -> ReportContent:
    folder = tmp_path_factory.mktemp("report_figures")
    y, p, patients = scores(200)
    rng = np.random.default_rng(2)
    cells = [{"image": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), "title": f"error {i}"} for i in range(4)]
    return ReportContent(
        run=RunInfo(
            run_name=f"run {XSS}", dataset="SYNTHETIC-cells", split_level="image", split_seed=1234, synthetic=True
        ),
        data=DataSummary(
            split_counts={"test": {"normal": 20, "leukemic": 19}, "train": {"normal": 91, "leukemic": 91}},
            patients={"train": 30, "test": 8},
            audit=LeakageAudit(leaks=True, duplicate_pairs=7, label_conflicts=2, duplicates_across_splits=1),
        ),
        config={"model": {"name": "resnet18", "pretrained": True}, "optim": {"lr": 3e-4}, "note": XSS},
        metrics={
            "roc_auc": 0.95,
            "accuracy": 0.9,
            "sensitivity": 0.875,
            "f1": None,
            "threshold": 0.42,
            "confusion_matrix": [[18, 2], [2, 17]],
            "ci": {"roc_auc": [0.91, 0.99], "accuracy": [0.85, 0.94], "sensitivity": [0.7, 0.95]},
        },
        operating_points=OperatingPoints(
            threshold=0.61, sensitivity=0.84, specificity=0.95, oracle_threshold=0.58, oracle_sensitivity=0.893
        ),
        calibration=Calibration(ece_before=0.081, ece_after=0.023, temperature=1.734, n_bins=10),
        patient_metrics={"roc_auc": 0.97, "ci": {"roc_auc": [0.9, 1.0]}},
        patient_rule="mean probability over a patient's cells",
        patient_table=[{"patient": "P1", "label": 1, "probability": 0.8}, {"patient": "P2", "label": 0}],
        tta_metrics={"roc_auc": 0.96, "accuracy": 0.905},
        figures=[
            ("Probe figure", probe_png(folder / "probe.png")),
            (f"ROC {XSS}", figures.plot_roc(y, p, folder / "roc.png", n_boot=20, groups=patients)),
            ("Confusion matrix", figures.plot_confusion_matrix([[18, 2], [2, 17]], folder / "cm.png")),
        ],
        error_gallery=figures.image_gallery(cells, folder / "errors.png"),
        model_card=ModelCard(
            training_data="synthetic training split",
            evaluation_data="synthetic test split",
            limitations=["one stain", XSS],
        ),
    )


@pytest.fixture(scope="module")
def report(content: ReportContent, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(tmp_path_factory.mktemp("report") / "report.html", title=f"Report {XSS}", sections=content)


def test_report_has_every_section(report: Path) -> None:
    html = report.read_text(encoding="utf-8")
    for section in SECTION_IDS:
        assert f'<section id="{section}">' in html, section
    for text in ("Intended use", "Known limitations", "Training data", "Evaluation data", "not validated for clinical"):
        assert text in html, text
    assert "SYNTHETIC" in html
    assert "Image-level split" in html
    assert "Leaking split" in html
    assert "TEST-ORACLE" in html and "not a valid estimate" in html


def test_report_embeds_every_figure_and_links_nothing(report: Path, content: ReportContent) -> None:
    html = report.read_text(encoding="utf-8")
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)
    assert len(sources) == len(content.figures) + 1  # + the gallery
    expected = [path for _, path in content.figures] + [content.error_gallery]
    for source, path in zip(sources, expected, strict=True):
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.removeprefix("data:image/png;base64,")) == Path(path).read_bytes()
    assert 'src="file' not in html
    assert "http://" not in html and "https://" not in html
    assert "<link" not in html and "@import" not in html and "url(" not in html
    assert "<script" not in html


def test_report_escapes_user_text(report: Path) -> None:
    html = report.read_text(encoding="utf-8")
    assert "<script" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    assert html.count("&lt;script&gt;") >= 5  # title, run name, config value, caption, limitation


def test_report_formats_estimates_with_ci(report: Path) -> None:
    html = report.read_text(encoding="utf-8")
    assert "0.900 (0.850\u20130.940)" in html
    assert "0.950 (0.910\u20130.990)" in html
    assert "0.875 (0.700\u20130.950)" in html
    assert "1.734" in html and "0.081" in html and "0.023" in html
    assert "+0.010" in html  # AUROC with TTA minus plain


def test_format_estimate() -> None:
    assert format_estimate(0.9, [0.85, 0.94]) == "0.900 (0.850\u20130.940)"
    assert format_estimate(0.9) == "0.900"
    assert format_estimate(0.9, [None, 0.94]) == "0.900"
    assert format_estimate(float("nan"), [0.1, 0.2]) == "\u2014"
    assert format_estimate(39) == "39"
    assert format_estimate(np.int64(39)) == "39"
    assert format_estimate(np.float32(0.5), (np.float64(0.25), 0.75)) == "0.500 (0.250\u20130.750)"


def test_missing_figure_is_refused(content: ReportContent, tmp_path: Path) -> None:
    data = content.model_dump()
    data["figures"] = [("gone", tmp_path / "missing.png")]
    with pytest.raises(ValidationError, match="figures"):
        ReportContent.model_validate(data)


def test_optional_sections_say_not_computed(content: ReportContent, tmp_path: Path) -> None:
    minimal = ReportContent(
        run=RunInfo(run_name="r", dataset="ALL-IDB2", split_level="patient"),
        data=DataSummary(split_counts={"test": {"normal": 1, "leukemic": 1}}),
        metrics={"accuracy": 0.5},
        model_card=ModelCard(training_data="t", evaluation_data="e"),
    )
    html = write_report(tmp_path / "r.html", title="r", sections=minimal).read_text(encoding="utf-8")
    for section in SECTION_IDS:
        assert f'<section id="{section}">' in html, section
    assert html.count("Not computed for this run") == 4
    assert "<img" not in html
    assert "Image-level split" not in html and "Synthetic data" not in html


# --- real browser ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report: Path, content: ReportContent, tmp_path: Path) -> None:
    binary = chromium()
    url = report.resolve().as_uri()

    dom = run_chromium(binary, tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    images = re.findall(r"<img[^>]*>", dom.stdout)
    assert len(images) == len(content.figures) + 1
    assert all('src="data:image/png;base64,' in tag for tag in images)
    # Chromium logs a blocked load ("... violates the following Content Security Policy directive ...").
    assert "Content Security Policy" not in dom.stderr and "Refused to load" not in dom.stderr

    shot = tmp_path / "report.png"
    result = run_chromium(binary, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,7000", url)
    assert shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert (pixels.std(axis=(0, 1)) > 10).all(), "the screenshot is blank"
    # The probe figure is one flat colour used nowhere else: seeing most of its area proves images decode.
    probe = (np.abs(pixels - PROBE_RGB).sum(axis=2) < 30).sum()
    assert probe > 0.5 * 480 * 320 * 0.6, f"only {probe} probe pixels rendered"
    # The real matplotlib ROC curve draws in this red; a broken image would leave none.
    red = (np.abs(pixels - (197, 48, 48)).sum(axis=2) < 40).sum()
    assert red > 200, f"only {red} ROC-curve pixels rendered"
