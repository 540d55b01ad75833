"""``rollnet evaluate`` on many processes (torchrun) and with incremental margins (--blocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rollnet import sharding
from rollnet.cli import main
from rollnet.train import train
from tests.train.helpers import quiet, tiny_config

TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny trained run: 2-D moons, 105 test examples, an 8 x 8 MLP."""
    out = tmp_path_factory.mktemp("sharded") / "run"
    cfg = tiny_config("name=tiny_sharded", "data.name=moons", "data.n=700", "model.hidden=[8,8]",
                      "model.dropout=0", "epochs=1", "val_margin_samples=0")
    train(cfg, out, log=quiet)
    return out


def _report(path: Path) -> dict:
    """The evaluation's JSON without its wall times."""
    found = json.loads(path.read_text())
    for r in found["reports"]:
        r.pop("seconds")
    return found


def test_torchrun_evaluate_equals_one_process_exactly(run, tmp_path, capsys):
    assert main(["evaluate", str(run), "--batch-size", "16", "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "rollnet", "evaluate", str(run),
           "--batch-size", "16", "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("| tiny_sharded |") == 1  # rank 0 alone prints
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["evaluation-test.json", "evaluation-test.md"]
    one, two = _report(tmp_path / "one" / "evaluation-test.json"), _report(tmp_path / "two" / "evaluation-test.json")
    assert one["reports"][0]["n"] == 105 and len(one["reports"][0]["per_example"]["l2"]) == 105
    assert two == one  # per-example margins included: bit for bit (JSON floats round-trip)


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = sharding._certify_block

    def counted(certifier, x, args):
        calls.append(int(x.shape[0]))
        return real(certifier, x, args)

    monkeypatch.setattr(sharding, "_certify_block", counted)
    return calls


def test_blocks_resume_and_refuse_other_data(run, tmp_path, capsys, monkeypatch):
    blocks = tmp_path / "blocks"
    base = ["evaluate", str(run), "--batch-size", "32", "--blocks", str(blocks)]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert sorted(p.name for p in blocks.iterdir()) == [*(f"block-00000{i}.pt" for i in range(4)), "manifest.json"]
    (blocks / "block-000002.pt").unlink()
    calls = _counting(monkeypatch)
    assert main([*base, "--out", str(tmp_path / "b")]) == 0
    assert calls == [32]  # only the missing block
    assert _report(tmp_path / "b" / "evaluation-test.json") == _report(tmp_path / "a" / "evaluation-test.json")
    capsys.readouterr()
    assert main([*base, "--limit", "50", "--out", str(tmp_path / "c")]) == 1
    assert "holds margins of another computation" in capsys.readouterr().err
    # several checkpoints: one directory each
    assert main(["evaluate", str(run), str(run / "last.json"), "--batch-size", "50", "--blocks", str(tmp_path / "k"),
                 "--out", str(tmp_path / "d")]) == 0
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["0", "1"]
