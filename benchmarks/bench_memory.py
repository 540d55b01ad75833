"""Peak memory against ``memory_budget``: a smaller budget must never cost more memory.

Run: .venv/bin/python benchmarks/bench_memory.py [--inputs 5000] [--p 2] [--rounding none] [--device cuda]

For each budget (16, 64, 256 MiB and the default), a fresh Python process
builds a 784-300x3-10 ReLU MLP and ``--inputs`` MNIST-sized inputs (seeded),
then runs ``rollnet.margin(model, x, p)`` once.  Reported per budget: the
peak resident set of that process (VmHWM from /proc/self/status) and the
part of it the margin call added, the wall and CPU time of the call, all as
ratios to the default-budget run; on a GPU also the peak GPU memory
allocated.  The last column is the largest relative difference of the margins
from the default run's: chunks of other sizes round differently (even the
model's own forward does), so it is rounding-level, not zero.

``--rounding none`` (the default here) certifies in the input's float32, as
the engine itself works; ``--rounding sound`` is ``margin``'s own default,
which runs a float64 copy of the model (twice the bytes per example).

p = 2 on this MLP takes the Gram path (squared norms by the Gram recursion,
the exact ROLL term's path too); p = 1 or inf propagates gradient rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
MIB = 2**20

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {bench!r})
import torch, rollnet
from common import PaperMLP, use_device

def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            return int(line.split()[1]) / 1024
    raise RuntimeError('no VmHWM')

device = use_device({device!r})
torch.manual_seed(0)
model = PaperMLP(widths=(300, 300, 300)).eval()
x = torch.rand({n}, 1, 28, 28)
p = {p!r}
rollnet.margin(model, x[:8], p=p, rounding={rounding!r})  # warm-up: import-time and first-call allocations
if device.type == 'cuda':
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
gpu_before = torch.cuda.memory_allocated() if device.type == 'cuda' else 0
def cpu():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime

before = hwm()
t0, c0 = time.perf_counter(), cpu()
r = rollnet.margin(model, x, p=p, memory_budget={budget}, rounding={rounding!r})
if device.type == 'cuda':
    torch.cuda.synchronize()
seconds, cpu_seconds = time.perf_counter() - t0, cpu() - c0
gpu_peak = torch.cuda.max_memory_allocated() if device.type == 'cuda' else 0
torch.save(r.cpu(), {out!r})
print(json.dumps(dict(before=before, peak=hwm(), seconds=seconds, cpu=cpu_seconds,
                      gpu_before=gpu_before / 2**20, gpu_peak=gpu_peak / 2**20)))
"""


def run_child(n: int, p: float, budget: int | None, device: str, rounding: str, out: Path) -> dict[str, Any]:
    code = CHILD.format(bench=str(HERE), device=device, n=n, p=p, budget=budget, rounding=rounding, out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=HERE.parent)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["margins"] = torch.load(out)
    return result


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    finite = torch.isfinite(b) & (b != 0)
    if bool((torch.isfinite(a) != torch.isfinite(b)).any()):
        return float("inf")
    return float(((a - b)[finite] / b[finite]).abs().max()) if bool(finite.any()) else 0.0


def label(budget: int | None) -> str:
    return "default" if budget is None else f"{budget // MIB} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inputs", type=int, default=5000)
    parser.add_argument("--p", default="2", help="1, 2 or inf (default 2: the Gram path)")
    parser.add_argument("--budgets", default="16,64,256", help="MiB, comma-separated (the default is added)")
    parser.add_argument("--rounding", default="none", choices=["none", "sound"])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    args = parser.parse_args()
    p = float(args.p)
    budgets: list[int | None] = [int(b) * MIB for b in args.budgets.split(",") if b]
    budgets.append(None)

    sys.path.insert(0, str(HERE))
    from common import machine, table

    print(f"machine: {machine()}\n")
    with tempfile.TemporaryDirectory() as tmp:
        results = {b: run_child(args.inputs, p, b, args.device, args.rounding, Path(tmp) / f"{i}.pt")
                   for i, b in enumerate(budgets)}
    ref = results[None]
    gpu = args.device.startswith("cuda")
    header = ["memory_budget", "peak RSS", "x default", "added by margin()", "x default", "time", "x default",
              "CPU time", "x default", "max rel. diff"]
    if gpu:
        header[1:1] = ["peak GPU", "x default"]
    rows = []
    for b, r in results.items():
        added = float(r["peak"]) - float(r["before"])
        ref_added = float(ref["peak"]) - float(ref["before"])
        row = [
            label(b),
            f"{float(r['peak']):.0f} MiB", f"{float(r['peak']) / float(ref['peak']):.2f}",
            f"{added:.0f} MiB", f"{added / max(ref_added, 1.0):.2f}",
            f"{float(r['seconds']):.1f} s", f"{float(r['seconds']) / float(ref['seconds']):.2f}",
            f"{float(r['cpu']):.1f} s", f"{float(r['cpu']) / float(ref['cpu']):.2f}",
            f"{rel_diff(r['margins'], ref['margins']):.1e}",
        ]
        if gpu:
            row[1:1] = [f"{float(r['gpu_peak']):.0f} MiB", f"{float(r['gpu_peak']) / float(ref['gpu_peak']):.2f}"]
        rows.append(row)
    title = (f"peak memory against memory_budget: margin(p={args.p}, rounding={args.rounding!r}), "
             f"784-300x3-10 MLP, {args.inputs:,} inputs, {args.device}")
    print(table(title, header, rows))
    before = float(ref["before"])
    print(f"(each run in a fresh process; {before:.0f} MiB resident before the call: torch, the model, "
          f"the inputs and a warm-up call on 8 of them)")


if __name__ == "__main__":
    main()
