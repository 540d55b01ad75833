"""``--jobs N``: N local worker processes on one storage, the machine's cores shared between them.

Each worker gets ``cores // N`` of torch's intra-op threads (at least one), where
``cores`` is the number of CPUs this process may run on.  The workers run in
their own process group: a Ctrl-C or SIGTERM to the sweep is forwarded to each
worker once, so each running trial saves a checkpoint and is queued again.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from rollnet.sweep.study import Sweep, open_study
from rollnet.sweep.worker import WorkerOutcome, run_worker

__all__ = ["cores", "run_jobs", "threads_per_job"]


def cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def threads_per_job(jobs: int) -> int:
    """torch threads of each of ``jobs`` workers: the cores split evenly, at least one.

    >>> threads_per_job(1) == cores()
    True
    """
    return max(1, cores() // jobs)


def _worker_main(sweep: Sweep, threads: int, queue: Any) -> None:
    import optuna

    os.setpgrp()  # the parent forwards signals exactly once
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    outcome = run_worker(sweep, threads=threads)
    queue.put((os.getpid(), outcome.status, outcome.signal_name, outcome.ran))


def run_jobs(sweep: Sweep, jobs: int, *, say: Callable[[str], None] | None = None) -> WorkerOutcome:
    """Run the sweep with ``jobs`` workers (in this process when ``jobs == 1``) and wait for them.

    Returns:
        ``"done"``, or ``"stopped"`` with the signal when a worker was stopped.
    """
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    threads = threads_per_job(jobs)
    say = say or (lambda m: print(m, file=sys.stderr, flush=True))
    open_study(sweep)  # create it (and check it) once, before the workers start
    if jobs == 1:
        return run_worker(sweep, threads=threads, say=say)
    say(f"{jobs} workers, {threads} thread{'s' if threads > 1 else ''} each ({cores()} cores)")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(sweep, threads, queue), daemon=False) for _ in range(jobs)]
    for p in procs:
        p.start()
    forwarded: set[int] = set()

    def forward(signum: int, frame: Any) -> None:
        if signum in forwarded:
            return
        forwarded.add(signum)
        say(f"{signal.Signals(signum).name}: asking the {jobs} workers to stop after saving their runs")
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for p in procs:
            p.join()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    outcomes = []
    while not queue.empty():
        outcomes.append(queue.get())
    stopped = [o for o in outcomes if o[1] == "stopped"]
    lost = [p for p in procs if p.exitcode not in (0, None)]
    if stopped or forwarded:
        name = stopped[0][2] if stopped else signal.Signals(min(forwarded)).name
        return WorkerOutcome("stopped", name, ran=sum(o[3] for o in outcomes))
    if lost:
        raise RuntimeError(f"{len(lost)} of the {jobs} workers died (exit codes "
                           f"{', '.join(str(p.exitcode) for p in lost)}); rerun the sweep to continue")
    return WorkerOutcome("done", ran=sum(o[3] for o in outcomes))
