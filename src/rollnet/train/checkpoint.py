"""Checkpoints: safetensors tensors plus a JSON manifest, committed atomically.

A checkpoint is a manifest ``<kind>.json`` (``last.json`` or ``best.json``)
that names its tensor files and their SHA-256:

- ``weights-s<step>.safetensors``: the model's ``state_dict`` (loadable on its own);
- ``trainer-s<step>.safetensors``: optimiser tensors and random-number states
  (``last`` only).

Tensor files get new names at every save and are written to a temporary
file, flushed and renamed; the manifest is written the same way *last*, and
that rename is the commit.  A crash at any moment leaves the previous manifest
pointing at complete files.  Files no manifest names any more are removed
after the commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rollnet.files import atomic_write_bytes, atomic_write_text

__all__ = [
    "FORMAT",
    "Checkpoint",
    "CheckpointError",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_manifest",
    "load_tensors",
    "load_weights_into",
    "save_checkpoint",
]

FORMAT = "rollnet-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, damaged, or not matching the model."""


def _require_safetensors() -> None:
    """Raise a clear ImportError when the ``safetensors`` package (the ``train`` extra) is missing."""
    try:
        import safetensors  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "rollnet checkpoints are safetensors files and the 'safetensors' package is not installed: "
            "pip install 'rollnet[train]' (or pip install safetensors)"
        ) from err


def _to_bytes(tensors: Mapping[str, Tensor]) -> bytes:
    _require_safetensors()
    from safetensors.torch import save

    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return save(plain)


@dataclass(frozen=True)
class Checkpoint:
    """A loaded manifest.

    Attributes:
        path: the manifest file.
        manifest: its JSON content (``config``, ``data``, ``trainer``, ``metrics``, ...).
    """

    path: Path

    manifest: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        value: dict[str, Any] = self.manifest["config"]
        return value

    @property
    def data(self) -> dict[str, Any]:
        value: dict[str, Any] = self.manifest["data"]
        return value

    @property
    def trainer(self) -> dict[str, Any]:
        value: dict[str, Any] = self.manifest.get("trainer") or {}
        return value

    def file(self, role: str) -> Path | None:
        """The tensor file for ``role`` (``"weights"`` or ``"trainer"``), if the checkpoint has one."""
        entry = self.manifest["files"].get(role)
        return None if entry is None else self.path.parent / entry["name"]


def save_checkpoint(
    directory: Path,
    kind: str,
    step: int,
    *,
    weights: Mapping[str, Tensor],
    trainer_tensors: Mapping[str, Tensor] | None,
    content: Mapping[str, Any],
) -> Path:
    """Write the tensor files, then commit the manifest ``<kind>.json``; return its path.

    Args:
        directory: the run directory.
        kind: manifest name, ``"last"`` or ``"best"``.
        step: optimisation step, part of the tensor files' names.
        weights: the model's ``state_dict``.
        trainer_tensors: optimiser tensors and RNG states (``None`` for a weights-only checkpoint).
        content: JSON-serialisable manifest content (config, data, trainer state, metrics).

    >>> import tempfile
    >>> run = Path(tempfile.mkdtemp())
    >>> path = save_checkpoint(run, "best", 7, weights={"w": torch.ones(2)}, trainer_tensors=None,
    ...                        content={"config": {}, "data": {}})
    >>> checkpoint = load_manifest(run)  # a run directory means its best.json
    >>> checkpoint.manifest["step"], load_tensors(checkpoint, "weights")["w"]
    (7, tensor([1., 1.]))
    """
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, str]] = {}
    for role, tensors in (("weights", weights), ("trainer", trainer_tensors)):
        if tensors is None:
            continue
        data = _to_bytes(tensors)
        name = f"{role}-s{step:08d}.safetensors"
        target = directory / name
        digest = hashlib.sha256(data).hexdigest()
        if not (target.is_file() and _sha256(target) == digest):
            atomic_write_bytes(target, data)
        files[role] = {"name": name, "sha256": digest}
    manifest = {"format": FORMAT, "version": VERSION, "kind": kind, "step": step, "files": files, **content}
    path = directory / f"{kind}.json"
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=False, allow_nan=True) + "\n")
    _remove_unreferenced(directory)
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _remove_unreferenced(directory: Path) -> None:
    keep: set[str] = set()
    for manifest in directory.glob("*.json"):
        try:
            content = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(content, dict) and content.get("format") == FORMAT:
            keep.update(entry["name"] for entry in content.get("files", {}).values())
    for pattern in ("weights-s*.safetensors", "trainer-s*.safetensors"):
        for f in directory.glob(pattern):
            if f.name not in keep:
                with contextlib.suppress(OSError):
                    f.unlink()


def load_manifest(path: str | Path) -> Checkpoint:
    """Read and check a manifest: a ``.json`` file, or a run directory (its ``best.json``).

    Checks the format, and that every tensor file it names exists with the
    recorded SHA-256.

    Raises:
        CheckpointError: with what is wrong (missing, not JSON, damaged, ...).
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / "best.json", path / "last.json"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise CheckpointError(f"{path} is a directory without best.json or last.json: not a rollnet run")
        path = found
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not a readable rollnet checkpoint manifest (JSON): {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a rollnet checkpoint manifest (no \"format\": \"{FORMAT}\")")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {manifest.get('version')!r}; this rollnet reads version {VERSION}"
        )
    for key in ("files", "config", "data"):
        if not isinstance(manifest.get(key), dict):
            raise CheckpointError(f"{path} is damaged: its {key!r} entry is missing or malformed")
    if "weights" not in manifest["files"]:
        raise CheckpointError(f"{path} is damaged: it names no weights file")
    for role, entry in manifest["files"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or "/" in entry["name"]:
            raise CheckpointError(f"{path} is damaged: bad {role!r} file entry")
        f = path.parent / entry["name"]
        if not f.is_file():
            raise CheckpointError(f"{path} names {f.name}, which is missing")
        if _sha256(f) != entry.get("sha256"):
            raise CheckpointError(f"{f} is damaged: its SHA-256 differs from the one {path.name} recorded")
    return Checkpoint(path, manifest)


def load_tensors(checkpoint: Checkpoint, role: str, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The tensors of one of the checkpoint's files (``"weights"`` or ``"trainer"``).

    Raises:
        CheckpointError: the checkpoint has no such file, or it cannot be parsed.
        ImportError: the ``safetensors`` package is not installed.
    """
    _require_safetensors()
    from safetensors import SafetensorError
    from safetensors.torch import load

    f = checkpoint.file(role)
    if f is None:
        raise CheckpointError(f"{checkpoint.path} holds no {role} state (a weights-only checkpoint?)")
    try:
        tensors: dict[str, Tensor] = load(f.read_bytes())
    except (OSError, SafetensorError, ValueError) as err:
        raise CheckpointError(f"{f} is not a readable safetensors file: {err}") from err
    return {k: v.to(device) for k, v in tensors.items()}


def load_weights_into(model: nn.Module, weights: Mapping[str, Tensor], source: Path) -> None:
    """``model.load_state_dict(weights)``, with a clear error when they do not match.

    Raises:
        CheckpointError: missing or unexpected keys, or shapes that differ.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own if k in weights and weights[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}{' ...' if len(shapes) > 3 else ''}")
        raise CheckpointError(
            f"the weights in {source} do not match the model built from its config: {'; '.join(parts)}"
        )
    model.load_state_dict(weights)
