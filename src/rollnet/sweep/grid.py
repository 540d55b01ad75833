"""The search space of a sweep: ``--grid key=v1,v2,...`` settings over a base config.

A :class:`Grid` holds, for each dotted config key, the values to try, in the
order given.  Every value is checked against the config (known key, right type)
when the grid is built, so a bad grid fails before anything runs.

A *point* is one setting of every key.  Points that give the same training run
share one :func:`point_key`: with ``roll.lam = 0`` (a vanilla run) the other
``roll.*`` settings do not matter, so all such points are one run, ``vanilla``.

>>> from rollnet.train import TrainConfig
>>> grid = parse_grid(["roll.lam=0,0.5", "roll.C=0.25,1"], TrainConfig())
>>> len(grid), grid.keys
(4, ('roll.lam', 'roll.C'))
>>> [point_key(p, TrainConfig()) for p in grid.points()]
['vanilla', 'vanilla', 'roll.lam=0.5,roll.C=0.25', 'roll.lam=0.5,roll.C=1']
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rollnet.train.config import ConfigError, TrainConfig, apply_overrides, valid_keys

__all__ = [
    "REFERENCE_KEY",
    "Grid",
    "GridValue",
    "config_for",
    "decode",
    "encode",
    "is_reference",
    "parse_grid",
    "point_key",
    "with_reference",
]

GridValue = None | bool | int | float | str
"""A value as Optuna stores it: scalars as they are, lists as their JSON text."""

REFERENCE_KEY = "vanilla"
"""The :func:`point_key` of the vanilla reference run (``roll.lam = 0``)."""

_MAX_KEY = 200  # bytes of a run key (a directory name)

# settings a sweep may not vary: they name or place the run, or only change how it is shown
_FIXED = ("name", "progress", "device")


@dataclass(frozen=True)
class Grid:
    """Values to try per config key (``key -> values``, in the order given).

    Attributes:
        values: ``{dotted key: (value, ...)}``; values are JSON-like (numbers,
            strings, booleans, null, lists).
    """

    values: Mapping[str, tuple[Any, ...]]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.values)

    def __len__(self) -> int:
        n = 1
        for vs in self.values.values():
            n *= len(vs)
        return n

    def points(self) -> Iterator[dict[str, Any]]:
        """Every point, in the order of Optuna's grid sampler (the last key varies fastest)."""
        for combo in itertools.product(*self.values.values()):
            yield dict(zip(self.keys, combo, strict=True))

    def search_space(self) -> dict[str, list[GridValue]]:
        """The grid as Optuna's :class:`~optuna.samplers.GridSampler` takes it (lists as JSON text)."""
        return {k: [encode(v) for v in vs] for k, vs in self.values.items()}

    def to_dict(self) -> dict[str, list[Any]]:
        return {k: list(vs) for k, vs in self.values.items()}


def encode(value: Any) -> GridValue:
    """A grid value as an Optuna parameter: scalars unchanged, lists as JSON text."""
    return json.dumps(value) if isinstance(value, list) else value


def decode(key: str, value: GridValue, grid: Grid) -> Any:
    """The grid value behind an Optuna parameter (inverse of :func:`encode`)."""
    for v in grid.values[key]:
        if encode(v) == value and type(encode(v)) is type(value):
            return v
    raise ConfigError(f"{key}={value!r} is not a value of the grid {grid.to_dict()[key]}")


def _split_values(text: str) -> list[Any]:
    """``0.1,0.2,max`` -> ``[0.1, 0.2, "max"]``; a JSON list ``[[100],[100,100]]`` as it is."""
    text = text.strip()
    if text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"cannot parse the grid values {text!r} as a JSON list: {err}") from err
        if not isinstance(values, list):  # pragma: no cover - a '[' text is a list when it parses
            raise ConfigError(f"grid values must be a list, got {text!r}")
        return values
    out: list[Any] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ConfigError(f"empty value in the grid values {text!r}")
        try:
            out.append(json.loads(item))
        except json.JSONDecodeError:
            out.append(item)
    return out


def parse_grid(specs: Sequence[str], base: TrainConfig) -> Grid:
    """Build a grid from ``key=v1,v2,...`` specs and check every value against ``base``.

    Values are parsed as JSON where they parse (``0.25``, ``null``, ``true``), else
    kept as strings (``max``); a value starting with ``[`` is one JSON list of values
    (``model.hidden=[[100],[100,100]]``).

    Raises:
        ConfigError: a spec without ``=``, an unknown key (listing the valid ones), a key
            given twice or one a sweep may not vary (``name``, ``device``, ``progress``), an
            empty list or a repeated value, or a value of the wrong type for its key.

    >>> parse_grid(["roll.gamma=max,50"], TrainConfig()).values
    {'roll.gamma': ('max', 50)}
    >>> parse_grid(["roll.lamda=1"], TrainConfig())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    rollnet.train.config.ConfigError: --grid roll.lamda=1: unknown config key 'roll.lamda'; valid keys: ...
    """
    if not specs:
        raise ConfigError("a sweep needs at least one --grid key=v1,v2,...")
    keys = set(valid_keys())
    values: dict[str, tuple[Any, ...]] = {}
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"--grid must look like key=v1,v2,..., got {spec!r}")
        key, _, text = spec.partition("=")
        key = key.strip()
        where = f"--grid {spec}"
        if key not in keys:
            raise ConfigError(f"{where}: unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")
        if key in _FIXED:
            raise ConfigError(f"{where}: a sweep cannot vary {key!r} (it names or places the runs)")
        if key in values:
            raise ConfigError(f"{where}: {key!r} is given twice; list all its values in one --grid")
        try:
            items = _split_values(text) if text.strip() else []
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from err
        if not items:
            raise ConfigError(f"{where}: the list of values is empty")
        seen: list[Any] = []
        for v in items:
            if any(json.dumps(v) == json.dumps(s) for s in seen):
                raise ConfigError(f"{where}: the value {v!r} is repeated")
            seen.append(v)
            try:
                apply_overrides(base, [f"{key}={json.dumps(v)}"])
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from err
        values[key] = tuple(items)
    return Grid(values)


def is_reference(cfg: TrainConfig) -> bool:
    """Whether a run is vanilla (``roll.lam = 0``): the sweep's reference for selection."""
    return cfg.roll.lam == 0


def config_for(base: TrainConfig, point: Mapping[str, Any]) -> TrainConfig:
    """``base`` with the point's settings; a vanilla point drops every other ``roll.*`` setting."""
    cfg = apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in point.items()])
    if is_reference(cfg):
        others = [k for k in point if not k.startswith("roll.")]
        cfg = apply_overrides(base, ["roll.lam=0", *(f"{k}={json.dumps(point[k])}" for k in others)])
    return cfg


def point_key(point: Mapping[str, Any], base: TrainConfig) -> str:
    """The name of a point's run on ``base``: ``key=value`` pairs joined by commas (``vanilla`` for
    ``roll.lam = 0``).

    A vanilla point keeps its non-``roll`` settings (``vanilla,optim.lr=0.1``).  The key is
    one path component (a directory under the sweep's ``trials/``).
    """
    reference = is_reference(config_for(base, point))
    parts = [REFERENCE_KEY] if reference else []
    for k, v in point.items():
        if reference and k.startswith("roll."):
            continue
        text = json.dumps(v, separators=(",", ":")) if not isinstance(v, str) else v
        parts.append(f"{k}={text}")
    key = ",".join(parts).replace("/", "%2F").replace("\\", "%5C") or REFERENCE_KEY
    if len(key.encode()) > _MAX_KEY:  # a file name has at most 255 bytes: keep a readable head and a digest
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        key = key.encode()[: _MAX_KEY - 17].decode(errors="ignore") + "-" + digest
    return key


def with_reference(grid: Grid, base: TrainConfig) -> Grid:
    """The grid with the vanilla reference the paper's selection needs: ``0`` added to
    ``roll.lam``'s values (first), or ``roll.lam=<base's>,0`` when the grid does not vary it.

    >>> from rollnet.train.config import RollConfig
    >>> base = TrainConfig(roll=RollConfig(lam=2.0))
    >>> with_reference(parse_grid(["roll.C=1,2"], base), base).values
    {'roll.lam': (2.0, 0), 'roll.C': (1, 2)}
    """
    if any(is_reference(config_for(base, p)) for p in grid.points()):
        return grid
    values = dict(grid.values)
    if "roll.lam" in values:
        values["roll.lam"] = (0, *values["roll.lam"])
        return Grid(values)
    return Grid({"roll.lam": (base.roll.lam, 0), **values})
