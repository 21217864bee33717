"""The pre-training loop: accumulation, clipping, schedule, validation, checkpoints, exact resume.

Exact resume rests on three facts: the data position is one integer (the next sample index of a
seeded window loader), the learning rate is a pure function of the step, and the checkpoint holds the
model, the optimizer and the RNG state. A resumed run therefore replays the uninterrupted one.
The progressive schedules (sequence length, micro-batch size, depth) are pure functions of the step
too; a checkpoint of a run that grows its depth records the depth it was saved at.

The same loop runs in one process or across a torchrun launch: a runner (`runners.py`) says which
samples this process trains on, how the loss and gradients are reduced and how checkpoints are kept.
A stability guard (`guards.py`) checks every step's loss and gradient norm before the weights move: a
non-finite value or a loss spike drops the step, rolls back to the last checkpoint and skips the
offending batches, each intervention logged as an event in the metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
from pydantic import ConfigDict, Field, model_validator

from lmloom.config import StrictConfig
from lmloom.monitor.metrics import JsonlMetrics
from lmloom.train.checkpoint import CheckpointCodecs, TrainState
from lmloom.train.guards import ParamSnapshot, StabilityGuard, StabilityMonitor
from lmloom.train.heap import keep_freed_memory
from lmloom.train.optim import OptimConfig, build_optimizer, lr_at
from lmloom.train.progressive import (
    BatchSizeRamp,
    DepthGrowth,
    SeqLenWarmup,
    batch_size_at,
    depth_at,
    depth_sizes,
    grow_optimizer,
    seq_len_at,
    stack_layers,
)
from lmloom.train.runners import LocalRunner, autocast


class LoopConfig(StrictConfig):
    # Every training stage's numbers: `.inf` passes `gt=0` (DPO's beta, GRPO's temperature) and would
    # only fail after the stability guard's rollbacks, blamed on the learning rate.
    model_config = ConfigDict(allow_inf_nan=False)

    batch_size: int = Field(16, ge=1, description="sequences per micro-batch (after any batch_size_ramp)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_steps: int = Field(300, ge=1, description="optimizer steps")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "bf16", description="bf16/fp16 = autocast on fp32 master weights (fp16 with a gradient scaler)"
    )
    compile: bool = Field(True, description="torch.compile the model for training")
    eval_every: int = Field(100, ge=1, description="steps between validation passes")
    eval_windows: int = Field(64, ge=1, description="validation windows per periodic pass")
    final_eval_windows: int = Field(512, ge=1, description="validation windows in the final pass")
    checkpoint_every: int = Field(50, ge=1, description="steps between resumable checkpoints")
    log_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    optim: OptimConfig = OptimConfig()
    seq_len_warmup: SeqLenWarmup = Field(
        default_factory=SeqLenWarmup, description="progressive training: grow the sequence length"
    )
    batch_size_ramp: BatchSizeRamp = Field(
        default_factory=BatchSizeRamp,
        description="progressive training: grow the micro-batch from start to batch_size sequences",
    )
    guard: StabilityGuard = Field(
        default_factory=StabilityGuard,
        description="roll back and skip the batch on a non-finite loss/gradient or a loss spike",
    )

    @model_validator(mode="after")
    def _ramp_grows(self) -> LoopConfig:
        ramp = self.batch_size_ramp  # batch_size_at ignores a ramp that does not grow: say so instead
        if ramp.steps and ramp.start >= self.batch_size:
            raise ValueError(
                f"batch_size_ramp.start = {ramp.start} is not below batch_size = {self.batch_size}, so "
                "there is nothing to ramp; lower start or leave batch_size_ramp out"
            )
        return self


class BatchSource(Protocol):
    def batch(self, start_sample: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class LoopResult:
    state: TrainState
    train_loss: float  # mean loss of the last optimizer step
    val_loss: float | None  # over final_eval_windows, after the last step
    tokens_per_s: float  # steady state, compile warm-up excluded
    seconds: float
    resumed_from: int  # step the run resumed from (0 = fresh)
    model: torch.nn.Module | None = None  # the trained model: a new, deeper one after depth growth


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], precision: str
) -> float:
    """Token-weighted mean cross-entropy over the given validation batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        with autocast(precision, x.device.type):
            loss = model(x, y)
        n = int((y != -100).sum())
        total += float(loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def train_loop(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: BatchSource,
    val_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    cfg: LoopConfig,
    seq_len: int,
    checkpoint_dir: Path,
    metrics: JsonlMetrics,
    progress=None,
    log: Callable[[str], None] = print,  # progress lines every log_every steps
    checkpoint_codecs: CheckpointCodecs | None = None,  # set when the run encrypts at rest
    depth_growth: DepthGrowth | None = None,  # grow a Decoder by stacking, up to `n_layers`
    n_layers: int | None = None,
    runner=None,  # a runners.ParallelRunner under torchrun; default: this one process
) -> LoopResult:
    """Train to `cfg.max_steps`, resuming from the newest checkpoint in `checkpoint_dir` if any.

    With `depth_growth`, `model` is the shallow `Decoder` of step 0 and each growth replaces the model
    (and the optimizer, rebuilt by `build_optimizer(model, cfg.optim)` with the moments carried over):
    use `LoopResult.model`, not the model passed in, after the loop.
    """
    if next(model.parameters()).device.type == "cpu":
        keep_freed_memory()  # glibc would hand each step's activations back to the kernel (heap.py)
    runner = runner or LocalRunner(checkpoint_dir, checkpoint_codecs)
    growing = depth_growth is not None and depth_growth.enabled
    if growing and runner.distributed:
        raise ValueError("depth growth is not supported under torchrun yet")
    if growing:
        if n_layers is None:
            raise ValueError("depth_growth needs n_layers, the depth the last growth reaches")
        sizes = depth_sizes(n_layers, depth_growth)
    state = TrainState()
    monitor = StabilityMonitor(cfg.guard)
    latest = runner.latest()
    if latest is not None:
        if growing:  # build the model at the depth the checkpoint was saved at, then load it
            saved = runner.saved_depth(latest)
            if saved not in sizes or saved < model.config.n_layers:
                raise ValueError(
                    f"checkpoint {latest} has depth {saved}; this run's depth growth goes through {sizes}"
                )
            if saved != model.config.n_layers:
                model = stack_layers(model, saved)  # the shape; the weights come from the checkpoint
                optimizer = build_optimizer(model, cfg.optim)
        state = runner.load(latest, model, optimizer)
        monitor.load_state_dict((state.extra or {}).get("guard") or {})
        metrics.truncate_after(state.step)
        log(f"resuming from {latest.name} (step {state.step}, sample {state.sample})")
    else:  # a fresh start: whatever an earlier run logged here died with it (it left no checkpoint)
        metrics.truncate_after(-1)
    resumed_from = state.step
    if cfg.optim.warmup_steps > cfg.max_steps and resumed_from == 0:  # allowed (short runs), but say so
        log(
            f"note: optim.warmup_steps ({cfg.optim.warmup_steps}) is longer than max_steps ({cfg.max_steps}): "
            f"the learning rate ends at {cfg.max_steps / cfg.optim.warmup_steps:.0%} of optim.lr"
        )
    last = state.extra or {}
    train_loss, val_loss = last.get("train_loss", math.nan), last.get("val_loss")
    # Under torchrun the caller compiled each block before sharding it (FSDP2 wants it that way).
    step_model = torch.compile(model) if cfg.compile and not runner.distributed else model
    model.train()
    scaler = torch.amp.GradScaler(_device_of(model)) if cfg.precision == "fp16" else None
    # The update ratio needs whole parameters next to their updates: one process, DDP or FSDP alone.
    watch_updates = not runner.distributed or (runner.cfg.tp == 1 and runner.cfg.pp == 1)

    started = time.perf_counter()
    steady_start, steady_tokens = None, 0
    if progress is not None:
        progress.update(state.step)
    while state.step < cfg.max_steps:
        grown = {}
        if growing and depth_at(state.step, n_layers, depth_growth) != model.config.n_layers:
            deeper = stack_layers(model, depth_at(state.step, n_layers, depth_growth))
            deeper_optimizer = build_optimizer(deeper, cfg.optim)
            grow_optimizer(model, optimizer, deeper, deeper_optimizer)
            # What stacking did to the function: validation loss just before and just after.
            before = runner.evaluate(model, val_batches(cfg.eval_windows), cfg.precision)
            after = runner.evaluate(deeper, val_batches(cfg.eval_windows), cfg.precision)
            grown = {
                "depth_from": model.config.n_layers,
                "growth_val_before": before,
                "growth_val_after": after,
            }
            log(
                f"step {state.step}: stacked {model.config.n_layers} -> {deeper.config.n_layers} layers; "
                f"val loss {before:.4f} -> {after:.4f}"
            )
            model, optimizer = deeper, deeper_optimizer
            step_model = torch.compile(model) if cfg.compile else model
            model.train()
        lr = lr_at(state.step, cfg.max_steps, cfg.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        length = seq_len_at(state.step, seq_len, cfg.seq_len_warmup)
        micro = batch_size_at(state.step, cfg.batch_size, cfg.batch_size_ramp)
        sequences_per_step = micro * cfg.grad_accum
        tokens_per_step = sequences_per_step * length
        first_sample = state.sample
        loss_sum = torch.zeros(())
        for _ in range(cfg.grad_accum):
            x, y = runner.local_batch(data, state.sample, micro)
            if length < seq_len:
                x, y = x[:, :length].contiguous(), y[:, :length].contiguous()
            state.sample += micro
            loss_sum += runner.forward_backward(step_model, x, y, cfg.precision, 1 / cfg.grad_accum, scaler)
        if scaler is not None:
            scaler.unscale_(optimizer)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = runner.clip(model, clip)
        train_loss = runner.mean(float(loss_sum) / cfg.grad_accum)  # the same on every rank
        # fp16's scaler skips a step with overflowed gradients itself: that is not instability.
        judged_norm = None if scaler is not None else grad_norm
        if not cfg.guard.enabled and not math.isfinite(train_loss):
            raise FloatingPointError(
                f"training loss became {train_loss} at step {state.step + 1}; lower optim.lr"
            )
        event = monitor.check(state.step, train_loss, judged_norm, batch=(first_sample, state.sample))
        if event is not None and event["kind"] == "loss_spike" and runner.latest() is None:
            # Nothing to roll back to: skipping batches would leave the same weights facing the same
            # spike. The event is logged and the step taken; the loss joins the guard's history.
            event["action"] = "no_checkpoint_continue"
            monitor.history.append(train_loss)
            details = {k: v for k, v in event.items() if k not in ("kind", "step")}
            metrics.log(state.step, event=event["kind"], flagged_step=event["step"] + 1, **details)
            log(
                f"step {event['step'] + 1}: {event['kind']} (loss {event['loss']}); no checkpoint yet, continuing"
            )
            event = None
        if event is not None:
            optimizer.zero_grad(set_to_none=True)
            good = runner.latest()
            restored = runner.load(good, model, optimizer) if good is not None else None
            state = monitor.rollback(event, restored, state)  # raises TrainingDiverged when out of rollbacks
            metrics.truncate_after(state.step)
            details = {k: v for k, v in event.items() if k not in ("kind", "step")}
            metrics.log(state.step, event=event["kind"], flagged_step=event["step"] + 1, **details)
            log(
                f"step {event['step'] + 1}: {event['kind']} (loss {event['loss']}); {event['action']} to step "
                f"{state.step}, skipping samples {event['skipped_samples'][0]}..{event['skipped_samples'][1] - 1}"
            )
            if progress is not None:
                progress.update(state.step)
            continue
        snapshot = (
            ParamSnapshot(model.parameters())
            if watch_updates and (state.step + 1) % cfg.log_every == 0
            else None
        )
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens += tokens_per_step

        # Throughput skips the first step of this process (compilation and warm-up).
        now = time.perf_counter()
        if steady_start is None:
            steady_start = now
        else:
            steady_tokens += tokens_per_step
        tok_s = steady_tokens / (now - steady_start) if steady_tokens else 0.0

        record = {"loss": train_loss, "lr": lr, "grad_norm": grad_norm, "tokens": state.tokens}
        if snapshot is not None:
            record["update_ratio"] = snapshot.update_ratio()
        if scaler is not None:
            record["loss_scale"] = scaler.get_scale()
        record.update(sequences_per_step=sequences_per_step, tokens_per_step=tokens_per_step)
        if cfg.seq_len_warmup.steps:
            record["seq_len"] = length
        if cfg.batch_size_ramp.steps:
            record["micro_batch"] = micro
        if growing:
            record.update(depth=model.config.n_layers, **grown)
        final = state.step == cfg.max_steps
        evaluating = final or state.step % cfg.eval_every == 0
        if state.step % cfg.log_every == 0 or evaluating or grown:
            # Called only on the steps that are logged: a source that gathers per-step statistics (GRPO's
            # rewards, DPO's margins, a mixture's per-task losses) reports the mean since its last call.
            describe = getattr(data, "describe", None)  # e.g. the curriculum's pool and difficulty
            if describe is not None:
                record.update(describe(state.step - 1))
            if evaluating:
                windows = cfg.final_eval_windows if final else cfg.eval_windows
                val_loss = runner.evaluate(model, val_batches(windows), cfg.precision)
                record.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)))
            metrics.log(state.step, **record, tokens_per_s=tok_s, elapsed_s=now - started)
        if progress is not None:
            progress.update(state.step)
            progress.note(f"loss {train_loss:.3f}  {tok_s / 1000:.1f}k tok/s")
        if state.step % cfg.log_every == 0:
            val = f"  val {val_loss:.3f}" if "val_loss" in record else ""
            log(
                f"step {state.step}/{cfg.max_steps}  loss {train_loss:.4f}{val}  lr {lr:.2e}  {tok_s:,.0f} tok/s"
            )
        if state.step % cfg.checkpoint_every == 0 or state.step == cfg.max_steps:
            state.extra = {"train_loss": train_loss, "val_loss": val_loss, "guard": monitor.state_dict()}
            state.depth = model.config.n_layers if growing else None
            runner.save(model, optimizer, state, cfg.keep_checkpoints)
    runner.finish()

    seconds = time.perf_counter() - started
    tok_s = steady_tokens / (time.perf_counter() - steady_start) if steady_tokens else 0.0
    return LoopResult(state, train_loss, val_loss, tok_s, seconds, resumed_from, model)


def _device_of(model) -> str:
    return next(iter(model.parameters())).device.type
