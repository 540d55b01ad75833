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

__all__ = [
    "DataInfo",
    "make_data",
    "make_model",
    "make_optimizer",
    "make_optimizers",
    "make_regularizer",
    "recurrent_parameters",
    "resolve_device",
]

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
    """The configured network for inputs of ``info.input_shape`` (in the current RNG state).

    Raises:
        ConfigError: options the architecture refuses (the message names them).
    """
    m = cfg.model
    inside: tuple[float, float] | None = None
    if m.normalize_inside:
        if info.normalization is None:
            raise ConfigError(f"model.normalize_inside: data set {info.name!r} has no pixel normalisation")
        if m.arch in ("elman", "scornn"):
            raise ConfigError(f"model.normalize_inside is not supported by model.arch={m.arch!r}")
        inside = info.normalization
    try:
        if m.arch == "mlp":
            return build_model("mlp", info.input_shape, info.num_classes, hidden=m.hidden, act=m.act,
                               negative_slope=m.negative_slope, dropout=m.dropout, normalization=inside)
        if m.arch == "elman":
            return build_model("elman", info.input_shape, info.num_classes, hidden_size=m.hidden_size,
                               nonlinearity=m.act, negative_slope=m.negative_slope)
        if m.arch == "scornn":
            slope = m.negative_slope if m.act == "leaky_relu" else 0.0
            return build_model("scornn", info.input_shape, info.num_classes, hidden_size=m.hidden_size,
                               negative_slope=slope, num_negative=m.num_negative)
        return build_model("resnet", info.input_shape, info.num_classes, width=m.width, blocks=m.blocks,
                           normalization=inside)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from err


def recurrent_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters ``model.recurrent_parameters()`` returns (a scoRNN's A), or ``[]`` for a
    model without that method.

    >>> from rollnet.models import MLP, ScoRNN
    >>> [p.shape for p in recurrent_parameters(ScoRNN(2, 4, 2))], recurrent_parameters(MLP((2,), 2))
    ([torch.Size([6])], [])
    """
    method = getattr(model, "recurrent_parameters", None)
    if method is None:
        return []
    params = list(method())
    if not all(isinstance(p, nn.Parameter) for p in params):
        raise TypeError(f"{type(model).__name__}.recurrent_parameters() must return parameters")
    return params


def _optimizer(name: str, params: list[nn.Parameter], lr: float, *, momentum: float = 0.0,
               nesterov: bool = False, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                               weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, amsgrad=name == "amsgrad")


def make_optimizers(cfg: TrainConfig, model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """``(main, recurrent)``: with ``recurrent_optim.name`` set, the model's recurrent parameters
    (:func:`recurrent_parameters`) get their own optimiser and the main one (``optim``) takes
    the rest; otherwise the main one takes all and the second is ``None``.

    Raises:
        ConfigError: a recurrent optimiser for a model without recurrent parameters.

    >>> from rollnet.train.config import apply_overrides
    >>> from rollnet.models import ScoRNN
    >>> cfg = apply_overrides(TrainConfig(), ["optim.name=amsgrad", "recurrent_optim.name=rmsprop"])
    >>> main, rec = make_optimizers(cfg, ScoRNN(2, 4, 2))
    >>> type(rec).__name__, rec.param_groups[0]["lr"], len(main.param_groups[0]["params"])
    ('RMSprop', 0.0001, 4)
    """
    o, r = cfg.optim, cfg.recurrent_optim
    if r.name is None:
        return _optimizer(o.name, list(model.parameters()), o.lr, momentum=o.momentum, nesterov=o.nesterov,
                          weight_decay=o.weight_decay), None
    recurrent = recurrent_parameters(model)
    if not recurrent:
        raise ConfigError(f"recurrent_optim.name={r.name!r}, but {type(model).__name__} has no recurrent "
                          "parameters (no recurrent_parameters() method, or it returns none); set it to null")
    ids = {id(p) for p in recurrent}
    rest = [p for p in model.parameters() if id(p) not in ids]
    main = _optimizer(o.name, rest, o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    return main, _optimizer(r.name, recurrent, r.lr)


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam or AMSGrad over all parameters (``recurrent_optim`` not
    used; see :func:`make_optimizers`)."""
    o = cfg.optim
    return _optimizer(o.name, list(model.parameters()), o.lr, momentum=o.momentum, nesterov=o.nesterov,
                      weight_decay=o.weight_decay)


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

