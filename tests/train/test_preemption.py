"""SIGTERM (preemption) on one process: save at the current step, exit 143, resume exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from rollnet.cli import EXIT_INTERRUPTED, EXIT_TERMINATED
from rollnet.train import config_from_dict, load_manifest, train
from rollnet.train.checkpoint import load_tensors
from tests.train.helpers import quiet, tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_tensors(load_manifest(run_dir / "last.json"), "weights")


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_sigterm_saves_at_the_current_step_restores_the_handlers_and_resumes_exactly(tmp_path):
    def hook(step, model):
        if step == 7:
            signal.raise_signal(signal.SIGTERM)

    cfg = tiny_config()  # dropout and the sampled ROLL term: every random state must come back
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    first = train(cfg, tmp_path / "resumed", on_step=hook, log=quiet)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert first.status == "interrupted" and first.stop_signal == "SIGTERM" and first.state.step == 7
    assert "(step 7) by SIGTERM; saved" in first.message
    assert load_manifest(tmp_path / "resumed" / "last.json").manifest["step"] == 7  # not the epoch end (19)
    second = train(cfg, tmp_path / "resumed", resume=True, log=quiet)
    straight = train(cfg, tmp_path / "straight", log=quiet)
    assert second.status == straight.status == "finished" and second.state.step == 38
    _assert_same_weights(_weights(tmp_path / "straight"), _weights(tmp_path / "resumed"))


def test_sigint_is_reported_as_sigint(tmp_path):
    def hook(step, model):
        if step == 3:
            signal.raise_signal(signal.SIGINT)

    result = train(tiny_config("roll.lam=0"), tmp_path, on_step=hook, log=quiet)
    assert result.status == "interrupted" and result.stop_signal == "SIGINT" and result.state.step == 3


def test_sigterm_to_a_real_process_saves_the_current_step_and_exits_143(tmp_path):
    """``python -m rollnet train``: SIGTERM mid-epoch saves at that step (the 44-step epoch is not
    over) and exits 143; ``--resume`` then ends with the weights of an uninterrupted run."""
    cfg = {"name": "preempted", "epochs": 2, "batch_size": 32, "progress": False, "val_margin_samples": 0,
           "checkpoint_every": 0, "data": {"name": "moons", "n": 2000}, "model": {"hidden": [16, 16]},
           "optim": {"name": "adam", "lr": 0.01}, "roll": {"lam": 0.5, "C": 1.0}}
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    marker = tmp_path / "started"
    # the step hook of the CLI is not reachable: the child stops itself once a few steps are done
    code = (
        "import os, signal, sys\n"
        "import rollnet.train.trainer as t\n"
        "real = t._Run.step\n"
        "def step(self, *a, **k):\n"
        "    out = real(self, *a, **k)\n"
        "    if self.state.step == 5:\n"
        f"        open({str(marker)!r}, 'w').close(); os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return out\n"
        "t._Run.step = step\n"
        "from rollnet.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", code, "train", str(config), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == EXIT_TERMINATED != EXIT_INTERRUPTED, proc.stdout + proc.stderr
    assert marker.exists()
    assert "SIGTERM: finishing this step" in proc.stdout
    assert "interrupted at epoch 1, batch 5 (step 5) by SIGTERM; saved" in proc.stdout
    assert load_manifest(out / "last.json").trainer["step"] == 5
    resumed = subprocess.run([sys.executable, "-m", "rollnet", "train", str(config), "--out", str(out), "--resume"],
                             capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert train(config_from_dict(cfg), tmp_path / "s", log=quiet).status == "finished"
    assert load_manifest(out / "last.json").trainer["step"] == 2 * 44
    _assert_same_weights(_weights(tmp_path / "s"), _weights(out))
