"""rollnet.load_model: a trained model from a run directory or manifest, without its data."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import rollnet
from rollnet.train import CheckpointError, load_manifest
from rollnet.train.load import load_checkpoint_model
from tests.train.helpers import trained_tiny


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_tiny(tmp_path_factory.mktemp("run"), "epochs=2", "roll.lam=0", "model.hidden=[16]")


@pytest.fixture
def copy(run_dir, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def _weights_file(run):
    return run / json.loads((run / "best.json").read_text())["files"]["weights"]["name"]


def test_loads_the_saved_weights_in_eval_mode_without_the_data(run_dir, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("load_model must not load the data set")

    monkeypatch.setattr("rollnet.data.load_dataset", no_data)
    monkeypatch.setattr("rollnet.train.factory.load_dataset", no_data)
    monkeypatch.setattr("rollnet.train.factory.make_data", no_data)
    model = rollnet.load_model(run_dir)
    assert isinstance(model, torch.nn.Module)
    assert not model.training and all(not m.training for m in model.modules()), "eval mode (dropout off)"
    saved = load_file(str(_weights_file(run_dir)))
    state = model.state_dict()
    assert sorted(state) == sorted(saved)
    for k, v in saved.items():
        assert torch.equal(state[k], v), k
    x = torch.randn(5, 1, 8, 8)
    assert model(x).shape == (5, 10)
    assert torch.equal(model(x), model(x)), "deterministic in eval mode (dropout 0.1 is off)"


def test_directory_means_best_json_and_manifests_load_as_given(run_dir):
    best = load_checkpoint_model(run_dir)
    assert best.checkpoint.path == run_dir / "best.json"
    assert best.config.name == "tiny" and best.info.num_classes == 10 and best.device == torch.device("cpu")
    last = load_checkpoint_model(run_dir / "last.json")
    assert last.checkpoint.path.name == "last.json"
    last_weights = load_file(str(run_dir / load_manifest(run_dir / "last.json").manifest["files"]["weights"]["name"]))
    for k, v in last.model.state_dict().items():
        assert torch.equal(v, last_weights[k])
    model = rollnet.load_model(str(run_dir / "best.json"), device=torch.device("cpu"))
    assert next(model.parameters()).device.type == "cpu"


def test_a_directory_without_best_json_uses_last_json(copy):
    (copy / "best.json").unlink()
    assert load_checkpoint_model(copy).checkpoint.path.name == "last.json"


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        rollnet.load_model(tmp_path / "nowhere" / "best.json")
    with pytest.raises(CheckpointError, match=r"without best\.json or last\.json"):
        rollnet.load_model(tmp_path)


def test_damaged_manifest_is_a_clear_error(copy):
    (copy / "best.json").write_text('{"format": "rollnet-checkpoint", "version": 1, "files": ')
    with pytest.raises(CheckpointError, match="not a readable rollnet checkpoint manifest"):
        rollnet.load_model(copy / "best.json")
    (copy / "best.json").write_text('{"hello": 1}')
    with pytest.raises(CheckpointError, match="not a rollnet checkpoint manifest"):
        rollnet.load_model(copy)


def test_damaged_weights_are_refused(copy):
    f = _weights_file(copy)
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        rollnet.load_model(copy)


def test_weights_that_do_not_fit_the_config_are_refused(copy):
    manifest = json.loads((copy / "best.json").read_text())
    manifest["config"]["model"]["hidden"] = [17]
    (copy / "best.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="do not match the model built from its config"):
        rollnet.load_model(copy)


def test_invalid_config_is_refused(copy):
    manifest = json.loads((copy / "best.json").read_text())
    manifest["config"]["model"]["arch"] = "transformer"
    (copy / "best.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="invalid config"):
        rollnet.load_model(copy)


def test_non_finite_weights_are_refused(copy):
    f = _weights_file(copy)
    tensors = load_file(str(f))
    key = sorted(k for k in tensors if k.endswith("weight"))[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(f))
    manifest = json.loads((copy / "best.json").read_text())
    manifest["files"]["weights"]["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
    (copy / "best.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        rollnet.load_model(copy)


def test_without_safetensors_the_error_says_what_to_install(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(ImportError, match=r"pip install 'rollnet\[train\]'"):
        rollnet.load_model(run_dir)


def test_import_rollnet_does_not_import_the_training_stack():
    import subprocess

    code = "import sys, rollnet; assert 'rollnet.train' not in sys.modules; print(callable(rollnet.load_model))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
