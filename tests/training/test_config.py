"""Training configs: strict keys, overrides, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from blastscan.errors import ConfigError
from blastscan.training.config import apply_overrides, load_config, parse_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_are_valid(path: Path) -> None:
    config = load_config(path)
    assert config.name == path.stem
    assert config.optim.lr == 1e-3
    assert config.trainer.monitor == "val_auroc"


def test_the_default_config_uses_packaged_pretrained_weights() -> None:
    config = load_config(Path(CONFIGS[0]).parent / "allidb2_efficientnet_lite0.yaml")
    assert config.model.name == "tf_efficientnet_lite0" and config.model.pretrained == "package"


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"trainer\.max_epoch: unknown key"):
        parse_config({"name": "x", "data": {"root": "d"}, "trainer": {"max_epoch": 3}})
    with pytest.raises(ConfigError, match=r"data\.image_size"):
        parse_config({"name": "x", "data": {"root": "d", "image_size": 8}})


def test_overrides_parse_yaml_values() -> None:
    tree = apply_overrides({"name": "x", "data": {"root": "d"}}, ["trainer.max_epochs=4", "augment.zoom=[1, 1]"])
    config = parse_config(tree)
    assert config.trainer.max_epochs == 4 and tuple(config.augment.zoom) == (1, 1)
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["trainer.max_epochs"])


def test_data_root_expands_blastscan_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLASTSCAN_DATA", "/somewhere")
    config = parse_config({"name": "x", "data": {"root": "$BLASTSCAN_DATA/ALL_IDB/ALL_IDB2"}})
    assert config.data.resolved_root() == Path("/somewhere/ALL_IDB/ALL_IDB2")


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("trainer.max_epochs=[1, 2", "is not a YAML value"),
        ("name=!!python/object/apply:os.system ['echo pwned']", "is not a YAML value"),
    ],
)
def test_a_bad_set_value_is_one_clear_error(override: str, said: str) -> None:
    with pytest.raises(ConfigError, match=said) as caught:
        apply_overrides({"name": "x"}, [override])
    assert "--set" in str(caught.value) and "Traceback" not in str(caught.value)


def test_a_config_file_with_a_python_tag_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\ndata: {{root: x}}\n")
    with pytest.raises(ConfigError, match="tags such as !!python are refused"):
        load_config(config)
    assert not marker.exists()


def test_throughput_options_default_to_todays_behaviour_and_are_accepted() -> None:
    config = parse_config({"name": "x", "data": {"root": "d"}, "trainer": {"batch_size": 16}})
    assert config.data.device_cache == "auto" and config.data.device_cache_share == 0.5
    assert not config.trainer.channels_last and not config.trainer.compile
    assert config.trainer.evaluation_batch_size() == 64 and config.learning_rate() == config.optim.lr
    tree = apply_overrides(
        {"name": "x", "data": {"root": "d"}},
        [
            "data.device_cache=on",
            "data.device_cache_share=0.25",
            "trainer.channels_last=true",
            "trainer.compile=true",
            "trainer.eval_batch_size=256",
        ],
    )
    config = parse_config(tree)
    assert config.data.device_cache == "on" and config.data.device_cache_share == 0.25
    assert config.trainer.channels_last and config.trainer.compile and config.trainer.evaluation_batch_size() == 256
    # YAML reads a bare off as False: still the mode "off".
    assert parse_config(apply_overrides(tree, ["data.device_cache=off"])).data.device_cache == "off"


def test_the_linear_scaling_rule_applies_only_when_asked() -> None:
    tree = {"name": "x", "data": {"root": "d"}, "optim": {"lr": 1e-3}, "trainer": {"batch_size": 256}}
    assert parse_config(tree).learning_rate(world_size=2) == 1e-3  # no reference batch: the rate as written
    tree["optim"]["lr_reference_batch"] = 64
    config = parse_config(tree)
    assert config.learning_rate() == pytest.approx(4e-3) and config.learning_rate(world_size=2) == pytest.approx(8e-3)


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [
        ("data.device_cache", "gpu", r"data\.device_cache: Input should be 'auto', 'on' or 'off'"),
        ("data.device_cache_share", 0, r"data\.device_cache_share: Input should be greater than 0"),
        ("data.device_cache_share", 1.5, r"data\.device_cache_share: Input should be less than or equal to 1"),
        ("trainer.compile", "sometimes", r"trainer\.compile: Input should be a valid boolean"),
        ("trainer.channels_last", [1], r"trainer\.channels_last: Input should be a valid boolean"),
        ("trainer.eval_batch_size", 0, r"trainer\.eval_batch_size: Input should be greater than or equal to 1"),
        ("optim.lr_reference_batch", 0, r"optim\.lr_reference_batch: Input should be greater than or equal to 1"),
        ("trainer.compiled", True, r"trainer\.compiled: unknown key"),
    ],
)
def test_bad_throughput_options_are_named(key: str, value: object, said: str) -> None:
    section, leaf = key.split(".")
    tree = {"name": "x", "data": {"root": "d"}}
    tree.setdefault(section, {})[leaf] = value
    with pytest.raises(ConfigError, match=said):
        parse_config(tree)
