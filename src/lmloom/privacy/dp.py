"""DP-SGD on our `Decoder` through Opacus: per-sample clipping, Gaussian noise, a privacy accountant.

The privacy unit is one training window (`seq_len + 1` tokens): the guarantee bounds what the weights
reveal about any one window, not about a document or a person whose text spans many windows (a secret
repeated in 16 windows is protected as 16 records; see `lmloom.evaluate.privacy`).

Why a wrapper (`PrivateDecoder`) and which Opacus mode (measured with Opacus 1.6, see tests/test_dp.py):

- `Decoder.forward(x, y)` computes the tied LM head and the loss in one custom autograd Function
  (`_LinearCrossEntropy`) on the raw embedding matrix. Opacus sees parameters only through the modules
  that use them, so under `hooks` and `functorch` the per-sample gradient of `tok_emb.weight` silently
  misses the LM head's share (relative error ~1 against a per-example loop); every other parameter matches.
- `ew` (expanded weights) fails outright: "Expanded Weights ... cannot handle function rms_norm".
- `ghost` (fast gradient clipping) refuses tied parameters.

`PrivateDecoder` runs the same blocks (the fused RoPE q/k/v, SwiGLU and attention Functions stay: they
carry no parameters, and Opacus' hooks on the `nn.Linear`s around them see the right activations and
output gradients) but computes the head through an `nn.Linear` that shares the embedding's `Parameter`,
and the loss per sequence. Opacus then sums the embedding's two per-sample contributions, and `hooks`
(the default) and `functorch` give per-sample gradients equal to a per-example loop. No monkeypatching of
`decoder.py` is needed. The wrapper mirrors `Decoder.forward`'s training path (no KV cache, no attention
mask); a test pins its loss to `Decoder(x, y)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from lmloom.config import StrictConfig
from lmloom.errors import ConfigError
from lmloom.models.decoder import IGNORE_INDEX, Decoder

Accountant = Literal["rdp", "prv", "gdp"]


class DPConfig(StrictConfig):
    """DP-SGD: give either `target_epsilon` (the noise is calibrated to reach it at the last step) or
    `noise_multiplier` (epsilon follows from it)."""

    alternative_keys = (("target_epsilon", "noise_multiplier"),)

    target_epsilon: float | None = Field(None, gt=0, description="epsilon to reach after max_steps")
    noise_multiplier: float | None = Field(None, ge=0, description="noise std / max_grad_norm")
    delta: float | None = Field(
        None, gt=0, lt=1, description="None = 1/N (N = training windows); well below 1/N is safer"
    )
    max_grad_norm: float = Field(1.0, gt=0, description="per-sample gradient clipping norm C")
    accountant: Accountant = Field("rdp", description="Opacus accountant: rdp, prv or gdp")
    grad_sample_mode: Literal["hooks", "functorch"] = Field(
        "hooks",
        description="Opacus per-sample gradients (ew cannot handle rms_norm; ghost refuses tied weights)",
    )
    poisson_sampling: bool = Field(
        True, description="each window joins each batch with probability q (what the accountant assumes)"
    )
    release_train_stats: bool = Field(
        False,
        description="keep the training loss and gradient norm (computed on private data, not noised) in the "
        "artifact's metrics; off: only DP-covered figures (validation loss on held-out data, epsilon) leave",
    )

    @model_validator(mode="after")
    def _one_noise_source(self) -> DPConfig:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("give exactly one of target_epsilon and noise_multiplier")
        return self


# -- the model Opacus wraps -------------------------------------------------------------------------


class PrivateDecoder(nn.Module):
    """A `Decoder` whose LM head is an `nn.Linear` sharing the embedding weight (see the module doc).

    forward(idx, targets) -> mean over the batch of each sequence's mean token loss (Opacus'
    loss_reduction="mean"); forward(idx) -> logits. Trains the wrapped decoder's parameters in place.
    """

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder
        cfg = decoder.config
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = decoder.tok_emb.weight if decoder.lm_head is None else decoder.lm_head.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        dec = self.decoder
        B, T = idx.shape
        if T > dec.config.seq_len:
            raise ValueError(f"{T} positions exceed seq_len {dec.config.seq_len}")
        cos, sin = dec.rope_cos[:T, None].float(), dec.rope_sin[:T, None].float()
        x = dec.tok_emb(idx)
        for layer in dec.layers:
            x = layer(x, cos, sin)
        logits = self.head(dec.norm(x))
        if targets is None:
            return logits
        return sequence_losses(logits, targets).mean()


def sequence_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence [B] (IGNORE_INDEX targets skipped)."""
    B, T, V = logits.shape
    per_token = F.cross_entropy(
        logits.reshape(B * T, V).float(), targets.reshape(B * T), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(B, T)
    valid = (targets != IGNORE_INDEX).float()
    return (per_token * valid).sum(1) / valid.sum(1).clamp(min=1)


# -- data ------------------------------------------------------------------------------------------


class WindowDataset(torch.utils.data.Dataset):
    """The N records DP protects: consecutive windows of `seq_len + 1` tokens, as (inputs, targets).

    `tokens` is anything with `.n_tokens` and `.tokens(start, end)` (`TokenShards`), or a 2-D int array
    of windows [N, seq_len + 1] (tests, canary-augmented data).
    """

    def __init__(self, tokens, seq_len: int):
        self.seq_len = seq_len
        if isinstance(tokens, np.ndarray | torch.Tensor):
            array = torch.as_tensor(np.asarray(tokens), dtype=torch.int64)
            if array.ndim != 2 or array.shape[1] != seq_len + 1:
                raise ValueError(
                    f"windows must be [N, seq_len + 1 = {seq_len + 1}], got {tuple(array.shape)}"
                )
            self.array, self.shards, self.n = array, None, array.shape[0]
        else:
            self.array, self.shards = None, tokens
            self.n = max(0, (tokens.n_tokens - 1) // seq_len)
        if self.n == 0:
            raise ValueError(f"no window of {seq_len + 1} tokens fits the training data")

    def __len__(self) -> int:
        return self.n

    def rows(self, indices: np.ndarray) -> torch.Tensor:
        if self.array is not None:
            return self.array[torch.as_tensor(indices, dtype=torch.int64)]
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for row, w in enumerate(indices):
            start = int(w) * self.seq_len
            out[row] = self.shards.tokens(start, start + self.seq_len + 1)
        return torch.from_numpy(out)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.rows(np.array([i]))[0]
        return row[:-1], row[1:]

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows(indices)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class PoissonBatches:
    """Poisson sampling as Opacus' `UniformWithReplacementSampler` does it (each window joins a batch with
    probability q, independently), but a pure function of (seed, step) so a resumed run replays the
    uninterrupted one. `batch(start_sample, batch_size)` follows the training loop's protocol: the step is
    start_sample // batch_size (batch_size = the expected batch size)."""

    def __init__(self, dataset: WindowDataset, sample_rate: float, seed: int, describe=None):
        self.dataset, self.sample_rate, self.seed = dataset, sample_rate, seed
        self._describe = describe

    def indices(self, step: int) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64([self.seed, 0x0D5A, step]))
        return np.flatnonzero(rng.random(len(self.dataset)) < self.sample_rate)

    def batch(self, start_sample: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset.batch(self.indices(start_sample // batch_size))

    def describe(self, step: int) -> dict:
        return self._describe(step) if self._describe else {}


class ShuffledBatches(PoissonBatches):
    """Fixed-size batches from a seeded permutation per epoch (poisson_sampling off). The accountant still
    assumes Poisson sampling at q = batch / N: an approximation Opacus also makes for shuffled loaders."""

    def batch(self, start_sample: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.dataset)
        picks = []
        for sample in range(start_sample, start_sample + batch_size):
            epoch, pos = divmod(sample, n)
            order = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(n)
            picks.append(order[pos])
        return self.dataset.batch(np.array(picks))


# -- making a model private ----------------------------------------------------------------------


def epsilon_for(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str
) -> float:
    """Epsilon after `steps` DP-SGD steps, from a fresh Opacus accountant (a pure function of its inputs)."""
    from opacus.accountants import create_accountant

    if steps <= 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = create_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


@dataclass
class PrivateTraining:
    """What `make_private` returns: train `module` with `optimizer` on batches from `batches`."""

    module: nn.Module  # an Opacus GradSampleModule around a PrivateDecoder
    optimizer: torch.optim.Optimizer  # an Opacus DPOptimizer (clips, noises, steps the accountant)
    engine: object  # the opacus.PrivacyEngine
    data_loader: torch.utils.data.DataLoader  # Opacus' (Poisson) loader, for callers that iterate
    batches: PoissonBatches  # the resumable equivalent used by the training loop
    decoder: Decoder
    cfg: DPConfig
    noise_multiplier: float
    sample_rate: float
    delta: float
    steps: int  # the planned steps (the noise is calibrated for them when target_epsilon is given)
    n_examples: int

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.n_examples

    def epsilon(self, steps: int | None = None) -> float:
        """Epsilon after `steps` steps (default: the planned ones), by this run's accountant."""
        steps = self.steps if steps is None else steps
        return epsilon_for(self.noise_multiplier, self.sample_rate, steps, self.delta, self.cfg.accountant)

    def spent(self) -> float:
        """Epsilon spent so far, as the engine's own accountant (stepped by the optimizer) reports it."""
        if not self.engine.accountant.history:
            return 0.0
        return float(self.engine.get_epsilon(self.delta))

    def set_steps_taken(self, steps: int) -> None:
        """Put the engine's accountant at `steps` (after a resume from a checkpoint)."""
        self.engine.accountant.history = [(self.noise_multiplier, self.sample_rate, steps)] if steps else []

    def report(self) -> dict:
        return {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "expected_batch_size": self.expected_batch_size,
            "max_grad_norm": self.cfg.max_grad_norm,
            "accountant": self.cfg.accountant,
            "grad_sample_mode": self.cfg.grad_sample_mode,
            "poisson_sampling": self.cfg.poisson_sampling,
            "n_examples": self.n_examples,
            "target_epsilon": self.cfg.target_epsilon,
        }


def make_private(
    model: Decoder,
    optimizer: torch.optim.Optimizer,
    data: WindowDataset,
    cfg: DPConfig,
    *,
    batch_size: int,
    steps: int,
    seed: int = 0,
    describe=None,
) -> PrivateTraining:
    """Wrap `model` (a Decoder) and `optimizer` (built on its parameters) for DP-SGD over the windows of
    `data`, `batch_size` windows per step in expectation, for `steps` steps.

    Goes through `opacus.PrivacyEngine`: `make_private_with_epsilon` when cfg.target_epsilon is given
    (noise calibrated so that epsilon after `steps` steps is at most the target), else `make_private`.
    """
    from opacus import PrivacyEngine

    if not isinstance(model, Decoder):
        raise ConfigError(f"make_private wraps a Decoder, got {type(model).__name__}")
    n = len(data)
    if batch_size > n:
        raise ConfigError(f"batch_size {batch_size} is larger than the {n} training windows")
    delta = cfg.delta if cfg.delta is not None else 1.0 / n
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size)
    sample_rate = 1.0 / len(loader)  # what Opacus takes as q for this loader
    engine = PrivacyEngine(accountant=cfg.accountant)
    common = dict(
        module=PrivateDecoder(model),
        optimizer=optimizer,
        data_loader=loader,
        max_grad_norm=cfg.max_grad_norm,
        poisson_sampling=cfg.poisson_sampling,
        grad_sample_mode=cfg.grad_sample_mode,
        loss_reduction="mean",
    )
    if cfg.target_epsilon is not None:
        # Opacus plans int(epochs / q) steps; the half step keeps float rounding from dropping one.
        module, dp_optimizer, dp_loader = engine.make_private_with_epsilon(
            target_epsilon=cfg.target_epsilon,
            target_delta=delta,
            epochs=(steps + 0.5) * sample_rate,
            **common,
        )
    else:
        module, dp_optimizer, dp_loader = engine.make_private(noise_multiplier=cfg.noise_multiplier, **common)
    kind = PoissonBatches if cfg.poisson_sampling else ShuffledBatches
    batches = kind(data, sample_rate, seed, describe)
    return PrivateTraining(
        module,
        dp_optimizer,
        engine,
        dp_loader,
        batches,
        model,
        cfg,
        float(dp_optimizer.noise_multiplier),
        sample_rate,
        delta,
        steps,
        n,
    )


def dp_step(private: PrivateTraining, x: torch.Tensor, y: torch.Tensor) -> float:
    """One DP-SGD step on a (Poisson) batch; returns the (non-private) batch loss, 0 for an empty batch."""
    loss = forward_backward(private.module, x, y)
    private.optimizer.step()
    private.optimizer.zero_grad(set_to_none=True)
    return loss


def forward_backward(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Loss and per-sample gradients of one batch. An empty Poisson batch (possible at small q) gets empty
    per-sample gradients, so the optimizer still adds the noise and counts the step, as Opacus' own loader
    would."""
    if x.shape[0] == 0:
        for p in module.parameters():
            if p.requires_grad:
                p.grad_sample = p.new_zeros((0, *p.shape))
        return 0.0
    loss = module(x, y)
    loss.backward()
    return float(loss.detach())


def train_private(
    model: Decoder,
    windows,
    cfg: DPConfig,
    *,
    steps: int,
    batch_size: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> PrivateTraining:
    """A minimal DP-SGD run (AdamW, constant lr) on windows [N, seq_len + 1]: for tests, audits and
    notebooks. The pipeline's stage (`dp_stage.py`) adds schedules, validation, checkpoints and resume."""
    data = WindowDataset(windows, model.config.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    private = make_private(model, optimizer, data, cfg, batch_size=batch_size, steps=steps, seed=seed)
    private.module.train()
    for step in range(steps):
        dp_step(private, *private.batches.batch(step * batch_size, batch_size))
    return private


def per_sample_gradients(model: Decoder, x: torch.Tensor, y: torch.Tensor, mode: str = "hooks") -> dict:
    """{parameter name: [B, *shape]} per-sample gradients of each sequence's mean loss, through Opacus'
    GradSampleModule on a `PrivateDecoder` (no clipping, no noise). Tied weights appear once."""
    from opacus.grad_sample import GradSampleModule

    wrapped = GradSampleModule(
        PrivateDecoder(model), batch_first=True, loss_reduction="mean", force_functorch=mode == "functorch"
    )
    try:
        wrapped(x, y).backward()
        out = {}
        for name, p in model.named_parameters():
            gs = p.grad_sample
            out[name] = (torch.cat(gs) if isinstance(gs, list) else gs).detach().clone()
        return out
    finally:
        for p in model.parameters():
            p.grad_sample = None
            p.grad = None
        wrapped._close()
