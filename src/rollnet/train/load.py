"""Load a trained model from a run directory or a checkpoint manifest, without its data.

The manifest records the config and a description of the data (input shape,
classes, normalisation); that is all the model's architecture needs, so the
data set itself does not have to be present.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rollnet.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_manifest,
    load_tensors,
    load_weights_into,
)
from rollnet.train.config import ConfigError, TrainConfig, config_from_dict
from rollnet.train.factory import DataInfo, make_model, resolve_device

__all__ = ["LoadedModel", "load_checkpoint_model", "load_model"]


@dataclass
class LoadedModel:
    """A checkpoint's model with what it was built from.

    Attributes:
        model: the network, weights loaded, in eval mode, on ``device``.
        config: the run's :class:`~rollnet.train.TrainConfig`.
        info: what the checkpoint records about the data (:class:`~rollnet.train.DataInfo`).
        checkpoint: the manifest read (its path, step, metrics, ...).
        device: where the model's parameters are.
    """

    model: nn.Module
    config: TrainConfig
    info: DataInfo
    checkpoint: Checkpoint
    device: torch.device


def load_checkpoint_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """:func:`load_model`, returning also the config, data description and manifest.

    Raises:
        CheckpointError: as :func:`load_model`.
        ConfigError: ``device`` names CUDA on a machine without it.
    """
    checkpoint = load_manifest(path)
    try:
        cfg = config_from_dict(checkpoint.config)
        info = DataInfo.from_dict(checkpoint.data)
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{checkpoint.path} holds an invalid config or data description: {err}") from err
    dev = resolve_device(str(device))
    try:
        model = make_model(cfg, info)
    except ConfigError as err:
        raise CheckpointError(f"{checkpoint.path}: its config does not build a model: {err}") from err
    model = model.to(dev)
    weights = load_tensors(checkpoint, "weights", dev)
    bad = sorted(k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise CheckpointError(f"{checkpoint.path}: weights {bad[:5]} hold NaN or infinite values")
    load_weights_into(model, weights, checkpoint.path)
    model.eval()
    return LoadedModel(model, cfg, info, checkpoint, dev)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A trained model from a run directory or a checkpoint manifest, ready to use.

    The architecture is rebuilt from the config the manifest records and the
    weights are loaded after checking their SHA-256, names, shapes and that
    they are finite.  The data set is not needed.

    Args:
        path: a manifest (``best.json`` or ``last.json``), or a run directory:
            its ``best.json`` (``last.json`` when there is no ``best.json``), as
            ``rollnet evaluate`` does.
        device: ``"cpu"`` (default), ``"cuda"`` or any torch device.

    Returns:
        The network in eval mode (call ``.train()`` to fine-tune it), its
        parameters on ``device``, in the precision it was trained in
        (float32).

    Raises:
        CheckpointError: no such file or directory, a manifest that is not
            JSON or not a rollnet manifest, a tensor file missing or damaged
            (SHA-256), weights that do not fit the architecture, or a
            config that no longer builds a model.
        ConfigError: ``device`` names CUDA on a machine without it.
        ImportError: the ``safetensors`` package (the ``train`` extra) is not installed.

    Example:
        >>> import tempfile, torch, rollnet
        >>> from rollnet.train import TrainConfig, apply_overrides, train
        >>> cfg = apply_overrides(TrainConfig(), ["data.name=moons", "data.n=200", "model.hidden=[8]",
        ...                                       "epochs=1", "progress=false", "val_margin_samples=0"])
        >>> run = tempfile.mkdtemp()
        >>> _ = train(cfg, run, log=lambda m: None)
        >>> model = rollnet.load_model(run)
        >>> model.training, model(torch.zeros(3, 2)).shape
        (False, torch.Size([3, 2]))
    """
    return load_checkpoint_model(path, device).model

