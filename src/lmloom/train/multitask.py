"""Multi-task pre-training: a weighted mixture of token-shard datasets, with per-task metrics.

`train.pretrain` takes its main `shards` plus any number of further shards inputs, each a task named
by its input role. Sample i of the run belongs to task k with probability weight_k / sum(weights),
drawn from a hash of (seed, i); within a task, its own seeded window loader is indexed by i as well,
so every sample is a pure function of its number and resume stays exact. The metrics log each step's
task mix, and the checkpoint records every task's validation loss.
"""

from __future__ import annotations

import numpy as np
import torch

from lmloom.tokenizers.loader import WindowLoader, _gather
from lmloom.train.curriculum import _mix


class MultiTaskLoader:
    def __init__(
        self, tasks: dict[str, WindowLoader], weights: dict[str, float], seed: int, samples_per_step: int
    ):
        self.names = list(tasks)
        self.loaders = [tasks[name] for name in self.names]
        total = sum(weights[name] for name in self.names)
        self.bounds = np.cumsum([weights[name] / total for name in self.names])
        self.bounds[-1] = 1.0
        self.seq_len = self.loaders[0].seq_len
        self.samples_per_step = samples_per_step
        with np.errstate(over="ignore"):
            self._salt = _mix(np.array([seed ^ 0x7A5C], dtype=np.uint64))[0]

    def tasks_of(self, samples: np.ndarray) -> np.ndarray:
        """Task index of each sample number."""
        with np.errstate(over="ignore"):
            draws = _mix(samples.astype(np.uint64) ^ self._salt)
        uniform = (draws >> np.uint64(11)).astype(np.float64) / 2.0**53
        return np.searchsorted(self.bounds, uniform, side="right")

    def batch(self, start_sample: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        samples = np.arange(start_sample, start_sample + batch_size, dtype=np.int64)
        xs, ys = [], []
        for sample, task in zip(samples.tolist(), self.tasks_of(samples).tolist(), strict=True):
            loader = self.loaders[task]
            x, y = _gather(loader.shards, loader.windows(sample, 1), self.seq_len)
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    def describe(self, step: int) -> dict[str, float]:
        """The step's task mix (share of its samples per task), for the metrics log."""
        samples = np.arange(step * self.samples_per_step, (step + 1) * self.samples_per_step)
        counts = np.bincount(self.tasks_of(samples), minlength=len(self.names))
        return {
            f"task_share/{name}": round(float(c) / len(samples), 4)
            for name, c in zip(self.names, counts, strict=True)
        }
