"""``make demo``: vanilla and ROLL MLPs on the bundled MNIST subset, compared as in the paper's Table 1.

Trains the paper's 784-300x4-10 MLP three times on the 5,000 real MNIST
images bundled with rollnet (stratified split 4,000 train / 500 validation /
500 test, seed 0): without regulariser, and with ROLL (lambda 2, C 0.25) and
(lambda 2, C 1).  Each run keeps the epoch with the best validation accuracy;
the three are then evaluated on the 500 held-out test images: accuracy,
distinct activation patterns and Jacobians, and l1 / l2 / l_inf margin
percentiles in normalised and in pixel units.

Deviations from the paper, to fit about five minutes on two CPU cores, stated
in the output too: 4,000 training images instead of 55,000; Adam (lr 1e-3)
instead of SGD; the unbiased approximate ROLL term with 16 random input axes
per example instead of all 784 (an exact step costs about 1 s on two cores).

Run ``python -m rollnet.demo --help`` for options; the results go to
``runs/demo`` (``comparison.md`` and ``comparison.json``).  Runs already
complete there are reused (resumed), so a second call is quick.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rollnet.train import TrainConfig, apply_overrides, evaluate_checkpoint, to_markdown, train
from rollnet.train.checkpoint import atomic_write_text
from rollnet.train.evaluation import RegionReport, describe, to_json

__all__ = ["MODELS", "demo_configs", "main"]

#: (run name, lambda, C)
MODELS = (("vanilla", 0.0, 0.0), ("roll_c025", 2.0, 0.25), ("roll_c1", 2.0, 1.0))


def demo_configs(epochs: int, approx: int | None, train_size: int | None = None) -> list[TrainConfig]:
    """The demo's three configurations (same seed, data, network and optimiser; only the term differs)."""
    configs = []
    for name, lam, c in MODELS:
        settings = [
            f"name={name}", "seed=0", f"epochs={epochs}", "batch_size=64", "data.name=mnist_subset",
            "model.arch=mlp", "model.hidden=[300,300,300,300]", "optim.name=adam", "optim.lr=0.001",
            f"roll.lam={lam}", f"roll.C={c}", f"roll.approx={'null' if approx is None else approx}",
            "val_margin_samples=100", f"progress={'true' if sys.stderr.isatty() else 'false'}",
        ]
        if train_size is not None:
            settings.append(f"data.train_size={train_size}")
        configs.append(apply_overrides(TrainConfig(), settings))
    return configs


def _summary(reports: Sequence[RegionReport]) -> str:
    base = reports[0]
    lines = []
    for r in reports[1:]:
        ratios = []
        for norm in ("l1", "l2", "linf"):
            a, b = r.margins["pixel"][norm]["P50"], base.margins["pixel"][norm]["P50"]
            ratios.append(f"{norm} {a / b:.1f}x" if b > 0 else f"{norm} n/a")
        lines.append(
            f"- {r.model}: median margin vs {base.model}: {', '.join(ratios)}; accuracy "
            f"{r.accuracy:.1%} vs {base.accuracy:.1%}; distinct patterns {r.n_patterns} vs {base.n_patterns}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Train, evaluate, print and write the comparison; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m rollnet.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default runs/demo)")
    parser.add_argument("--epochs", type=int, default=25, help="epochs per model (default 25)")
    parser.add_argument("--approx", type=int, default=16,
                        help="random input axes of the approximate ROLL term (default 16; 0: exact term)")
    parser.add_argument("--train-size", type=int, default=None, help="use only this many training images")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N test images")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    approx = None if args.approx == 0 else args.approx
    configs = demo_configs(args.epochs, approx, args.train_size)
    term = "exact ROLL term" if approx is None else f"approximate ROLL term ({approx} random input axes per example)"
    setting = (
        f"MLP 784-300x4-10 on the bundled MNIST subset (stratified split 4,000 / 500 / 500, seed 0"
        f"{', training on ' + str(args.train_size) + ' images' if args.train_size else ''}); Adam lr 1e-3, "
        f"batch 64, {args.epochs} epochs, best epoch on validation accuracy; {term}."
    )
    print(f"rollnet demo: {setting}", flush=True)
    reports: list[RegionReport] = []
    for cfg in configs:
        run = args.out / cfg.name
        label = "vanilla" if cfg.roll.lam == 0 else f"ROLL (lambda {cfg.roll.lam:g}, C {cfg.roll.C:g})"
        print(f"\n== {label}", flush=True)
        result = train(cfg, run, resume=(run / "last.json").exists())
        if result.status != "finished":
            print(f"demo stopped: {result.message}", file=sys.stderr)
            return 1
        reports.append(evaluate_checkpoint(run / "best.json", split="test", limit=args.limit, label=label))

    markdown = (
        f"# rollnet demo\n\n{setting}\n\n{describe(reports)}\n\n{to_markdown(reports)}\n\n{_summary(reports)}\n"
    )
    elapsed = time.perf_counter() - started
    print("\n" + markdown)
    print(f"demo time (training and evaluation): {elapsed:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "comparison.md", markdown)
    atomic_write_text(args.out / "comparison.json", to_json(reports, {"setting": setting, "seconds": elapsed}))
    print(f"wrote {args.out / 'comparison.md'} and {args.out / 'comparison.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
