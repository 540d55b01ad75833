"""The Caltech-table report: P@1 / P@5, expected and worst-case gradient distortion, units, box, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

import rollnet
from rollnet.cli import EXIT_ERROR, main
from rollnet.models import MLP
from rollnet.train import DataInfo
from rollnet.train.distortion_report import (
    distortion_markdown,
    distortion_report,
    pixel_box,
)
from rollnet.train.metrics import percentiles
from tests.train.helpers import trained_tiny

SMALL = {"n_samples": 32, "population": 16, "generations": 3}


def _image_info(std: float = 0.5, mean: float = 0.25, units: str = "normalized") -> DataInfo:
    return DataInfo("digits", (1, 4, 4), 6, (mean, std), units == "normalized", units)


def test_pixel_box_in_model_units():
    assert pixel_box(_image_info()) == (-0.5, 1.5)
    assert pixel_box(_image_info(units="pixel")) == (0.0, 1.0)
    assert pixel_box(DataInfo("moons", (2,), 2, None, False, "raw")) is None
    assert pixel_box(DataInfo("japanese_vowels", (29, 12), 9, (0.0, 1.0), True, "normalized")) is None


def test_top_k_units_box_and_restored_mode():
    torch.manual_seed(0)
    net = MLP((1, 4, 4), 6, [16], dropout=0.5).train()
    x = torch.rand(12, 1, 4, 4) * 2 - 0.5  # inside the pixel box of _image_info in normalised units
    y = torch.randint(0, 6, (12,))
    r = distortion_report(net, x, y, _image_info(), 0.02, label="m", **SMALL)
    assert net.training and net.layers[-2].training, "train/eval mode must be restored"
    with torch.no_grad():
        logits = net.eval()(x)
    net.train()
    assert r.p_at_1 == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert r.p_at_5 == pytest.approx(float((logits.topk(5, 1).indices == y[:, None]).any(1).float().mean()))
    assert r.eps_units == "pixel" and r.eps == 0.02 and r.eps_model == pytest.approx(0.04)
    assert r.clamp == (-0.5, 1.5) and r.model_units == "normalized"
    assert r.n == 12 and len(r.per_example["worst"]) == 12
    assert r.expected == percentiles(torch.tensor(r.per_example["expected"]))
    assert r.worst == percentiles(torch.tensor(r.per_example["worst"]))
    assert r.label_changes == sum(r.per_example["label_changed"])
    assert r.evaluations > 0 and r.search == "genetic"
    assert r.search_options == {"budget": None, "population": 16, "generations": 3}
    normalized = distortion_report(net, x, y, _image_info(), 0.02, label="m", units="normalized", **SMALL)
    assert normalized.eps_model == pytest.approx(0.02)


def test_matches_the_measures_called_directly():
    torch.manual_seed(1)
    net = MLP((2,), 3, [12, 12])
    x, y = torch.randn(7, 2), torch.randint(0, 3, (7,))
    info = DataInfo("moons", (2,), 3, None, False, "raw")
    r = distortion_report(net, x, y, info, 0.3, label="m", seed=5, batch_size=100, **SMALL)
    from rollnet.evaluate.distortion import gradient_distortion, max_gradient_distortion

    g = torch.Generator().manual_seed(5)
    expected = gradient_distortion(net, x, y, 0.3, n_samples=32, generator=g)
    worst = max_gradient_distortion(net, x, y, 0.3, population=16, generations=3, generator=g)
    assert r.per_example["expected"] == pytest.approx(expected.tolist(), rel=1e-6, abs=1e-9)
    assert r.per_example["worst"] == pytest.approx(worst.distortion.tolist(), rel=1e-6, abs=1e-9)
    assert r.per_example["label_changed"] == worst.label_changed.tolist()
    assert math.isnan(r.p_at_5), "P@5 needs at least 5 classes"
    assert "| m |" in distortion_markdown([r]) and " n/a " in distortion_markdown([r])


def test_zero_inside_the_certified_region_and_positive_across_boundaries():
    torch.manual_seed(2)
    net = MLP((2,), 2, [16, 16]).double()
    x = torch.randn(10, 2, dtype=torch.float64)
    y = torch.zeros(10, dtype=torch.int64)
    info = DataInfo("moons", (2,), 2, None, False, "raw")
    radius = float(rollnet.margin(net, x, p="inf").min())
    inside = distortion_report(net, x, y, info, 0.5 * radius, label="m", **SMALL)
    assert inside.expected["P100"] == 0 and inside.worst["P100"] == 0 and inside.label_changes == 0
    across = distortion_report(net, x, y, info, 1.0, label="m", **SMALL)
    assert across.worst["P100"] > 0 and across.expected["P100"] > 0


def test_bad_arguments_are_clear_errors():
    net = MLP((2,), 2, [4])
    x, y = torch.randn(3, 2), torch.zeros(3, dtype=torch.int64)
    info = DataInfo("moons", (2,), 2, None, False, "raw")
    with pytest.raises(ValueError, match="eps must be a positive"):
        distortion_report(net, x, y, info, 0.0, label="m")
    with pytest.raises(ValueError, match="units 'pixel' are not available"):
        distortion_report(net, x, y, info, 0.1, label="m", units="pixel")
    with pytest.raises(ValueError, match="one label per example"):
        distortion_report(net, x, y[:2], info, 0.1, label="m")
    with pytest.raises(ValueError, match="n_samples must be positive"):
        distortion_report(net, x, y, info, 0.1, label="m", n_samples=0)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    return trained_tiny(tmp_path_factory.mktemp("run"), "epochs=1", "roll.lam=0", "model.hidden=[16]", "val_margin_samples=0")


def test_cli_evaluate_distortion_writes_the_caltech_table(digits_run, tmp_path, capsys):
    args = ["evaluate", str(digits_run), "--limit", "8", "--out", str(tmp_path), "--distortion", "0.03125",
            "--samples", "16", "--population", "12", "--generations", "2", "--seed", "3"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    header = ("| model | P@1 | P@5 | expected P25 | expected P50 | expected P75 | expected P100 | worst-case P25 "
              "| worst-case P50 | worst-case P75 | worst-case P100 | label changes |")
    assert header in printed
    assert "0.03125 pixel units" in printed and "normalized units, the model's input" in printed
    assert "[0, 1] pixel box" in printed
    md = (tmp_path / "evaluation-test.md").read_text()
    assert header in md and "| l1 P25 |" in md, "the distortion table goes with the margins table"
    saved = json.loads((tmp_path / "evaluation-test.json").read_text())
    (d,) = saved["distortion"]
    assert d["n"] == 8 and d["eps"] == 0.03125 and d["seed"] == 3 and d["samples"] == 16
    assert d["eps_model"] == pytest.approx(0.03125 / 0.3763, rel=1e-3)
    assert len(d["per_example"]["worst"]) == 8
    assert main([*args, "--seed", "3"]) == 0, "same seed"
    again = json.loads((tmp_path / "evaluation-test.json").read_text())["distortion"][0]
    assert again["per_example"] == d["per_example"], "seeded: the same numbers twice"


def test_cli_distortion_errors(digits_run, tmp_path, capsys):
    assert main(["evaluate", str(digits_run), "--limit", "2", "--out", str(tmp_path), "--distortion", "-1"]) == EXIT_ERROR
    assert "--distortion must be a positive radius" in capsys.readouterr().err
    assert not (tmp_path / "evaluation-test.md").exists()
    assert main(["evaluate", str(digits_run), "--limit", "2", "--out", str(tmp_path), "--distortion", "0.1",
                 "--search", "nope", "--samples", "4"]) == EXIT_ERROR
    assert "nope" in capsys.readouterr().err
