"""The ``rollnet`` command: a thin layer over :mod:`rollnet.train`.

::

    rollnet train CONFIG [--set key=value ...] [--resume] [--out DIR]
    rollnet sweep CONFIG --grid key=v1,v2,... [--grid ...] [--trials N] [--jobs N] [--storage URL]
                  [--study NAME] [--out DIR] [--set key=value ...]
    rollnet evaluate CHECKPOINT [CHECKPOINT ...] [--split test] [--limit N] [--out DIR] [--distortion EPS]
                     [--blocks DIR]
    rollnet report RUN_DIR [RUN_DIR ...] -o report.html [--split test] [--limit N] [--distortion EPS]
    rollnet plot regions RUN [RUN ...] -o FILE.png
    rollnet plot margins RUN [RUN ...] -o FILE.png [--norm l2] [--split test] [--limit N]
    rollnet plot saliency VANILLA_RUN ROLL_RUN -o FILE.png [--eps E] [--examples K] [--budget N]
    rollnet plot plane RUN [RUN ...] -o FILE.png [--example I] [--scale S | --half-width W]
    rollnet plot stability RUN [RUN ...] -o FILE.png [--channel C]

``evaluate`` prints one table for all the checkpoints given (one row per
model).  For sequence models it also draws, for each model, one channel's
per-time-step stability bounds of the test sequences at the P50 and P75 of
the l2 margin (``stability-<split>.png``, the paper's figure 3).  With
``--distortion EPS`` it adds the paper's Caltech table (P@1, P@5, expected and
worst-case gradient distortion, label changes).  ``evaluate`` runs on many
processes too: ``torchrun --nproc_per_node N -m rollnet evaluate RUN`` shards
the margins (in blocks of ``--batch-size``) across the processes and gathers
them (:func:`rollnet.certify_dataset`: the same numbers as one process, bit for
bit); rank 0 alone prints and writes.  ``--blocks DIR`` keeps each finished
block of margins in DIR, so a killed evaluation resumes where it stopped.
``report`` writes one
self-contained HTML page with the tables and pictures of several runs.
``plot`` draws one picture (:mod:`rollnet.plots.runs`): exact regions of 2-D
runs, margin CDFs, saliency maps at worst-case perturbations, the plane
through a test image with its exact regions, stability bounds of sequences.

Exit status: 0 done, 1 error (bad config, missing data, damaged
checkpoint), 3 training diverged, 130 interrupted by Ctrl-C (checkpoint saved),
143 stopped by SIGTERM, i.e. preempted (checkpoint saved at the current step;
``--resume`` continues).  Under torchrun every rank exits with the same status.

``sweep`` trains one run per grid point (Optuna's grid sampler; with
``--trials N`` a multi-objective sampler picks N points) into ``DIR/trials/``,
scores each on validation (accuracy, median l2 margin), and writes
``sweep.md``, ``sweep.json`` and ``tradeoff.png`` with the Pareto front and the
paper's selection (see :mod:`rollnet.sweep`).  Rerunning it skips finished
points and retries failed or killed ones; several machines share one sweep
with one ``--storage``.

``train`` runs unchanged on many processes:
``torchrun --nproc_per_node N -m rollnet train CONFIG`` (see the README).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rollnet.train.distortion_report import DistortionReport
    from rollnet.train.evaluation import RegionReport

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rollnet", description="Robust, locally linear deep networks.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a config file (.json or .toml)")
    t.add_argument("config", type=Path, help="configuration file, e.g. configs/mnist_roll_c025.json")
    t.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set optim.lr=0.1 roll.lam=2 (values parsed as JSON)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<name>)")

    _sweep_parser(sub)

    e = sub.add_parser("evaluate", help="accuracy, linear regions and margin percentiles of a checkpoint")
    e.add_argument("checkpoints", type=Path, nargs="+",
                   help="best.json / last.json, or a run directory (uses best.json); several to compare")
    e.add_argument("--split", default="test", choices=["test", "val", "train"], help="split to evaluate (default test)")
    e.add_argument("--limit", type=int, default=None, help="only the first N examples of the split")
    e.add_argument("--out", type=Path, default=None,
                   help="directory for evaluation-<split>.md and .json (default: the first checkpoint's directory)")
    e.add_argument("--channel", type=int, default=0, help="sequence models: the channel drawn (default 0)")
    e.add_argument("--device", default="cpu", help="cpu or cuda")
    e.add_argument("--float32", action="store_true", help="certify in float32 (default: float64, exact)")
    e.add_argument("--batch-size", type=int, default=250,
                   help="examples per pass, and per block of margins (the unit of sharding and of --blocks)")
    e.add_argument("--blocks", type=Path, default=None, metavar="DIR",
                   help="keep each finished block of margins in DIR (DIR/<k> for the k-th of several checkpoints) "
                        "and resume from them: a killed evaluation recomputes only the missing blocks")
    _distortion_options(e)

    r = sub.add_parser("report", help="one self-contained HTML page comparing runs: tables and pictures")
    r.add_argument("runs", type=Path, nargs="+", help="run directories (their best.json) or manifests")
    r.add_argument("-o", "--output", type=Path, default=Path("report.html"), help="HTML file (default report.html)")
    r.add_argument("--split", default="test", choices=["test", "val", "train"], help="split to evaluate (default test)")
    r.add_argument("--limit", type=int, default=None, help="only the first N examples of the split")
    r.add_argument("--device", default="cpu", help="cpu or cuda")
    r.add_argument("--float32", action="store_true", help="certify in float32 (default: float64, exact)")
    r.add_argument("--batch-size", type=int, default=250, help="examples per pass")
    r.add_argument("--channel", type=int, default=0, help="sequence runs: the channel drawn (default 0)")
    r.add_argument("--no-pictures", action="store_true", help="tables only (pictures can take minutes for ResNets)")
    _distortion_options(r)
    _plot_parser(sub)
    return parser


def _sweep_parser(sub: Any) -> None:
    w = sub.add_parser("sweep", help="train a grid of settings on Optuna and select models as the paper does")
    w.add_argument("config", type=Path, help="the base configuration, e.g. configs/mnist_roll_c025.json")
    w.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="values to try for a setting, e.g. --grid roll.lam=0.125,0.25,0.5 --grid roll.gamma=max,50 "
                        "(values parsed as JSON; a JSON list for list values: model.hidden=[[100],[100,100]])")
    w.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a setting of the base configuration (as rollnet train --set)")
    w.add_argument("--trials", type=int, default=None,
                   help="a budget of N points searched by a multi-objective sampler (default: the whole grid)")
    w.add_argument("--jobs", type=int, default=1, help="local worker processes, sharing the cores (default 1)")
    w.add_argument("--storage", default=None,
                   help="Optuna storage shared by every worker: a database URL (postgresql://..., mysql://..., "
                        "sqlite:///...) or a journal file path (default: DIR/study.db)")
    w.add_argument("--study", default=None, help="the study's name (default: the config's name)")
    w.add_argument("--out", type=Path, default=None, help="the sweep directory (default: sweeps/<config name>)")
    w.add_argument("--seed", type=int, default=0, help="seed of the samplers (default 0)")
    w.add_argument("--val-limit", type=int, default=None,
                   help="certify the validation margins of the first N validation examples (default: all)")
    w.add_argument("--test-limit", type=int, default=None,
                   help="test figures of the selected runs on the first N test examples (default: all)")
    w.add_argument("--no-reference", action="store_true",
                   help="do not add the vanilla run (roll.lam=0) the paper's selection compares against")
    w.add_argument("--heartbeat", type=int, default=60,
                   help="seconds between a trial's heartbeats on database storages (default 60); a trial "
                        "silent for twice as long is taken as killed and retried")
    w.add_argument("--table-only", action="store_true", help="only write the tables and picture from the study")
    w.add_argument("--export", type=Path, default=None, metavar="DIR",
                   help="copy the vanilla and selected runs (best checkpoint, manifest, scores) and the tables to DIR")


def _sweep(args: argparse.Namespace) -> int:
    import optuna

    from rollnet.sweep import Sweep, parse_grid, with_reference, write_tables
    from rollnet.sweep.jobs import run_jobs
    from rollnet.train import apply_overrides, load_config

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial comes from the workers
    base = apply_overrides(load_config(args.config), args.overrides)
    grid = parse_grid(args.grid, base)
    if not args.no_reference:
        grid = with_reference(grid, base)
    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    out = args.out if args.out is not None else Path("sweeps") / base.name
    sweep = Sweep(base=base, grid=grid, out=out, study_name=args.study or base.name, storage=args.storage,
                  trials=args.trials, seed=args.seed, val_limit=args.val_limit, heartbeat=args.heartbeat)
    say = _stderr
    status = 0
    if args.table_only and args.storage is None and not (out / "study.db").is_file():
        raise ValueError(f"no sweep in {out} (no {out / 'study.db'}): run the sweep first, or pass its --storage")
    if not args.table_only:
        say(f"sweep {sweep.study_name}: {len(sweep.keys())} runs ({len(grid)} grid points) in {out}; "
            f"storage {sweep.storage_url()}")
        outcome = run_jobs(sweep, args.jobs, say=say)
        if outcome.status == "stopped":
            say("stopped: rerun the same command to continue (finished runs are kept)")
            return EXIT_TERMINATED if outcome.signal_name == "SIGTERM" else EXIT_INTERRUPTED
    tables = write_tables(sweep, test_limit=args.test_limit, say=say)
    print(tables.markdown(), end="")
    say(f"wrote {out / 'sweep.md'}, {out / 'sweep.json'} and {out / 'tradeoff.png'}")
    if args.export is not None:
        from rollnet.sweep.export import export_selected

        runs = export_selected(tables, args.export)
        say(f"exported {len(runs)} runs and the tables to {args.export}")
    failed = [r for r in tables.rows if r.status in ("error", "failed", "killed", "interrupted")]
    pending = [r for r in tables.rows if r.status in ("running", "queued")]
    if pending:
        say(f"{len(pending)} runs are still running or queued in other workers")
    if failed:
        say(f"{len(failed)} runs failed ({', '.join(r.key for r in failed)}): see their train.log; "
            "rerun the command to retry them")
        status = EXIT_ERROR
    return status


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _distortion_options(parser: argparse.ArgumentParser) -> None:
    """``--distortion EPS`` and the options of its samples and worst-case search."""
    d = parser.add_argument_group("gradient distortion (the paper's Caltech table)")
    d.add_argument("--distortion", type=float, default=None, metavar="EPS",
                   help="also report P@1, P@5 and the expected and worst-case gradient distortion in an "
                        "l_inf ball of radius EPS (in --distortion-units; the paper: 0.03125 = 8/256 pixels)")
    d.add_argument("--distortion-units", default=None, choices=["pixel", "normalized", "raw"],
                   help="units of EPS (default: pixel for image data, else the model's input units)")
    d.add_argument("--samples", type=int, default=1000, help="uniform samples per example (default 1000)")
    d.add_argument("--search", default="genetic",
                   help="worst-case search: genetic (the paper's, default) or surrogate; see "
                        "rollnet.evaluate.distortion.max_gradient_distortion")
    d.add_argument("--budget", type=int, default=None, help="model evaluations per example for the search")
    d.add_argument("--population", type=int, default=4800, help="genetic population (default 4800)")
    d.add_argument("--generations", type=int, default=30, help="genetic generations (default 30)")
    d.add_argument("--seed", type=int, default=0, help="seed of the samples and the search (default 0)")


def _distortion(args: argparse.Namespace, path: Path) -> DistortionReport:
    """The distortion table's row for one checkpoint (``--distortion``)."""
    from rollnet.train.distortion_report import distortion_report
    from rollnet.train.evaluation import load_run

    run = load_run(path, args.device)
    part = getattr(run.data, args.split).head(args.limit)
    return distortion_report(
        run.model, part.x, part.y, run.info, args.distortion, label=run.config.name, split=args.split,
        units=args.distortion_units, n_samples=args.samples, method=args.search, budget=args.budget,
        population=args.population, generations=args.generations, seed=args.seed, device=run.device,
        lengths=getattr(part, "lengths", None),
    )


def _report(args: argparse.Namespace) -> int:
    import shlex

    from rollnet.plots.report import write_report

    if args.distortion is not None and not args.distortion > 0:
        raise ValueError(f"--distortion must be a positive radius, got {args.distortion}")
    options = None
    if args.distortion is not None:
        options = {"units": args.distortion_units, "n_samples": args.samples, "method": args.search,
                   "budget": args.budget, "population": args.population, "generations": args.generations,
                   "seed": args.seed}
    command = "rollnet " + " ".join(shlex.quote(a) for a in (args.argv or []))
    out = write_report(args.runs, args.output, split=args.split, limit=args.limit, distortion=args.distortion,
                       distortion_options=options, device=args.device, batch_size=args.batch_size,
                       float64=not args.float32, command=command, channel=args.channel,
                       figures=not args.no_pictures)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _train(args: argparse.Namespace) -> int:
    from rollnet.train import apply_overrides, load_config, train

    cfg = apply_overrides(load_config(args.config), args.overrides)
    out = args.out if args.out is not None else Path("runs") / cfg.name
    result = train(cfg, out, resume=args.resume)
    if result.status == "diverged":
        return EXIT_DIVERGED
    if result.status == "interrupted":
        return EXIT_TERMINATED if result.stop_signal == "SIGTERM" else EXIT_INTERRUPTED
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """``rollnet evaluate``; under torchrun the margins are sharded and rank 0 alone prints and writes."""
    import torch

    from rollnet.train.distributed import device_for, process_group, world_from_env
    from rollnet.train.evaluation import evaluate_checkpoint

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be positive, got {args.limit}")
    if args.distortion is not None and not args.distortion > 0:
        raise ValueError(f"--distortion must be a positive radius, got {args.distortion}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    world = world_from_env()
    args.device = str(device_for(torch.device(args.device), world))
    with process_group(torch.device(args.device), world):
        blocks: list[Path | None] = [None] * len(args.checkpoints)
        if args.blocks is not None:  # DIR, or DIR/<k> for the k-th of several checkpoints
            several = len(args.checkpoints) > 1
            blocks = [args.blocks / str(k) if several else args.blocks for k in range(len(args.checkpoints))]
        reports = [
            evaluate_checkpoint(path, split=args.split, limit=args.limit, batch_size=args.batch_size,
                                float64=not args.float32, device=args.device, blocks=where)
            for path, where in zip(args.checkpoints, blocks, strict=True)
        ]
    if not world.is_main:
        return 0
    return _write_evaluation(args, reports)


def _write_evaluation(args: argparse.Namespace, reports: list[RegionReport]) -> int:
    """Print the evaluation's tables and write its files (with ``--distortion``, its table too)."""
    from rollnet.train.checkpoint import atomic_write_text, load_manifest
    from rollnet.train.evaluation import describe, to_json, to_markdown

    markdown = f"{describe(reports)}\n\n{to_markdown(reports)}\n"
    extra: dict[str, Any] = {"checkpoints": [str(p) for p in args.checkpoints]}
    if args.distortion is not None:
        from rollnet.train.distortion_report import describe_distortion, distortion_markdown

        distortions = [_distortion(args, path) for path in args.checkpoints]
        markdown += f"\n{describe_distortion(distortions)}\n\n{distortion_markdown(distortions)}\n"
        extra["distortion"] = [asdict(d) for d in distortions]
    print(markdown, end="")
    out = args.out if args.out is not None else load_manifest(args.checkpoints[0]).path.parent
    stem = f"evaluation-{args.split}"
    atomic_write_text(out / f"{stem}.md", markdown)
    atomic_write_text(out / f"{stem}.json", to_json(reports, extra))
    print(f"wrote {out / (stem + '.md')} and {out / (stem + '.json')}", file=sys.stderr)
    if all(r.sequence for r in reports):
        figure = _stability_figure(args, reports, out / f"stability-{args.split}.png")
        print(f"wrote {figure}", file=sys.stderr)
    return 0


def _stability_figure(args: argparse.Namespace, reports: list[RegionReport], path: Path) -> Path:
    """One channel's stability bounds of the sequences at the P50 and P75 of each model's l2 margin."""
    from rollnet.plots import plot_stability_bounds
    from rollnet.plots.runs import stability_panels
    from rollnet.train.evaluation import load_run

    sequences = []
    units = "raw"
    for ckpt, report in zip(args.checkpoints, reports, strict=True):
        run = load_run(ckpt, args.device)
        part = getattr(run.data, args.split).head(args.limit)
        units = report.model_units
        if not 0 <= args.channel < part.x.shape[2]:
            raise ValueError(f"--channel must lie in [0, {part.x.shape[2]}), got {args.channel}")
        assert report.per_example is not None
        sequences.append((report.model, run.model, part.x, part.lengths, report.per_example["l2"]))
    panels = stability_panels(sequences, args.channel)
    return plot_stability_bounds(panels, path, channel=args.channel, units=f"{units} units")


def _plot_parser(sub: Any) -> None:
    """``rollnet plot {regions,margins,saliency,plane,stability} RUN ... -o FILE.png``."""
    p = sub.add_parser("plot", help="draw a picture of trained runs (PNG)")
    kinds = p.add_subparsers(dest="picture", required=True)

    def common(q: argparse.ArgumentParser, runs: str, nargs: str | int = "+") -> None:
        q.add_argument("runs", type=Path, nargs=nargs, help=runs)
        q.add_argument("-o", "--output", type=Path, required=True, help="the PNG to write")
        q.add_argument("--device", default="cpu", help="cpu or cuda")

    q = kinds.add_parser("regions", help="exact linear regions of 2-D runs side by side (the paper's figure 1)")
    common(q, "run directories or manifests of models with 2-D input")
    q.add_argument("--max-regions", type=int, default=100000, help="most regions per run (default 100000)")

    q = kinds.add_parser("margins", help="CDF of the per-example margins of several runs (log scale)")
    common(q, "run directories or manifests")
    q.add_argument("--norm", default="l2", choices=["l1", "l2", "linf"], help="margin norm (default l2)")
    q.add_argument("--split", default="test", choices=["test", "val", "train"], help="split (default test)")
    q.add_argument("--limit", type=int, default=None, help="only the first N examples of the split")

    q = kinds.add_parser("saliency", help="saliency maps at test images and at their worst cases, vanilla vs ROLL")
    common(q, "VANILLA_RUN ROLL_RUN", nargs=2)
    q.add_argument("--eps", type=float, default=8 / 256,
                   help="l_inf radius, in pixel units [0, 1] for images (default 8/256, the paper's)")
    q.add_argument("--examples", type=int, default=4, help="K images evenly spaced through the split (default 4)")
    q.add_argument("--budget", type=int, default=None,
                   help="model evaluations per example of the worst-case search (default: the paper's 112,800)")
    q.add_argument("--method", default="genetic", help="worst-case search method (default genetic)")
    q.add_argument("--split", default="test", choices=["test", "val", "train"], help="split (default test)")
    q.add_argument("--seed", type=int, default=0, help="seed of the search (default 0)")

    q = kinds.add_parser("plane", help="plane through a test image (gradient x random direction), exact regions")
    common(q, "run directories or manifests (one panel each)")
    q.add_argument("--example", type=int, default=0, help="index of the image in the split (default 0)")
    q.add_argument("--split", default="test", choices=["test", "val", "train"], help="split (default test)")
    q.add_argument("--scale", type=float, default=100.0,
                   help="half side in multiples of the image's l2 margin (default 100)")
    q.add_argument("--half-width", type=float, default=None,
                   help="half side in the model's input units instead (the same for every run)")
    q.add_argument("--seed", type=int, default=0, help="seed of the random direction (default 0)")
    q.add_argument("--max-regions", type=int, default=10000, help="most regions per panel (default 10000)")

    q = kinds.add_parser("stability", help="per-time-step stability bounds of sequences (the paper's figure 3)")
    common(q, "run directories or manifests of sequence models")
    q.add_argument("--split", default="test", choices=["test", "val", "train"], help="split (default test)")
    q.add_argument("--limit", type=int, default=None, help="only the first N sequences of the split")
    q.add_argument("--channel", type=int, default=0, help="the channel drawn (default 0)")


def _plot(args: argparse.Namespace) -> int:
    from rollnet.plots import runs as figures

    if getattr(args, "limit", None) is not None and args.limit < 1:
        raise ValueError(f"--limit must be positive, got {args.limit}")
    if args.picture == "regions":
        path = figures.regions_figure(args.runs, args.output, max_regions=args.max_regions, device=args.device)
    elif args.picture == "margins":
        path = figures.margins_figure(args.runs, args.output, norm=args.norm, split=args.split, limit=args.limit,
                                      device=args.device)
    elif args.picture == "saliency":
        path = figures.saliency_figure(args.runs[0], args.runs[1], args.output, eps=args.eps,
                                       examples=args.examples, budget=args.budget, method=args.method,
                                       split=args.split, seed=args.seed, device=args.device)
    elif args.picture == "plane":
        path = figures.plane_figure(args.runs, args.output, example=args.example, split=args.split,
                                    scale=args.scale, half_width=args.half_width, seed=args.seed,
                                    max_regions=args.max_regions, device=args.device)
    else:
        from rollnet.train.evaluation import evaluate_checkpoint

        reports = [evaluate_checkpoint(r, split=args.split, limit=args.limit, device=args.device) for r in args.runs]
        if not all(r.sequence for r in reports):
            raise ValueError("the stability picture needs sequence runs (inputs [T, C] with lengths)")
        args.checkpoints = args.runs
        path = _stability_figure(args, reports, args.output)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    from rollnet.data import DataSetMissingError
    from rollnet.train import CheckpointError, ConfigError

    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "report":
            return _report(args)
        if args.command == "plot":
            return _plot(args)
        return _evaluate(args)
    except (ConfigError, CheckpointError, DataSetMissingError, ValueError) as err:
        print(f"rollnet: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("rollnet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
