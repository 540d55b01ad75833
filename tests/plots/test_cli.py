"""``rollnet plot ...`` end to end on tiny runs trained in the fixtures (seconds each)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rollnet.cli import EXIT_ERROR, main
from rollnet.train import TrainConfig, apply_overrides, train
from tests.plots.helpers import png_size
from tests.threads import intra_op_threads
from tests.train.helpers import quiet, tiny_vowels_config


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with intra_op_threads(1):
        yield


def _run(root: Path, name: str, *overrides: str) -> Path:
    base = ["progress=false", "val_margin_samples=0", "epochs=2", "batch_size=64", "optim.name=adam",
            "optim.lr=0.01", "roll.lam=0"]
    cfg = apply_overrides(TrainConfig(), [*base, f"name={name}", *overrides])
    train(cfg, root / name, log=quiet)
    return root / name


@pytest.fixture(scope="module")
def moons(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("moons")
    opts = ("data.name=moons", "data.n=200", "model.hidden=[8,8]")
    return _run(root, "moons_vanilla", *opts), _run(root, "moons_roll", *opts, "roll.lam=1", "roll.C=1")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("digits")
    opts = ("data.name=digits", "model.hidden=[16]", "epochs=1")
    return _run(root, "digits_vanilla", *opts), _run(root, "digits_roll", *opts, "roll.lam=1", "roll.C=1")


def test_regions_of_two_toy_runs(moons, tmp_path, capsys) -> None:
    out = tmp_path / "regions.png"
    assert main(["plot", "regions", str(moons[0]), str(moons[1]), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().err
    width, height = png_size(out)
    assert width == 1152 and 300 < height < 900


def test_margins_of_two_runs(moons, tmp_path) -> None:
    out = tmp_path / "m.png"
    assert main(["plot", "margins", str(moons[0]), str(moons[1] / "last.json"), "-o", str(out), "--norm", "linf",
                 "--split", "val", "--limit", "20"]) == 0
    assert png_size(out) == (768, 480)


def test_saliency_of_a_pair(digits, tmp_path) -> None:
    out = tmp_path / "s.png"
    assert main(["plot", "saliency", str(digits[0]), str(digits[1]), "-o", str(out), "--eps", "0.1",
                 "--examples", "2", "--budget", "200"]) == 0
    assert png_size(out) == (1045, 495)  # 5 columns of 1.9 in, 2 rows of 2 in + 0.5, 110 dpi


def test_plane_through_test_images(digits, tmp_path) -> None:
    out = tmp_path / "p.png"
    assert main(["plot", "plane", str(digits[0]), str(digits[1]), "-o", str(out), "--example", "3",
                 "--scale", "20"]) == 0
    assert png_size(out) == (1152, 552)
    out = tmp_path / "fixed.png"
    assert main(["plot", "plane", str(digits[0]), "-o", str(out), "--half-width", "0.5"]) == 0
    assert png_size(out) == (576, 552)


def test_stability_of_a_sequence_run(tmp_path) -> None:
    train(tiny_vowels_config("epochs=1"), tmp_path / "vowels", log=quiet)
    out = tmp_path / "st.png"
    assert main(["plot", "stability", str(tmp_path / "vowels"), "-o", str(out), "--limit", "10"]) == 0
    assert png_size(out) == (1200, 432)


def test_errors_name_their_cause(moons, digits, tmp_path, capsys) -> None:
    out = str(tmp_path / "x.png")
    cases = [
        (["plot", "regions", str(digits[0]), "-o", out], "needs a model with 2-D input"),
        (["plot", "stability", str(moons[0]), "-o", out], "needs sequence runs"),
        (["plot", "saliency", str(moons[0]), str(digits[1]), "-o", out], "trained on different data"),
        (["plot", "saliency", str(digits[0]), str(digits[1]), "-o", out, "--eps", "0"], "eps must be a positive"),
        (["plot", "plane", str(digits[0]), "-o", out, "--example", "100000"], "example must lie in"),
        (["plot", "saliency", str(digits[0]), str(digits[1]), "-o", out, "--examples", "100000"],
         "examples must be at most"),
        (["plot", "margins", str(moons[0]), "-o", out, "--limit", "0"], "--limit must be positive"),
        (["plot", "margins", str(tmp_path / "missing"), "-o", out], "missing"),
        (["plot", "plane", str(digits[0]), "-o", out, "--max-regions", "1"], "max_regions=1"),
    ]
    for argv, message in cases:
        assert main(argv) == EXIT_ERROR, argv
        err = capsys.readouterr().err
        assert "rollnet: error:" in err and message in err, (argv, err)
    assert not Path(out).exists()
