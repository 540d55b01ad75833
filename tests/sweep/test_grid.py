"""``--grid`` parsing: every value checked against the config before anything runs."""

from __future__ import annotations

import pytest

from rollnet.sweep.grid import config_for, parse_grid, point_key, with_reference
from rollnet.train import ConfigError, TrainConfig, apply_overrides


def base() -> TrainConfig:
    return apply_overrides(TrainConfig(), ["roll.lam=2", "roll.C=0.25"])


def test_values_are_parsed_as_json_else_strings_in_the_order_given() -> None:
    grid = parse_grid(["roll.lam=0.125,2,4", "roll.gamma=max,25,100", "roll.approx=null,3"], base())
    assert grid.values == {"roll.lam": (0.125, 2, 4), "roll.gamma": ("max", 25, 100), "roll.approx": (None, 3)}
    assert len(grid) == 18
    assert len(list(grid.points())) == 18


def test_list_values_are_one_json_list_and_travel_as_json_text() -> None:
    grid = parse_grid(["model.hidden=[[100],[100,100]]"], base())
    assert grid.values == {"model.hidden": ([100], [100, 100])}
    assert grid.search_space() == {"model.hidden": ["[100]", "[100, 100]"]}
    assert config_for(base(), {"model.hidden": [100, 100]}).model.hidden == [100, 100]


@pytest.mark.parametrize(("spec", "message"), [
    ("roll.lamda=1,2", "unknown config key 'roll.lamda'; valid keys: "),
    ("roll.lam=abc,2", "roll.lam: expected a number, got 'abc'"),
    ("epochs=1.5", "epochs: expected an integer"),
    ("roll.lam=[]", "the list of values is empty"),
    ("roll.lam=", "the list of values is empty"),
    ("roll.lam=1,,2", "empty value"),
    ("roll.lam=1,2,1", "the value 1 is repeated"),
    ("roll.gamma=most", "roll.gamma must be a percentage"),
    ("name=a,b", "cannot vary 'name'"),
    ("roll.lam", "must look like key=v1,v2"),
    ("model.hidden=[[100],[1,", "cannot parse the grid values"),
])
def test_a_bad_grid_is_a_clear_error(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        parse_grid([spec], base())
    assert message in str(info.value)
    assert spec in str(info.value) or "must look like" in message


def test_a_key_given_twice_and_no_grid_are_errors() -> None:
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["roll.lam=1", "roll.lam=2"], base())
    with pytest.raises(ConfigError, match="at least one --grid"):
        parse_grid([], base())


def test_vanilla_points_are_one_run_whatever_their_other_roll_settings() -> None:
    grid = parse_grid(["roll.lam=0,2", "roll.C=0.25,1", "optim.lr=0.01,0.1"], base())
    keys = [point_key(p, base()) for p in grid.points()]
    assert keys.count("vanilla,optim.lr=0.01") == 2 and keys.count("vanilla,optim.lr=0.1") == 2
    assert "roll.lam=2,roll.C=1,optim.lr=0.1" in keys
    assert len(set(keys)) == 6
    cfg = config_for(base(), {"roll.lam": 0, "roll.C": 1, "optim.lr": 0.1})
    assert (cfg.roll.lam, cfg.roll.C, cfg.optim.lr) == (0.0, 0.25, 0.1)  # C back to the base's: one run


def test_keys_are_single_path_components() -> None:
    grid = parse_grid(["data.path=/a/b,c"], base())
    for p in grid.points():
        key = point_key(p, base())
        assert "/" not in key
        apply_overrides(TrainConfig(), [f"name={key}"])  # a valid run name


def test_the_reference_is_added_unless_present() -> None:
    grid = with_reference(parse_grid(["roll.lam=1,2", "roll.C=1"], base()), base())
    assert grid.values["roll.lam"] == (0, 1, 2)
    assert with_reference(grid, base()) == grid
    unvaried = with_reference(parse_grid(["roll.C=1,4"], base()), base())
    assert unvaried.values == {"roll.lam": (2.0, 0), "roll.C": (1, 4)}


def test_long_keys_are_cut_to_a_file_name_with_a_digest() -> None:
    grid = parse_grid(["model.hidden=[[" + ",".join(["300"] * 60) + "],[" + ",".join(["300"] * 61) + "]]"], base())
    keys = [point_key(p, base()) for p in grid.points()]
    assert len(set(keys)) == 2 and all(len(k.encode()) <= 200 for k in keys)
    assert all(k.startswith("model.hidden=[300,300") for k in keys)
