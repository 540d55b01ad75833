"""The trainer: exact resume, Ctrl-C, divergence, held-out selection, metrics."""

from __future__ import annotations

import json
import math
import re
import signal
import sys

import pytest
import torch

from rollnet.data import Split
from rollnet.models import ScoRNN
from rollnet.train import CheckpointError, ConfigError, load_manifest, train
from rollnet.train.checkpoint import load_tensors
from rollnet.train.factory import make_optimizers
from rollnet.train.metrics import classify, margins
from tests.train.helpers import quiet, tiny_config, tiny_vowels_config


def _weights(run_dir, kind="last"):
    return load_tensors(load_manifest(run_dir / f"{kind}.json"), "weights")


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def _interrupt_at(step_to_stop):
    def hook(step, model):
        if step == step_to_stop:
            raise KeyboardInterrupt

    return hook


def _strip_times(history):
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in history]


@pytest.mark.parametrize(
    ("optimizer", "stop_at"),
    [("sgd", 7), ("sgd", 19), ("adam", 11)],  # mid-epoch, at the epoch boundary (19 steps/epoch), Adam
)
def test_resume_gives_exactly_the_same_weights(tmp_path, optimizer, stop_at):
    cfg = tiny_config(f"optim.name={optimizer}", "optim.lr=0.01" if optimizer == "adam" else "optim.lr=0.05")
    straight = train(cfg, tmp_path / "straight", log=quiet)
    assert straight.status == "finished" and straight.state.step == 38

    first = train(cfg, tmp_path / "resumed", on_step=_interrupt_at(stop_at), log=quiet)
    assert first.status == "interrupted" and first.state.step == stop_at
    assert load_manifest(tmp_path / "resumed" / "last.json").manifest["step"] == stop_at
    second = train(cfg, tmp_path / "resumed", resume=True, log=quiet)
    assert second.status == "finished" and second.state.step == 38

    _assert_same_weights(_weights(tmp_path / "straight"), _weights(tmp_path / "resumed"))
    _assert_same_weights(_weights(tmp_path / "straight", "best"), _weights(tmp_path / "resumed", "best"))
    assert _strip_times(second.state.history) == _strip_times(straight.state.history)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


def test_resume_is_not_trivially_equal(tmp_path):
    """The comparison above can fail: another seed gives other weights."""
    train(tiny_config(), tmp_path / "a", log=quiet)
    train(tiny_config("seed=1"), tmp_path / "b", log=quiet)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_resume_can_extend_epochs_but_not_change_the_model(tmp_path):
    cfg = tiny_config("epochs=1", "roll.lam=0")
    train(cfg, tmp_path, log=quiet)
    with pytest.raises(ConfigError, match=r"model\.hidden"):
        train(tiny_config("epochs=1", "roll.lam=0", "model.hidden=[16]"), tmp_path, resume=True, log=quiet)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg, tmp_path, log=quiet)
    longer = train(tiny_config("epochs=2", "roll.lam=0"), tmp_path, resume=True, log=quiet)
    assert longer.status == "finished" and len(longer.state.history) == 2


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(tiny_config(), tmp_path, resume=True, log=quiet)


def test_sigint_finishes_the_step_saves_and_restores_the_handler(tmp_path):
    def hook(step, model):
        if step == 5:
            signal.raise_signal(signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    result = train(tiny_config("roll.lam=0"), tmp_path, on_step=hook, log=quiet)
    assert result.status == "interrupted" and result.state.step == 5
    assert load_manifest(tmp_path / "last.json").manifest["step"] == 5
    assert signal.getsignal(signal.SIGINT) is before


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny_config("roll.lam=0", "epochs=1")
    train(cfg, tmp_path, log=quiet)
    good = (tmp_path / "last.json").read_bytes()
    good_weights = _weights(tmp_path)

    def poison(step, model):
        if step == 21:  # two steps into epoch 2
            with torch.no_grad():
                next(model.parameters())[0, 0] = math.nan

    messages: list[str] = []
    result = train(tiny_config("roll.lam=0", "epochs=3"), tmp_path, resume=True, on_step=poison,
                   log=messages.append)
    assert result.status == "diverged"
    assert result.state.step == 21
    assert "nan" in result.message and "kept the last good checkpoint" in result.message
    assert any("diverged" in m for m in messages)
    assert (tmp_path / "last.json").read_bytes() == good
    _assert_same_weights(_weights(tmp_path), good_weights)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_best_checkpoint_is_chosen_on_validation(tmp_path):
    result = train(tiny_config("roll.lam=0", "epochs=3", "optim.lr=0.5"), tmp_path, log=quiet)
    history = result.state.history
    best = load_manifest(tmp_path / "best.json")
    best_acc = max(r["val_acc"] for r in history)
    first_best = next(r for r in history if r["val_acc"] == best_acc)
    assert best.manifest["metrics"]["val_acc"] == best_acc
    assert best.manifest["metrics"]["epoch"] == first_best["epoch"]
    assert best.file("trainer") is None  # weights only
    assert not any("test" in k for r in history for k in r)


def test_metrics_lines_hold_loss_accuracy_and_margin_percentiles(tmp_path):
    train(tiny_config(), tmp_path, log=quiet)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        for key in ("train_loss", "train_ce", "train_reg", "train_acc", "val_loss", "val_acc"):
            assert math.isfinite(r[key])
        assert r["train_reg"] > 0
        margins = r["val_margin_l2"]
        assert set(margins) == {"normalized", "pixel"}
        p = margins["normalized"]
        assert 0 < p["P25"] <= p["P50"] <= p["P75"] <= p["P100"]
        assert math.isclose(margins["pixel"]["P50"], p["P50"] * 0.3763, rel_tol=1e-6)
    assert json.loads((tmp_path / "config.json").read_text())["data"]["name"] == "digits"


def test_training_leaves_the_callers_random_state_alone(tmp_path):
    state = torch.get_rng_state()
    train(tiny_config("epochs=1"), tmp_path, log=quiet)
    assert torch.equal(state, torch.get_rng_state())


def test_one_log_line_per_epoch(tmp_path):
    lines: list[str] = []
    train(tiny_config(), tmp_path, log=lines.append)
    assert sum(line.startswith("epoch ") for line in lines) == 2


def test_cuda_request_without_cuda_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        train(tiny_config("device=cuda"), tmp_path, log=quiet)


def test_data_path_is_only_for_fashion_mnist(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.path is only used by fashion_mnist"):
        train(tiny_config("data.path=/tmp"), tmp_path, log=quiet)


# -- sequences, and the recurrent parameters' own optimiser ----------------------------------------


@pytest.mark.parametrize("stop_at", [5, 7])  # mid-epoch, at the epoch boundary (7 steps/epoch)
def test_resume_of_a_scornn_with_its_recurrent_optimizer_is_exact(tmp_path, stop_at):
    cfg = tiny_vowels_config()
    straight = train(cfg, tmp_path / "straight", log=quiet)
    assert straight.status == "finished" and straight.state.step == 14
    first = train(cfg, tmp_path / "resumed", on_step=_interrupt_at(stop_at), log=quiet)
    assert first.status == "interrupted" and first.state.step == stop_at
    manifest = load_manifest(tmp_path / "resumed" / "last.json").manifest
    assert manifest["trainer"]["recurrent_optimizer"]["param_groups"][0]["lr"] == 0.001
    second = train(cfg, tmp_path / "resumed", resume=True, log=quiet)
    assert second.status == "finished" and second.state.step == 14
    _assert_same_weights(_weights(tmp_path / "straight"), _weights(tmp_path / "resumed"))
    assert _strip_times(second.state.history) == _strip_times(straight.state.history)


def test_resume_needs_the_recurrent_optimizer_state(tmp_path):
    """Resuming restores both optimisers: without the second one's tensors the checkpoint is incomplete."""
    cfg = tiny_vowels_config("epochs=1")
    train(cfg, tmp_path, on_step=_interrupt_at(3), log=quiet)
    last = tmp_path / "last.json"
    manifest = json.loads(last.read_text())
    del manifest["trainer"]["recurrent_optimizer"]
    last.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="incomplete trainer state"):
        train(cfg, tmp_path, resume=True, log=quiet)


def test_the_recurrent_optimizer_holds_only_a_with_its_own_lr():
    torch.manual_seed(0)
    model = ScoRNN(12, 8, 9)
    main, recurrent = make_optimizers(tiny_vowels_config(), model)
    assert recurrent is not None and type(recurrent).__name__ == "RMSprop"
    assert [p for g in recurrent.param_groups for p in g["params"]] == [model.skew]
    assert [g["lr"] for g in recurrent.param_groups] == [0.001]
    main_params = [p for g in main.param_groups for p in g["params"]]
    assert all(p is not model.skew for p in main_params) and len(main_params) == 4
    assert main.defaults["amsgrad"] is True and main.defaults["lr"] == 0.01
    main_only, none = make_optimizers(tiny_vowels_config("recurrent_optim.name=null"), model)
    assert none is None and len(main_only.param_groups[0]["params"]) == 5


def test_the_recurrent_lr_moves_a_and_only_a(tmp_path):
    """With recurrent_optim.lr = 0, A stays at its initial value while the rest trains."""
    start = {}

    def keep_start(step, model):
        if step == 1:
            start.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    frozen = train(tiny_vowels_config("epochs=1", "recurrent_optim.lr=0", "roll.lam=0"), tmp_path / "a",
                   on_step=keep_start, log=quiet)
    assert frozen.status == "finished"
    end = _weights(tmp_path / "a")
    assert torch.equal(end["skew"], start["skew"])
    assert not torch.equal(end["input.weight"], start["input.weight"])
    start.clear()
    train(tiny_vowels_config("epochs=1", "roll.lam=0"), tmp_path / "b", on_step=keep_start, log=quiet)
    assert not torch.equal(_weights(tmp_path / "b")["skew"], start["skew"])


def test_a_recurrent_optimizer_for_a_model_without_recurrent_parameters_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="has no recurrent parameters"):
        train(tiny_config("recurrent_optim.name=rmsprop"), tmp_path, log=quiet)
    with pytest.raises(ConfigError, match="has no recurrent parameters"):
        train(tiny_vowels_config("model.arch=elman"), tmp_path / "elman", log=quiet)


def test_sequence_runs_train_with_the_roll_term_and_log_margins(tmp_path):
    result = train(tiny_vowels_config("epochs=1"), tmp_path, log=quiet)
    (record,) = result.state.history
    assert record["train_reg"] > 0 and math.isfinite(record["val_acc"])
    assert set(record["val_margin_l2"]) == {"raw"} and record["val_margin_samples"] == 8
    assert record["val_margin_l2"]["raw"]["P50"] > 0


def test_validation_metrics_pass_the_lengths():
    """classify and margins run model(x, lengths): padded sequences score as each alone."""
    torch.manual_seed(0)
    model = ScoRNN(3, 6, 4, num_negative=1).double()
    x = torch.randn(5, 7, 3, dtype=torch.float64)
    lengths = torch.tensor([7, 2, 5, 1, 6])
    y = torch.tensor([0, 1, 2, 3, 0])
    loss, acc = classify(model, Split(x, y, lengths=lengths), batch_size=2)
    with torch.no_grad():
        alone = torch.cat([model(x[i : i + 1, :n]) for i, n in enumerate(lengths.tolist())])
    assert math.isclose(loss, float(torch.nn.functional.cross_entropy(alone, y)), rel_tol=1e-12)
    assert acc == float((alone.argmax(1) == y).double().mean())
    radii = margins(model, x, p=2, batch_size=2, lengths=lengths)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(radii[i : i + 1], margins(model, x[i : i + 1, :n], p=2), rtol=1e-10, atol=0)


def test_the_summary_prints_accuracy_as_a_percentage(tmp_path):
    lines: list[str] = []
    result = train(tiny_config("epochs=1", "select_on=val_acc"), tmp_path, log=lines.append)
    assert re.search(r"\(val_acc \d{1,3}\.\d%\)", lines[-1]), lines[-1]
    assert f"{result.state.best['value']:.1%}" in lines[-1]
    lines.clear()
    train(tiny_config("epochs=1", "select_on=val_loss"), tmp_path / "loss", log=lines.append)
    assert re.search(r"\(val_loss \d\.\d+\)", lines[-1]), lines[-1]


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_auto_draws_bars_only_on_a_terminal(tmp_path, capsys, monkeypatch, terminal):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    train(tiny_config("epochs=1", "progress=auto", "val_margin_samples=0"), tmp_path, log=quiet)
    err = capsys.readouterr().err
    assert ("epoch 1/1" in err) is terminal, err[:200]


def test_a_bad_name_writes_nothing(tmp_path, monkeypatch, capsys):
    from rollnet.cli import EXIT_ERROR, main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.json").write_text(json.dumps({"name": "../../escape", "data": {"name": "moons", "n": 100}}))
    assert main(["train", "c.json"]) == EXIT_ERROR
    assert "single path component" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]
