"""Progressive training: grow the sequence length, the batch and the depth while training.

**Sequence-length warmup** (Li et al., 2022, "The Stability-Efficiency Dilemma"). Early steps train on
short sequences, which are cheap and keep the first, noisiest updates small; the length grows linearly
to the model's full context over `steps` optimizer steps. Lengths are multiples of `seq_len // 8` (at
least 8), so `torch.compile` sees at most eight shapes. The loader still hands out full windows, one
per sequence: a shortened step uses the beginning of each window and skips the rest, so the data order
and the data position (one integer) stay exactly those of a run without warmup.

**Batch-size ramp** (as in GPT-3's training). Early gradients are large and agree with each other, so
a small batch gives nearly the same update for a fraction of the tokens; the micro-batch grows linearly
from `start` to `batch_size` sequences over `steps` optimizer steps, in multiples of `batch_size // 8`
(at least 1): at most eight compiled shapes. The micro-batch is what ramps, not the accumulation count:
the loop keeps `grad_accum` equal micro-batches per step (so the loss stays a plain mean of their means),
the ramp also works without accumulation, and it can start below one full micro-batch. Consecutive
samples are still consumed in order, so the data position stays one integer; which sample a step
starts at is a pure function of the step (`first_sample`).

**Depth growth by stacking** (Gong et al., 2019, "Efficient training of BERT by progressively
stacking"). Train a shallow model, then at the given steps stack copies of its trained layers on top
(`stack_layers`), doubling the depth until the last growth reaches the configured `n_layers`. The
depth is a pure function of the step (`depth_at`), and a checkpoint records the depth it was saved at,
so a resumed run rebuilds the same model and replays the same growths.

All three schedules are pure functions of the optimizer step, so a resumed run replays them exactly.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from lmloom.config import StrictConfig
from lmloom.models.decoder import Decoder


class SeqLenWarmup(StrictConfig):
    steps: int = Field(0, ge=0, description="optimizer steps over which the length grows (0 = off)")
    start: int = Field(64, ge=8, description="sequence length at step 0")


def seq_len_at(step: int, seq_len: int, warmup: SeqLenWarmup) -> int:
    """Training sequence length for optimizer step `step` (0-based)."""
    if warmup.steps == 0 or step >= warmup.steps or warmup.start >= seq_len:
        return seq_len
    grain = max(8, seq_len // 8)
    length = warmup.start + (seq_len - warmup.start) * step / warmup.steps
    return max(grain, min(seq_len, int(length) // grain * grain))


# -- batch-size ramp --------------------------------------------------------------------------------


class BatchSizeRamp(StrictConfig):
    steps: int = Field(0, ge=0, description="optimizer steps over which the micro-batch grows (0 = off)")
    start: int = Field(1, ge=1, description="sequences per micro-batch at step 0")


def batch_size_at(step: int, batch_size: int, ramp: BatchSizeRamp) -> int:
    """Sequences per micro-batch at optimizer step `step` (0-based)."""
    if ramp.steps == 0 or step >= ramp.steps or ramp.start >= batch_size:
        return batch_size
    grain = max(1, batch_size // 8)
    size = ramp.start + (batch_size - ramp.start) * step / ramp.steps
    return max(grain, min(batch_size, int(size) // grain * grain))


def first_sample(step: int, batch_size: int, grad_accum: int, ramp: BatchSizeRamp) -> int:
    """The data position (sample index) at which optimizer step `step` starts."""
    ramped = min(step, ramp.steps)
    total = sum(batch_size_at(s, batch_size, ramp) for s in range(ramped))
    return grad_accum * (total + (step - ramped) * batch_size)


# -- depth growth by stacking -----------------------------------------------------------------------


class DepthGrowth(StrictConfig):
    start_layers: int = Field(0, ge=0, description="layers at step 0 (0 = off: train at full depth)")
    at_steps: list[int] = Field(
        default_factory=list,
        description="optimizer steps at which the depth doubles; the last growth reaches model.n_layers",
    )

    @model_validator(mode="after")
    def _check_steps(self) -> DepthGrowth:
        if self.at_steps != sorted(set(self.at_steps)) or any(s < 1 for s in self.at_steps):
            raise ValueError(f"at_steps {self.at_steps}: must be distinct, increasing and at least 1")
        if self.start_layers and not self.at_steps:
            raise ValueError("start_layers is set but at_steps is empty: the model would never grow")
        return self

    @property
    def enabled(self) -> bool:
        return self.start_layers > 0


def depth_sizes(n_layers: int, growth: DepthGrowth) -> list[int]:
    """The depth before the first growth and after each one: doubling, the last one to `n_layers`."""
    if not growth.enabled:
        return [n_layers]
    sizes = [min(n_layers, growth.start_layers * 2**k) for k in range(len(growth.at_steps))]
    sizes.append(n_layers)
    if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)):
        raise ValueError(
            f"depth growth from {growth.start_layers} layers at steps {growth.at_steps} to n_layers "
            f"{n_layers} gives depths {sizes}: each growth must add layers (at most doubling, except the last)"
        )
    return sizes


def depth_at(step: int, n_layers: int, growth: DepthGrowth) -> int:
    """Layers of the model that computes optimizer step `step` (0-based)."""
    sizes = depth_sizes(n_layers, growth)
    grown = sum(1 for at in growth.at_steps if at <= step) if growth.enabled else 0
    return sizes[grown]


def layer_sources(old_n_layers: int, new_n_layers: int) -> list[int]:
    """For each layer of the stacked model, the layer of the shallow model it copies.

    The whole stack is copied on top of itself (Gong et al.): 0..L-1, 0..L-1; a growth by fewer than L
    layers copies the bottom of the stack, one by more copies it again: source of layer i is i mod L.
    """
    if new_n_layers < old_n_layers:
        raise ValueError(f"cannot stack {old_n_layers} layers down to {new_n_layers}")
    return [i % old_n_layers for i in range(new_n_layers)]


def source_names(old_n_layers: int, new_n_layers: int, new_names: list[str]) -> dict[str, str]:
    """Map each parameter/buffer name of the stacked model to the name it is copied from."""
    sources = layer_sources(old_n_layers, new_n_layers)
    mapping = {}
    for name in new_names:
        if name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            mapping[name] = f"layers.{sources[int(index)]}.{rest}"
        else:
            mapping[name] = name
    return mapping


def stack_layers(model: Decoder, new_n_layers: int) -> Decoder:
    """A new `Decoder` of `new_n_layers` layers: the model's own layers with copies stacked on top.

    Pure: the input model is left untouched, nothing is shared with it, and the global RNG is not
    advanced (the new model's random init is overwritten anyway), so growing is deterministic.
    """
    old_n = model.config.n_layers
    config = model.config.model_copy(update={"n_layers": new_n_layers})
    weight = model.tok_emb.weight
    with torch.random.fork_rng(devices=[]):
        grown = Decoder(config).to(device=weight.device, dtype=weight.dtype)
    old_state = model.state_dict()
    new_state = grown.state_dict()
    mapping = source_names(old_n, new_n_layers, list(new_state))
    with torch.no_grad():
        grown.load_state_dict({name: old_state[source].clone() for name, source in mapping.items()})
    return grown.train(model.training)


def grow_optimizer(
    old_model: Decoder,
    old_optimizer: torch.optim.Optimizer,
    new_model: Decoder,
    new_optimizer: torch.optim.Optimizer,
) -> None:
    """Give the stacked model's fresh optimizer the state of the shallow one: every parameter keeps its
    AdamW moments and step count, and a copied layer's parameters get those of the layer they copy (so
    its first updates have the same scale as its source's, instead of a fresh Adam's sign-like steps)."""
    old_params = dict(old_model.named_parameters())
    mapping = source_names(
        old_model.config.n_layers,
        new_model.config.n_layers,
        [name for name, _ in new_model.named_parameters()],
    )
    for name, param in new_model.named_parameters():
        entries = old_optimizer.state.get(old_params[mapping[name]])
        if entries:
            new_optimizer.state[param] = {key: value.clone() for key, value in entries.items()}
