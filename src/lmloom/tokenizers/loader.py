"""Fixed-length training windows over a token split, in an order that depends only on (seed, sample).

The split's token stream is cut into windows of `seq_len + 1` tokens at stride `seq_len`, so window w
covers tokens [w * seq_len, w * seq_len + seq_len + 1) and neighbouring windows share one token: every
token is a target exactly once per epoch. A window gives inputs `w[:-1]` and targets `w[1:]`.

Training samples are numbered 0, 1, 2, ... forever. Sample s belongs to epoch `s // n_windows` and is
window `permutation(epoch)[s % n_windows]`, the permutation drawn from
`np.random.Generator(np.random.PCG64([seed, epoch]))`. A batch is a run of consecutive sample numbers,
so a trainer's whole data-loader state is one integer (the next sample number): restarting at any
sample gives exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from lmloom.errors import DataError, LmloomError
from lmloom.tokenizers.shards import TokenShards


def count_windows(n_tokens: int, seq_len: int) -> int:
    """Windows of `seq_len + 1` tokens at stride `seq_len` that fit in `n_tokens` tokens."""
    return max(0, (n_tokens - 1) // seq_len)


def check_windows(shards: TokenShards, seq_len: int) -> int:
    if seq_len < 1:
        raise LmloomError(f"seq_len = {seq_len}: must be at least 1")
    n_windows = count_windows(shards.n_tokens, seq_len)
    if n_windows == 0:
        raise DataError(
            f"split {shards.split!r} has {shards.n_tokens:,} tokens; a window of seq_len={seq_len} needs "
            f"{seq_len + 1:,} (use a shorter seq_len or more data)"
        )
    return n_windows


def _gather(shards: TokenShards, windows: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) as int64 tensors [len(windows), seq_len] for the given window numbers."""
    buf = np.empty((len(windows), seq_len + 1), dtype=np.int64)
    for row, w in enumerate(windows):
        start = int(w) * seq_len
        buf[row] = shards.tokens(start, start + seq_len + 1)
    return torch.from_numpy(np.ascontiguousarray(buf[:, :-1])), torch.from_numpy(
        np.ascontiguousarray(buf[:, 1:])
    )


class WindowLoader:
    """Shuffled training windows of one split; `batch(start_sample, batch_size)` is a pure function."""

    def __init__(self, shards: TokenShards, seq_len: int, seed: int):
        if seed < 0:
            raise LmloomError(f"seed = {seed}: must be a non-negative integer")
        self.shards = shards
        self.seq_len = seq_len
        self.seed = seed
        self.n_windows = check_windows(shards, seq_len)
        self._orders: dict[int, np.ndarray] = {}  # the last two epochs' permutations

    @property
    def tokens_per_epoch(self) -> int:
        return self.n_windows * self.seq_len

    def epoch_of(self, sample: int) -> int:
        return sample // self.n_windows

    def order(self, epoch: int) -> np.ndarray:
        """The window permutation of an epoch (cached for the most recent two epochs)."""
        order = self._orders.get(epoch)
        if order is None:
            order = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.n_windows)
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = order
        return order

    def windows(self, start_sample: int, count: int) -> np.ndarray:
        """Window numbers of samples start_sample .. start_sample + count - 1 (may span epochs)."""
        if start_sample < 0 or count < 0:
            raise LmloomError(f"samples start at 0 (got start_sample={start_sample}, count={count})")
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            sample = start_sample + done
            epoch, pos = divmod(sample, self.n_windows)
            take = min(count - done, self.n_windows - pos)
            out[done : done + take] = self.order(epoch)[pos : pos + take]
            done += take
        return out

    def batch(self, start_sample: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 tensors [batch_size, seq_len], of samples start_sample, ..."""
        if batch_size < 1:
            raise LmloomError(f"batch_size = {batch_size}: must be at least 1")
        return _gather(self.shards, self.windows(start_sample, batch_size), self.seq_len)


def validation_batches(
    shards: TokenShards, seq_len: int, batch_size: int, max_windows: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Windows 0, 1, 2, ... of a split in order (no shuffling), `batch_size` at a time.

    Stops after `max_windows` windows when given; the last batch may be smaller.
    """
    if batch_size < 1:
        raise LmloomError(f"batch_size = {batch_size}: must be at least 1")
    n_windows = check_windows(shards, seq_len)
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    for first in range(0, n_windows, batch_size):
        yield _gather(shards, np.arange(first, min(first + batch_size, n_windows)), seq_len)
