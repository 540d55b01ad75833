"""The demo's plumbing on a tiny budget (the real run is `make demo`)."""

from __future__ import annotations

import json

import torch

from rollnet.demo import MODELS, demo_configs, main


def test_demo_configs_differ_only_in_the_regulariser():
    configs = demo_configs(epochs=3, approx=16)
    assert [c.name for c in configs] == [name for name, _, _ in MODELS]
    assert [(c.roll.lam, c.roll.C) for c in configs] == [(0.0, 0.0), (2.0, 0.25), (2.0, 1.0)]
    base = configs[0]
    for c in configs[1:]:
        assert (c.model, c.optim, c.data, c.seed, c.epochs) == (base.model, base.optim, base.data, base.seed, 3)
    assert base.model.hidden == [300] * 4 and base.data.name == "mnist_subset"


def test_demo_runs_end_to_end_and_reuses_finished_runs(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = ["--out", str(tmp_path), "--epochs", "1", "--train-size", "200", "--limit", "20", "--approx", "2"]
        assert main(args) == 0
        first = json.loads((tmp_path / "comparison.json").read_text())
        assert [r["model"] for r in first["reports"]] == [
            "vanilla", "ROLL (lambda 2, C 0.25)", "ROLL (lambda 2, C 1)"]
        assert all(r["n"] == 20 and set(r["margins"]) == {"normalized", "pixel"} for r in first["reports"])
        markdown = (tmp_path / "comparison.md").read_text()
        assert "| vanilla |" in markdown and "median margin vs vanilla" in markdown
        printed = capsys.readouterr().out
        assert printed.count("\nepoch 1/1") == 3
        assert main(args) == 0  # second call: all three runs are complete and only re-evaluated
        assert "\nepoch 1/1" not in capsys.readouterr().out
        again = json.loads((tmp_path / "comparison.json").read_text())
        assert [r["margins"] for r in again["reports"]] == [r["margins"] for r in first["reports"]]
    finally:
        torch.set_num_threads(threads)
