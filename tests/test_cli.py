"""The rollnet command end to end on tiny configs (a few seconds each)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rollnet.cli import EXIT_DIVERGED, EXIT_ERROR, EXIT_INTERRUPTED, main
from rollnet.train import load_manifest

TINY = {
    "name": "tiny_cli",
    "epochs": 2,
    "batch_size": 32,
    "progress": False,
    "val_margin_samples": 20,
    "data": {"name": "moons", "n": 300},
    "model": {"hidden": [16, 16]},
    "optim": {"name": "adam", "lr": 0.01},
    "roll": {"lam": 0.5, "C": 1.0},
}


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def test_train_then_evaluate(config, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out), "--set", "epochs=3"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("\nepoch ") + printed.startswith("epoch ") == 3
    assert {"best.json", "last.json", "metrics.jsonl", "config.json"} <= {p.name for p in out.iterdir()}

    assert main(["evaluate", str(out), "--split", "test"]) == 0
    printed = capsys.readouterr().out
    assert "| model | accuracy | patterns | Jacobians | units | l1 P25 |" in printed
    assert "| tiny_cli |" in printed and "raw units" in printed
    report = json.loads((out / "evaluation-test.json").read_text())["reports"][0]
    assert report["split"] == "test" and report["n"] == 45
    assert 0.0 <= report["accuracy"] <= 1.0 and report["precision"] == "float64"
    assert 1 <= report["n_jacobians"] <= report["n_patterns"] <= 45
    l2 = report["margins"]["raw"]["l2"]
    assert 0 < l2["P25"] <= l2["P50"] <= l2["P75"] <= l2["P100"]
    assert (out / "evaluation-test.md").read_text().startswith("test split, 45 examples")


def test_evaluate_reports_normalised_and_pixel_units(tmp_path, capsys):
    cfg = {**TINY, "data": {"name": "digits"}, "epochs": 1}
    path = tmp_path / "digits.json"
    path.write_text(json.dumps(cfg))
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 0
    assert main(["evaluate", str(tmp_path / "run" / "best.json"), "--split", "val", "--limit", "30",
                 "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "evaluation-val.json").read_text())["reports"][0]
    assert report["n"] == 30 and report["model_units"] == "normalized"
    norm, pixel = report["margins"]["normalized"], report["margins"]["pixel"]
    for p in ("l1", "l2", "linf"):
        assert pixel[p]["P50"] == pytest.approx(norm[p]["P50"] * 0.3763, rel=1e-9)
    # l_inf radii are the smallest and l1 the largest, as the norms' ordering demands
    assert norm["linf"]["P50"] <= norm["l2"]["P50"] <= norm["l1"]["P50"]
    assert "| pixel |" in capsys.readouterr().out


def test_unknown_key_is_an_error_listing_the_valid_keys(config, tmp_path, capsys):
    assert main(["train", str(config), "--out", str(tmp_path / "r"), "--set", "optim.momentun=0.9"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "unknown config key 'optim.momentun'" in err and "optim.momentum" in err
    assert not (tmp_path / "r").exists()


def test_existing_run_is_not_overwritten_and_resume_continues(config, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out), "--set", "epochs=1"]) == 0
    before = (out / "last.json").read_bytes()
    assert main(["train", str(config), "--out", str(out)]) == EXIT_ERROR
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "last.json").read_bytes() == before
    assert main(["train", str(config), "--out", str(out), "--resume", "--set", "epochs=2"]) == 0
    assert load_manifest(out / "last.json").trainer["epoch"] == 2


def test_evaluate_a_corrupt_checkpoint_fails_cleanly_and_overwrites_nothing(config, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out), "--set", "epochs=1"]) == 0
    (out / "evaluation-test.md").write_text("previous report\n")
    weights = load_manifest(out / "best.json").file("weights")
    assert weights is not None
    weights.write_bytes(weights.read_bytes()[:-10])
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("rollnet: error:") and "damaged" in err
    assert (out / "evaluation-test.md").read_text() == "previous report\n"
    assert not (out / "evaluation-test.json").exists()
    (tmp_path / "junk.json").write_text("not json")
    assert main(["evaluate", str(tmp_path / "junk.json")]) == EXIT_ERROR
    assert "not a readable rollnet checkpoint" in capsys.readouterr().err


def test_divergence_exit_status(config, tmp_path, capsys):
    # a learning rate of 1e30 overflows the weights at the first update; the next loss is not finite
    code = main(["train", str(config), "--out", str(tmp_path / "run"), "--set", "optim.name=sgd",
                 "optim.lr=1e30", "optim.momentum=0", "roll.lam=0"])
    assert code == EXIT_DIVERGED
    assert "training diverged" in capsys.readouterr().out
    assert not (tmp_path / "run" / "last.json").exists()


def test_ctrl_c_in_a_real_process_saves_and_exits_130(config, tmp_path):
    cfg = {**TINY, "epochs": 500, "val_margin_samples": 0, "data": {"name": "moons", "n": 2000}}
    config.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollnet.cli", "train", str(config), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("epoch 1/"):
                break
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, rest
    assert "interrupted at epoch" in rest
    checkpoint = load_manifest(out / "last.json")
    assert checkpoint.trainer["step"] >= 44  # at least the first epoch's 44 steps
