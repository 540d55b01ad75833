"""Copy a sweep's selected models (and its tables) to a small directory, e.g. the repository's ``results/``.

Each exported run keeps its manifest (``best.json``), the weights it names, its
``config.json`` and its cached scores, so ``rollnet evaluate DIR/<key>`` checks a
row of the table on a fresh clone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rollnet.sweep.table import SweepTables

__all__ = ["export_selected"]

_RUN_FILES = ("best.json", "config.json", "metrics.jsonl", "sweep-val.json", "sweep-test.json")
_SWEEP_FILES = ("sweep.md", "sweep.json", "tradeoff.png")


def export_selected(tables: SweepTables, dest: str | Path) -> list[Path]:
    """Copy the vanilla run and the selected runs of ``tables`` (best checkpoint only) and the sweep's
    tables into ``dest``; returns the run directories written.

    Raises:
        ValueError: the sweep has no selection yet (no finished vanilla run).
    """
    if tables.selection is None:
        raise ValueError(f"nothing to export: {tables.selection_error}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for key in tables._selected_keys():
        src = tables.sweep.run_dir(key)
        target = dest / key
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        manifest = json.loads((src / "best.json").read_text())
        for entry in manifest["files"].values():
            shutil.copy2(src / entry["name"], target / entry["name"])
        for name in _RUN_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, target / name)
        written.append(target)
    for name in _SWEEP_FILES:
        if (tables.sweep.out / name).is_file():
            shutil.copy2(tables.sweep.out / name, dest / name)
    return written
