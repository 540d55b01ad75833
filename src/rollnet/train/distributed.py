"""Process-group helpers for training on many processes with torchrun and DistributedDataParallel.

torchrun starts one process per device and tells each, in its environment,
its ``RANK``, ``LOCAL_RANK`` and the ``WORLD_SIZE``; :func:`process_group`
joins that group (gloo on CPU, nccl on CUDA) for the duration of a run.  A
process started without torchrun (or with one process) is a world of one, and
every helper here is then a no-op, so the trainer has one code path.

The helpers are collective: every rank must call them in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from rollnet.train.config import ConfigError

__all__ = ["World", "all_sum", "barrier", "broadcast_tensor", "gather_cat", "process_group",
           "shard", "world_from_env"]


@dataclass(frozen=True)
class World:
    """Where this process stands among the run's processes.

    Attributes:
        rank: this process's number, ``0 .. size - 1`` (rank 0 writes the run's files).
        size: the number of processes (1 without torchrun).
        local_rank: the number among the processes of this machine (picks the GPU).

    >>> World().is_main, World().distributed
    (True, False)
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether there is more than one process (collectives communicate)."""
        return self.size > 1


def world_from_env() -> World:
    """The :class:`World` torchrun's environment variables describe (a world of one without them),
    or that of a process group the caller already initialised.

    Returns:
        ``World(RANK, WORLD_SIZE, LOCAL_RANK)``.

    Raises:
        ConfigError: the variables are malformed.

    >>> world_from_env().size >= 1
    True
    """
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return World(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", str(rank))))
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise ConfigError(f"malformed torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK): {err}") from err
    if size < 1 or not 0 <= rank < size or local < 0:
        raise ConfigError(f"malformed torchrun environment: RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local}")
    return World(rank, size, local)


def device_for(requested: torch.device, world: World) -> torch.device:
    """The device of this process: ``requested``, or on CUDA with several processes ``cuda:LOCAL_RANK``.

    Args:
        requested: the config's device (``cpu``, ``cuda`` or ``cuda:N``).
        world: this process's place.

    Returns:
        The device this process computes on (one device per process).

    Raises:
        ConfigError: ``cuda:N`` with several processes (each process takes its own GPU), or more
            processes on a machine than it has GPUs.

    >>> device_for(torch.device("cpu"), World(1, 2, 1))
    device(type='cpu')
    """
    if requested.type != "cuda" or not world.distributed:
        return requested
    if requested.index is not None:
        raise ConfigError(f"device {str(requested)!r} with {world.size} processes: say 'cuda', and each process "
                          "takes the GPU of its LOCAL_RANK")
    if world.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK {world.local_rank} but this machine has {torch.cuda.device_count()} GPU(s): "
                          "start at most one process per GPU (torchrun --nproc_per_node)")
    return torch.device("cuda", world.local_rank)


@contextmanager
def process_group(device: torch.device, world: World | None = None) -> Iterator[World]:
    """Join torchrun's process group for the duration (gloo on CPU, nccl on CUDA).

    With one process nothing is initialised.  A group that is already
    initialised (by the caller) is used as it is and left open.

    Args:
        device: the device this process computes on.
        world: this process's place (default: :func:`world_from_env`).

    Returns:
        A context manager yielding the :class:`World`.

    >>> with process_group(torch.device("cpu"), World()) as w:
    ...     w.size
    1
    """
    world = world if world is not None else world_from_env()
    if not world.distributed:
        yield world
        return
    if dist.is_initialized():
        if dist.get_world_size() != world.size or dist.get_rank() != world.rank:
            raise ConfigError(f"the initialised process group (rank {dist.get_rank()} of {dist.get_world_size()}) "
                              f"is not torchrun's (rank {world.rank} of {world.size})")
        yield world
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield world
    finally:
        dist.destroy_process_group()


def shard(n: int, world: World) -> slice:
    """This rank's contiguous part of ``n`` items in order (``torch.tensor_split``'s division:
    the first ``n % size`` ranks take one more).

    >>> [shard(5, World(r, 2)) for r in range(2)]
    [slice(0, 3, None), slice(3, 5, None)]
    """
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return slice(start, start + base + (1 if world.rank < extra else 0))


def all_sum(values: Tensor, world: World) -> Tensor:
    """The sum of ``values`` over all ranks (a new tensor; ``values`` itself with one process).

    >>> all_sum(torch.tensor([1.0, 2.0]), World())
    tensor([1., 2.])
    """
    if not world.distributed:
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_tensor(t: Tensor, world: World) -> Tensor:
    """Rank 0's ``t`` on every rank (in place; same shape and dtype everywhere).

    >>> broadcast_tensor(torch.tensor([3]), World())
    tensor([3])
    """
    if world.distributed:
        dist.broadcast(t, src=0)
    return t


def gather_cat(part: Tensor, world: World, device: torch.device) -> Tensor:
    """Every rank's ``part`` ``[n_r, ...]`` concatenated in rank order, on every rank (on the CPU).

    Parts may differ in length (not in trailing shape or dtype).  Communication goes through
    ``device`` (a CUDA one for nccl).

    >>> gather_cat(torch.arange(3), World(), torch.device("cpu"))
    tensor([0, 1, 2])
    """
    if not world.distributed:
        return part.cpu()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world.size)]
    dist.all_gather(sizes, torch.tensor([part.shape[0]], dtype=torch.int64, device=device))
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = torch.zeros((longest, *part.shape[1:]), dtype=part.dtype, device=device)
    padded[: part.shape[0]] = part.to(device)
    pieces = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(pieces, padded)
    return torch.cat([p[:c].cpu() for p, c in zip(pieces, counts, strict=True)])


def barrier(world: World) -> None:
    """Wait until every rank arrives (a no-op with one process)."""
    if world.distributed:
        dist.barrier()
