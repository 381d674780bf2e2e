"""The inference engine: the same pixels and scores as training's cache, any image type, TTA, bounded streaming,
unreadable files listed, devices and backends named in errors, and RunFolder's errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blastscan.baselines.embeddings import CnnEmbeddings
from blastscan.errors import ConfigError, DatasetError
from blastscan.inference import Predictor
from blastscan.inference.torch_backend import dihedral_views, resolve_device
from blastscan.runs import RunFolder


@pytest.fixture(scope="module")
def predictor(stain_run: Path) -> Predictor:
    return Predictor.from_run(stain_run, device="cpu", backend="torch", batch_size=16)


@pytest.fixture(scope="module")
def test_paths(stain_run: Path) -> list[Path]:
    run = RunFolder.open(stain_run)
    manifest = run.manifest()
    return [manifest.absolute_paths()[int(i)] for i in run.rows("test", manifest)]


def test_files_are_prepared_and_scored_exactly_as_the_training_cache(
    stain_run: Path, predictor: Predictor, test_paths: list[Path]
) -> None:
    run = RunFolder.open(stain_run)
    manifest = run.manifest()
    rows = run.rows("test", manifest)
    cache = predictor.image_cache(manifest, run.config().data.cache_dir)
    assert predictor.stain is not None  # the run normalises stain: the path under test includes it
    for row, path in zip(rows[:8], test_paths[:8], strict=True):
        assert np.array_equal(predictor.prepare(path), np.asarray(cache[int(row)]))
    from_files = predictor.predict_logits(test_paths)
    from_cache = predictor.logits_of_rows(cache, rows)
    np.testing.assert_allclose(from_files, from_cache, rtol=0, atol=1e-6)


def test_paths_arrays_and_pil_images_give_the_same_probabilities(predictor: Predictor, test_paths: list[Path]) -> None:
    paths = test_paths[:5]
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    pils = [Image.fromarray(a) for a in arrays]
    by_path = predictor.predict(paths)
    assert by_path.shape == (5,) and ((by_path >= 0) & (by_path <= 1)).all()
    np.testing.assert_allclose(predictor.predict(arrays), by_path, atol=1e-6)
    np.testing.assert_allclose(predictor.predict(pils), by_path, atol=1e-6)


def test_tta_is_the_mean_logit_over_the_eight_dihedral_views(predictor: Predictor, test_paths: list[Path]) -> None:
    prepared = np.stack([predictor.prepare(p) for p in test_paths[:4]])
    batch = predictor.to_input(prepared)
    views = dihedral_views(batch)
    assert len(views) == 8 and not torch.equal(views[0], views[1])
    expected = torch.stack([predictor.forward(v, tta=False) for v in views]).mean(dim=0).numpy()
    np.testing.assert_allclose(predictor.logits_prepared(prepared, tta=True), expected, atol=1e-5)
    assert not np.allclose(predictor.logits_prepared(prepared, tta=False), expected)


def test_streaming_reads_at_most_three_batches_ahead(predictor: Predictor, test_paths: list[Path]) -> None:
    consumed = 0

    def endless():
        nonlocal consumed
        while True:
            for path in test_paths:
                consumed += 1
                yield path

    stream = predictor.stream(endless())
    for _ in range(3):
        batch = next(stream)
        assert len(batch.sources) == predictor.batch_size
    stream.close()
    assert consumed <= 6 * predictor.batch_size  # 3 scored + at most 3 decoding ahead, whatever the source's size


def test_unreadable_images_are_listed_not_raised(predictor: Predictor, test_paths: list[Path], tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(Path(test_paths[0]).read_bytes()[:200])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    sources = [test_paths[0], truncated, tmp_path / "missing.tif", text, test_paths[1]]
    batches = list(predictor.stream(sources))
    scored = [s for b in batches for s in b.sources]
    failed = [s for b in batches for s, _ in b.failures]
    assert scored == [test_paths[0], test_paths[1]]
    assert failed == [truncated, tmp_path / "missing.tif", text]
    reasons = " ".join(r for b in batches for _, r in b.failures)
    assert "truncated.jpg" in reasons and "missing.tif" in reasons and "--skip-bad" not in reasons
    with pytest.raises(DatasetError, match=r"truncated\.jpg"):
        predictor.predict(sources)


def test_embeddings_match_the_hybrid_baselines_transformer(predictor: Predictor, stain_run: Path) -> None:
    prepared = np.stack([np.full((48, 48, 3), v, dtype=np.uint8) for v in (60, 120, 200)])
    features = predictor.embed_prepared(prepared)
    assert features.shape == (3, predictor.model.num_features)
    via_sklearn = CnnEmbeddings(run_dir=stain_run, device="cpu").transform(prepared)
    assert via_sklearn.shape == features.shape and np.isfinite(via_sklearn).all()


def test_devices_and_backends_are_named_in_errors(stain_run: Path) -> None:
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("tpu9")
    with pytest.raises(ConfigError, match="unknown inference backend 'tensorrt'; choose one of"):
        Predictor.from_run(stain_run, backend="tensorrt")


def test_run_folder_errors_name_what_is_missing_or_damaged(stain_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such run folder"):
        RunFolder.open(tmp_path / "nowhere")
    half = tmp_path / "half"
    half.mkdir()
    (half / RunFolder.CONFIG).write_text((stain_run / RunFolder.CONFIG).read_text())
    with pytest.raises(ConfigError, match=r"missing manifest.csv, splits.csv, model.json, best.safetensors"):
        RunFolder.open(half)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / RunFolder.MODEL_CARD).write_text("{not json")
    (broken / RunFolder.WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Predictor.from_run(broken)
    (broken / RunFolder.MODEL_CARD).write_text((stain_run / RunFolder.MODEL_CARD).read_text())
    with pytest.raises(ConfigError, match="cannot be loaded"):
        Predictor.from_run(broken)
    card = json.loads((stain_run / RunFolder.MODEL_CARD).read_text())
    del card["image_size"]
    (broken / RunFolder.MODEL_CARD).write_text(json.dumps(card))
    (broken / RunFolder.WEIGHTS).write_bytes((stain_run / RunFolder.WEIGHTS).read_bytes())
    with pytest.raises(ConfigError, match="'image_size'"):
        Predictor.from_run(broken)


def test_damaged_run_files_are_one_line_errors_in_every_command(stain_run: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from blastscan.cli import app

    damaged = tmp_path / "damaged"
    shutil.copytree(stain_run, damaged, ignore=shutil.ignore_patterns("eval", "checkpoints", "logs", "tensorboard"))
    weights = damaged / RunFolder.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])  # a half-written file
    image = str(RunFolder(damaged).manifest().absolute_paths()[0])
    runner = CliRunner()
    for args in (
        ["evaluate", str(damaged), "--bootstrap", "10", "--explain-images", "0"],
        ["explain", str(damaged), image, "--out", str(tmp_path / "x")],
        ["audit-shortcuts", str(damaged), "--bootstrap", "10"],
        ["predict", str(damaged), image, "--out", str(tmp_path / "p.csv")],
    ):
        result = runner.invoke(app, args)
        said = " ".join(result.output.split())
        assert result.exit_code == 2 and "best.safetensors" in said and "cannot be loaded" in said, (args, said)
    (damaged / RunFolder.WEIGHTS).write_bytes((stain_run / RunFolder.WEIGHTS).read_bytes())
    marker = tmp_path / "pwned"
    (damaged / RunFolder.CONFIG).write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    for args in (["evaluate", str(damaged), "--bootstrap", "10"], ["train", "--resume", str(damaged)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "!!python are refused" in " ".join(result.output.split()), args
    assert not marker.exists()


def test_explain_names_an_unreadable_image_without_advice_for_another_command(stain_run: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from blastscan.cli import app

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = CliRunner().invoke(app, ["explain", str(stain_run), str(broken), "--out", str(tmp_path / "x")])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "broken.png" in said and "--skip-bad" not in said, said
