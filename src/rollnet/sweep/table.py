"""A sweep's results: one row per point, the Pareto front, the paper's selection with test figures.

:func:`sweep_rows` reads the study; :func:`write_tables` writes ``sweep.md``,
``sweep.json`` and ``tradeoff.png`` in the sweep directory.  Test figures are
computed only for the vanilla run and the selected runs, after the selection
(on validation) is made, and are cached in each run directory (``sweep-test.json``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from rollnet.files import atomic_write_text
from rollnet.sweep.grid import REFERENCE_KEY, point_key
from rollnet.sweep.selection import Row, Selection, pareto_front, select
from rollnet.sweep.study import Sweep, open_study, trial_point

if TYPE_CHECKING:
    import optuna

    from rollnet.train.evaluation import RegionReport

__all__ = ["SweepTables", "sweep_rows", "test_report", "write_tables"]

_STATE_NAMES = {"RUNNING": "running", "WAITING": "queued", "FAIL": "failed", "PRUNED": "skipped", "COMPLETE": "done"}
_ORDER = {"done": 0, "diverged": 1, "error": 2, "running": 3, "queued": 4, "interrupted": 5, "killed": 6,
          "failed": 7}


def sweep_rows(study: optuna.Study, sweep: Sweep) -> list[Row]:
    """One row per distinct run of the sweep (the best-informed trial of each key), in grid order.

    A point with several trials (retries) shows the finished one, else the latest.
    """
    best: dict[str, tuple[int, int, Row]] = {}
    for t in study.get_trials(deepcopy=False):
        status = t.user_attrs.get("status") or _STATE_NAMES[t.state.name]
        if status in ("skipped", "same_as", "repeat"):
            continue
        if t.state.name == "RUNNING":
            status = "running"
        elif t.state.name == "WAITING":
            status = "queued"
        point = trial_point(study, sweep, t)
        if point is None:
            continue
        key = point_key(point, sweep.base)
        scores = t.user_attrs.get("scores") if status == "done" else None
        values = t.values if status == "done" and t.values is not None else None
        settings = dict(point) if key != REFERENCE_KEY else {k: v for k, v in point.items()
                                                               if not k.startswith("roll.")} | {"roll.lam": 0}
        row = Row(key, settings, status, values[0] if values else None, values[1] if values else None,
                  reference=sweep.config(point).roll.lam == 0, trial=t.number, scores=scores)
        rank = (-_ORDER.get(status, 9), t.number)
        if key not in best or rank > best[key][:2]:
            best[key] = (*rank, row)
    order = {k: i for i, k in enumerate(sweep.keys())}
    return [best[k][2] for k in sorted(best, key=lambda k: order.get(k, len(order)))]


def test_report(sweep: Sweep, row: Row, *, limit: int | None = None) -> RegionReport:
    """Test figures of a row's best checkpoint (exact, float64), cached in ``sweep-test.json``."""
    from rollnet.train.checkpoint import load_manifest
    from rollnet.train.evaluation import RegionReport, evaluate_checkpoint

    run_dir = sweep.run_dir(row.key)
    weights = load_manifest(run_dir / "best.json").manifest["files"]["weights"]["sha256"]
    cache = run_dir / "sweep-test.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("weights_sha256") == weights and saved.get("limit") == limit:
            return RegionReport(**saved["report"])
    report = evaluate_checkpoint(run_dir / "best.json", split="test", limit=limit, device=sweep.base.device,
                                 label=row.key)
    report.per_example = None  # the table needs only the percentiles
    atomic_write_text(cache, json.dumps({"weights_sha256": weights, "limit": limit, "report": asdict(report)}) + "\n")
    return report


class SweepTables:
    """The rows, front, selection and test reports of a sweep, and their Markdown / JSON."""

    def __init__(self, sweep: Sweep, rows: list[Row], selection: Selection | None, selection_error: str | None,
                 tests: dict[str, RegionReport]) -> None:
        self.sweep = sweep
        self.rows = rows
        self.front = pareto_front(rows)
        self.selection = selection
        self.selection_error = selection_error
        self.tests = tests

    def units(self) -> str:
        for r in self.rows:
            if r.scores:
                return str(r.scores["units"])
        return "model"

    def markdown(self) -> str:
        sweep = self.sweep
        units = self.units()
        front = {r.key for r in self.front}
        chosen = self._chosen_labels()
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r.status] = counts.get(r.status, 0) + 1
        lines = [f"# Sweep {sweep.study_name}", "",
                 f"{len(self.rows)} runs of {len(sweep.keys())} "
                 f"({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}); "
                 f"{'grid' if sweep.mode == 'grid' else f'budget of {sweep.trials} points'}: "
                 + ", ".join(f"{k} in {list(v)}" for k, v in sweep.grid.values.items())
                 + f". Storage: `{sweep.storage_url()}`, study `{sweep.study_name}`.", "",
                 f"Validation only (the split the models are selected on). Margins in {units} units, certified "
                 f"exactly (float64) on {self._margin_examples()} validation examples; accuracy on the whole "
                 "validation split. * marks the Pareto front of accuracy against median l2 margin.", ""]
        keys = list(sweep.grid.keys)
        head = ["run", *keys, "status", "val acc", "l2 P25", "l2 P50", "l2 P75", "l1 P50", "best epoch",
                "train s", "front", "selected"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            s = r.scores or {}
            m = s.get("margins", {}).get(units, {}) if s else {}
            l2, l1 = m.get("l2", {}), m.get("l1", {})
            cells = [r.key, *(_fmt_setting(r.settings.get(k, "")) for k in keys), r.status,
                     f"{r.val_acc:.2%}" if r.val_acc is not None else "",
                     *(_num(l2.get(q)) for q in ("P25", "P50", "P75")), _num(l1.get("P50")),
                     str(s.get("best_epoch", "")), f"{s['train_seconds']:.0f}" if "train_seconds" in s else "",
                     "*" if r.key in front else "", chosen.get(r.key, "")]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "## The paper's selection", ""]
        if self.selection is None:
            lines.append(f"Not made: {self.selection_error}")
        else:
            lines += self._selection_lines()
        return "\n".join(lines) + "\n"

    def _margin_examples(self) -> str:
        for r in self.rows:
            if r.scores:
                return f"{r.scores['margin_examples']:,}"
        return "the"

    def _chosen_labels(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.selection is None:
            return out
        out[self.selection.reference.key] = "reference"
        for drop, row in zip(self.selection.drops, self.selection.chosen, strict=True):
            if row is not None:
                label = _drop_label(drop)
                out[row.key] = f"{out[row.key]}, {label}" if row.key in out else label
        return out

    def _selection_lines(self) -> list[str]:
        from rollnet.train.evaluation import to_markdown

        sel = self.selection
        assert sel is not None and sel.reference.val_acc is not None and sel.reference.margin is not None
        units = self.units()
        lines = [f"Vanilla reference `{sel.reference.key}`: validation accuracy {sel.reference.val_acc:.2%}, "
                 f"median l2 margin {_num(sel.reference.margin)} ({units})."]
        for drop, row in zip(sel.drops, sel.chosen, strict=True):
            label = _drop_label(drop)
            if row is None:
                lines.append(f"- {label}: no ROLL run reaches validation accuracy "
                             f"{sel.reference.val_acc - drop:.2%}.")
                continue
            assert row.margin is not None and row.val_acc is not None
            lines.append(f"- {label}: `{row.key}` (trial {row.trial}): validation accuracy {row.val_acc:.2%}, "
                         f"median l2 margin {_num(row.margin)}, {row.margin / sel.reference.margin:.1f}x vanilla's.")
        reports = [self.tests[k] for k in self._selected_keys() if k in self.tests]
        if reports:
            ref = self.tests.get(sel.reference.key)
            lines += ["", "Test figures of the selected runs (computed after the selection):", "",
                      to_markdown(reports).rstrip("\n"), "",
                      "Spearman's rank correlation of the l1 and l2 test margins: "
                      + ", ".join(f"`{r.model}` {r.spearman_l1_l2:.3f}" for r in reports) + "."]
            if ref is not None:
                ref_p50 = ref.margins[units]["l2"]["P50"]
                for r in reports[1:]:
                    ratio = r.margins[units]["l2"]["P50"] / ref_p50 if ref_p50 > 0 else float("inf")
                    lines.append(f"\n`{r.model}`: test median l2 margin {ratio:.1f}x vanilla's, accuracy "
                                 f"{r.accuracy:.2%} against {ref.accuracy:.2%}.")
        return lines

    def _selected_keys(self) -> list[str]:
        if self.selection is None:
            return []
        keys = [self.selection.reference.key]
        for row in self.selection.chosen:
            if row is not None and row.key not in keys:
                keys.append(row.key)
        return keys

    def to_json(self) -> str:
        sel = self.selection
        doc: dict[str, Any] = {
            "sweep": self.sweep.fingerprint(),
            "storage": self.sweep.storage_url(),
            "study": self.sweep.study_name,
            "rows": [asdict(r) for r in self.rows],
            "front": [r.key for r in self.front],
            "selection": None if sel is None else {
                "reference": sel.reference.key,
                "chosen": [{"drop": d, "key": None if r is None else r.key} for d, r in zip(sel.drops, sel.chosen,
                                                                                          strict=True)],
            },
            "selection_error": self.selection_error,
            "test": {k: asdict(v) for k, v in self.tests.items()},
        }
        return json.dumps(doc, indent=1, default=str) + "\n"


def _drop_label(drop: float) -> str:
    return "at vanilla's accuracy" if drop == 0 else f"{drop * 100:g} point{'s' if drop != 0.01 else ''} below"


def _fmt_setting(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _num(value: Any) -> str:
    return "" if value is None else f"{float(value):.3g}"


def write_tables(sweep: Sweep, *, test_limit: int | None = None, picture: bool = True,
                 say: Callable[[str], None] | None = None) -> SweepTables:
    """Read the sweep's study and write ``sweep.md``, ``sweep.json`` and ``tradeoff.png`` in ``sweep.out``.

    The test figures of the vanilla run and the selected runs are computed (and cached) here.
    """
    from rollnet.sweep.selection import MissingReferenceError

    study = open_study(sweep, create=False)
    rows = sweep_rows(study, sweep)
    selection: Selection | None = None
    error: str | None = None
    try:
        selection = select(rows)
    except MissingReferenceError as err:
        error = str(err)
    tables = SweepTables(sweep, rows, selection, error, {})
    for key in tables._selected_keys():
        row = next(r for r in rows if r.key == key)
        if say is not None and not (sweep.run_dir(key) / "sweep-test.json").is_file():
            say(f"test figures of {key} ...")
        tables.tests[key] = test_report(sweep, row, limit=test_limit)
    sweep.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep.out / "sweep.md", tables.markdown())
    atomic_write_text(sweep.out / "sweep.json", tables.to_json())
    if picture:
        from rollnet.plots.tradeoff import plot_tradeoff

        done = [r for r in rows if r.done]
        labels = tables._chosen_labels()
        plot_tradeoff(
            [(r.margin or 0.0, r.val_acc or 0.0) for r in done], sweep.out / "tradeoff.png",
            front=[i for i, r in enumerate(done) if r in tables.front],
            marks={i: labels[r.key] for i, r in enumerate(done) if r.key in labels},
            units=tables.units(), title=f"sweep {sweep.study_name}: validation",
        )
    return tables
