"""``rollnet sweep`` end to end on a tiny 2-D toy: tables, resume, retries, several workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

optuna = pytest.importorskip("optuna", reason="rollnet sweep needs optuna (the 'sweep' extra)")

from rollnet.cli import main  # noqa: E402
from rollnet.sweep import Sweep, open_study, parse_grid, with_reference  # noqa: E402
from rollnet.train import config_from_dict, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOY = {"name": "toy", "epochs": 3, "batch_size": 64, "progress": False, "val_margin_samples": 0,
       "data": {"name": "moons", "n": 200}, "model": {"arch": "mlp", "hidden": [8], "act": "relu"},
       "optim": {"name": "adam", "lr": 0.01}, "roll": {"lam": 1.0, "C": 1.0}}


def toy_config(tmp_path: Path, **changes: Any) -> Path:
    path = tmp_path / "toy.json"
    path.write_text(json.dumps({**TOY, **changes}))
    return path


def sweep_of(config: Path, out: Path, grid: list[str], **kw: Any) -> Sweep:
    base = load_config(config)
    return Sweep(base=base, grid=with_reference(parse_grid(grid, base), base), out=out, study_name="toy", **kw)


def grid_args(grid: list[str]) -> list[str]:
    return [arg for g in grid for arg in ("--grid", g)]


def trained_lines(run: Path) -> list[str]:
    """The lines of a run's log that start a training from scratch or resume one."""
    log = (run / "train.log").read_text()
    return [line for line in log.splitlines() if line.startswith(("training ", "resuming "))]


def test_a_tiny_grid_runs_end_to_end(tmp_path: Path) -> None:
    config, out = toy_config(tmp_path), tmp_path / "sweep"
    grid = ["roll.lam=0.5,2", "roll.C=1,4"]
    results = tmp_path / "results"
    assert main(["sweep", str(config), *grid_args(grid), "--out", str(out), "--export", str(results)]) == 0
    runs = sorted(p.name for p in (out / "trials").iterdir())
    assert runs == sorted(["vanilla", "roll.lam=0.5,roll.C=1", "roll.lam=0.5,roll.C=4", "roll.lam=2,roll.C=1",
                           "roll.lam=2,roll.C=4"])
    sweep = sweep_of(config, out, grid)
    for point in sweep.grid.points():  # each trial is an ordinary run, exactly as rollnet train writes it
        run = sweep.run_dir(sweep.config(point).name)
        assert config_from_dict(json.loads((run / "config.json").read_text())) == sweep.config(point)
        assert (run / "best.json").is_file() and (run / "metrics.jsonl").is_file()
        assert len(trained_lines(run)) == 1
    doc = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in doc["rows"]] == ["done"] * 5
    assert doc["selection"]["reference"] == "vanilla"
    assert set(doc["test"]) >= {"vanilla"}
    assert all(r["val_acc"] is not None and r["margin"] > 0 for r in doc["rows"])
    assert doc["front"] and set(doc["front"]) <= set(runs)
    md = (out / "sweep.md").read_text()
    assert "## The paper's selection" in md and "| vanilla |" in md
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    # the scores are the run's own: validation accuracy of its best checkpoint
    best = json.loads((out / "trials" / "vanilla" / "best.json").read_text())
    assert doc["rows"][0]["val_acc"] == best["metrics"]["val_acc"]
    assert main(["evaluate", str(out / "trials" / "vanilla"), "--limit", "20"]) == 0
    # the export holds what rollnet evaluate needs to check a row: the vanilla and the selected runs
    exported = {p.name for p in results.iterdir() if p.is_dir()}
    assert "vanilla" in exported and exported <= set(runs)
    assert {"sweep.md", "sweep.json", "tradeoff.png"} <= {p.name for p in results.iterdir()}
    for name in exported:
        assert not list((results / name).glob("trainer-*")) and not (results / name / "last.json").exists()
        assert main(["evaluate", str(results / name), "--limit", "20", "--out", str(tmp_path / "ev")]) == 0

    # rerunning skips every finished point: nothing is trained again
    stamps = {p.name: (p / "best.json").stat().st_mtime_ns for p in (out / "trials").iterdir()}
    assert main(["sweep", str(config), *grid_args(grid), "--out", str(out)]) == 0
    assert stamps == {p.name: (p / "best.json").stat().st_mtime_ns for p in (out / "trials").iterdir()}
    assert all(len(trained_lines(p)) == 1 for p in (out / "trials").iterdir())


def test_a_bad_grid_is_an_error_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, out = toy_config(tmp_path), tmp_path / "sweep"
    for bad, message in [("roll.lamb=1", "unknown config key 'roll.lamb'"), ("roll.lam=x", "expected a number"),
                         ("roll.lam=[]", "the list of values is empty")]:
        assert main(["sweep", str(config), "--grid", bad, "--out", str(out)]) == 1
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_a_different_sweep_in_the_same_study_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, out = toy_config(tmp_path, epochs=1), tmp_path / "sweep"
    assert main(["sweep", str(config), "--grid", "roll.lam=1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["sweep", str(config), "--grid", "roll.lam=1,2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "holds a different sweep" in err and "grid.roll.lam" in err


def _interrupt_at(victim: int) -> Callable[..., Any]:
    """A stand-in for rollnet.train.train whose ``victim``-th call gets a Ctrl-C at its second step."""
    from rollnet.train import trainer

    calls = []

    def train(cfg: Any, out: Any, **kw: Any) -> Any:
        calls.append(cfg.name)
        if len(calls) == victim:
            kw["on_step"] = lambda step, model: os.kill(os.getpid(), signal.SIGINT) if step == 2 else None
        return trainer.train(cfg, out, **kw)

    train.calls = calls  # type: ignore[attr-defined]
    return train


def test_an_interrupted_sweep_resumes_without_rerunning_finished_points(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rollnet.train

    config, out = toy_config(tmp_path, epochs=4), tmp_path / "sweep"
    args = ["sweep", str(config), "--grid", "roll.lam=0.5,2", "--out", str(out)]
    fake = _interrupt_at(2)
    monkeypatch.setattr(rollnet.train, "train", fake)
    assert main(args) == 130  # Ctrl-C: the running point saved a checkpoint
    first, stopped = fake.calls  # type: ignore[attr-defined]
    assert (out / "trials" / first / "best.json").is_file()
    assert (out / "trials" / stopped / "last.json").is_file()
    stamp = (out / "trials" / first / "best.json").stat().st_mtime_ns
    monkeypatch.undo()
    assert main(args) == 0
    assert (out / "trials" / first / "best.json").stat().st_mtime_ns == stamp
    assert [line.split()[0] for line in trained_lines(out / "trials" / first)] == ["training"]
    assert [line.split()[0] for line in trained_lines(out / "trials" / stopped)] == ["training", "resuming"]
    study = open_study(sweep_of(config, out, ["roll.lam=0.5,2"]))
    states = sorted((t.user_attrs.get("status"), t.state.name) for t in study.trials)
    assert ("interrupted", "FAIL") in states
    assert sum(1 for s in states if s == ("done", "COMPLETE")) == 3


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rollnet", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


@pytest.mark.slow
def test_a_killed_worker_s_trial_is_retried_from_its_checkpoint(tmp_path: Path) -> None:
    config, out = toy_config(tmp_path, epochs=150, checkpoint_every=5), tmp_path / "sweep"
    args = ["sweep", str(config), "--grid", "roll.lam=1", "--out", str(out), "--no-reference"]
    proc = subprocess.Popen(_cli(*args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("trials/*/last.json")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list(out.glob("trials/*/last.json")), "the sweep never saved a checkpoint"
    finally:
        proc.kill()  # SIGKILL: no handler runs, the trial stays RUNNING in the storage
        proc.wait()
    killed = {p.parent.name for p in out.glob("trials/*/last.json")}
    assert main(args) == 0
    for run in (out / "trials").iterdir():
        words = [line.split()[0] for line in trained_lines(run)]
        assert words == (["training", "resuming"] if run.name in killed else ["training"])
    base = load_config(config)
    study = open_study(Sweep(base=base, grid=parse_grid(["roll.lam=1"], base), out=out, study_name="toy"))
    failed = [t for t in study.trials if t.user_attrs.get("status") == "killed"]
    assert failed and all(t.state.name == "FAIL" for t in failed)
    assert {t.system_attrs.get("retry_of") for t in study.trials} >= {t.number for t in failed}


def _assert_each_point_ran_once(out: Path, sweep: Sweep) -> None:
    runs = sorted(p.name for p in (out / "trials").iterdir())
    assert runs == sorted(sweep.keys())
    for run in (out / "trials").iterdir():
        assert [line.split()[0] for line in trained_lines(run)] == ["training"], run.name
    study = open_study(sweep)
    done = [t.user_attrs["key"] for t in study.trials if t.user_attrs.get("status") == "done"]
    assert sorted(done) == runs  # one finished trial per point, none twice


@pytest.mark.slow
def test_two_local_jobs_never_run_the_same_point(tmp_path: Path) -> None:
    config, out = toy_config(tmp_path, epochs=6), tmp_path / "sweep"
    journal = tmp_path / "shared" / "journal.log"  # Optuna's journal file, as on a shared filesystem
    grid = ["roll.lam=0.5,1,2", "roll.C=1,4"]
    args = ["sweep", str(config), *grid_args(grid), "--out", str(out),
            "--storage", str(journal), "--jobs", "2"]
    result = subprocess.run(_cli(*args), env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "2 workers, 1 thread each" in result.stderr or "2 workers," in result.stderr
    _assert_each_point_ran_once(out, sweep_of(config, out, grid, storage=str(journal)))


@pytest.mark.slow
def test_two_commands_sharing_one_storage_never_run_the_same_point(tmp_path: Path) -> None:
    config, out = toy_config(tmp_path, epochs=6), tmp_path / "sweep"
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    grid = ["roll.lam=0.5,1,2", "roll.C=1,4"]
    args = ["sweep", str(config), *grid_args(grid), "--out", str(out), "--storage", url]
    procs = [subprocess.Popen(_cli(*args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(o[1][-2000:] for o in outputs)
    trained = [line for _, err in outputs for line in err.splitlines() if ": training in " in line]
    assert len(trained) == 7  # each of the 7 runs once, shared between the two commands
    _assert_each_point_ran_once(out, sweep_of(config, out, grid, storage=url))


def test_a_budget_runs_that_many_distinct_points_with_the_reference(tmp_path: Path) -> None:
    config, out = toy_config(tmp_path, epochs=2), tmp_path / "sweep"
    grid = ["roll.lam=0.5,1,2,4", "roll.C=1,4"]
    args = ["sweep", str(config), *grid_args(grid), "--out", str(out), "--trials", "3"]
    assert main(args) == 0
    runs = {p.name for p in (out / "trials").iterdir()}
    assert len(runs) == 3 and "vanilla" in runs
    doc = json.loads((out / "sweep.json").read_text())
    assert len(doc["rows"]) == 3 and doc["selection"]["reference"] == "vanilla"
    assert main(args) == 0  # rerun: the budget is spent, nothing more runs
    assert {p.name for p in (out / "trials").iterdir()} == runs


@pytest.mark.slow
def test_sigterm_to_a_sweep_of_two_jobs_stops_both_workers_after_saving(tmp_path: Path) -> None:
    config, out = toy_config(tmp_path, epochs=150, checkpoint_every=5), tmp_path / "sweep"
    args = ["sweep", str(config), "--grid", "roll.lam=0.5,1", "--out", str(out), "--no-reference", "--jobs", "2"]
    proc = subprocess.Popen(_cli(*args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(out.glob("trials/*/last.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "asking the 2 workers to stop" in err
    study = open_study(Sweep(base=load_config(config), grid=parse_grid(["roll.lam=0.5,1"], load_config(config)),
                             out=out, study_name="toy"))
    stopped = [t for t in study.trials if t.user_attrs.get("status") == "interrupted"]
    assert stopped and not [t for t in study.trials if t.state.name == "RUNNING"]
    assert main(args[:-2]) == 0  # one worker finishes both; the stopped runs resume from their checkpoints
    for t in stopped:
        words = [line.split()[0] for line in trained_lines(out / "trials" / t.user_attrs["key"])]
        assert words == ["training", "resuming"]


def test_tables_of_a_sweep_that_never_ran_are_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, out = toy_config(tmp_path), tmp_path / "nothing"
    assert main(["sweep", str(config), "--grid", "roll.lam=1", "--out", str(out), "--table-only"]) == 1
    assert "no sweep in" in capsys.readouterr().err and not out.exists()
    journal = tmp_path / "j.log"
    assert main(["sweep", str(config), "--grid", "roll.lam=1", "--out", str(out), "--table-only",
                 "--storage", str(journal)]) == 1
    assert "no study 'toy'" in capsys.readouterr().err
