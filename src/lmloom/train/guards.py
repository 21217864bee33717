"""Stability guards: catch a non-finite or spiking loss before it reaches the weights, roll back, skip.

`StabilityMonitor.check` is fed every step's (globally averaged) loss and global gradient norm
*after* backward and *before* `optimizer.step()`. It flags

    nonfinite_loss / nonfinite_grad   the loss or the gradient norm is NaN or infinite
    loss_spike                        the loss is more than `spike_zscore` standard deviations above
                                      the mean of the last `window` good steps (after `min_history`)

and otherwise records the loss as good. On a flag the loop drops the step's gradients, restores the
last complete checkpoint and calls `rollback`, which moves the data position past the offending
batch (and `skip_batches_after_rollback - 1` more), so those samples are never seen again; the steps
between the checkpoint and the spike are redone on fresh data, as PaLM does (restart from before the
spike, skip the batches around it). `rollback` returns the event dict for the caller to log and raises
`TrainingDiverged` once `max_rollbacks` is used up. Put `state_dict()` into the checkpoint (e.g.
`TrainState.extra["guard"]`) so a resumed run makes the same decisions as an uninterrupted one.

Every rank must see the same loss and gradient norm (all-reduce the loss, use `global_grad_norm`), so
that every rank takes the same branch; the decision is then deterministic and collective-safe.

Monitoring helpers: `global_grad_norm` (plain, DDP and FSDP2 parameters; a 2-D mesh falls back to
DTensor's own reductions; under pipeline parallelism each stage only sees its own gradients, so use
the norm `lmloom.train.parallel.clip_grad_norm_` returns) and `ParamSnapshot` (plain, DDP, 1-D FSDP2), whose
`update_ratio` is ||Δθ|| / ||θ|| of one optimizer step (healthy training sits around 1e-3; much larger
means the learning rate is too high for the current state).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from pydantic import Field

from lmloom.config import StrictConfig
from lmloom.errors import LmloomError
from lmloom.train.checkpoint import TrainState


class TrainingDiverged(LmloomError):
    """The loss kept going bad after `max_rollbacks` rollbacks: lower the learning rate, check the data."""


class StabilityGuard(StrictConfig):
    enabled: bool = Field(True, description="check every step's loss and gradient norm")
    spike_zscore: float | None = Field(
        None,
        gt=0,
        description="flag a loss this many std above the window mean (e.g. 6; None = NaN/Inf checks only)",
    )
    window: int = Field(50, ge=2, description="trailing good steps the mean and std are taken over")
    min_history: int = Field(10, ge=2, description="good steps needed before spikes are judged")
    std_floor: float = Field(
        0.01, ge=0, description="the std is at least this fraction of the mean loss (flat losses)"
    )
    max_rollbacks: int = Field(5, ge=0, description="rollbacks allowed in a run before it stops")
    skip_batches_after_rollback: int = Field(
        1, ge=1, description="global batches skipped, starting with the offending one"
    )


class StabilityMonitor:
    """The detector and the rollback policy of a `StabilityGuard`; its state goes into checkpoints."""

    def __init__(self, cfg: StabilityGuard):
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=cfg.window)
        self.rollbacks = 0
        self.skipped: list[list[int]] = []  # [first, end) sample ranges never trained on

    # -- detection ---------------------------------------------------------------------------------

    def zscore(self, loss: float) -> float | None:
        if len(self.history) < self.cfg.min_history:
            return None
        n = len(self.history)
        mean = sum(self.history) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in self.history) / n)
        std = max(std, self.cfg.std_floor * abs(mean), 1e-12)
        return (loss - mean) / std

    def check(
        self,
        step: int,
        loss: float,
        grad_norm: float | None = None,
        batch: tuple[int, int] | None = None,
    ) -> dict[str, Any] | None:
        """None when the step is good (its loss joins the history); else a flag event to act on.

        `step` is the step being taken, `batch` the [first, end) sample range it consumed.
        """
        if not self.cfg.enabled:
            return None
        kind, z = None, None
        if not math.isfinite(loss):
            kind = "nonfinite_loss"
        elif grad_norm is not None and not math.isfinite(grad_norm):
            kind = "nonfinite_grad"
        else:
            z = self.zscore(loss)
            if z is not None and self.cfg.spike_zscore is not None and z > self.cfg.spike_zscore:
                kind = "loss_spike"
        if kind is None:
            self.history.append(float(loss))
            return None
        return {
            "kind": kind,
            "step": step,
            "loss": _json_float(loss),
            "zscore": None if z is None else round(z, 3),
            "grad_norm": None if grad_norm is None else _json_float(grad_norm),
            "batch": list(batch) if batch is not None else None,
            "action": "flagged",
        }

    # -- policy ------------------------------------------------------------------------------------

    def rollback(self, event: dict[str, Any], restored: TrainState | None, current: TrainState) -> TrainState:
        """The state to continue from after a flag: `restored` (the state of the checkpoint the caller
        just loaded into model and optimizer) with its data position moved past the bad batches, or,
        with no checkpoint yet, `current` (weights untouched, the step's gradients dropped) moved past
        them. Updates `event` in place (action, rollback target, skipped samples) and returns the state.
        """
        self.rollbacks += 1
        if self.rollbacks > self.cfg.max_rollbacks:
            event["action"] = "stop"
            raise TrainingDiverged(
                f"{event['kind']} at step {event['step']} (loss {event['loss']}) after "
                f"{self.cfg.max_rollbacks} rollbacks; lower the learning rate or inspect the data"
            )
        first, end = event["batch"] if event.get("batch") else (current.sample, current.sample)
        skip_to = end + (self.cfg.skip_batches_after_rollback - 1) * (end - first)
        if restored is None:
            target, event["action"], event["rolled_back_to"] = current, "skip_batch", None
        else:
            target, event["action"], event["rolled_back_to"] = restored, "rollback", restored.step
            saved = (restored.extra or {}).get("guard")
            if saved:  # the loss history as it was at that checkpoint
                self.history = deque(saved.get("history", []), maxlen=self.cfg.window)
        skipped = [first, max(skip_to, target.sample)]
        target.sample = max(target.sample, skip_to)
        self.skipped.append(skipped)
        event.update(skipped_samples=skipped, resume_sample=target.sample, rollbacks=self.rollbacks)
        return target

    # -- checkpointing -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-able; store it in the checkpoint's TrainState.extra so a resume decides alike."""
        return {"history": list(self.history), "rollbacks": self.rollbacks, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque(state.get("history", []), maxlen=self.cfg.window)
        self.rollbacks = int(state.get("rollbacks", 0))
        self.skipped = [list(r) for r in state.get("skipped", [])]


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)  # "nan", "inf": strict JSON has neither


# -- monitoring helpers ----------------------------------------------------------------------------


def _piece(t: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """(this rank's values, the group to sum them over, or None when they are the whole tensor)."""
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(t, DTensor):
        if t.device_mesh.ndim > 1:  # e.g. FSDP x tensor parallel: let DTensor reduce this one
            return t.detach().double().square().sum().full_tensor().sqrt(), None
        sharded = any(isinstance(p, Shard) for p in t.placements)
        return t.to_local(), t.device_mesh.get_group() if sharded else None
    return t, None


def _squared_norm(pieces: Iterable[tuple[torch.Tensor, Any]]) -> float:
    """Sum of squares over (local values, group) pieces: sharded pieces (FSDP2 DTensors) are summed
    locally and all-reduced once over their mesh's group; replicated and plain tensors count once.
    Assumes one device mesh (the usual FSDP2 setup)."""
    whole = torch.zeros((), dtype=torch.float64)
    sharded = torch.zeros((), dtype=torch.float64)
    group = None
    for values, values_group in pieces:
        square = values.detach().double().square().sum().cpu()
        if values_group is None:
            whole += square
        else:
            sharded += square
            group = values_group
    if group is not None:
        dist.all_reduce(sharded, group=group)
    return float(whole + sharded)


def global_grad_norm(parameters: Iterable[torch.Tensor]) -> float:
    """The L2 norm of all gradients across ranks (the same number on every rank); inf/nan propagate.

    Under FSDP2 call it on every rank (a collective). Under DDP the gradients are already averaged
    and replicated, so the local norm is the global one.
    """
    return math.sqrt(_squared_norm(_piece(p.grad) for p in parameters if p.grad is not None))


class ParamSnapshot:
    """A copy of the parameters taken before `optimizer.step()`; `update_ratio()` after it gives
    ||Δθ|| / ||θ||. Costs one copy of the (local shards of the) parameters; take it every N steps."""

    def __init__(self, parameters: Iterable[torch.Tensor]):
        self.pieces = [_piece(p) for p in parameters if p.requires_grad]
        self.before = [values.detach().clone() for values, _ in self.pieces]

    def update_ratio(self) -> float:
        """Call on every rank after the step (a collective under FSDP2)."""
        deltas = [(v.detach() - b, g) for (v, g), b in zip(self.pieces, self.before, strict=True)]
        delta = math.sqrt(_squared_norm(deltas))
        norm = math.sqrt(_squared_norm(self.pieces))
        return delta / norm if norm > 0 else math.inf
