"""The training loop: cross-entropy plus the optional ROLL term, checkpoints, resume.

Guarantees:

- **Held-out selection**: only the training split is trained on; the best
  checkpoint is picked on the validation split; the test split is never read.
- **Exact resume**: a run interrupted at any step boundary and resumed
  (``resume=True``) ends with bit-for-bit the same weights as an
  uninterrupted run on the same machine and device (CPU; on CUDA as far as
  its kernels are deterministic).  The batch order of epoch e is a function of
  ``(seed, e)`` only, and the checkpoint holds the optimisers' states (the main
  one and, with ``recurrent_optim``, the recurrent parameters' own), the
  random-number states, the position inside the epoch and the running sums.
- **Sequences**: a split with ``lengths`` (Japanese Vowels) is trained and
  evaluated as ``model(x, lengths)``; the ROLL term gets the lengths as the
  model's further argument, so padded steps are not neurons.
- **Ctrl-C and SIGTERM** (preemption): the first one finishes the current
  step, saves ``last.json`` at it and returns; a second one aborts at once,
  keeping the previous checkpoint.
- **Many processes** (``torchrun``; :mod:`rollnet.train.distributed`): the
  model is wrapped in DistributedDataParallel (gloo on CPU, nccl on CUDA, one
  device per process); ``batch_size`` is the global batch, each of N ranks
  takes its contiguous ``batch_size / N`` slice of the one-process batch, and
  the loss is weighted so that the gradient is the global batch's mean: the
  weights equal one process's within float tolerance (BatchNorm statistics
  are per shard, and dropout and the sampled ROLL directions are drawn per
  process, so those runs differ).  Rank 0 alone writes files; validation is
  sharded and gathered; a stop signal on any rank stops all at the same step.
- **Divergence**: a non-finite loss stops the run before the update; the last
  checkpoint (from before) is kept.
- The caller's global random state is not touched (the run uses a forked one).
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rollnet import __version__
from rollnet.data import Split
from rollnet.regularizer import ROLLLoss
from rollnet.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    atomic_write_text,
    load_manifest,
    load_tensors,
    load_weights_into,
    save_checkpoint,
)
from rollnet.train.config import (
    ConfigError,
    TrainConfig,
    config_diff,
    config_from_dict,
    config_to_dict,
)
from rollnet.train.distributed import (
    World,
    all_sum,
    barrier,
    broadcast_tensor,
    device_for,
    gather_cat,
    process_group,
    shard,
    world_from_env,
)
from rollnet.train.factory import (
    DataInfo,
    make_data,
    make_model,
    make_optimizers,
    make_regularizer,
    resolve_device,
)
from rollnet.train.interrupt import StopRequest, graceful_interrupt
from rollnet.train.metrics import MetricsLog, classify, margins, percentiles

__all__ = ["RESUMABLE_CHANGES", "StepHook", "TrainResult", "TrainerState", "TrainingDiverged", "show_progress",
           "train"]

#: config keys that may differ between a run and its resumption
RESUMABLE_CHANGES = frozenset({"epochs", "device", "progress"})

#: called after every completed step with (step number, model)
StepHook = Callable[[int, nn.Module], None]


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite."""


@dataclass
class TrainerState:
    """Where a run stands; saved in every checkpoint.

    Attributes:
        epoch: completed epochs.
        batch: batches done inside the current epoch.
        step: optimisation steps done in all.
        sums: running sums of the current epoch (``loss``, ``ce``, ``reg``, ``correct``, ``count``).
        best: the best epoch so far (``epoch``, ``step``, ``metric``, ``value``), or ``None``.
        history: one metrics record per completed epoch.
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    sums: dict[str, float] = field(default_factory=lambda: _zero_sums())
    best: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def _zero_sums() -> dict[str, float]:
    return {"loss": 0.0, "ce": 0.0, "reg": 0.0, "correct": 0.0, "count": 0.0}


@dataclass
class TrainResult:
    """How a run ended.

    Attributes:
        status: ``"finished"``, ``"interrupted"`` or ``"diverged"``.
        out_dir: the run directory.
        state: the trainer's state at the end (of the last completed step).
        last, best: manifests of the last and best checkpoints (``None`` if none was saved).
        message: a one-line summary for people.
        stop_signal: for ``"interrupted"``: ``"SIGINT"`` (Ctrl-C) or ``"SIGTERM"`` (preemption), the
            signal that stopped the run (on many processes: agreed by all ranks; SIGTERM wins).
    """

    status: str
    out_dir: Path
    state: TrainerState
    last: Path | None
    best: Path | None
    message: str
    stop_signal: str | None = None


class _Run:
    """One run's objects; :func:`train` drives it."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, device: torch.device, log: Callable[[str], None],
                 world: World | None = None) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self.device = device
        self.log = log
        self.world = world if world is not None else World()
        self.data = make_data(cfg)
        self.info = DataInfo.of(self.data)
        self.model = make_model(cfg, self.info).to(device)
        #: what the training forward calls: the model, or its DistributedDataParallel wrapper
        self.net: nn.Module = self.model
        if self.world.distributed:
            ids = [device.index] if device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.stop_signal: str | None = None
        self.optimizer, self.recurrent_optimizer = make_optimizers(cfg, self.model)
        self.roll_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.roll: ROLLLoss | None = make_regularizer(cfg, self.roll_generator)
        self.state = TrainerState()
        self.metrics = MetricsLog(out_dir / "metrics.jsonl")

    # -- checkpoint content ----------------------------------------------------
    def _content(self, record: dict[str, Any] | None, with_trainer: bool) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
        trainer: dict[str, Any] = asdict(self.state)
        tensors: dict[str, Tensor] | None = None
        if with_trainer:
            opt_tensors, opt_json = _split_optimizer_state(self.optimizer.state_dict())
            tensors = dict(opt_tensors)
            if self.recurrent_optimizer is not None:
                rec_tensors, rec_json = _split_optimizer_state(self.recurrent_optimizer.state_dict(), _RECURRENT)
                tensors.update(rec_tensors)
                trainer[_RECURRENT] = rec_json
            tensors["rng.torch"] = torch.get_rng_state()
            tensors["rng.roll"] = self.roll_generator.get_state()
            if self.device.type == "cuda":
                tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
            trainer["optimizer"] = opt_json
        else:
            trainer = {k: trainer[k] for k in ("epoch", "batch", "step", "best")}
        content = {
            "config": config_to_dict(self.cfg),
            "data": self.info.to_dict(),
            "trainer": trainer,
            "metrics": record,
            "rollnet_version": __version__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        return content, tensors

    def save(self, kind: str, record: dict[str, Any] | None) -> Path:
        for name, p in self.model.named_parameters():
            if not bool(torch.isfinite(p).all()):
                raise TrainingDiverged(f"parameter {name} holds NaN or Inf at step {self.state.step}")
        content, tensors = self._content(record, with_trainer=kind == "last")
        path = self.out_dir / f"{kind}.json"
        if self.world.is_main:  # rank 0 writes; the others wait until the checkpoint is committed
            path = save_checkpoint(self.out_dir, kind, self.state.step, weights=self.model.state_dict(),
                                   trainer_tensors=tensors, content=content)
        barrier(self.world)
        return path

    def sync_random_states(self) -> None:
        """Give every rank rank 0's random states (at epoch starts: a last batch split unevenly
        draws different amounts on different ranks)."""
        if not self.world.distributed:
            return
        wire = self.device if self.device.type == "cuda" else torch.device("cpu")
        torch.set_rng_state(broadcast_tensor(torch.get_rng_state().to(wire), self.world).cpu())
        self.roll_generator.set_state(broadcast_tensor(self.roll_generator.get_state().to(wire), self.world).cpu())
        if self.device.type == "cuda":
            cuda_state = broadcast_tensor(torch.cuda.get_rng_state(self.device).to(wire), self.world).cpu()
            torch.cuda.set_rng_state(cuda_state, self.device)

    def restore(self, checkpoint: Checkpoint) -> None:
        weights = load_tensors(checkpoint, "weights", self.device)
        load_weights_into(self.model, weights, checkpoint.path)
        tensors = load_tensors(checkpoint, "trainer", "cpu")
        trainer = checkpoint.trainer
        try:
            self.optimizer.load_state_dict(_join_optimizer_state(tensors, trainer["optimizer"], self.device))
            if self.recurrent_optimizer is not None:
                self.recurrent_optimizer.load_state_dict(
                    _join_optimizer_state(tensors, trainer[_RECURRENT], self.device, _RECURRENT)
                )
            torch.set_rng_state(tensors["rng.torch"])
            self.roll_generator.set_state(tensors["rng.roll"])
            if self.device.type == "cuda" and "rng.cuda" in tensors:
                torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
            self.state = TrainerState(
                epoch=int(trainer["epoch"]), batch=int(trainer["batch"]), step=int(trainer["step"]),
                sums={k: float(v) for k, v in trainer["sums"].items()}, best=trainer["best"],
                history=list(trainer["history"]),
            )
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{checkpoint.path} holds an incomplete trainer state: {err}") from err

    # -- one step ----------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor, lengths: Tensor | None = None, *, global_size: int | None = None,
             stop: int | None = None) -> str | None:
        """One optimisation step on this rank's shard ``x``, ``y`` of a global batch of ``global_size``.

        ``stop``: the number of the stop signal this rank received (or ``None``); on many
        processes it travels with the step's sums, and the signal agreed by all ranks is returned
        (``None``: go on).  One process returns ``None``.
        """
        args = () if lengths is None else (lengths,)
        world = self.world
        n = int(y.shape[0])
        if self.roll is not None:  # the regulariser's pass is the training forward
            reg, logits = self.roll(self.net, x, additional_forward_args=args, return_output=True)
        else:
            logits = self.net(x, *args)
            reg = logits.new_zeros(())
        ce = F.cross_entropy(logits, y) if n else logits.sum() * 0.0
        loss = ce + reg
        agreed: str | None = None
        if world.distributed:
            # one collective a step: the global sums, and the stop signals of every rank
            local = torch.tensor([float(loss.detach()) * n, float(ce.detach()) * n, float(reg.detach()) * n,
                                  float((logits.detach().argmax(dim=1) == y).sum()), float(n),
                                  float(stop == signal.SIGINT), float(stop == signal.SIGTERM)],
                                 dtype=torch.float64, device=self.device if self.device.type == "cuda" else None)
            totals = all_sum(local, world).cpu().tolist()
            count = max(totals[4], 1.0)
            values = {"loss": totals[0] / count, "ce": totals[1] / count, "reg": totals[2] / count}
            correct, b = totals[3], totals[4]
            agreed = "SIGTERM" if totals[6] > 0 else "SIGINT" if totals[5] > 0 else None
            # DDP averages the ranks' gradients: weighting each shard's mean by n_r * N / n makes it the
            # global batch's mean (the weight is exactly 1 when the shards are equal)
            size = global_size if global_size is not None else int(b)
            weight = n * world.size / size
            if weight != 1.0:
                loss = loss * weight
        else:
            values = {"loss": float(loss.detach()), "ce": float(ce.detach()), "reg": float(reg.detach())}
            correct, b = float((logits.detach().argmax(dim=1) == y).sum()), float(n)
        if not math.isfinite(values["loss"]):
            raise TrainingDiverged(
                f"loss is {values['loss']} (cross-entropy {values['ce']}, ROLL {values['reg']}) at epoch "
                f"{self.state.epoch + 1}, batch {self.state.batch + 1} (step {self.state.step + 1})"
            )
        optimizers = [o for o in (self.optimizer, self.recurrent_optimizer) if o is not None]
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in optimizers:
            o.step()
        s = self.state.sums
        for key, value in values.items():
            s[key] += value * b
        s["correct"] += correct
        s["count"] += b
        self.state.batch += 1
        self.state.step += 1
        return agreed

    def batch_order(self, epoch: int) -> Tensor:
        """The permutation of the training split for ``epoch``: a function of (seed, epoch) only."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.data.train), generator=gen)

    # -- end of epoch ------------------------------------------------------------
    def epoch_record(self, seconds: float) -> dict[str, Any]:
        cfg, s = self.cfg, self.state.sums
        n = max(s["count"], 1.0)
        val_loss, val_acc = self.classify_val()
        record: dict[str, Any] = {
            "epoch": self.state.epoch + 1,
            "step": self.state.step,
            "train_loss": s["loss"] / n,
            "train_ce": s["ce"] / n,
            "train_reg": s["reg"] / n,
            "train_acc": s["correct"] / n,
            "val_loss": val_loss,
            "val_acc": val_acc,
        }
        if cfg.val_margin_samples > 0:
            subset = self.data.val.head(cfg.val_margin_samples)
            part = _part(subset, shard(len(subset), self.world))
            radii = margins(self.model, part.x, p=2, batch_size=cfg.eval_batch_size, device=self.device,
                            memory_budget=cfg.roll.memory_budget, lengths=part.lengths)
            if self.world.distributed:  # each rank certified its contiguous part: gathered in order
                radii = gather_cat(radii.to(torch.float64), self.world, self._wire())
            record["val_margin_l2"] = {
                units: percentiles(radii * scale) for units, scale in self.info.radius_scales().items()
            }
            record["val_margin_samples"] = len(subset)
        record["train_seconds"] = seconds
        return record

    def _wire(self) -> torch.device:
        """The device collectives go through (nccl needs CUDA tensors)."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def classify_val(self) -> tuple[float, float]:
        """Validation loss and accuracy; on many processes each rank classifies its contiguous part
        and the sums are added up (every rank gets the same numbers)."""
        val = self.data.val
        if not self.world.distributed:
            return classify(self.model, val, self.cfg.eval_batch_size, self.device)
        part = _part(val, shard(len(val), self.world))
        loss, acc = classify(self.model, part, self.cfg.eval_batch_size, self.device) if len(part) else (0.0, 0.0)
        k = float(len(part))
        totals = all_sum(torch.tensor([loss * k, acc * k, k], dtype=torch.float64, device=self._wire()),
                         self.world).cpu().tolist()
        if totals[2] == 0:
            return math.nan, math.nan
        return totals[0] / totals[2], totals[1] / totals[2]

    def improved(self, record: dict[str, Any]) -> bool:
        metric = self.cfg.select_on
        value = float(record[metric])
        if math.isnan(value):
            return False
        best = self.state.best
        if best is None or best["metric"] != metric:
            return True
        return value > best["value"] if metric == "val_acc" else value < best["value"]

    def describe(self, record: dict[str, Any], is_best: bool) -> str:
        text = (
            f"epoch {record['epoch']}/{self.cfg.epochs} step {record['step']} | train loss "
            f"{record['train_loss']:.4f} (ce {record['train_ce']:.4f} + roll {record['train_reg']:.4f}) "
            f"acc {record['train_acc']:.2%} | val loss {record['val_loss']:.4f} acc {record['val_acc']:.2%}"
        )
        if "val_margin_l2" in record:
            units = self.info.model_units
            text += f" | val l2 margin P50 {record['val_margin_l2'][units]['P50']:.3g} ({units})"
        text += f" | {record['seconds']:.1f}s" + (" *best*" if is_best else "")
        return text


def _part(split: Split, where: slice) -> Split:
    """The examples ``where`` of ``split`` (with their lengths)."""
    lengths = None if split.lengths is None else split.lengths[where]
    return Split(split.x[where], split.y[where], lengths=lengths)


def _format_metric(metric: str, value: float) -> str:
    """``val_acc 91.2%``; losses as numbers.

    >>> _format_metric("val_acc", 0.9125), _format_metric("val_loss", 0.31234)
    ('val_acc 91.2%', 'val_loss 0.3123')
    """
    return f"{metric} {value:.1%}" if metric.endswith("acc") else f"{metric} {value:.4g}"


#: prefix of the recurrent optimiser's tensors in the trainer file, and its key in the manifest
_RECURRENT = "recurrent_optimizer"


def _split_optimizer_state(sd: dict[str, Any], prefix: str = "optimizer") -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for idx, entries in sd["state"].items():
        for name, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}.{idx}.{name}"] = value
            else:
                plain.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "state": plain}


def _join_optimizer_state(
    tensors: dict[str, Tensor], meta: dict[str, Any], device: torch.device, prefix: str = "optimizer"
) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for idx, entries in meta["state"].items():
        state.setdefault(int(idx), {}).update(entries)
    for key, value in tensors.items():
        if key.startswith(f"{prefix}."):
            _, idx, name = key.split(".", 2)
            # Adam keeps its step counter on the CPU; everything else lives with the parameters.
            state.setdefault(int(idx), {})[name] = value if name == "step" else value.to(device)
    return {"state": state, "param_groups": meta["param_groups"]}


def show_progress(setting: bool | str) -> bool:
    """Whether the config's ``progress`` draws tqdm bars: ``"auto"`` (the default) when stderr is
    a terminal, so logs written to files hold no bars.

    >>> show_progress(True), show_progress(False)
    (True, False)
    """
    if setting == "auto":
        return sys.stderr.isatty()
    return bool(setting)


def _default_log(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stdout)


def _open_run(cfg: TrainConfig, out_dir: Path, resume: bool) -> Checkpoint | None:
    last = out_dir / "last.json"
    if not resume:
        if last.exists() or (out_dir / "best.json").exists():
            raise ConfigError(
                f"{out_dir} already holds a run; pass --resume to continue it, or --out to start a new one elsewhere"
            )
        return None
    if not last.exists():
        raise CheckpointError(f"nothing to resume: {last} does not exist")
    checkpoint = load_manifest(last)
    try:
        saved = config_from_dict(checkpoint.config)
    except ConfigError as err:
        raise CheckpointError(f"{last} holds an invalid config: {err}") from err
    diff = {k: v for k, v in config_diff(saved, cfg).items() if k not in RESUMABLE_CHANGES}
    if diff:
        changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ConfigError(
            f"cannot resume {out_dir} with a different config ({changes}); only "
            f"{sorted(RESUMABLE_CHANGES)} may change"
        )
    return checkpoint


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    on_step: StepHook | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train the configured model; write checkpoints and ``metrics.jsonl`` under ``out_dir``.

    Args:
        cfg: the configuration.
        out_dir: run directory; must not hold a run unless ``resume``.
        resume: continue the run in ``out_dir`` from its ``last.json`` (the
            config must match, except for ``epochs``, ``device`` and ``progress``).
        on_step: called after every completed step with ``(step, model)``.
        log: receives one line per epoch and status messages (default: stdout).

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment, or a process group
    the caller initialised) every process calls this: it joins the group (gloo
    on CPU, nccl on CUDA, one GPU per process), trains on its share of each
    global batch of ``cfg.batch_size`` and returns the same result; rank 0 alone
    writes ``out_dir`` and logs.

    Returns:
        A :class:`TrainResult`; ``status`` says whether the run finished, was
        interrupted (Ctrl-C or SIGTERM: ``stop_signal``) or diverged.

    Raises:
        ConfigError: bad configuration, ``out_dir`` already holds a run, or a
            ``batch_size`` the number of processes does not divide.
        CheckpointError: ``resume`` with a missing, damaged or mismatched checkpoint.

    Example:
        >>> import tempfile
        >>> from rollnet.train import TrainConfig, apply_overrides
        >>> cfg = apply_overrides(TrainConfig(), ["data.name=moons", "data.n=200", "model.hidden=[8]",
        ...                                       "epochs=1", "progress=false", "val_margin_samples=0"])
        >>> train(cfg, tempfile.mkdtemp(), log=lambda m: None).status
        'finished'
    """
    out = Path(out_dir)
    world = world_from_env()
    if cfg.batch_size % world.size:
        raise ConfigError(f"batch_size {cfg.batch_size} is the global batch and must be divisible by the "
                          f"{world.size} processes (each takes batch_size / {world.size} examples a step)")
    device = device_for(resolve_device(cfg.device), world)
    emit = (log or _default_log) if world.is_main else _quiet
    with process_group(device, world):
        checkpoint = _open_run(cfg, out, resume)
        barrier(world)  # every rank has looked at out_dir before rank 0 writes into it
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed)
            return _start(cfg, out, device, emit, world, checkpoint, on_step)


def _quiet(message: str) -> None:
    """The log of ranks other than 0."""


def _start(cfg: TrainConfig, out: Path, device: torch.device, emit: Callable[[str], None], world: World,
           checkpoint: Checkpoint | None, on_step: StepHook | None) -> TrainResult:
    """Build the run, restore or initialise it, and train (inside the forked random state)."""
    run = _Run(cfg, out, device, emit, world)
    if checkpoint is not None:
        if checkpoint.data != run.info.to_dict():
            raise CheckpointError(
                f"{checkpoint.path} was trained on data {checkpoint.data}, but the config now gives {run.info.to_dict()}"
            )
        run.restore(checkpoint)
        if world.is_main:
            run.metrics.rewrite(run.state.history)
        emit(f"resuming {out} at epoch {run.state.epoch + 1}, batch {run.state.batch} (step {run.state.step})")
    else:
        if world.is_main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "config.json", _json(config_to_dict(cfg)))
            run.metrics.rewrite([])
        n_params = sum(p.numel() for p in run.model.parameters())
        where = f"{device}" if not world.distributed else f"{world.size} processes ({device.type})"
        emit(f"training {cfg.name} -> {out} on {where}: {run.data.source}; {n_params:,} parameters; "
             f"{'ROLL ' + repr(run.roll) if run.roll is not None else 'vanilla'}")
    return _loop(run, on_step, resume_from=checkpoint)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, indent=1) + "\n"


def _loop(run: _Run, on_step: StepHook | None, resume_from: Checkpoint | None) -> TrainResult:
    from tqdm import tqdm

    cfg, state = run.cfg, run.state
    last: Path | None = resume_from.path if resume_from is not None else None
    best: Path | None = run.out_dir / "best.json" if (run.out_dir / "best.json").is_file() else None
    train_split = run.data.train
    n_batches = math.ceil(len(train_split) / cfg.batch_size)
    consistent = True
    world = run.world
    bars = show_progress(cfg.progress) and world.is_main
    notice = "finishing this step, then saving a checkpoint (a second Ctrl-C or SIGTERM aborts without saving)"
    stop: StopRequest | None = None
    try:
        with graceful_interrupt(notice) as stop:
            while state.epoch < cfg.epochs:
                started = time.perf_counter()
                order = run.batch_order(state.epoch)
                run.sync_random_states()
                run.model.train()
                bar = tqdm(total=n_batches, initial=state.batch, desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
                           disable=not bars, leave=False, dynamic_ncols=True)
                with bar:
                    while state.batch < n_batches:
                        if stop.requested and not world.distributed:  # (many: agreed inside the step)
                            run.stop_signal = stop.name
                            raise KeyboardInterrupt
                        idx = order[state.batch * cfg.batch_size : (state.batch + 1) * cfg.batch_size]
                        n_global = int(idx.shape[0])
                        idx = idx[shard(n_global, world)]  # this rank's contiguous slice of the global batch
                        x = train_split.x[idx].to(run.device)
                        y = train_split.y[idx].to(run.device)
                        lengths = None if train_split.lengths is None else train_split.lengths[idx].to(run.device)
                        consistent = False
                        agreed = run.step(x, y, lengths, global_size=n_global, stop=stop.signum)
                        consistent = True
                        bar.update(1)
                        if bars:
                            bar.set_postfix(loss=f"{state.sums['loss'] / max(state.sums['count'], 1):.4f}")
                        if on_step is not None:
                            on_step(state.step, run.model)
                        if world.distributed:
                            if agreed is not None:
                                run.stop_signal = agreed
                                raise KeyboardInterrupt
                        elif stop.requested:
                            run.stop_signal = stop.name
                            raise KeyboardInterrupt
                        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.batch < n_batches:
                            last = run.save("last", None)
                record = run.epoch_record(time.perf_counter() - started)
                record["seconds"] = time.perf_counter() - started
                is_best = run.improved(record)
                state.history.append(record)
                state.epoch += 1
                state.batch = 0
                state.sums = _zero_sums()
                if is_best:
                    state.best = {"epoch": record["epoch"], "step": state.step, "metric": cfg.select_on,
                                  "value": float(record[cfg.select_on])}
                if is_best:  # best first: an interruption in between then leaves both consistent
                    best = run.save("best", record)
                last = run.save("last", record)
                if world.is_main:
                    run.metrics.append(record)
                run.log(run.describe(record, is_best))
    except KeyboardInterrupt:
        where = f"epoch {state.epoch + 1}, batch {state.batch} (step {state.step})"
        if run.stop_signal is not None:
            where += " by Ctrl-C" if run.stop_signal == "SIGINT" else f" by {run.stop_signal}"
        if consistent:
            try:
                last = run.save("last", None)
                message = f"interrupted at {where}; saved {last}; continue with --resume"
            except TrainingDiverged as err:
                message = f"interrupted at {where}; not saved ({err}); kept the previous checkpoint {last}"
        else:
            message = f"aborted during a step at {where}; kept the previous checkpoint {last}"
        run.log(message)
        return TrainResult("interrupted", run.out_dir, state, last, best, message,
                           run.stop_signal or (stop.name if stop is not None else None))
    except TrainingDiverged as err:
        kept = f"kept the last good checkpoint {last}" if last is not None else "no checkpoint had been saved yet"
        message = f"training diverged: {err}; stopped, {kept}"
        run.log(message)
        return TrainResult("diverged", run.out_dir, state, last, best, message)
    summary = "finished"
    if state.best is not None:
        summary += (f": best epoch {state.best['epoch']} ({_format_metric(state.best['metric'], state.best['value'])}), "
                    f"checkpoint {best}")
    run.log(summary)
    return TrainResult("finished", run.out_dir, state, last, best, summary)
