"""Experiment configuration: dataclasses, JSON / TOML files, ``key=value`` overrides.

A configuration is a :class:`TrainConfig` with five sections (``data``,
``model``, ``optim``, ``recurrent_optim``, ``roll``).  Keys are addressed with dots
(``optim.lr``, ``roll.lam``, ``epochs``); an unknown key is an error that
lists the valid ones.

>>> cfg = apply_overrides(TrainConfig(), ["optim.lr=0.1", "roll.lam=2", "model.hidden=[100,100]"])
>>> cfg.optim.lr, cfg.roll.lam, cfg.model.hidden
(0.1, 2.0, [100, 100])
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "RecurrentOptimConfig",
    "RollConfig",
    "TrainConfig",
    "apply_overrides",
    "config_diff",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "valid_keys",
]


class ConfigError(ValueError):
    """An invalid configuration file, key or value."""


@dataclass
class DataConfig:
    """Which data set, and how (see :func:`rollnet.data.load_dataset`).

    Attributes:
        name: ``mnist_subset``, ``fashion_mnist``, ``digits``, ``japanese_vowels``,
            ``moons``, ``spirals``, ``rings``.
        path: directory of the Fashion-MNIST files (default: ``$ROLLNET_FASHION_MNIST``,
            then Debian's location).
        normalize: feed normalised inputs (``True``) or [0, 1] pixel units (``False``).
        train_size: keep a stratified subset of this many training examples
            (``mnist_subset`` and ``fashion_mnist``).
        n: number of points of a 2-D toy.
        noise: noise of a 2-D toy (default: the toy's own).
        seed: seed of the split (and of a toy's points).
    """

    name: str = "mnist_subset"
    path: str | None = None
    normalize: bool = True
    train_size: int | None = None
    n: int = 1000
    noise: float | None = None
    seed: int = 0


@dataclass
class ModelConfig:
    """The network (see :func:`rollnet.models.build_model`).

    Attributes:
        arch: ``mlp``, ``resnet``, ``elman`` (:class:`rollnet.models.ElmanRNN`) or
            ``scornn`` (:class:`rollnet.models.ScoRNN`); the recurrent nets take
            sequences ``[T, C]`` (``japanese_vowels``).
        hidden: MLP hidden widths (the paper's MNIST network: 4 x 300).
        act: activation of the MLP, the Elman RNN and the scoRNN, ``relu`` or
            ``leaky_relu`` (a scoRNN with ``relu`` gets slope 0).
        negative_slope: LeakyReLU's slope for negative inputs.
        dropout: MLP dropout after each activation.
        width: ResNet channels of the first stage.
        blocks: ResNet basic blocks per stage (ResNet-18: [2, 2, 2, 2]).
        hidden_size: hidden units of a recurrent net.
        num_negative: scoRNN: number of -1 entries of its scaling D (default
            ``hidden_size // 10``, see :class:`rollnet.models.ScoRNN`).
        normalize_inside: put the data set's normalisation inside the model
            as its first layer (needs ``data.normalize = false``): the model
            then takes pixel units.
    """

    arch: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [300, 300, 300, 300])
    act: str = "relu"
    negative_slope: float = 0.01
    dropout: float = 0.0
    width: int = 16
    blocks: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    hidden_size: int = 512
    num_negative: int | None = None
    normalize_inside: bool = False


@dataclass
class OptimConfig:
    """The optimiser: ``sgd`` (with ``momentum`` and ``nesterov``), ``adam`` or ``amsgrad``."""

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.5
    nesterov: bool = True
    weight_decay: float = 0.0


@dataclass
class RecurrentOptimConfig:
    """A second optimiser for the model's recurrent parameters (``recurrent_parameters()``:
    a scoRNN's skew-symmetric A), as the scoRNN reference trains them (RMSprop, lr 1e-4).

    Attributes:
        name: ``null`` (default: every parameter is the main optimiser's), or
            ``rmsprop``, ``sgd``, ``adam``, ``amsgrad`` (PyTorch's defaults otherwise).
        lr: its learning rate.
    """

    name: str | None = None
    lr: float = 1e-4


@dataclass
class RollConfig:
    """The ROLL regulariser (see :class:`rollnet.ROLLLoss`); ``lam = 0`` trains a vanilla model.

    Attributes:
        lam: weight lambda of the term.
        C: weight of the hinge on the neuron values.
        gamma: percentage of neurons kept per example, or ``"max"``.
        approx: ``null`` for the exact term, else the number k of random
            directions of the unbiased estimate.
        estimator: ``axes`` or ``gaussian`` (with ``approx``).
        memory_budget: bytes of tangents held at once (default: the engine's).
    """

    lam: float = 0.0
    C: float = 0.0
    gamma: float | str = 100.0
    approx: int | None = None
    estimator: str = "axes"
    memory_budget: int | None = None


@dataclass
class TrainConfig:
    """A training run.

    Attributes:
        name: the run's name (default output directory ``runs/<name>``).
        seed: seed of initialisation, batch order, dropout and the regulariser's sampling.
        epochs: passes over the training split.
        batch_size: examples per step.
        eval_batch_size: examples per forward pass in evaluation.
        device: ``cpu`` or ``cuda`` (or ``cuda:N``).
        select_on: validation metric that picks the best checkpoint: ``val_acc`` or ``val_loss``.
        val_margin_samples: validation examples whose l2 margins are logged each
            epoch (the first ones of the split; 0: none).
        checkpoint_every: also save the last checkpoint every this many steps (0: only at epoch ends).
        progress: show progress bars: ``true``, ``false`` or ``"auto"`` (default: when stderr is a
            terminal, so a log redirected to a file holds no bars).
    """

    name: str = "run"
    seed: int = 0
    epochs: int = 20
    batch_size: int = 64
    eval_batch_size: int = 500
    device: str = "cpu"
    select_on: str = "val_acc"
    val_margin_samples: int = 500
    checkpoint_every: int = 0
    progress: bool | str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    recurrent_optim: RecurrentOptimConfig = field(default_factory=RecurrentOptimConfig)
    roll: RollConfig = field(default_factory=RollConfig)

    def __post_init__(self) -> None:
        _check_choices(self)


_CHOICES: dict[str, tuple[Any, ...]] = {
    "device": (),
    "select_on": ("val_acc", "val_loss"),
    "data.name": ("mnist_subset", "fashion_mnist", "digits", "japanese_vowels", "moons", "spirals", "rings"),
    "model.arch": ("mlp", "resnet", "elman", "scornn"),
    "model.act": ("relu", "leaky_relu"),
    "optim.name": ("sgd", "adam", "amsgrad"),
    "recurrent_optim.name": (None, "rmsprop", "sgd", "adam", "amsgrad"),
    "roll.estimator": ("axes", "gaussian"),
}


def _check_choices(cfg: TrainConfig) -> None:
    flat = _flatten(config_to_dict(cfg))
    for key, choices in _CHOICES.items():
        if choices and flat[key] not in choices:
            raise ConfigError(f"{key} must be one of {list(choices)}, got {flat[key]!r}")
    if not (flat["device"] == "cpu" or str(flat["device"]).startswith("cuda")):
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {flat['device']!r}")
    gamma = flat["roll.gamma"]
    if isinstance(gamma, str) and gamma != "max":
        raise ConfigError(f"roll.gamma must be a percentage in (0, 100] or 'max', got {gamma!r}")
    if not isinstance(cfg.progress, bool) and cfg.progress != "auto":
        raise ConfigError(f"progress must be true, false or 'auto', got {cfg.progress!r}")
    _check_name(cfg.name)
    positive = ("epochs", "batch_size", "eval_batch_size", "model.hidden_size")
    for key in positive:
        if flat[key] < 1:
            raise ConfigError(f"{key} must be at least 1, got {flat[key]}")
    for key in ("val_margin_samples", "checkpoint_every", "optim.lr", "recurrent_optim.lr", "roll.lam", "roll.C",
                "model.negative_slope"):
        if flat[key] < 0:
            raise ConfigError(f"{key} must be non-negative, got {flat[key]}")
    if cfg.model.normalize_inside and cfg.data.normalize:
        raise ConfigError("model.normalize_inside needs data.normalize = false (else inputs are normalised twice)")


def _check_name(name: str) -> None:
    """A run's ``name`` is its directory under ``runs/``: one plain path component (not empty,
    ``.`` or ``..``, without a path separator or NUL), so a run is never written elsewhere.

    >>> _check_name("../escape")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    rollnet.train.config.ConfigError: name must be a single path component ...got '../escape'
    """
    separators = {"/", "\\", "\0", os.sep, *([os.altsep] if os.altsep else [])}
    if name in ("", ".", "..") or any(c in name for c in separators) or os.path.isabs(name):
        raise ConfigError("name must be a single path component (a directory name under runs/: not empty, "
                          f"'.' or '..', without '/' or '\\'), got {name!r}")


# ---------------------------------------------------------------------------
# dict <-> dataclass


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The configuration as plain nested dicts (JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def valid_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every settable dotted key, e.g. ``["name", "seed", ..., "data.name", ...]``.

    >>> "optim.lr" in valid_keys() and "roll.lam" in valid_keys()
    True
    """
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys += valid_keys(hint, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown(key: str) -> ConfigError:
    return ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type ``hint`` (int, float, str, bool, list[int], unions)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(hint)} ({'; '.join(errors)})")
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {hint!r}")  # pragma: no cover - programming error


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            raise _unknown(f"{prefix}{k}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        hint, value, key = hints[f.name], values[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key} must be a table of settings, got {value!r}")
            kwargs[f.name] = _build(hint, value, f"{key}.")  # type: ignore[arg-type]
        else:
            kwargs[f.name] = _coerce(value, hint, key)
    return cls(**kwargs)


def config_from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from nested dicts; missing keys take their defaults.

    Raises:
        ConfigError: unknown key (listing the valid ones) or a value of the wrong type.

    >>> config_from_dict({"epochs": 3, "roll": {"lam": 2, "C": 1}}).roll.C
    1.0
    """
    result: TrainConfig = _build(TrainConfig, values, "")
    return result


def load_config(path: str | Path) -> TrainConfig:
    """Read a ``.json`` or ``.toml`` configuration file.

    Raises:
        ConfigError: unreadable file, bad syntax, unknown key or wrong type.

    >>> load_config("configs/mnist_roll_c1.json").roll.lam  # doctest: +SKIP
    2.0
    """
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror or err}") from err
    try:
        if path.suffix == ".toml":
            values = tomllib.loads(text.decode("utf-8"))
        elif path.suffix == ".json":
            values = json.loads(text)
        else:
            raise ConfigError(f"config {path} must be a .json or .toml file")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot parse config {path}: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"config {path} must hold a table of settings")
    return config_from_dict(values)


def _parse_value(text: str) -> Any:
    """JSON when it parses (numbers, true/false, null, lists), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg: TrainConfig, overrides: Iterable[str]) -> TrainConfig:
    """A copy of ``cfg`` with ``key=value`` settings applied (values parsed as JSON, else strings).

    Raises:
        ConfigError: malformed setting, unknown key (listing the valid ones) or wrong type.

    >>> apply_overrides(TrainConfig(), ["data.name=moons", "roll.approx=null"]).data.name
    'moons'
    """
    values = config_to_dict(cfg)
    keys = set(valid_keys())
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"a setting must look like key=value, got {item!r}")
        key, _, text = item.partition("=")
        key = key.strip()
        if key not in keys:
            raise _unknown(key)
        node = values
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = _parse_value(text.strip())
    return config_from_dict(values)


def config_diff(a: TrainConfig, b: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``key -> (value in a, value in b)`` for every dotted key whose values differ.

    >>> config_diff(TrainConfig(), apply_overrides(TrainConfig(), ["epochs=5"]))
    {'epochs': (20, 5)}
    """
    fa, fb = _flatten(config_to_dict(a)), _flatten(config_to_dict(b))
    return {k: (fa[k], fb[k]) for k in fa if fa[k] != fb[k]}
