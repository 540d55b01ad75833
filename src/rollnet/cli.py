"""The ``rollnet`` command: a thin layer over :mod:`rollnet.train`.

::

    rollnet train CONFIG [--set key=value ...] [--resume] [--out DIR]
    rollnet evaluate CHECKPOINT [--split test] [--limit N] [--out DIR]

Exit status: 0 done, 1 error (bad config, missing data, damaged
checkpoint), 3 training diverged, 130 interrupted by Ctrl-C (checkpoint saved).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rollnet", description="Robust, locally linear deep networks.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a config file (.json or .toml)")
    t.add_argument("config", type=Path, help="configuration file, e.g. configs/mnist_roll_c025.json")
    t.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set optim.lr=0.1 roll.lam=2 (values parsed as JSON)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<name>)")

    e = sub.add_parser("evaluate", help="accuracy, linear regions and margin percentiles of a checkpoint")
    e.add_argument("checkpoint", type=Path, help="best.json / last.json, or a run directory (uses best.json)")
    e.add_argument("--split", default="test", choices=["test", "val", "train"], help="split to evaluate (default test)")
    e.add_argument("--limit", type=int, default=None, help="only the first N examples of the split")
    e.add_argument("--out", type=Path, default=None,
                   help="directory for evaluation-<split>.md and .json (default: the checkpoint's directory)")
    e.add_argument("--device", default="cpu", help="cpu or cuda")
    e.add_argument("--float32", action="store_true", help="certify in float32 (default: float64, exact)")
    e.add_argument("--batch-size", type=int, default=250, help="examples per pass")
    return parser


def _train(args: argparse.Namespace) -> int:
    from rollnet.train import apply_overrides, load_config, train

    cfg = apply_overrides(load_config(args.config), args.overrides)
    out = args.out if args.out is not None else Path("runs") / cfg.name
    result = train(cfg, out, resume=args.resume)
    if result.status == "diverged":
        return EXIT_DIVERGED
    if result.status == "interrupted":
        return EXIT_INTERRUPTED
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from rollnet.train.checkpoint import atomic_write_text, load_manifest
    from rollnet.train.evaluation import describe, evaluate_checkpoint, to_json, to_markdown

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be positive, got {args.limit}")
    report = evaluate_checkpoint(args.checkpoint, split=args.split, limit=args.limit, batch_size=args.batch_size,
                                 float64=not args.float32, device=args.device)
    markdown = f"{describe([report])}\n\n{to_markdown([report])}\n"
    print(markdown, end="")
    out = args.out if args.out is not None else load_manifest(args.checkpoint).path.parent
    stem = f"evaluation-{args.split}"
    atomic_write_text(out / f"{stem}.md", markdown)
    atomic_write_text(out / f"{stem}.json", to_json([report], {"checkpoint": str(args.checkpoint)}))
    print(f"wrote {out / (stem + '.md')} and {out / (stem + '.json')}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    from rollnet.data import DataSetMissingError
    from rollnet.train import CheckpointError, ConfigError

    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
        return _evaluate(args)
    except (ConfigError, CheckpointError, DataSetMissingError, ValueError) as err:
        print(f"rollnet: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("rollnet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
