"""The one registry style: the `Registry` class, and every registry's names being what the config and CLI accept."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from blastscan.errors import ConfigError, DatasetError
from blastscan.registry import Registry


def _config_tree(**sections: dict) -> dict:
    tree: dict = {"name": "x", "data": {"root": "d"}}
    for section, values in sections.items():
        tree[section] = {**tree.get(section, {}), **values}
    return tree


# ------------------------------------------------------------------------------------------ the Registry class


def test_register_get_meta_and_names() -> None:
    shapes: Registry = Registry("shape")

    @shapes.register("square", sides=4)
    def square() -> str:
        return "square"

    @shapes.register("circle")
    class Circle:
        pass

    shapes.add("triangle", "a plain value", sides=3)

    assert shapes.get("square") is square and square() == "square"  # the decorator returns what it decorates
    assert shapes.get("circle") is Circle
    assert shapes.get("triangle") == "a plain value"
    assert shapes.meta("square") == {"sides": 4} and shapes.meta("circle") == {}
    assert shapes.names() == ["circle", "square", "triangle"]  # sorted, not in registration order
    assert [name for name, _ in shapes.items()] == shapes.names()
    assert "square" in shapes and "hexagon" not in shapes and len(shapes) == 3


def test_unknown_name_lists_the_choices() -> None:
    shapes: Registry = Registry("shape")
    shapes.add("square", 4)
    shapes.add("circle", 0)
    with pytest.raises(ConfigError, match=r"^unknown shape 'hexagon'; choose one of circle, square$"):
        shapes.get("hexagon")
    with pytest.raises(ConfigError, match="unknown shape 'hexagon'"):
        shapes.meta("hexagon")


def test_the_error_type_is_the_registrys() -> None:
    formats: Registry = Registry("dataset format", error=DatasetError)
    with pytest.raises(DatasetError, match=r"unknown dataset format 'x'; choose one of $"):
        formats.get("x")


def test_a_name_is_registered_once() -> None:
    shapes: Registry = Registry("shape")
    shapes.add("square", 4)
    with pytest.raises(ValueError, match="a shape named 'square' is already registered"):
        shapes.add("square", 5)
    with pytest.raises(ValueError, match="already registered"):
        shapes.register("square")(lambda: None)
    assert shapes.get("square") == 4


# ------------------------------------------------------------------------ each registry, and who reads names()


def test_dataset_readers_are_the_cli_and_config_formats() -> None:
    from blastscan.cli import FormatName
    from blastscan.data import READERS, reader_names
    from blastscan.data.registry import get_reader
    from blastscan.training.config import parse_config

    assert READERS.names() == reader_names() == ["all-idb1", "all-idb2", "bccd", "c-nmc", "csv", "deepapl", "folder"]
    assert [member.value for member in FormatName] == ["auto", *READERS.names()]
    for name, reader in READERS.items():
        assert reader.name == name  # the class attribute repeats the registered name
        assert get_reader(name).name == name
        assert parse_config(_config_tree(data={"format": name})).data.format == name
    with pytest.raises(DatasetError, match=r"unknown dataset format 'xyz'; choose one of auto, all-idb1, "):
        get_reader("xyz")
    with pytest.raises(ConfigError, match=r"data\.format: unknown dataset format 'xyz'; choose one of auto, all-idb1"):
        parse_config(_config_tree(data={"format": "xyz"}))


def test_models_are_what_create_accepts() -> None:
    from blastscan.models import MODELS, create, model_names, preprocessing_for

    assert MODELS.names() == model_names() == ["blastscan_cnn"]
    for name in MODELS.names():
        assert create(name, num_classes=3)(torch.randn(1, 3, 64, 64)).shape == (1, 3)
        assert preprocessing_for(name)["input_size"] == MODELS.meta(name)["input_size"]
    with pytest.raises(ConfigError, match=r"not a blastscan model \(blastscan_cnn\)"):
        create("no_such_model_anywhere")


def test_weight_sources_are_what_pretrained_accepts() -> None:
    from blastscan.models.weights import WEIGHT_SOURCES, parse_source

    assert WEIGHT_SOURCES.names() == ["file", "hub", "none", "package"]
    assert parse_source(None).kind == "none"
    assert parse_source("hub").kind == "hub" and parse_source("package").kind == "package"
    assert parse_source("file:w.safetensors").path is not None
    for refused in ("none", "file", "hub:x", "imagenet"):
        with pytest.raises(
            ConfigError, match=r"not understood; use pretrained='file:PATH' .*, 'hub' .*None .* 'package'"
        ):
            parse_source(refused)


def test_stain_methods_are_what_the_config_accepts() -> None:
    from blastscan.imaging.stain import STAIN_METHODS, create_stain_method, stain_method_names
    from blastscan.training.config import parse_config

    assert STAIN_METHODS.names() == stain_method_names() == ["macenko", "none", "reinhard"]
    for name, method in STAIN_METHODS.items():
        assert method.name == name
        assert isinstance(create_stain_method(name), method)
        assert parse_config(_config_tree(data={"stain_normalization": name})).data.stain_normalization == name
    with pytest.raises(
        ConfigError,
        match=r"data\.stain_normalization: unknown stain method 'vahadane'; choose one of macenko, none, reinhard",
    ):
        parse_config(_config_tree(data={"stain_normalization": "vahadane"}))


def test_losses_are_what_the_config_accepts() -> None:
    from blastscan.training.config import parse_config
    from blastscan.training.losses import LOSSES, make_loss

    assert LOSSES.names() == ["ce", "class_balanced", "focal", "weighted_ce"]
    for name in LOSSES.names():
        assert isinstance(make_loss(name, [3, 5]), torch.nn.Module)
        assert parse_config(_config_tree(loss={"name": name})).loss.name == name
    with pytest.raises(
        ConfigError, match=r"loss\.name: unknown loss 'dice'; choose one of ce, class_balanced, focal, weighted_ce"
    ):
        parse_config(_config_tree(loss={"name": "dice"}))


def test_schedulers_are_what_the_config_accepts() -> None:
    from blastscan.training.config import parse_config
    from blastscan.training.schedulers import SCHEDULERS

    assert SCHEDULERS.names() == ["cosine", "none", "plateau"]
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    assert SCHEDULERS.get("none")(optimizer, max_epochs=3, monitor="val_auroc") is optimizer
    cosine = SCHEDULERS.get("cosine")(optimizer, max_epochs=3, monitor="val_auroc")
    assert isinstance(cosine["lr_scheduler"], torch.optim.lr_scheduler.CosineAnnealingLR)
    plateau = SCHEDULERS.get("plateau")(optimizer, max_epochs=3, monitor="val_loss")["lr_scheduler"]
    assert plateau["monitor"] == "val_loss" and plateau["scheduler"].mode == "min"
    for name in SCHEDULERS.names():
        assert parse_config(_config_tree(optim={"scheduler": name})).optim.scheduler == name
    with pytest.raises(
        ConfigError, match=r"optim\.scheduler: unknown scheduler 'step'; choose one of cosine, none, plateau"
    ):
        parse_config(_config_tree(optim={"scheduler": "step"}))


def test_cam_methods_are_what_compute_cams_accepts() -> None:
    from blastscan.explain.cam import CAM_METHODS, compute_cams

    assert CAM_METHODS.names() == ["eigencam", "gradcam", "gradcam++", "scorecam"]
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(ConfigError, match="unknown CAM method 'nope'; choose one of eigencam, gradcam, gradcam"):
        compute_cams(model, torch.randn(1, 3, 16, 16), method="nope")


def test_classifiers_are_what_the_baselines_run() -> None:
    from blastscan.baselines.classifiers import CLASSIFIER_NAMES, CLASSIFIERS, make_classifiers

    assert CLASSIFIERS.names() == ["knn", "logistic_regression", "random_forest", "svm_rbf"]
    # Tables keep their order (the `order` metadata), not the alphabetical one.
    assert (
        list(CLASSIFIER_NAMES) == list(make_classifiers()) == ["svm_rbf", "random_forest", "knn", "logistic_regression"]
    )
    assert CLASSIFIER_NAMES["knn"] == CLASSIFIERS.meta("knn")["label"] == "k-NN"


# ------------------------------------------------------------------------------------- no import cycles


@pytest.mark.parametrize(
    ("first", "check"),
    [
        ("blastscan.data.registry", "from blastscan.data.registry import READERS; assert 'deepapl' in READERS"),
        ("blastscan.data.readers.lab", "from blastscan.data import READERS; assert 'folder' in READERS"),
        ("blastscan.models.factory", "from blastscan.models.factory import MODELS; assert 'blastscan_cnn' in MODELS"),
        ("blastscan.models.custom_cnn", "from blastscan.models import MODELS; assert 'blastscan_cnn' in MODELS"),
    ],
)
def test_a_registry_or_a_plugin_can_be_imported_first(first: str, check: str) -> None:
    # A fresh interpreter, so that the import order is the one named; the package's __init__ loads the plugins.
    code = f"import {first}; {check}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_registries_import_no_plugin() -> None:
    code = (
        "import sys, blastscan.registry, blastscan.errors; "
        "assert not [m for m in sys.modules if m.startswith('blastscan.') and m not in "
        "('blastscan.registry', 'blastscan.errors')], sorted(sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
