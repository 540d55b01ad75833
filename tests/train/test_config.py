"""Configs: files, overrides, validation, and the shipped configs in configs/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rollnet.train import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    valid_keys,
)
from rollnet.train.config import config_diff, config_to_dict

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.*"))


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        apply_overrides(TrainConfig(), ["optim.learning_rate=0.1"])
    message = str(err.value)
    assert "unknown config key 'optim.learning_rate'" in message
    for key in ("optim.lr", "roll.lam", "roll.C", "data.name", "model.hidden", "epochs"):
        assert key in message


def test_unknown_key_in_a_file_is_refused(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"roll": {"lambda": 2}}))
    with pytest.raises(ConfigError, match=r"unknown config key 'roll\.lambda'.*valid keys"):
        load_config(path)
    path.write_text(json.dumps({"optimizer": {"lr": 1}}))
    with pytest.raises(ConfigError, match="unknown config key 'optimizer'"):
        load_config(path)


def test_overrides_parse_json_values_and_check_types():
    cfg = apply_overrides(TrainConfig(), [
        "epochs=3", "optim.lr=1e-3", "model.hidden=[8, 8]", "roll.approx=4", "roll.gamma=max",
        "data.name=moons", "progress=false", "data.noise=null",
    ])
    assert (cfg.epochs, cfg.optim.lr, cfg.model.hidden, cfg.roll.approx) == (3, 1e-3, [8, 8], 4)
    assert cfg.roll.gamma == "max" and cfg.data.name == "moons" and cfg.progress is False
    assert isinstance(apply_overrides(cfg, ["roll.gamma=50"]).roll.gamma, float)
    for bad, match in [
        ("epochs=many", "expected an integer"),
        ("epochs=0", "at least 1"),
        ("model.hidden=8", "expected a list"),
        ("progress=1", "true or false"),
        ("data.name=cifar", "data.name must be one of"),
        ("roll.gamma=most", "gamma"),
        ("device=tpu", "device"),
        ("optim.lr", "key=value"),
    ]:
        with pytest.raises(ConfigError, match=match):
            apply_overrides(TrainConfig(), [bad])


def test_normalize_inside_needs_pixel_inputs():
    with pytest.raises(ConfigError, match="normalised twice"):
        apply_overrides(TrainConfig(), ["model.normalize_inside=true"])
    cfg = apply_overrides(TrainConfig(), ["model.normalize_inside=true", "data.normalize=false"])
    assert cfg.model.normalize_inside


def test_toml_and_json_files_give_the_same_config(tmp_path):
    (tmp_path / "a.toml").write_text('epochs = 2\n[optim]\nlr = 0.5\n[roll]\nlam = 1.0\nC = 0.5\n')
    (tmp_path / "a.json").write_text(json.dumps({"epochs": 2, "optim": {"lr": 0.5}, "roll": {"lam": 1, "C": 0.5}}))
    assert load_config(tmp_path / "a.toml") == load_config(tmp_path / "a.json")
    (tmp_path / "broken.toml").write_text("epochs = \n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(tmp_path / "broken.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "a.yaml").write_text("epochs: 2\n")
    with pytest.raises(ConfigError, match=r"\.json or \.toml"):
        load_config(tmp_path / "a.yaml")


def test_round_trip_and_diff():
    cfg = apply_overrides(TrainConfig(), ["roll.lam=2", "model.hidden=[4]"])
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert config_diff(TrainConfig(), cfg) == {"roll.lam": (0.0, 2.0), "model.hidden": ([300] * 4, [4])}
    assert "roll.memory_budget" in valid_keys() and "data" not in valid_keys()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_shipped_configs_hold_the_paper_settings():
    names = {p.stem for p in CONFIGS}
    assert {"mnist_vanilla", "mnist_roll_c025", "mnist_roll_c1", "toy_moons", "fashion_resnet_roll_approx"} <= names
    folder = CONFIGS[0].parent
    for name, (lam, c) in {"mnist_vanilla": (0.0, 0.0), "mnist_roll_c025": (2.0, 0.25), "mnist_roll_c1": (2.0, 1.0)}.items():
        cfg = load_config(folder / f"{name}.json")
        assert (cfg.roll.lam, cfg.roll.C, cfg.roll.approx) == (lam, c, None)
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.nesterov) == ("sgd", 0.01, 0.5, True)
        assert cfg.batch_size == 64 and cfg.model.hidden == [300] * 4
    toy = load_config(folder / "toy_moons.json")
    assert toy.model.hidden == [100] * 4 and toy.data.name == "moons"
    fashion = load_config(folder / "fashion_resnet_roll_approx.json")
    assert fashion.model.arch == "resnet" and fashion.roll.approx and fashion.roll.estimator == "axes"


def test_shipped_vowels_configs_hold_the_paper_settings():
    folder = CONFIGS[0].parent
    for name, (lam, c) in {"vowels_vanilla": (0.0, 0.0), "vowels_roll": (2.0**-5, 2.0**4)}.items():
        cfg = load_config(folder / f"{name}.json")
        assert cfg.data.name == "japanese_vowels" and cfg.data.normalize is False
        m = cfg.model
        assert (m.arch, m.hidden_size, m.act, m.negative_slope, m.num_negative) == ("scornn", 512, "leaky_relu", 0.01, None)
        assert (cfg.optim.name, cfg.optim.lr, cfg.batch_size, cfg.epochs) == ("amsgrad", 1e-3, 32, 100)
        assert (cfg.recurrent_optim.name, cfg.recurrent_optim.lr) == ("rmsprop", 1e-4)
        assert (cfg.roll.lam, cfg.roll.C, cfg.roll.gamma, cfg.roll.approx) == (lam, c, 100.0, None)


def test_recurrent_settings_are_checked():
    assert TrainConfig().recurrent_optim.name is None
    cfg = apply_overrides(TrainConfig(), ["model.arch=elman", "recurrent_optim.name=rmsprop", "recurrent_optim.lr=0.001"])
    assert (cfg.model.arch, cfg.recurrent_optim.name, cfg.recurrent_optim.lr) == ("elman", "rmsprop", 0.001)
    with pytest.raises(ConfigError, match=r"recurrent_optim\.name must be one of"):
        apply_overrides(TrainConfig(), ["recurrent_optim.name=lbfgs"])
    with pytest.raises(ConfigError, match=r"model\.arch must be one of"):
        apply_overrides(TrainConfig(), ["model.arch=lstm"])
    with pytest.raises(ConfigError, match=r"recurrent_optim\.lr must be non-negative"):
        apply_overrides(TrainConfig(), ["recurrent_optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"model\.hidden_size must be at least 1"):
        apply_overrides(TrainConfig(), ["model.hidden_size=0"])


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", ".", "", "/abs/path", "a\\b", "nul\0byte"])
def test_a_name_that_is_not_one_path_component_is_refused(name):
    with pytest.raises(ConfigError, match="single path component"):
        config_from_dict({"name": name})


def test_plain_names_are_kept():
    for name in ("mnist_roll", "run-1.2", "ROLL c=0.25", "..dots"):
        assert config_from_dict({"name": name}).name == name


def test_progress_is_true_false_or_auto():
    assert TrainConfig().progress == "auto"
    assert apply_overrides(TrainConfig(), ["progress=true"]).progress is True
    with pytest.raises(ConfigError, match="true, false or 'auto'"):
        apply_overrides(TrainConfig(), ["progress=sometimes"])
