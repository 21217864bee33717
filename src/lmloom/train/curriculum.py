"""Curriculum learning: easy training windows first, harder ones let in by a pacing function.

Each training window gets a difficulty score; windows are ranked easiest first. During the first
`steps` optimizer steps, sample i draws (uniformly, from a hash of (seed, i)) one of the easiest
`pool(step)` windows, where the pool is a fraction of all windows that grows from `start_fraction`
to 1 by the pacing function (t = step / steps):

    linear   start + (1 - start) t
    root     sqrt(start^2 + (1 - start^2) t)   the "competence" schedule of Platanios et al. (2019):
                                               fast early growth, when every new window is easy
    step     start, then three equal steps up to 1 at t = 1/4, 1/2, 3/4

After the curriculum the normal shuffled epochs of the window loader follow, starting at their first
sample. Everything is a pure function of the sample number, so resume stays exact.

Difficulty scores:

- `unigram`: the mean surprisal of a window's tokens under the split's own unigram distribution:
  windows of common words and boilerplate come first, rare vocabulary later.
- `reference`: the window's mean next-token loss under a separate, already trained reference model
  (a `checkpoint` input of the stage, with the same tokenizer): what a model has learned to predict
  comes first (as in the "easy by a teacher's loss" curricula, and CCNet's perplexity buckets).
  `data.score` does the same per document and can order a corpus itself, `order: ascending`.

With a batch-size ramp the optimizer steps hold different numbers of samples; the loader takes the
samples of each curriculum step, so a sample's step (and so its pool) stays a pure function of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from lmloom.config import StrictConfig
from lmloom.models.decoder import Decoder
from lmloom.tokenizers.loader import WindowLoader, _gather
from lmloom.tokenizers.shards import TokenShards

_CHUNK_TOKENS = 1 << 22


class CurriculumConfig(StrictConfig):
    by: Literal["none", "unigram", "reference"] = Field(
        "none", description="difficulty score of a window; reference: loss under the `reference` input"
    )
    pacing: Literal["linear", "root", "step"] = "root"
    start_fraction: float = Field(0.2, gt=0, le=1, description="share of the easiest windows at step 0")
    steps: int = Field(0, ge=0, description="optimizer steps the curriculum lasts (0 = all of them)")
    reference_batch_size: int = Field(16, ge=1, description="windows per forward pass of the reference")


def pool_fraction(step: int, config: CurriculumConfig, total_steps: int) -> float:
    """Share of windows (easiest first) available at optimizer step `step`."""
    steps = config.steps or total_steps
    t = min(1.0, step / steps) if steps else 1.0
    start = config.start_fraction
    if config.pacing == "linear":
        return start + (1 - start) * t
    if config.pacing == "root":
        return math.sqrt(start**2 + (1 - start**2) * t)
    return min(1.0, start + (1 - start) * math.floor(4 * t) / 3) if t < 1 else 1.0


def unigram_difficulty(shards: TokenShards, seq_len: int, n_windows: int) -> np.ndarray:
    """Mean surprisal (nats) of each window's `seq_len` tokens under the split's unigram distribution."""
    total = n_windows * seq_len
    counts: np.ndarray | None = None
    for start in range(0, total, _CHUNK_TOKENS):
        chunk = shards.tokens(start, min(total, start + _CHUNK_TOKENS)).astype(np.int64)
        found = np.bincount(chunk)
        counts = found if counts is None else _add(counts, found)
    assert counts is not None
    surprisal = -np.log(np.maximum(counts, 1) / total)
    scores = np.empty(n_windows, dtype=np.float64)
    per_chunk = max(1, _CHUNK_TOKENS // seq_len)
    for first in range(0, n_windows, per_chunk):
        last = min(n_windows, first + per_chunk)
        tokens = shards.tokens(first * seq_len, last * seq_len).astype(np.int64)
        scores[first:last] = surprisal[tokens].reshape(last - first, seq_len).mean(axis=1)
    return scores


_LOGITS_PER_PASS = 1 << 24  # 64 MiB of float32 logits: bounds a scoring pass at large vocabularies


@torch.no_grad()
def reference_difficulty(
    model: Decoder,
    shards: TokenShards,
    seq_len: int,
    n_windows: int,
    batch_size: int = 16,
    precision: str = "fp32",
    advance: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Mean next-token loss (nats) of each training window under a reference model.

    Window w is the loader's: inputs tokens[w * seq_len : (w + 1) * seq_len], targets shifted by one.
    A window longer than the reference's context is scored in pieces of its `seq_len` positions.
    """
    was_training = model.training
    model.eval()
    context = model.config.seq_len
    rows = max(1, min(batch_size, _LOGITS_PER_PASS // (min(context, seq_len) * model.config.vocab_size)))
    scores = np.empty(n_windows, dtype=np.float64)
    for first in range(0, n_windows, rows):
        last = min(n_windows, first + rows)
        x, y = _gather(shards, np.arange(first, last), seq_len)
        total = torch.zeros(last - first, dtype=torch.float64)
        for start in range(0, seq_len, context):
            piece_x, piece_y = x[:, start : start + context], y[:, start : start + context]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(piece_x)
            losses = F.cross_entropy(logits.float().transpose(1, 2), piece_y, reduction="none")
            total += losses.double().sum(dim=1)
        scores[first:last] = (total / seq_len).numpy()
        if advance is not None:
            advance(last - first)
    model.train(was_training)
    return scores


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) < len(b):
        a, b = b, a
    a = a.copy()
    a[: len(b)] += b
    return a


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64: a well-spread 64-bit hash of each value (numpy wraps on overflow, as intended)."""
    z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class CurriculumLoader:
    """A `WindowLoader` whose first `steps` optimizer steps follow the curriculum (see module doc).

    `samples_per_step` is one count for every step, or (batch-size ramp) each step's own count.
    """

    def __init__(
        self,
        base: WindowLoader,
        difficulty: np.ndarray,
        config: CurriculumConfig,
        samples_per_step: int | Sequence[int],
        total_steps: int,
    ):
        if len(difficulty) != base.n_windows:
            raise ValueError(f"{len(difficulty)} difficulty scores for {base.n_windows} windows")
        self.base = base
        self.config = config
        self.total_steps = total_steps
        self.steps = config.steps or total_steps
        if isinstance(samples_per_step, int):
            per_step = np.full(self.steps, samples_per_step, dtype=np.int64)
        else:
            per_step = np.asarray(samples_per_step[: self.steps], dtype=np.int64)
            if len(per_step) < self.steps:
                raise ValueError(
                    f"sample counts for {len(per_step)} steps; the curriculum lasts {self.steps}"
                )
        self.step_starts = np.concatenate([[0], np.cumsum(per_step)])  # first sample of each step
        self.rank = np.argsort(difficulty, kind="stable")  # easiest first
        self.difficulty = difficulty
        self.curriculum_samples = int(self.step_starts[-1])
        with np.errstate(over="ignore"):
            self._salt = _mix(np.array([base.seed], dtype=np.uint64))[0]

    @property
    def seq_len(self) -> int:
        return self.base.seq_len

    def windows(self, start_sample: int, count: int) -> np.ndarray:
        samples = np.arange(start_sample, start_sample + count, dtype=np.int64)
        out = np.empty(count, dtype=np.int64)
        inside = samples < self.curriculum_samples
        if inside.any():
            chosen = samples[inside]
            steps = np.searchsorted(self.step_starts, chosen, side="right") - 1
            pools = np.array(
                [
                    max(1, math.ceil(pool_fraction(int(s), self.config, self.total_steps) * len(self.rank)))
                    for s in steps
                ]
            )
            with np.errstate(over="ignore"):
                draws = _mix(chosen.astype(np.uint64) ^ self._salt)
            out[inside] = self.rank[(draws % pools.astype(np.uint64)).astype(np.int64)]
        after = ~inside
        if after.any():
            first = int(samples[after][0]) - self.curriculum_samples
            out[after] = self.base.windows(first, int(after.sum()))
        return out

    def batch(self, start_sample: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _gather(self.base.shards, self.windows(start_sample, batch_size), self.base.seq_len)

    def describe(self, step: int) -> dict[str, float]:
        """What the curriculum offered at optimizer step `step`, for the metrics log."""
        if step >= self.steps:
            return {}
        first, end = int(self.step_starts[step]), int(self.step_starts[step + 1])
        windows = self.windows(first, end - first)
        return {
            "curriculum_pool": round(pool_fraction(step, self.config, self.total_steps), 4),
            "curriculum_difficulty": round(float(self.difficulty[windows].mean()), 4),
        }
