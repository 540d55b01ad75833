"""Build the data, model, optimiser and regulariser a :class:`TrainConfig` describes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from rollnet.data import DataSplits, load_dataset
from rollnet.models import build_model
from rollnet.regularizer import ROLLLoss
from rollnet.train.config import ConfigError, TrainConfig

__all__ = ["DataInfo", "make_data", "make_model", "make_optimizer", "make_regularizer", "resolve_device"]

_IMAGE_SETS = ("mnist_subset", "fashion_mnist")


@dataclass(frozen=True)
class DataInfo:
    """What a checkpoint records about its data: enough to rebuild the model and convert radii.

    Attributes:
        name: data set name.
        input_shape: shape of one example.
        num_classes: number of logits.
        normalization: ``(mean, std)`` of the data set's pixel normalisation, or ``None``.
        data_normalized: whether the loader normalised ``x``.
        model_units: units of the model's input, so of its certified radii:
            ``"normalized"``, ``"pixel"`` or ``"raw"``.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    normalization: tuple[float, float] | None
    data_normalized: bool
    model_units: str

    @staticmethod
    def of(data: DataSplits) -> DataInfo:
        norm = data.normalization
        return DataInfo(
            name=data.name,
            input_shape=tuple(data.input_shape),
            num_classes=data.num_classes,
            normalization=None if norm is None else (norm.mean, norm.std),
            data_normalized=data.normalized,
            model_units=data.input_units,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "normalization": None if self.normalization is None else list(self.normalization),
            "data_normalized": self.data_normalized,
            "model_units": self.model_units,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> DataInfo:
        norm = d.get("normalization")
        return DataInfo(
            name=str(d["name"]),
            input_shape=tuple(int(s) for s in d["input_shape"]),
            num_classes=int(d["num_classes"]),
            normalization=None if norm is None else (float(norm[0]), float(norm[1])),
            data_normalized=bool(d["data_normalized"]),
            model_units=str(d["model_units"]),
        )

    def radius_scales(self) -> dict[str, float]:
        """Factors from the model's input units to each reportable unit (``units -> factor``)."""
        if self.normalization is None:
            return {"raw": 1.0}
        std = self.normalization[1]
        if self.model_units == "normalized":
            return {"normalized": 1.0, "pixel": std}
        return {"normalized": 1.0 / std, "pixel": 1.0}


def make_data(cfg: TrainConfig) -> DataSplits:
    """Load the configured data set (see :func:`rollnet.data.load_dataset`)."""
    d = cfg.data
    options: dict[str, Any] = {"seed": d.seed}
    if d.name in ("moons", "spirals", "rings"):
        options["n"] = d.n
        if d.noise is not None:
            options["noise"] = d.noise
        return load_dataset(d.name, **options)
    options["normalize"] = d.normalize
    if d.train_size is not None:
        if d.name not in _IMAGE_SETS:
            raise ConfigError(f"data.train_size is supported for {list(_IMAGE_SETS)}, not {d.name!r}")
        options["train_size"] = d.train_size
    if d.path is not None:
        if d.name != "fashion_mnist":
            raise ConfigError(f"data.path is only used by fashion_mnist, not {d.name!r}")
        options["path"] = d.path
    return load_dataset(d.name, **options)


def make_model(cfg: TrainConfig, info: DataInfo) -> nn.Module:
    """The configured network for inputs of ``info.input_shape`` (in the current RNG state)."""
    m = cfg.model
    inside: tuple[float, float] | None = None
    if m.normalize_inside:
        if info.normalization is None:
            raise ConfigError(f"model.normalize_inside: data set {info.name!r} has no pixel normalisation")
        inside = info.normalization
    if m.arch == "mlp":
        return build_model("mlp", info.input_shape, info.num_classes, hidden=m.hidden, act=m.act,
                           dropout=m.dropout, normalization=inside)
    return build_model("resnet", info.input_shape, info.num_classes, width=m.width, blocks=m.blocks,
                       normalization=inside)


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam or AMSGrad over all parameters."""
    o = cfg.optim
    if o.name == "sgd":
        nesterov = o.nesterov and o.momentum > 0
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=nesterov,
                               weight_decay=o.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay,
                            amsgrad=o.name == "amsgrad")


def make_regularizer(cfg: TrainConfig, generator: torch.Generator | None) -> ROLLLoss | None:
    """The ROLL term, or ``None`` for a vanilla run (``roll.lam = 0``)."""
    r = cfg.roll
    if r.lam == 0:
        return None
    gamma: float | Literal["max"] = "max" if r.gamma == "max" else float(r.gamma)
    estimator: Literal["axes", "gaussian"] = "gaussian" if r.estimator == "gaussian" else "axes"
    try:
        return ROLLLoss(lam=r.lam, C=r.C, gamma=gamma, approx=r.approx, estimator=estimator,
                        memory_budget=r.memory_budget, generator=generator)
    except ValueError as err:
        raise ConfigError(f"roll: {err}") from err


def resolve_device(name: str) -> torch.device:
    """``cpu`` or an available CUDA device; a clear error when CUDA is asked for but absent."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available on this machine")
    return torch.device(name)

