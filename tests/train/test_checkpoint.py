"""Checkpoints: atomic commits, damage detection, mismatched weights."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from rollnet.train import CheckpointError, evaluate_checkpoint, load_manifest
from rollnet.train.checkpoint import (
    atomic_write_bytes,
    load_tensors,
    load_weights_into,
    save_checkpoint,
)
from tests.train.helpers import trained_tiny


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_tiny(tmp_path_factory.mktemp("run"), "epochs=1", "roll.lam=0")


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"], "temporary file left behind"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "atomic.txt", b"x")
        (tmp_path / "plain.txt").write_bytes(b"x")
    finally:
        os.umask(old)
    mode = (tmp_path / "atomic.txt").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_crash_before_the_manifest_commit_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    weights = {"w": torch.ones(3)}
    save_checkpoint(tmp_path, "last", 1, weights=weights, trainer_tensors=None, content={"config": {}, "data": {}})
    real_replace = os.replace

    def crash_on_manifest(src, dst):
        if str(dst).endswith(".json"):
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_manifest)
    with pytest.raises(OSError, match="power cut"):
        save_checkpoint(tmp_path, "last", 2, weights={"w": torch.zeros(3)}, trainer_tensors=None,
                        content={"config": {}, "data": {}})
    monkeypatch.setattr(os, "replace", real_replace)
    checkpoint = load_manifest(tmp_path / "last.json")
    assert checkpoint.manifest["step"] == 1
    assert torch.equal(load_tensors(checkpoint, "weights")["w"], torch.ones(3))


def test_unreferenced_tensor_files_are_removed_after_a_commit(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, "last", step, weights={"w": torch.full((2,), float(step))},
                        trainer_tensors={"t": torch.zeros(1)}, content={"config": {}, "data": {}})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["last.json", "trainer-s00000003.safetensors", "weights-s00000003.safetensors"]


def test_damaged_weights_are_detected(run_dir, tmp_path):
    d = tmp_path / "copy"
    d.mkdir()
    for f in run_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    weights = load_manifest(d / "best.json").file("weights")
    assert weights is not None
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="damaged"):
        load_manifest(d / "best.json")
    with pytest.raises(CheckpointError, match="damaged"):
        evaluate_checkpoint(d)


def test_truncated_or_foreign_manifests_are_refused(tmp_path):
    (tmp_path / "best.json").write_text('{"format": "rollnet-checkpoint", "vers')
    with pytest.raises(CheckpointError, match="not a readable"):
        load_manifest(tmp_path / "best.json")
    (tmp_path / "best.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not a rollnet checkpoint"):
        load_manifest(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_manifest(tmp_path / "nothing.json")
    with pytest.raises(CheckpointError, match="not a rollnet run"):
        load_manifest(tmp_path / "..")


def test_missing_tensor_file_is_reported(run_dir, tmp_path):
    d = tmp_path / "copy"
    d.mkdir()
    (d / "best.json").write_bytes((run_dir / "best.json").read_bytes())
    with pytest.raises(CheckpointError, match="which is missing"):
        load_manifest(d / "best.json")


def test_weights_that_do_not_fit_the_model_give_a_clear_error(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_weights_into(model, {**model.state_dict(), "0.weight": torch.zeros(5, 3)}, tmp_path)
    with pytest.raises(CheckpointError, match="missing"):
        load_weights_into(model, {"0.weight": torch.zeros(4, 3)}, tmp_path)


def test_checkpoint_with_a_tampered_architecture_is_mismatched(run_dir, tmp_path):
    d = tmp_path / "copy"
    d.mkdir()
    for f in run_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((d / "best.json").read_text())
    manifest["config"]["model"]["hidden"] = [16, 16]
    (d / "best.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="do not match the model"):
        evaluate_checkpoint(d / "best.json")


def test_last_checkpoint_holds_optimizer_and_random_states(run_dir):
    checkpoint = load_manifest(run_dir / "last.json")
    tensors = load_tensors(checkpoint, "trainer")
    assert {"rng.torch", "rng.roll"} <= set(tensors)
    assert any(k.startswith("optimizer.") and k.endswith("momentum_buffer") for k in tensors)
    trainer = checkpoint.trainer
    assert trainer["epoch"] == 1 and trainer["batch"] == 0 and trainer["optimizer"]["param_groups"]
