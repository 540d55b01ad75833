"""Training on 2 CPU processes with torchrun (gloo): the same global batch gives the same run,
gradients are all-reduced through the fused ROLL pass, preemption of one rank, resume on 1 or 2.

Each launch is a real ``torchrun --standalone`` (free port) of 2 processes with one thread each,
killed if it outlives its timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rollnet.cli import EXIT_TERMINATED
from rollnet.train import ConfigError, config_from_dict, load_manifest, train
from rollnet.train.checkpoint import load_tensors
from rollnet.train.distributed import World, shard
from tests.train.helpers import quiet

WORKER = Path(__file__).with_name("ddp_worker.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")
ROOT = Path(__file__).resolve().parents[2]

#: moons: 151 training examples, so the last global batch of 32 holds 23 (ranks take 12 and 11, and the
#: loss weights n_r * N / n matter); 15 validation margins (8 + 7); no dropout, exact ROLL (the engine
#: pass, several forwards inside one DDP forward); nothing random after initialisation
CFG = {"name": "ddp", "epochs": 2, "batch_size": 32, "progress": False, "val_margin_samples": 15,
       "data": {"name": "moons", "n": 215}, "model": {"hidden": [16, 16]},
       "optim": {"name": "adam", "lr": 0.01}, "roll": {"lam": 0.5, "C": 1.0}}
STEPS = 2 * 5


def _torchrun(*args: str, nproc: int = 2, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", str(WORKER), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # torchrun and its workers share the new session's process group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def _weights(run_dir: Path, kind: str = "last") -> dict[str, torch.Tensor]:
    return load_tensors(load_manifest(run_dir / f"{kind}.json"), "weights")


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same config on 1 process (in-process) and on 2 (torchrun)."""
    base = tmp_path_factory.mktemp("ddp")
    config = base / "cfg.json"
    config.write_text(json.dumps(CFG))
    two = _torchrun("train", str(config), str(base / "two"))
    assert two.returncode == 0, two.stdout
    assert train(config_from_dict(CFG), base / "one", log=quiet).status == "finished"
    (base / "two.log").write_text(two.stdout)
    return {"config": config, "one": base / "one", "two": base / "two", "log": base / "two.log"}


def test_two_processes_give_the_weights_and_metrics_of_one(runs):
    one, two = runs["one"], runs["two"]
    assert load_manifest(two / "last.json").trainer["step"] == STEPS  # global batches: 5 steps an epoch
    assert _close(_weights(one), _weights(two)) < 1e-5
    h1, h2 = _history(one), _history(two)
    assert len(h1) == len(h2) == 2
    for a, b in zip(h1, h2, strict=True):
        assert a["val_acc"] == b["val_acc"] and a["train_acc"] == b["train_acc"]  # all 151 / 32 counted
        for key in ("train_loss", "train_ce", "train_reg", "val_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
        assert b["val_margin_samples"] == 15
        for q, v in a["val_margin_l2"]["raw"].items():
            assert b["val_margin_l2"]["raw"][q] == pytest.approx(v, rel=1e-4), q  # gathered in order


def test_every_rank_gets_the_same_validation_metrics(runs):
    lines = [line for line in runs["log"].read_text().splitlines() if line.startswith("history of rank ")]
    histories = {int(line.split()[3].rstrip(":")): json.loads(line.split(": ", 1)[1]) for line in lines}
    assert sorted(histories) == [0, 1]
    assert histories[0] == histories[1]
    assert histories[0][-1]["val_margin_l2"] == _history(runs["two"])[-1]["val_margin_l2"]


def test_each_rank_trains_on_its_share_of_the_global_batch(runs):
    text = runs["log"].read_text()
    epoch = {0: [16, 16, 16, 16, 12], 1: [16, 16, 16, 16, 11]}  # 151 = 4 x 32 + 23 = 4 x 32 + (12 + 11)
    for rank, sizes in epoch.items():
        assert f"shard sizes of rank {rank}: {json.dumps(sizes * 2)}" in text, text


def test_the_equality_can_fail(runs, tmp_path):
    """Another seed on one process is far from the 2-process run."""
    train(config_from_dict({**CFG, "seed": 1}), tmp_path, log=quiet)
    assert _close(_weights(tmp_path), _weights(runs["two"])) > 1e-2


def test_fused_roll_through_ddp_all_reduces_the_gradients():
    got = _torchrun("grads")
    assert got.returncode == 0, got.stdout
    assert got.stdout.count("gradients all-reduced") == 2


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_all_at_one_step_and_resumes_on_one_or_two(runs, tmp_path):
    """Rank 1 gets SIGTERM after its step 3: the flag reaches rank 0 in step 4's all-reduce, both
    stop after step 4, rank 0 saves there and they exit 143.  Resumed on 2 processes the run ends
    bit for bit as the uninterrupted 2-process one; resumed on 1 process (same global batch) it
    ends within float tolerance of it."""
    config, stopped = runs["config"], tmp_path / "stopped"
    got = _torchrun("train", str(config), str(stopped), "--sigterm-rank", "1", "--sigterm-step", "3")
    # torchrun reports the workers' exit status 143 (the rank that exits last may instead be
    # stopped by torchrun itself once the first has exited, after the checkpoint is committed)
    assert got.returncode != 0, got.stdout
    assert f"exitcode  : {EXIT_TERMINATED}" in got.stdout, got.stdout
    assert load_manifest(stopped / "last.json").trainer["step"] == 4
    assert not (stopped / "best.json").exists()  # mid-epoch: no epoch end yet
    on_one = tmp_path / "on_one"
    shutil.copytree(stopped, on_one)

    again = _torchrun("train", str(config), str(stopped), "--resume")
    assert again.returncode == 0, again.stdout
    assert _close(_weights(stopped), _weights(runs["two"])) == 0.0
    assert _history(stopped)[-1]["val_acc"] == _history(runs["two"])[-1]["val_acc"]

    result = train(config_from_dict(CFG), on_one, resume=True, log=quiet)
    assert result.status == "finished" and result.state.step == STEPS
    assert _close(_weights(on_one), _weights(runs["one"])) < 1e-5


@pytest.mark.slow
def test_sigterm_to_torchrun_reaches_every_rank_and_saves_one_step(runs, tmp_path):
    """A preempted job: SIGTERM to torchrun itself (rank 0 sends it after its step 3), which forwards
    it to both ranks; they agree on one step, rank 0 saves there, and the run resumes on 1 process."""
    stopped = tmp_path / "stopped"
    got = _torchrun("train", str(runs["config"]), str(stopped), "--sigterm-rank", "-1", "--sigterm-step", "3")
    assert "Sending process" in got.stdout and "closing signal SIGTERM" in got.stdout, got.stdout
    step = load_manifest(stopped / "last.json").trainer["step"]
    assert 3 < step < STEPS
    assert f"interrupted at epoch 1, batch {step} (step {step}) by SIGTERM; saved" in got.stdout, got.stdout
    result = train(config_from_dict(CFG), stopped, resume=True, log=quiet)
    assert result.status == "finished" and result.state.step == STEPS
    assert _close(_weights(stopped), _weights(runs["one"])) < 1e-5


def test_a_global_batch_the_processes_do_not_divide_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="divisible by the 3 processes"):
        train(config_from_dict(CFG), tmp_path, log=quiet)
    assert not any(tmp_path.iterdir())


def test_shards_are_contiguous_and_cover_the_batch_in_order():
    for n in (0, 1, 23, 32):
        for size in (1, 2, 3):
            parts = [list(range(n))[shard(n, World(r, size))] for r in range(size)]
            assert [i for part in parts for i in part] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_the_fused_passes_are_detected_through_a_wrapper():
    from torch import nn

    from rollnet.models import ScoRNN
    from rollnet.regularizer.chain import find_chain, unwrap_parallel
    from rollnet.regularizer.recurrent import find_recurrence

    mlp = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    wrapped = nn.DataParallel(mlp)  # (CPU: a plain wrapper; DistributedDataParallel is seen the same way)
    assert unwrap_parallel(wrapped) is mlp
    chain = find_chain(wrapped)
    assert chain is not None and chain.linears == (mlp[0], mlp[2])
    rnn = ScoRNN(3, 6, 4, num_negative=1)
    assert find_recurrence(nn.DataParallel(rnn)) is not None and find_recurrence(rnn) is not None


def test_one_gpu_per_process():
    from rollnet.train.distributed import device_for

    with pytest.raises(ConfigError, match="say 'cuda'"):
        device_for(torch.device("cuda", 1), World(0, 2, 0))
    assert device_for(torch.device("cpu"), World(1, 2, 1)) == torch.device("cpu")
    if torch.cuda.device_count() < 8:
        with pytest.raises(ConfigError, match="at most one process per GPU"):
            device_for(torch.device("cuda"), World(7, 8, 7))
