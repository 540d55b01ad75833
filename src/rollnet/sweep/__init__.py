"""Sweeps over training settings on Optuna, and the paper's model selection (``rollnet sweep``).

>>> from rollnet.train import TrainConfig
>>> from rollnet.sweep import parse_grid
>>> len(parse_grid(["roll.lam=0.5,1,2", "roll.C=0.25,1"], TrainConfig()))
6
"""

from rollnet.sweep.grid import Grid, parse_grid, point_key, with_reference
from rollnet.sweep.selection import (
    DROPS,
    MissingReferenceError,
    Row,
    Selection,
    pareto_front,
    select,
)
from rollnet.sweep.study import Sweep, SweepError, open_study
from rollnet.sweep.table import SweepTables, sweep_rows, write_tables
from rollnet.sweep.worker import WorkerOutcome, run_worker

__all__ = [
    "DROPS",
    "Grid",
    "MissingReferenceError",
    "Row",
    "Selection",
    "Sweep",
    "SweepError",
    "SweepTables",
    "WorkerOutcome",
    "open_study",
    "pareto_front",
    "parse_grid",
    "point_key",
    "run_worker",
    "select",
    "sweep_rows",
    "with_reference",
    "write_tables",
]
