"""Run under torchrun by tests/train/test_distributed.py (not a test module itself).

``ddp_worker.py train CONFIG OUT [--resume] [--sigterm-rank R --sigterm-step S]``: ``rollnet train``,
with rank R sending itself SIGTERM once its step S is done (a preempted rank); with rank -1, rank 0
sends it to its parent, torchrun, which forwards it to every rank (a preempted job).  Each rank
prints the metrics history it ends with (``history of rank R: [...]``) and the number of examples
it trained on in each step (``shard sizes of rank R: [...]``).

``ddp_worker.py grads``: checks on 2 ranks that the fused chain pass of ROLLLoss through a
DistributedDataParallel model (``return_output=True``) all-reduces the gradients: every rank ends
with the mean of the ranks' own gradients.
"""

from __future__ import annotations

import os
import signal
import sys


def say(line: str) -> None:
    """One line in one write: the ranks share stdout (unbuffered, print() would write the text and
    its newline separately, and another rank's line could land in between)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _train(argv: list[str]) -> int:
    rank = int(os.environ["RANK"])
    if "--sigterm-rank" in argv:
        i = argv.index("--sigterm-rank")
        who, when = int(argv[i + 1]), int(argv[i + 3])
        argv = argv[:i] + argv[i + 4:]
        if rank == max(who, 0):
            import rollnet.train.trainer as trainer

            real = trainer._Run.step

            def step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
                out = real(self, *args, **kwargs)
                if self.state.step == when:
                    os.kill(os.getpid() if who >= 0 else os.getppid(), signal.SIGTERM)
                return out

            trainer._Run.step = step  # type: ignore[method-assign]
    import json

    import rollnet.train
    import rollnet.train.trainer as trainer_module
    from rollnet.cli import main

    sizes: list[int] = []
    counted = trainer_module._Run.step

    def count(self, x, *args, **kwargs):  # type: ignore[no-untyped-def]
        sizes.append(int(x.shape[0]))
        return counted(self, x, *args, **kwargs)

    trainer_module._Run.step = count  # type: ignore[method-assign]

    real_train = rollnet.train.train

    def train(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = real_train(*args, **kwargs)
        # what this rank computed (every rank must get the same validation metrics)
        history = [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in result.state.history]
        say(f"history of rank {rank}: {json.dumps(history, sort_keys=True)}")
        say(f"shard sizes of rank {rank}: {json.dumps(sizes)}")
        return result

    rollnet.train.train = train
    config, out, *rest = argv
    return main(["train", config, "--out", out, *rest])


def _grads() -> int:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    from rollnet.regularizer import ROLLLoss
    from rollnet.regularizer.chain import find_chain

    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    ddp = nn.parallel.DistributedDataParallel(model)
    assert find_chain(ddp) is not None, "the chain detection does not see through DDP"
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(100 + rank))  # each rank its own shard
    y = torch.randint(0, 2, (6,), generator=torch.Generator().manual_seed(200 + rank))
    roll = ROLLLoss(lam=1.0, C=1.0, approx=3, estimator="axes", generator=torch.Generator().manual_seed(7))
    assert roll.fused
    # the rank's own gradient, without DDP (same random directions: a fresh generator of the same seed)
    own = ROLLLoss(lam=1.0, C=1.0, approx=3, estimator="axes", generator=torch.Generator().manual_seed(7))
    reg, logits = own(model, x, return_output=True)
    (F.cross_entropy(logits, y) + reg).backward()
    local = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    reg, logits = roll(ddp, x, return_output=True)
    (F.cross_entropy(logits, y) + reg).backward()
    for mine, p in zip(local, model.parameters(), strict=True):
        total = mine.clone()
        dist.all_reduce(total)
        assert torch.allclose(p.grad, total / size, atol=1e-6), "the gradients were not all-reduced"
        assert not torch.allclose(mine, total / size), "the shards' gradients should differ"
    # DDP's reducer holds the process group: drop it first, or its destructor runs at exit after
    # the group is gone and gloo aborts ("terminate called without an active exception", seen once)
    del ddp, roll
    dist.barrier()
    dist.destroy_process_group()
    say(f"rank {rank}: gradients all-reduced")
    return 0


if __name__ == "__main__":
    what, *rest = sys.argv[1:]
    code = _train(rest) if what == "train" else _grads()
    sys.stdout.flush()
    sys.stderr.flush()
    # skip the interpreter's teardown: gloo threads torn down there abort now and then
    # ("terminate called without an active exception", SIGABRT after both ranks had finished)
    os._exit(code)
