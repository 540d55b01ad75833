"""Small, fast configurations for the trainer, checkpoint and CLI tests (tests/zoo.py is the shared one)."""

from __future__ import annotations

from pathlib import Path

from rollnet.train import TrainConfig, apply_overrides, train
from tests.threads import intra_op_threads


def tiny_config(*overrides: str) -> TrainConfig:
    """Digits (8x8), a 2 x 32 MLP with dropout and the approximate ROLL term: every source of
    randomness the trainer must restore on resume (batch order, dropout, the regulariser's directions)."""
    base = [
        "name=tiny", "data.name=digits", "model.hidden=[32,32]", "model.dropout=0.1",
        "epochs=2", "batch_size=64", "progress=false", "val_margin_samples=20",
        "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9",
        "roll.lam=0.5", "roll.C=1", "roll.approx=4", "roll.estimator=gaussian",
    ]
    return apply_overrides(TrainConfig(), [*base, *overrides])


def quiet(message: str) -> None:
    """A log function that drops everything."""


def trained_tiny(out: Path, *overrides: str) -> Path:
    """Train ``tiny_config(*overrides)`` into ``out`` quietly on one intra-op thread; returns ``out``."""
    with intra_op_threads(1):
        train(tiny_config(*overrides), out, log=quiet)
    return out


def tiny_vowels_config(*overrides: str) -> TrainConfig:
    """Japanese Vowels (216 padded sequences: 7 steps of 32), a scoRNN of 8 units, AMSGrad on
    the rest and RMSprop on its A, and the exact ROLL term through the lengths."""
    base = [
        "name=tiny_vowels", "data.name=japanese_vowels", "data.normalize=false",
        "model.arch=scornn", "model.hidden_size=8", "model.act=leaky_relu", "model.num_negative=2",
        "epochs=2", "batch_size=32", "progress=false", "val_margin_samples=8",
        "optim.name=amsgrad", "optim.lr=0.01", "recurrent_optim.name=rmsprop", "recurrent_optim.lr=0.001",
        "roll.lam=0.5", "roll.C=1",
    ]
    return apply_overrides(TrainConfig(), [*base, *overrides])
