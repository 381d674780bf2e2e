"""The ONNX Runtime backend scores like the torch one, is the CPU default, and caches its export per weights."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from blastscan.errors import ConfigError
from blastscan.inference import Predictor, choose_backend, dihedral_arrays
from blastscan.inference.onnx_backend import OnnxPredictor
from blastscan.runs import RunFolder


@pytest.fixture(scope="module")
def test_images(stain_run: Path) -> list[str]:
    run = RunFolder(stain_run)
    manifest = run.manifest()
    paths = manifest.absolute_paths()
    return [paths[i] for i in run.rows("test", manifest)[:24]]


def test_onnx_logits_match_torch_on_real_cells_plain_and_with_tta(stain_run: Path, test_images: list[str]) -> None:
    onnx = Predictor.from_run(stain_run, device="cpu", backend="onnx", batch_size=8)
    torch_ = Predictor.from_run(stain_run, device="cpu", backend="torch", batch_size=8)
    assert isinstance(onnx, OnnxPredictor) and onnx.backend == "onnx" and torch_.backend == "torch"
    plain_onnx, plain_torch = onnx.predict_logits(test_images), torch_.predict_logits(test_images)
    assert plain_onnx.shape == (len(test_images), 2)
    assert np.abs(plain_onnx - plain_torch).max() <= 1e-4 * max(1.0, np.abs(plain_torch).max())
    tta_onnx, tta_torch = onnx.predict_logits(test_images, tta=True), torch_.predict_logits(test_images, tta=True)
    assert np.abs(tta_onnx - tta_torch).max() <= 1e-4 * max(1.0, np.abs(tta_torch).max())
    assert not np.allclose(tta_onnx, plain_onnx)  # TTA really averaged other views


def test_numpy_dihedral_views_are_the_torch_views_in_the_same_order() -> None:
    import torch

    from blastscan.inference.torch_backend import dihedral_views

    images = np.random.default_rng(0).integers(0, 255, size=(2, 5, 5, 3), dtype=np.uint8)
    expected = [v.permute(0, 2, 3, 1).numpy() for v in dihedral_views(torch.from_numpy(images).permute(0, 3, 1, 2))]
    for ours, theirs in zip(dihedral_arrays(images), expected, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_auto_is_onnx_on_the_cpu_and_torch_where_a_gpu_is_asked_for() -> None:
    assert choose_backend("auto", "cpu") == "onnx"
    assert choose_backend("auto", "cuda") == "torch"
    assert choose_backend("torch", "cpu") == "torch"


def test_the_export_is_cached_by_the_weights_hash_and_remade_when_damaged(stain_run: Path, tmp_path: Path) -> None:
    run = RunFolder(stain_run)
    first = Predictor.from_run(stain_run, device="cpu")
    assert isinstance(first, OnnxPredictor)
    cached = first.model_file
    assert cached.parent == run.path / RunFolder.ONNX_CACHE
    assert cached.name == f"model-{run.weights_sha256()[:16]}-f.onnx"  # -f: the export with the feature outputs
    stamp = cached.stat().st_mtime_ns
    assert Predictor.from_run(stain_run, device="cpu").model_file == cached
    assert cached.stat().st_mtime_ns == stamp  # reused, not re-exported
    assert oct(cached.stat().st_mode & 0o777) == oct(0o644)

    cached.write_bytes(cached.read_bytes()[:100])  # a damaged cache file is remade, not fatal
    again = Predictor.from_run(stain_run, device="cpu")
    assert again.model_file == cached and cached.stat().st_size > 1000
    assert not [p for p in cached.parent.iterdir() if p.name.endswith(".part")]


def test_a_damaged_export_file_is_a_config_error_naming_it(stain_export: Path, tmp_path: Path) -> None:
    broken = tmp_path / "export"
    broken.mkdir()
    for name in ("preprocessing.json", "model.onnx"):
        (broken / name).write_bytes((stain_export / name).read_bytes())
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ConfigError, match=r"model\.onnx: not a loadable ONNX model"):
        Predictor.open(broken)
    (broken / "preprocessing.json").write_text('{"format": "something-else"}')
    with pytest.raises(ConfigError, match="re-export the model"):
        Predictor.open(broken)
    os.remove(broken / "model.onnx")
    with pytest.raises(ConfigError, match=r"missing model\.onnx"):
        Predictor.open(broken)
