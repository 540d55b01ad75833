"""Sweep workers: each takes Optuna trials one at a time and trains and scores one point per trial.

Every point of the grid is one ordinary run directory, ``<out>/trials/<key>/``,
exactly as ``rollnet train`` writes it.  What makes a sweep safe to rerun and to
share between workers and machines:

- **Each point is run once.** In a grid, Optuna's grid sampler gives trial ``k``
  of the first ``len(grid)`` the ``k``-th point (trial numbers are unique in a
  storage), and a trial it draws beyond those is a duplicate and is skipped.
  Points that are the same run (every ``roll.lam = 0`` point is the one vanilla
  run) are run by the first of them.  With a budget, a point the sampler draws
  again reuses the first trial's scores.  A lock file in the run directory keeps
  two processes out of one run on a shared filesystem.
- **Retries.** A trial whose worker was killed (a dead process on this machine;
  a heartbeat older than twice its interval on a database storage) or stopped
  (Ctrl-C, SIGTERM) is failed and queued again; a trial that raised an error is
  queued again when the command is rerun.  A retry resumes the point's run from
  its last checkpoint.  Of several retries queued for one failure (two workers
  starting at once), only the first is run.  Diverged runs are results, not
  failures, and are not retried.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollnet.files import atomic_write_text
from rollnet.sweep.grid import decode, point_key
from rollnet.sweep.study import Sweep, host_id, open_study, trial_point

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

__all__ = ["WorkerOutcome", "margin_units", "run_worker", "score_run"]

# statuses of trials that hold no run of their own
_NOT_RUNS = ("skipped", "same_as", "repeat")
# proposals in a row that bring no new point before a budget worker gives up
_STALE_PROPOSALS = 50


class _TrialError(Exception):
    """An error inside one trial: recorded in the trial, and the worker goes on."""


class _Diverged(_TrialError):
    """The point's training diverged (a result, not retried)."""


class _Stopped(Exception):
    """Ctrl-C or SIGTERM stopped the worker (the run saved a checkpoint)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"stopped by {name}")
        self.name = name


class WorkerOutcome:
    """How a worker ended: ``status`` ``"done"`` or ``"stopped"``, and the signal that stopped it."""

    def __init__(self, status: str, signal_name: str | None = None, ran: int = 0) -> None:
        self.status = status
        self.signal_name = signal_name
        self.ran = ran

    def __repr__(self) -> str:
        return f"WorkerOutcome({self.status!r}, {self.signal_name!r}, ran={self.ran})"


def margin_units(scales: dict[str, float]) -> str:
    """The units margins are compared in: ``pixel`` for image data (the paper's), else the model's."""
    return "pixel" if "pixel" in scales else next(iter(scales))


def score_run(run_dir: Path, sweep: Sweep) -> dict[str, Any]:
    """Validation scores of a finished run's best checkpoint (cached in ``sweep-val.json``).

    Accuracy is the best epoch's, on the whole validation split; margins are certified
    exactly (float64) on the first ``sweep.val_limit`` validation examples.
    """
    from rollnet.train.checkpoint import load_manifest
    from rollnet.train.evaluation import evaluate_checkpoint

    best = load_manifest(run_dir / "best.json")
    weights = best.manifest["files"]["weights"]["sha256"]
    cache = run_dir / "sweep-val.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("weights_sha256") == weights and saved.get("val_limit") == sweep.val_limit:
            return dict(saved)
    report = evaluate_checkpoint(run_dir / "best.json", split="val", limit=sweep.val_limit,
                                 device=sweep.base.device)
    units = margin_units(report.scales)
    history = best.trainer.get("epoch")
    scores = {
        "val_acc": float(best.manifest["metrics"]["val_acc"]),
        "val_loss": float(best.manifest["metrics"]["val_loss"]),
        "units": units,
        "margins": report.margins,
        "margin_examples": report.n,
        "val_limit": sweep.val_limit,
        "spearman_l1_l2": report.spearman_l1_l2,
        "best_epoch": history,
        "best_step": best.manifest["step"],
        "weights_sha256": weights,
    }
    atomic_write_text(cache, json.dumps(scores, indent=1) + "\n")
    return scores


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[bool]:
    """Hold ``run_dir/.lock`` (yields ``False`` if another process holds it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _train_point(sweep: Sweep, point: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Train (or resume) the point's run, then score it."""
    from rollnet.train import train

    cfg = sweep.config(point)
    with open(run_dir / "train.log", "a", encoding="utf-8") as log_file:
        def log(message: str) -> None:
            log_file.write(message + "\n")
            log_file.flush()

        result = train(cfg, run_dir, resume=(run_dir / "last.json").is_file(), log=log)
    if result.status == "diverged":
        raise _Diverged(result.message)
    if result.status == "interrupted":
        raise _Stopped(result.stop_signal or "SIGINT")
    if result.best is None:
        raise _TrialError(f"{run_dir} finished without a best checkpoint")
    scores = score_run(run_dir, sweep)
    scores["train_seconds"] = sum(float(r.get("seconds", 0.0)) for r in result.state.history)
    return scores


class _Objective:
    """The function Optuna calls for each trial of one worker."""

    def __init__(self, study: optuna.Study, sweep: Sweep, say: Callable[[str], None]) -> None:
        self.study = study
        self.sweep = sweep
        self.say = say
        self.owner_ids = _owner_grid_ids(study, sweep) if sweep.mode == "grid" else {}
        self.new_point = False
        self.progress = False

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        import optuna

        sweep = self.sweep
        self.new_point = False
        self.progress = False
        space = sweep.grid.search_space()
        raw = {k: trial.suggest_categorical(k, space[k]) for k in sweep.grid.keys}
        point = {k: decode(k, v, sweep.grid) for k, v in raw.items()}
        key = point_key(point, sweep.base)
        for name, value in (("key", key), ("host", host_id()), ("pid", os.getpid())):
            trial.set_user_attr(name, value)
        role = self._role(trial, key)
        # progress: a point run, or a grid number walked past (a vanilla alias); not a duplicate draw
        self.progress = role is None or (role[0] == "same_as" and trial.number < len(sweep.grid))
        if role is not None:
            status, note, values = role
            trial.set_user_attr("status", status)
            trial.set_user_attr("note", note)
            if values is not None:
                return values
            raise optuna.TrialPruned(note)
        run_dir = sweep.run_dir(key)
        trial.set_user_attr("run_dir", str(run_dir.relative_to(sweep.out)))
        with _run_lock(run_dir) as held:
            if not held:
                trial.set_user_attr("status", "skipped")
                trial.set_user_attr("note", "its run is held by another process")
                raise optuna.TrialPruned("run held by another process")
            self.new_point = True
            self.say(f"trial {trial.number}: {key}: training in {run_dir}")
            started = time.perf_counter()
            try:
                scores = _train_point(sweep, point, run_dir)
            except _Diverged as err:
                trial.set_user_attr("status", "diverged")
                trial.set_user_attr("note", str(err))
                self.say(f"trial {trial.number}: {key}: diverged")
                raise
            except _Stopped as err:
                trial.set_user_attr("status", "interrupted")
                trial.set_user_attr("note", str(err))
                raise
            except Exception as err:  # an error in this point's run: record it, go on with others
                trial.set_user_attr("status", "error")
                trial.set_user_attr("note", f"{type(err).__name__}: {err}")
                with open(run_dir / "train.log", "a", encoding="utf-8") as f:
                    traceback.print_exc(file=f)
                self.say(f"trial {trial.number}: {key}: failed ({type(err).__name__}: {err}); "
                         f"see {run_dir / 'train.log'}")
                raise _TrialError(str(err)) from err
        trial.set_user_attr("status", "done")
        trial.set_user_attr("scores", scores)
        median = float(scores["margins"][scores["units"]]["l2"]["P50"])
        self.say(f"trial {trial.number}: {key}: val acc {scores['val_acc']:.2%}, val l2 margin P50 {median:.3g} "
                 f"({scores['units']}) [{time.perf_counter() - started:.0f} s]")
        return float(scores["val_acc"]), median

    def _role(self, trial: optuna.Trial, key: str) -> tuple[str, str, tuple[float, float] | None] | None:
        """``None``: run the point; else (status, note, values to report or ``None``)."""
        trials = self.study.get_trials(deepcopy=False)
        me = trial.number
        frozen = next(t for t in trials if t.number == me)
        retry_of = frozen.system_attrs.get("retry_of")
        if retry_of is not None:
            first = min(t.number for t in trials if t.system_attrs.get("retry_of") == retry_of)
            if first != me:
                return "skipped", f"trial {first} already retries trial {retry_of}", None
        if self.sweep.mode == "grid":
            grid_id = int(frozen.system_attrs.get("grid_id", me))
            if retry_of is None and me >= len(self.sweep.grid):
                return "skipped", "the grid sampler drew a point already given to an earlier trial", None
            if self.owner_ids[key] != grid_id:
                return "same_as", f"the same run as grid point {self.owner_ids[key]} ({key})", None
            return None
        earlier = [t for t in trials if t.number < me and t.user_attrs.get("status") not in _NOT_RUNS
                   and t.state.name != "FAIL" and _key_of(self.study, self.sweep, t) == key]
        if retry_of is None and earlier:
            import optuna

            done = [t for t in earlier if t.state == optuna.trial.TrialState.COMPLETE]
            if done:
                values = done[0].values
                return "repeat", f"drawn again: the scores of trial {done[0].number}", (values[0], values[1])
            return "skipped", f"drawn again while trial {earlier[0].number} holds it", None
        return None


def _key_of(study: optuna.Study, sweep: Sweep, trial: FrozenTrial) -> str | None:
    point = trial_point(study, sweep, trial)
    return None if point is None else point_key(point, sweep.base)


def _queue_reference(study: optuna.Study, sweep: Sweep) -> None:
    """With a budget, queue the vanilla reference first (the sampler might never draw it).

    Of several queued at once (workers starting together) only the first runs: they form one
    family, like the retries of one failure."""
    import optuna

    points = [p for p in sweep.grid.points() if sweep.config(p).roll.lam == 0]
    if not points:
        return
    trials = study.get_trials(deepcopy=False)
    if any(_key_of(study, sweep, t) == point_key(points[0], sweep.base) for t in trials):
        return
    space = sweep.grid.search_space()
    params = {k: space[k][sweep.grid.values[k].index(v)] for k, v in points[0].items()}
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=params,
        distributions={k: optuna.distributions.CategoricalDistribution(space[k]) for k in params},
        system_attrs={"retry_of": -1},
    ))


def _owner_grid_ids(study: optuna.Study, sweep: Sweep) -> dict[str, int]:
    """For each run key, the first grid id (the grid sampler's order) whose point has that key."""
    from rollnet.sweep.study import grid_point

    owners: dict[str, int] = {}
    for grid_id in range(len(sweep.grid)):
        raw = grid_point(study, grid_id)
        assert raw is not None
        point = {k: decode(k, raw[k], sweep.grid) for k in sweep.grid.keys}
        owners.setdefault(point_key(point, sweep.base), grid_id)
    return owners


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _fail_dead(study: optuna.Study) -> None:
    """Fail the running trials of this machine whose worker process is gone."""
    import optuna

    here, me = host_id(), os.getpid()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != here or not isinstance(pid, int) or pid == me or _alive(pid):
            continue
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # another worker was first
            study._storage.set_trial_user_attr(t._trial_id, "status", "killed")  # (a finished trial is frozen)
            study._storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL)


_COVERING = ("COMPLETE", "RUNNING", "WAITING")


def _covered(study: optuna.Study, sweep: Sweep, trials: list[FrozenTrial]) -> dict[str, str]:
    """``key -> state`` of the runs that are done, under way, queued, or failed in a way not
    retried now (errors: next command; divergence: never)."""
    out: dict[str, str] = {}
    owners = _owner_grid_ids(study, sweep) if sweep.mode == "grid" else {}
    for t in trials:
        status = t.user_attrs.get("status")
        if status in _NOT_RUNS:
            continue
        point = trial_point(study, sweep, t)
        if point is None:
            continue
        key = point_key(point, sweep.base)
        if t.state.name in _COVERING or status in ("diverged", "error"):
            if sweep.mode == "grid" and "retry_of" not in t.system_attrs:
                grid_id = int(t.system_attrs.get("grid_id", t.number))
                if t.number >= len(sweep.grid) or owners[key] != grid_id:
                    continue
            out.setdefault(key, t.state.name)
    return out


def _queue_retries(study: optuna.Study, sweep: Sweep, *, errors: bool) -> int:
    """Queue one retry of each failed trial that is not retried yet and whose run is not covered.

    ``errors``: also trials that raised an error (at a worker's start), not only killed or
    stopped ones.  In a grid, retries wait until the grid sampler has numbered every point.
    """
    import optuna

    trials = study.get_trials(deepcopy=False)
    if sweep.mode == "grid":
        needed = max(_owner_grid_ids(study, sweep).values()) + 1
        if len(trials) < needed:
            return 0
    covered = _covered(study, sweep, trials)
    retried = {t.system_attrs["retry_of"] for t in trials if "retry_of" in t.system_attrs}
    queued = 0
    for t in trials:
        status = t.user_attrs.get("status")
        if t.state != optuna.trial.TrialState.FAIL or t.number in retried:
            continue
        if status in ("diverged", *_NOT_RUNS) or (status == "error" and not errors):
            continue
        point = trial_point(study, sweep, t)
        if point is None:
            continue
        key = point_key(point, sweep.base)
        if covered.get(key) in _COVERING:
            continue
        system = {k: v for k, v in t.system_attrs.items() if k in ("grid_id", "search_space")}
        if sweep.mode == "grid" and "grid_id" not in system:
            system["grid_id"] = t.number
            system["search_space"] = sweep.grid.search_space()
        system["retry_of"] = t.number
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING, params=t.params, distributions=t.distributions,
            system_attrs=system,
        ))
        covered[key] = "WAITING"
        queued += 1
    return queued


def _work_left(study: optuna.Study, sweep: Sweep) -> tuple[bool, list[str]]:
    """Whether this worker should ask for another trial, and the keys not yet covered."""
    trials = study.get_trials(deepcopy=False)
    covered = _covered(study, sweep, trials)
    keys = sweep.keys()
    missing = [k for k in keys if k not in covered]
    if any(t.state.name == "WAITING" for t in trials):
        return True, missing
    if sweep.mode == "budget":
        assert sweep.trials is not None
        return bool(missing) and len(covered) < sweep.trials, missing
    return bool(missing), missing


def run_worker(sweep: Sweep, *, threads: int | None = None,
               say: Callable[[str], None] | None = None) -> WorkerOutcome:
    """Run trials of ``sweep`` until none is left to start; returns how the worker ended.

    Args:
        threads: torch's intra-op threads for this worker (default: unchanged).
        say: receives one line per trial (default: stderr).

    A stop signal (Ctrl-C, SIGTERM) makes the running trial's training save a
    checkpoint; the trial is failed and queued again for the next run of the sweep.
    """
    import optuna
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    say = say or (lambda m: print(m, file=sys.stderr, flush=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since 2.9
        return _loop(sweep, say)


def _loop(sweep: Sweep, say: Callable[[str], None]) -> WorkerOutcome:
    import optuna

    study = open_study(sweep)
    if sweep.mode == "budget":
        _queue_reference(study, sweep)
    objective = _Objective(study, sweep, say)
    ran = 0
    idle = 0
    first = True
    while True:
        _fail_dead(study)
        optuna.storages.fail_stale_trials(study)
        _queue_retries(study, sweep, errors=first)
        first = False
        left, _ = _work_left(study, sweep)
        if not left:
            return WorkerOutcome("done", ran=ran)
        try:
            with _terminate_as_exception():
                study.optimize(objective, n_trials=1, catch=(_TrialError,), gc_after_trial=False)
        except _Stopped as err:
            say(f"worker {os.getpid()}: {err}; rerun the sweep to continue")
            return WorkerOutcome("stopped", err.name, ran=ran)
        except KeyboardInterrupt:
            say(f"worker {os.getpid()}: interrupted; rerun the sweep to continue")
            return WorkerOutcome("stopped", "SIGINT", ran=ran)
        ran += objective.new_point
        if objective.progress:
            idle = 0
            continue
        idle += 1
        if idle >= _STALE_PROPOSALS:
            say(f"worker {os.getpid()}: the sampler drew {idle} points in a row that were already taken; stopping "
                f"(missing: {', '.join(_work_left(study, sweep)[1]) or 'none'})")
            return WorkerOutcome("done", ran=ran)
        if idle % 10 == 0:
            time.sleep(0.5)  # others' trials are starting: let them write their points


@contextlib.contextmanager
def _terminate_as_exception() -> Iterator[None]:
    """Between trainings, SIGTERM stops the worker like Ctrl-C (the trial is failed, not left running)."""
    def handler(signum: int, frame: Any) -> None:
        raise _Stopped("SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
