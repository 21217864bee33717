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

Difficulty `unigram` is the mean surprisal of a window's tokens under the split's own unigram
distribution: windows of common words and boilerplate come first, rare vocabulary later. (A reference
model's perplexity is the other classic score; `data.score` writes it per document and can order the
corpus itself, `order: ascending`.)
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from lmloom.config import StrictConfig
from lmloom.tokenizers.loader import WindowLoader, _gather
from lmloom.tokenizers.shards import TokenShards

_CHUNK_TOKENS = 1 << 22


class CurriculumConfig(StrictConfig):
    by: Literal["none", "unigram"] = Field("none", description="difficulty score of a window")
    pacing: Literal["linear", "root", "step"] = "root"
    start_fraction: float = Field(0.2, gt=0, le=1, description="share of the easiest windows at step 0")
    steps: int = Field(0, ge=0, description="optimizer steps the curriculum lasts (0 = all of them)")


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
    """A `WindowLoader` whose first `steps` optimizer steps follow the curriculum (see module doc)."""

    def __init__(
        self,
        base: WindowLoader,
        difficulty: np.ndarray,
        config: CurriculumConfig,
        samples_per_step: int,
        total_steps: int,
    ):
        if len(difficulty) != base.n_windows:
            raise ValueError(f"{len(difficulty)} difficulty scores for {base.n_windows} windows")
        self.base = base
        self.config = config
        self.samples_per_step = samples_per_step
        self.total_steps = total_steps
        self.steps = config.steps or total_steps
        self.rank = np.argsort(difficulty, kind="stable")  # easiest first
        self.difficulty = difficulty
        self.curriculum_samples = self.steps * samples_per_step
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
            steps = chosen // self.samples_per_step
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
        windows = self.windows(step * self.samples_per_step, self.samples_per_step)
        return {
            "curriculum_pool": round(pool_fraction(step, self.config, self.total_steps), 4),
            "curriculum_difficulty": round(float(self.difficulty[windows].mean()), 4),
        }
