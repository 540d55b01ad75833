"""Margins over a whole data set, sharded across processes, with incremental results.

:func:`certify_dataset` cuts the examples into fixed-size *blocks* of ``batch_size``
examples and certifies each block on its own, exactly as :func:`rollnet.margin` would
certify that block.  Under ``torchrun`` (``torch.distributed`` initialised with more than one
process) each process takes a contiguous run of blocks and the margins are gathered, in the
original order, on every process.  Because a block's margins depend only on the block (never on
which process computed it, or on how many processes there are), sharded margins equal
single-process margins bitwise, given the same machine, thread settings and ``memory_budget``.

With ``out=DIR`` every finished block is written to ``DIR/block-<index>.pt`` through a flushed
temporary file and an atomic rename, beside ``DIR/manifest.json`` (what the blocks are margins
of: the model's fingerprint, the norms, the block size, the number of examples).  A rerun after
a kill loads the finished blocks and computes only the missing ones; a rerun with another model,
other norms, another block size or other examples is refused with an error naming the
difference (each block also records the SHA-256 of its own inputs).

This module uses only :mod:`rollnet.certify` and the engine, so that the trainer, the
evaluation and the CLI can all build on it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rollnet.certify import Norm, _margin_from, check_forward_args, check_input, parse_norm
from rollnet.engine.gradients import Request, batch_slice, collect, unit_directions
from rollnet.engine.modes import eval_mode
from rollnet.files import atomic_write_bytes
from rollnet.rounding import Rounding, Working, _moved, check_rounding, working

__all__ = ["ResumeMismatchError", "block_ranges", "certify_dataset", "shard_blocks"]

FORMAT = "rollnet-margins"
VERSION = 1
_DUAL = {1.0: math.inf, 2.0: 2.0, math.inf: 1.0}
_NAMES = {1.0: "l1", 2.0: "l2", math.inf: "linf"}


class ResumeMismatchError(ValueError):
    """A directory of finished blocks that belongs to another model, data set or setting."""


def block_ranges(n: int, block_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each block of ``block_size`` examples (the last may be shorter).

    >>> block_ranges(10, 4)
    [(0, 4), (4, 8), (8, 10)]
    """
    if block_size <= 0:
        raise ValueError(f"batch_size must be positive, got {block_size}")
    return [(i, min(i + block_size, n)) for i in range(0, n, block_size)]


def shard_blocks(n_blocks: int, world_size: int, rank: int) -> range:
    """The contiguous run of block indices that process ``rank`` of ``world_size`` certifies.

    Shards differ in length by at most one block; concatenated in rank order they are
    ``range(n_blocks)``.

    >>> [list(shard_blocks(5, 2, r)) for r in range(2)]
    [[0, 1], [2, 3, 4]]
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    return range(n_blocks * rank // world_size, n_blocks * (rank + 1) // world_size)


# ---------------------------------------------------------------------------
# the data set, block by block


class _Examples:
    """Uniform access to the examples of a tensor, a ``Dataset`` or a sequence: ``len`` and
    ``block(start, stop) -> (x, per-block forward args)``."""

    def __init__(self, dataset: Any, additional_forward_args: Any) -> None:
        self._tensor: Tensor | None = None
        self._items: Any = None
        self._shared: Any = additional_forward_args
        if isinstance(dataset, Tensor):
            self._tensor = check_input(dataset, "dataset")
            self._args = check_forward_args(additional_forward_args, self._tensor)
            self.n = int(dataset.shape[0])
            return
        tensors = getattr(dataset, "tensors", None)  # a TensorDataset: no per-item stacking
        if isinstance(tensors, tuple) and tensors and all(isinstance(t, Tensor) for t in tensors):
            self._tensor = check_input(tensors[0], "dataset.tensors[0]")
            self.n = int(tensors[0].shape[0])
            self._args = self._with_lengths(tensors[2] if len(tensors) > 2 else None, additional_forward_args)
            return
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(
                "dataset must be a tensor [M, *input_shape], a torch.utils.data.Dataset or a sequence of "
                f"examples (tensors or (x, y[, lengths]) tuples) with len() and indexing; got {type(dataset).__name__}"
            )
        self._items = dataset
        self.n = len(dataset)
        self._args = ()

    def _with_lengths(self, lengths: Tensor | None, extra: Any) -> tuple[Any, ...]:
        if lengths is None:
            assert self._tensor is not None
            return check_forward_args(extra, self._tensor)
        if extra is not None:
            raise ValueError(
                "the dataset gives (x, y, lengths) and additional_forward_args was also given; "
                "pass one or the other (the lengths are passed to the model as model(x, lengths))"
            )
        return (lengths,)

    def block(self, start: int, stop: int) -> tuple[Tensor, tuple[Any, ...]]:
        if self._tensor is not None:
            return self._tensor[start:stop], batch_slice(self._args, start, stop, self.n)
        xs: list[Tensor] = []
        lengths: list[Tensor] = []
        for i in range(start, stop):
            item = self._items[i]
            if isinstance(item, (tuple, list)):
                if not item or not isinstance(item[0], Tensor):
                    raise TypeError(f"dataset[{i}] must be a tensor or a tuple (x, y[, lengths]) with a tensor x")
                xs.append(item[0])
                if len(item) > 2:
                    lengths.append(torch.as_tensor(item[2]).reshape(1))
            elif isinstance(item, Tensor):
                xs.append(item)
            else:
                raise TypeError(f"dataset[{i}] must be a tensor or a tuple (x, y[, lengths]), got {type(item).__name__}")
        shapes = {tuple(x.shape) for x in xs}
        if len(shapes) > 1:
            raise ValueError(
                f"the examples of block [{start}, {stop}) have different shapes {sorted(shapes)}; "
                "pad them to one shape (sequences: pad to the longest and give the lengths)"
            )
        if lengths and len(lengths) != len(xs):
            raise ValueError(f"in block [{start}, {stop}) some examples give lengths and some do not")
        x = check_input(torch.stack(xs), "dataset") if xs else torch.empty(0)
        if lengths:
            if self._shared is not None:
                raise ValueError(
                    "the dataset gives (x, y, lengths) and additional_forward_args was also given; "
                    "pass one or the other (the lengths are passed to the model as model(x, lengths))"
                )
            return x, (torch.cat(lengths),)
        return x, check_forward_args(self._shared, x)


# ---------------------------------------------------------------------------
# fingerprints and the blocks directory


def _tensor_bytes(t: Tensor) -> bytes:
    flat = t.detach().reshape(-1).contiguous().cpu()
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's class and ``state_dict`` (names, dtypes, shapes and values).

    >>> a = torch.nn.Linear(2, 2)
    >>> model_fingerprint(a) == model_fingerprint(a), len(model_fingerprint(a))
    (True, 64)
    """
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, value in model.state_dict().items():
        h.update(name.encode())
        _hash_value(h, value)
    return h.hexdigest()


def _inputs_fingerprint(x: Tensor, args: tuple[Any, ...]) -> str:
    """SHA-256 of one block's inputs and further arguments."""
    h = hashlib.sha256()
    for value in (x, *args):
        _hash_value(h, value)
    return h.hexdigest()


def _hash_value(h: Any, value: Any) -> None:
    """Feed ``value`` to the hash ``h``: a tensor by dtype, shape and bytes, anything else by ``repr``."""
    if isinstance(value, Tensor):
        h.update(f"{value.dtype}{tuple(value.shape)}".encode())
        h.update(_tensor_bytes(value))
    else:
        h.update(repr(value).encode())


@dataclass
class _Blocks:
    """The blocks directory of one :func:`certify_dataset` call."""

    root: Path
    manifest: dict[str, Any]

    def path(self, index: int) -> Path:
        return self.root / f"block-{index:06d}.pt"

    def open(self) -> None:
        """Create the directory and manifest, or check an existing manifest matches ours."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "manifest.json"
        if path.exists():
            try:
                found = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise ResumeMismatchError(f"{path} is not a readable margins manifest ({err})") from err
            if found.get("format") != FORMAT:
                raise ResumeMismatchError(f"{path} is not a rollnet margins manifest (format {found.get('format')!r})")
            diff = [
                f"{key} {found.get(key)!r} there, {value!r} now"
                for key, value in self.manifest.items() if found.get(key) != value
            ]
            if diff:
                raise ResumeMismatchError(
                    f"{self.root} holds margins of another computation ({'; '.join(diff)}); "
                    "use another directory, or delete this one to start over"
                )
            return
        atomic_write_bytes(path, (json.dumps(self.manifest, indent=1) + "\n").encode())

    def load(self, index: int, inputs: str) -> dict[str, Tensor] | None:
        """Block ``index``'s margins if finished (and of these inputs), else ``None``."""
        path = self.path(index)
        if not path.exists():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            margins = {name: saved["margins"][name] for name in self.manifest["norms"]}
        except Exception:  # an unreadable block is recomputed (the commit is atomic: rare)
            return None
        if saved.get("inputs") != inputs:
            raise ResumeMismatchError(
                f"{path} holds the margins of other examples than block {index} now has (the data set "
                "changed); use another directory, or delete this one to start over"
            )
        return margins

    def save(self, index: int, inputs: str, margins: dict[str, Tensor]) -> None:
        buffer = io.BytesIO()
        torch.save({"index": index, "inputs": inputs, "margins": margins}, buffer)
        atomic_write_bytes(self.path(index), buffer.getvalue())


# ---------------------------------------------------------------------------
# processes


def _distributed(group: Any) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in ``group`` (``(0, 1)`` without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        raise RuntimeError(
            f"this process is one of WORLD_SIZE={world} (launched by torchrun) but torch.distributed is not "
            "initialised, so the processes cannot share the data set; call "
            "torch.distributed.init_process_group() first"
        )
    return 0, 1


def _agree(value: Any, group: Any, world: int) -> list[Any]:
    """Every process's ``value``, in rank order (just ``[value]`` on one process)."""
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value, group=group)
    return gathered


_KINDS: dict[str, type[Exception]] = {"ResumeMismatchError": ResumeMismatchError, "ValueError": ValueError,
                                     "TypeError": TypeError}


def _error(err: Exception) -> tuple[str, str, str]:
    """What a process reports of its error: the most specific of :data:`_KINDS` it is, and its message."""
    kind = next((name for name, cls in _KINDS.items() if isinstance(err, cls)), "RuntimeError")
    return ("error", kind, f"{type(err).__name__}: {err}")


def _raise_first(statuses: list[Any]) -> None:
    """Raise, on every process, the first error a process reported (naming that process)."""
    for rank, status in enumerate(statuses):
        if isinstance(status, tuple) and status and status[0] == "error":
            _, kind, message = status
            error = _KINDS.get(kind, RuntimeError)
            raise error(message if len(statuses) == 1 else f"process {rank}: {message}")


# ---------------------------------------------------------------------------
# one block


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


class _Certifier:
    """Certifies blocks one at a time, keeping the float64 copy of the model (``rounding="sound"``)
    made for the first block."""

    def __init__(self, model: nn.Module, qs: tuple[float, ...], rounding: Rounding, memory_budget: int | None,
                 device: torch.device) -> None:
        self.model, self.qs, self.rounding, self.memory_budget, self.device = model, qs, rounding, memory_budget, device
        self._work: Working | None = None

    def __call__(self, x: Tensor, args: tuple[Any, ...]) -> list[Tensor]:
        return _certify_block(self, x, args)

    def working(self, x: Tensor, args: tuple[Any, ...]) -> Working:
        x = x.to(self.device)
        args = tuple(a.to(self.device) if isinstance(a, Tensor) else a for a in args)
        if self._work is None or not self._work.recomputed:
            self._work = working(self.model, x, self.rounding, args)
            return self._work
        w = self._work
        return Working(w.model, x.to(device=w.x.device, dtype=w.x.dtype), x.dtype, x.device, recomputed=True,
                       args=_moved(args, w.x.device))


def _certify_block(certifier: _Certifier, x: Tensor, args: tuple[Any, ...]) -> list[Tensor]:
    """One block's margins, one ``[B]`` CPU tensor per dual norm in ``certifier.qs``: the values
    :func:`rollnet.margin` gives for this block, for every norm from one pass over the input axes."""
    if x.shape[0] == 0:
        return [x.new_empty(0).cpu() for _ in certifier.qs]
    work = certifier.working(x, args)
    with torch.no_grad(), eval_mode(work.model), work.arithmetic():
        got = collect(work.model, work.x, unit_directions(x.shape[1:]), Request(norms=certifier.qs),
                      memory_budget=certifier.memory_budget, forward_args=work.args)
    return [work.certificate(_margin_from(got.values, got.norms[q])).cpu() for q in certifier.qs]


# ---------------------------------------------------------------------------
# the public function


def certify_dataset(
    model: nn.Module,
    dataset: Tensor | Sequence[Any] | Any,
    p: Norm | Sequence[Norm] = 2,
    *,
    batch_size: int = 256,
    additional_forward_args: Any = None,
    rounding: Rounding = "sound",
    memory_budget: int | None = None,
    out: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    group: Any = None,
) -> Tensor | dict[Norm, Tensor]:
    """Margins of every example of a data set, sharded across processes under torchrun.

    The examples are cut into blocks of ``batch_size``; each block is certified alone, as
    :func:`rollnet.margin` certifies it, so the margins do not depend on the number of
    processes.  When ``torch.distributed`` is initialised (for instance by
    ``torchrun --nproc_per_node N``) with more than one process in ``group``, each process
    certifies a contiguous run of blocks (:func:`shard_blocks`) and the margins are gathered on
    every process.  Every process of the group must call this function with the same arguments.

    Args:
        model: the network (eval mode, flags restored), on ``device``.
        dataset: a tensor ``[M, *input_shape]``; a ``torch.utils.data.Dataset`` (or any sequence
            with ``len`` and indexing) of example tensors ``[*input_shape]`` or of tuples
            ``(x, y)`` / ``(x, y, lengths)`` (the lengths go to the model as ``model(x, lengths)``);
            or a ``TensorDataset`` of ``(x, y[, lengths])`` tensors.  Only a process's own examples
            are read.
        p: 1, 2, ``inf`` / ``"inf"``, or a sequence of them (then a dict is returned).
        batch_size: examples per block: one certification pass, one file under ``out``, the unit of
            sharding.  Results are bitwise reproducible for a given block size.
        additional_forward_args: further arguments of the model, ``model(x, *args)`` (Captum's
            convention); for a tensor data set, tensors with one entry per example (``lengths``
            ``[M]``) are cut with the blocks.
        rounding: ``"sound"`` (default) or ``"none"``, as in :func:`rollnet.margin`.
        memory_budget: bytes of tangents held at once per process (as in :func:`rollnet.margin`).
        out: a directory for incremental results (see the module docstring): finished blocks are
            kept there, and a rerun computes only the missing ones.  ``None``: nothing is written.
        device: where blocks are certified (default: the model's device).
        progress: show a progress bar of this process's blocks (process 0 only; needs tqdm).
        group: the ``torch.distributed`` process group (default: the whole world).

    Returns:
        ``[M]`` margins in the original order on the CPU, in the certificates' dtype (the
        input's); for several ``p``, a dict ``p -> [M]`` keyed by the values given.

    Raises:
        ResumeMismatchError: ``out`` holds blocks of another model, data set, norm or block size.
        RuntimeError: under torchrun without an initialised process group, or when another
            process failed (its error is named).

    Example:
        >>> import torch, rollnet
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> x = torch.randn(10, 3)
        >>> m = rollnet.certify_dataset(net, x, p=2, batch_size=4)
        >>> torch.equal(m[:4], rollnet.margin(net, x[:4], p=2)), m.shape
        (True, torch.Size([10]))
        >>> list(rollnet.certify_dataset(net, x, p=(1, "inf"), batch_size=4))
        [1, 'inf']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    several = isinstance(p, (list, tuple))
    given: list[Norm] = list(p) if isinstance(p, (list, tuple)) else [p]  # type: ignore[list-item]
    if not given:
        raise ValueError("p must be a norm (1, 2 or inf) or a non-empty sequence of them")
    parsed = [parse_norm(v) for v in given]
    if len(set(parsed)) != len(parsed):
        raise ValueError(f"p names a norm twice: {given}")
    rounding = check_rounding(rounding)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    examples = _Examples(dataset, additional_forward_args)
    blocks = block_ranges(examples.n, batch_size)
    rank, world = _distributed(group)
    mine = shard_blocks(len(blocks), world, rank)
    names = [_NAMES[v] for v in parsed]
    run = torch.device(device) if device is not None else _model_device(model)
    certifier = _Certifier(model, tuple(_DUAL[v] for v in parsed), rounding, memory_budget, run)

    store: _Blocks | None = None
    if out is not None:
        store = _Blocks(Path(out), {
            "format": FORMAT, "version": VERSION, "model": model_fingerprint(model), "norms": names,
            "block_size": batch_size, "examples": examples.n, "blocks": len(blocks), "rounding": rounding,
        })
    if store is not None and world == 1:
        store.open()
    elif store is not None:  # every process agrees before any computes (a refusal on one is a refusal on all)
        status: Any = "ok"
        try:
            store.open()
        except (ResumeMismatchError, OSError) as err:
            status = _error(err)
        _raise_first(_agree(status, group, world))

    parts: list[list[Tensor]] = []
    status = "ok"
    try:
        parts = _certify_blocks(examples, blocks, mine, certifier, names, store, progress and rank == 0)
    except Exception as err:  # reported to every process, so that none waits for this one forever
        if world == 1:
            raise
        status = _error(err)
    local = [torch.cat(column) if column else None for column in zip(*parts, strict=True)] if parts else None
    gathered = _agree((status, local), group, world)
    _raise_first([s for s, _ in gathered])

    dtype = _result_dtype(examples, gathered)
    result: dict[Norm, Tensor] = {}
    for k, key in enumerate(given):
        pieces = [shard[k] for _, shard in gathered if shard is not None and shard[k] is not None]
        result[key] = torch.cat(pieces) if pieces else torch.empty(0, dtype=dtype)
    return result if several else result[given[0]]


def _certify_blocks(
    examples: _Examples, blocks: list[tuple[int, int]], mine: range, certify: Callable[[Tensor, tuple[Any, ...]], list[Tensor]],
    names: list[str], store: _Blocks | None, progress: bool,
) -> list[list[Tensor]]:
    """This process's blocks, loaded from ``store`` where finished, else certified (and saved)."""
    indices: Any = mine
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm ships with the train extra
            pass
        else:
            indices = tqdm(mine, desc="margins", unit="block")
    parts = []
    for index in indices:
        start, stop = blocks[index]
        x, args = examples.block(start, stop)
        inputs = _inputs_fingerprint(x, args) if store is not None else ""
        saved = store.load(index, inputs) if store is not None else None
        if saved is not None:
            parts.append([saved[name] for name in names])
            continue
        margins = certify(x, args)
        if store is not None:
            store.save(index, inputs, dict(zip(names, margins, strict=True)))
        parts.append(margins)
    return parts


def _result_dtype(examples: _Examples, gathered: list[Any]) -> torch.dtype:
    for _, shard in gathered:
        if shard:
            for t in shard:
                if t is not None:
                    return t.dtype
    if examples._tensor is not None:
        return examples._tensor.dtype
    return torch.get_default_dtype()
