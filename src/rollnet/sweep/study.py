"""A sweep's Optuna study: where it is stored, how it is opened, and what each trial is.

A sweep is one Optuna study with two objectives, both maximised: validation
accuracy and validation median l2 margin.  A grid runs through Optuna's
:class:`~optuna.samplers.GridSampler`; a ``trials`` budget runs a multi-objective
:class:`~optuna.samplers.TPESampler` over the same (categorical) space.

Storage (``storage=``):

- ``None``: a SQLite file ``<out>/study.db`` (one machine needs nothing more);
- a database URL (``postgresql://...``, ``mysql+pymysql://...``, ``sqlite:///...``):
  Optuna's :class:`~optuna.storages.RDBStorage`, with heartbeats, so a trial whose
  worker was killed on any machine is failed and retried;
- any other text: a path to an Optuna journal file
  (:class:`~optuna.storages.journal.JournalFileBackend`), e.g. on a shared filesystem.

Each trial records in its user attributes what it did (``status``), its point's
run (``key``, ``run_dir``), where it ran (``host``, ``pid``) and its scores.
"""

from __future__ import annotations

import socket
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollnet.sweep.grid import Grid, config_for, decode, point_key
from rollnet.train.config import ConfigError, TrainConfig, config_to_dict

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

__all__ = [
    "DIRECTIONS",
    "OBJECTIVES",
    "Sweep",
    "SweepError",
    "open_study",
    "trial_point",
]

OBJECTIVES = ("val_acc", "val_margin_l2_p50")
DIRECTIONS = ("maximize", "maximize")

# config settings that may differ between the workers of one sweep
_LOCAL = ("device", "progress")


class SweepError(ConfigError):
    """A sweep that cannot run: a storage holding a different sweep, a bad option, ..."""


@dataclass(frozen=True)
class Sweep:
    """Everything that defines a sweep; every worker of one sweep is given the same.

    Attributes:
        base: the configuration every trial starts from (``--set`` applied).
        grid: the values to try (see :func:`rollnet.sweep.grid.parse_grid`).
        out: the sweep directory: ``trials/<key>/`` holds each point's run, and the
            tables and picture go next to it.
        study_name: the Optuna study's name.
        storage: ``None`` (SQLite in ``out``), a database URL or a journal file path.
        trials: a budget of distinct points for the multi-objective sampler, or
            ``None`` for the whole grid.
        seed: seed of the samplers.
        val_limit: score margins on the first ``val_limit`` validation examples
            (``None``: all); accuracy is always the whole validation split's.
        heartbeat: seconds between a running trial's heartbeats (database storages): a trial
            silent for twice as long is failed and retried.
    """

    base: TrainConfig
    grid: Grid
    out: Path
    study_name: str = "sweep"
    storage: str | None = None
    trials: int | None = None
    seed: int = 0
    val_limit: int | None = None
    heartbeat: int = 60

    def __post_init__(self) -> None:
        if self.trials is not None and self.trials < 1:
            raise SweepError(f"--trials must be at least 1, got {self.trials}")
        if self.val_limit is not None and self.val_limit < 1:
            raise SweepError(f"--val-limit must be at least 1, got {self.val_limit}")
        if self.heartbeat < 1:
            raise SweepError(f"the heartbeat interval must be at least 1 s, got {self.heartbeat}")
        if not self.study_name:
            raise SweepError("the study name must not be empty")

    @property
    def mode(self) -> str:
        """``"grid"`` (every point) or ``"budget"`` (``trials`` points chosen by the sampler)."""
        return "grid" if self.trials is None else "budget"

    @property
    def trials_dir(self) -> Path:
        return self.out / "trials"

    def run_dir(self, key: str) -> Path:
        """The run directory of the point named ``key``."""
        return self.trials_dir / key

    def storage_url(self) -> str:
        """The storage as given, or the default SQLite file's URL."""
        if self.storage is not None:
            return self.storage
        return f"sqlite:///{(self.out / 'study.db').resolve()}"

    def fingerprint(self) -> dict[str, Any]:
        """What must be equal for two commands to be the same sweep (kept in the study)."""
        config = config_to_dict(self.base)
        for key in _LOCAL:
            config.pop(key, None)
        return {"config": config, "grid": self.grid.to_dict(), "mode": self.mode, "trials": self.trials,
                "seed": self.seed, "val_limit": self.val_limit}

    def keys(self) -> list[str]:
        """The distinct runs of the grid (its points' keys), in grid order."""
        seen: dict[str, None] = {}
        for point in self.grid.points():
            seen.setdefault(point_key(point, self.base), None)
        return list(seen)

    def config(self, point: Mapping[str, Any]) -> TrainConfig:
        """The training configuration of a point (named by its key)."""
        cfg = config_for(self.base, point)
        cfg.name = point_key(point, self.base)
        return cfg


def open_storage(sweep: Sweep) -> optuna.storages.BaseStorage:
    """The sweep's Optuna storage (see the module docstring)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    url = sweep.storage_url()
    if "://" in url:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
        # Workers started together on a fresh database race to create its tables: the loser's
        # error ("table ... already exists", "database is locked") goes away once the winner is done.
        for attempt in range(_OPEN_ATTEMPTS):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
                    return optuna.storages.RDBStorage(url, heartbeat_interval=sweep.heartbeat,
                                                      grace_period=2 * sweep.heartbeat, **kwargs)
            except Exception as err:  # SQLAlchemy raises many kinds (bad URL, driver missing, ...)
                if attempt + 1 < _OPEN_ATTEMPTS and _transient(err):
                    time.sleep(0.5 * (attempt + 1))
                    continue
                raise SweepError(f"cannot open the storage {url!r}: {err}") from err
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


_OPEN_ATTEMPTS = 6


def _transient(err: BaseException) -> bool:
    """A database error another process's schema creation can cause (retried), not a bad URL."""
    import sqlalchemy.exc

    return isinstance(err, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError))


def _sampler(sweep: Sweep) -> optuna.samplers.BaseSampler:
    import optuna

    if sweep.mode == "grid":
        return optuna.samplers.GridSampler(sweep.grid.search_space(), seed=sweep.seed)
    return optuna.samplers.TPESampler(seed=sweep.seed, n_startup_trials=min(10, sweep.trials or 10))


def open_study(sweep: Sweep, *, create: bool = True) -> optuna.Study:
    """Create the sweep's study (unless ``create`` is false), or load it and check it is the same sweep.

    Raises:
        SweepError: the storage cannot be opened, its study of that name was made by a
            different sweep (config, grid, budget, seed or validation limit), or (``create=False``)
            there is no such study.
    """
    import optuna

    storage = open_storage(sweep)
    if not create and sweep.study_name not in {s.study_name for s in storage.get_all_studies()}:
        raise SweepError(f"no study {sweep.study_name!r} in {sweep.storage_url()}: run the sweep first")
    study = optuna.create_study(storage=storage, study_name=sweep.study_name,
                                sampler=_sampler(sweep), directions=["maximize", "maximize"], load_if_exists=True)
    if [d.name.lower() for d in study.directions] != list(DIRECTIONS):
        raise SweepError(f"study {sweep.study_name!r} in {sweep.storage_url()} is not a rollnet sweep "
                         "(it does not maximise accuracy and margin)")
    mine = sweep.fingerprint()
    theirs = study.user_attrs.get("rollnet_sweep")
    if theirs is None:
        study.set_user_attr("rollnet_sweep", mine)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(OBJECTIVES))
    elif theirs != mine:
        raise SweepError(f"study {sweep.study_name!r} in {sweep.storage_url()} holds a different sweep "
                         f"({_differences(theirs, mine)}); pass another --study or --out to start a new one")
    return study


def _differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> str:
    diffs: list[str] = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            inner = _differences(va, vb, f"{prefix}{key}.")
            if inner:
                diffs.append(inner)
        elif va != vb:
            diffs.append(f"{prefix}{key}: {va!r} there, {vb!r} here")
    return "; ".join(diffs)


def grid_point(study: optuna.Study, grid_id: int) -> dict[str, Any] | None:
    """The point of a grid sampler's ``grid_id`` (``None`` for another sampler)."""
    import optuna

    sampler = study.sampler
    if not isinstance(sampler, optuna.samplers.GridSampler):
        return None
    values = sampler._all_grids[grid_id]  # the sampler's own (seeded, shuffled) order
    return dict(zip(sampler._param_names, values, strict=True))


def trial_point(study: optuna.Study, sweep: Sweep, trial: FrozenTrial) -> dict[str, Any] | None:
    """The grid point a trial runs, in the grid's key order (``None`` if not known yet).

    A grid trial's point is known from its number (the grid sampler gives trial ``k`` of
    the first ``len(grid)`` the ``k``-th point) or its ``grid_id``, before its parameters
    are written; a queued trial's from its fixed parameters; otherwise it is read from
    the parameters.
    """
    raw: Mapping[str, Any] | None = None
    fixed = trial.system_attrs.get("fixed_params") or {}
    if all(k in trial.params for k in sweep.grid.keys):
        raw = trial.params
    elif all(k in fixed for k in sweep.grid.keys):
        raw = fixed
    elif sweep.mode == "grid":
        grid_id = trial.system_attrs.get("grid_id")
        if grid_id is None and "retry_of" not in trial.system_attrs and 0 <= trial.number < len(sweep.grid):
            grid_id = trial.number
        if grid_id is not None:
            raw = grid_point(study, int(grid_id))
    if raw is None:
        return None
    return {k: decode(k, raw[k], sweep.grid) for k in sweep.grid.keys}


def host_id() -> str:
    """This machine's name, as recorded in each trial (``host``)."""
    return socket.gethostname()
