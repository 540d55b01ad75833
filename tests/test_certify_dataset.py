"""rollnet.certify_dataset: margins of a whole data set, in blocks, sharded across processes,
with incremental results that a rerun resumes from."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import rollnet
from rollnet import sharding
from rollnet.models import MLP
from rollnet.models.recurrent import ElmanRNN
from rollnet.sharding import ResumeMismatchError, certify_dataset
from tests.threads import intra_op_threads

TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.fixture(autouse=True)
def _single_thread():
    with intra_op_threads(1):
        yield


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MLP((5,), 3, [16, 16])


def _data(n: int = 23, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 5, generator=torch.Generator().manual_seed(seed))


def test_equals_margin_block_by_block_bitwise_in_the_original_order():
    net, x = _net(), _data()
    got = certify_dataset(net, x, p=(1, 2, "inf"), batch_size=7)
    assert list(got) == [1, 2, "inf"]
    for p in (1, 2, "inf"):
        want = torch.cat([rollnet.margin(net, x[i : i + 7], p=p) for i in range(0, 23, 7)])
        assert got[p].dtype == torch.float32 and got[p].shape == (23,)
        assert torch.equal(got[p], want)
    single = certify_dataset(net, x, p=math.inf, batch_size=7)
    assert isinstance(single, torch.Tensor) and torch.equal(single, got["inf"])


def test_rounding_none_and_float64_inputs():
    net, x = _net(), _data()
    assert torch.equal(certify_dataset(net, x, batch_size=5, rounding="none"),
                       torch.cat([rollnet.margin(net, x[i : i + 5], rounding="none") for i in range(0, 23, 5)]))
    net64, x64 = _net().double(), x.double()
    got = certify_dataset(net64, x64, batch_size=5)
    assert got.dtype == torch.float64
    assert torch.equal(got, torch.cat([rollnet.margin(net64, x64[i : i + 5]) for i in range(0, 23, 5)]))


def test_datasets_of_tuples_tensors_and_tensordatasets_agree():
    net, x = _net(), _data()
    y = torch.zeros(23, dtype=torch.int64)
    want = certify_dataset(net, x, batch_size=6)
    assert torch.equal(certify_dataset(net, TensorDataset(x, y), batch_size=6), want)
    assert torch.equal(certify_dataset(net, list(zip(x, y, strict=True)), batch_size=6), want)
    assert torch.equal(certify_dataset(net, list(x), batch_size=6), want)


def test_sequences_with_lengths():
    torch.manual_seed(0)
    rnn = ElmanRNN(3, 6, 2)
    x = torch.randn(9, 5, 3)
    lengths = torch.tensor([5, 2, 3, 5, 1, 4, 5, 2, 3])
    want = torch.cat([rollnet.margin(rnn, x[i : i + 4], additional_forward_args=(lengths[i : i + 4],))
                      for i in range(0, 9, 4)])
    assert torch.equal(certify_dataset(rnn, x, batch_size=4, additional_forward_args=(lengths,)), want)
    assert torch.equal(certify_dataset(rnn, TensorDataset(x, torch.zeros(9), lengths), batch_size=4), want)
    items = [(x[i], 0, int(lengths[i])) for i in range(9)]
    assert torch.equal(certify_dataset(rnn, items, batch_size=4), want)


def test_bad_arguments_name_the_cause():
    net, x = _net(), _data()
    with pytest.raises(ValueError, match="batch_size"):
        certify_dataset(net, x, batch_size=0)
    with pytest.raises(ValueError, match="twice"):
        certify_dataset(net, x, p=(2, 2.0))
    with pytest.raises(TypeError, match="dataset must be"):
        certify_dataset(net, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="different shapes"):
        certify_dataset(net, [torch.zeros(5), torch.zeros(4)])
    assert certify_dataset(net, x[:0]).shape == (0,)


def test_under_torchrun_without_a_process_group_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="init_process_group"):
        certify_dataset(_net(), _data())


def test_progress_bar_and_device(capsys):
    net, x = _net(), _data()
    got = certify_dataset(net, x, batch_size=10, progress=True, device="cpu")
    assert torch.equal(got, certify_dataset(net, x, batch_size=10))
    assert "3/3" in capsys.readouterr().err  # one step per block


def test_model_mode_is_restored():
    net = _net()
    net.train()
    certify_dataset(net, _data(), batch_size=8)
    assert all(m.training for m in net.modules())


# -- incremental results ----------------------------------------------------


def _counting(monkeypatch, fail_after: int | None = None) -> list[int]:
    """Count the blocks certified (their sizes); raise on the block after ``fail_after``."""
    calls: list[int] = []
    real = sharding._certify_block

    def counted(certifier, x, args):
        if fail_after is not None and len(calls) == fail_after:
            raise KeyboardInterrupt  # a kill: nothing after it runs
        calls.append(int(x.shape[0]))
        return real(certifier, x, args)

    monkeypatch.setattr(sharding, "_certify_block", counted)
    return calls


def test_a_killed_run_resumes_computing_only_the_missing_blocks(tmp_path, monkeypatch):
    net, x = _net(), _data()
    want = certify_dataset(net, x, p=(1, 2), batch_size=5)
    calls = _counting(monkeypatch, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        certify_dataset(net, x, p=(1, 2), batch_size=5, out=tmp_path / "m")
    assert sorted(f.name for f in (tmp_path / "m").glob("block-*.pt")) == ["block-000000.pt", "block-000001.pt"]
    monkeypatch.undo()
    calls = _counting(monkeypatch)
    got = certify_dataset(net, x, p=(1, 2), batch_size=5, out=tmp_path / "m")
    assert calls == [5, 5, 3]  # blocks 2, 3, 4 only
    assert all(torch.equal(got[p], want[p]) for p in (1, 2))
    calls.clear()
    (tmp_path / "m" / "block-000003.pt").unlink()
    again = certify_dataset(net, x, p=(1, 2), batch_size=5, out=tmp_path / "m")
    assert calls == [5]
    assert all(torch.equal(again[p], want[p]) for p in (1, 2))
    calls.clear()
    assert torch.equal(certify_dataset(net, x, p=(1, 2), batch_size=5, out=tmp_path / "m")[2], want[2])
    assert calls == []


def test_a_damaged_block_is_recomputed(tmp_path, monkeypatch):
    net, x = _net(), _data()
    want = certify_dataset(net, x, batch_size=5, out=tmp_path)
    (tmp_path / "block-000001.pt").write_bytes(b"not a block")
    calls = _counting(monkeypatch)
    assert torch.equal(certify_dataset(net, x, batch_size=5, out=tmp_path), want)
    assert calls == [5]


def test_a_mismatched_resume_is_refused(tmp_path):
    net, x = _net(), _data()
    certify_dataset(net, x, p=2, batch_size=5, out=tmp_path)
    with pytest.raises(ResumeMismatchError, match="model"):
        certify_dataset(_net(seed=1), x, p=2, batch_size=5, out=tmp_path)
    with pytest.raises(ResumeMismatchError, match="block_size"):
        certify_dataset(net, x, p=2, batch_size=6, out=tmp_path)
    with pytest.raises(ResumeMismatchError, match="norms"):
        certify_dataset(net, x, p=1, batch_size=5, out=tmp_path)
    with pytest.raises(ResumeMismatchError, match="examples"):
        certify_dataset(net, x[:20], p=2, batch_size=5, out=tmp_path)
    changed = x.clone()
    changed[7, 0] += 1
    with pytest.raises(ResumeMismatchError, match="block 1"):
        certify_dataset(net, changed, p=2, batch_size=5, out=tmp_path)


def test_blocks_honour_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        certify_dataset(_net(), _data(), batch_size=10, out=tmp_path)
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in tmp_path.iterdir()}
    assert modes and set(modes.values()) == {0o640}, modes


# -- many processes -----------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    from rollnet import sharding
    from rollnet.models import MLP

    out, blocks, fail_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)
    net = MLP((5,), 3, [16, 16])
    x = torch.randn(23, 5, generator=torch.Generator().manual_seed(1))
    calls = []
    real = sharding._certify_block
    def counted(certifier, xb, args):
        if fail_after == -2 and rank == 1:
            raise ValueError("no such example")
        if fail_after >= 0 and rank == 1 and len(calls) == fail_after:
            os._exit(9)  # killed mid-way: block files of finished blocks stay
        calls.append(1)
        return real(certifier, xb, args)
    sharding._certify_block = counted
    got = sharding.certify_dataset(net, x, p=(1, 2, "inf"), batch_size=4, out=None if blocks == "-" else blocks)
    torch.save({"margins": got, "calls": len(calls)}, f"{out}-{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()
    """
)


def _launch(tmp_path: Path, nproc: int, out: str, blocks: str = "-", fail_after: int = -1) -> subprocess.CompletedProcess:
    """Run SCRIPT on ``nproc`` processes; ``fail_after`` k >= 0: rank 1 dies at its block k; -2: rank 1 raises."""
    script = tmp_path / "shard.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    if nproc == 1:
        cmd = [sys.executable, str(script)]
        env.pop("WORLD_SIZE", None)
    else:
        cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", str(script)]
    proc = subprocess.run([*cmd, str(tmp_path / out), blocks, str(fail_after)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=90)
    if fail_after == -1:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _one_process() -> dict:
    torch.manual_seed(0)
    net = MLP((5,), 3, [16, 16])
    x = torch.randn(23, 5, generator=torch.Generator().manual_seed(1))
    return certify_dataset(net, x, p=(1, 2, "inf"), batch_size=4)  # type: ignore[return-value]


def test_sharded_margins_equal_one_process_bitwise(tmp_path):
    one = _one_process()
    _launch(tmp_path, 2, "two")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"two-{rank}.pt")
        assert all(torch.equal(got["margins"][p], one[p]) for p in (1, 2, "inf"))  # gathered on every rank
        assert got["calls"] == 3  # blocks 0-2 on rank 0, 3-5 on rank 1


@pytest.mark.slow
def test_a_killed_rank_resumes_on_another_number_of_processes(tmp_path):
    one = _one_process()
    # rank 1 (blocks 3, 4, 5 of 0..5) is killed after finishing one block: block 3 and rank 0's stay
    blocks = tmp_path / "blocks"
    assert _launch(tmp_path, 2, "killed", str(blocks), fail_after=1).returncode != 0
    finished = sorted(f.name for f in blocks.glob("block-*.pt"))
    assert "block-000003.pt" in finished and "block-000004.pt" not in finished
    _launch(tmp_path, 3, "resumed", str(blocks))
    calls = [torch.load(tmp_path / f"resumed-{rank}.pt")["calls"] for rank in range(3)]
    assert sum(calls) == 6 - len(finished)
    for rank in range(3):
        resumed = torch.load(tmp_path / f"resumed-{rank}.pt")["margins"]
        assert all(torch.equal(resumed[p], one[p]) for p in (1, 2, "inf"))


@pytest.mark.slow
def test_an_error_on_one_process_is_raised_on_all_naming_it(tmp_path):
    proc = _launch(tmp_path, 2, "failed", fail_after=-2)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert log.count("ValueError: process 1: ValueError: no such example") == 2, log[-3000:]
