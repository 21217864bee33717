"""Prefix language modelling (Raffel et al., 2020; UniLM, Dong et al., 2019) for a decoder-only model.

A [B, T + 1] window is shifted as for next-token prediction (inputs [B, T], targets [B, T]). Each row has
a prefix length P: the first P input positions attend to each other bidirectionally, and every later
position attends causally, so key j is visible from query i iff j < P or j <= i.

Loss falls on the continuation only: the tokens at window index P and later. Position P - 1, the last of
the prefix, predicts the first continuation token; it may, because it sees inputs 0..P-1 and nothing after.
The targets of positions 0..P-2 are prefix tokens those positions can already see, so they are ignored.
"""

from __future__ import annotations

import torch

from lmloom.errors import ConfigError, DataError
from lmloom.objectives.batch import IGNORE_INDEX, Batch, check_windows


def prefix_lm_attention_mask(prefix_lengths: torch.Tensor, length: int) -> torch.Tensor:
    """[B, T, T] bool: key j visible from query i iff j < prefix_lengths[b] or j <= i."""
    pos = torch.arange(length)
    causal = pos[None, :] <= pos[:, None]  # [query, key]
    in_prefix = pos[None, None, :] < prefix_lengths[:, None, None]  # [B, 1, key]
    return causal[None, :, :] | in_prefix


def draw_prefix_lengths(
    batch_size: int, min_prefix: int, max_prefix: int, generator: torch.Generator
) -> torch.Tensor:
    """[B] prefix lengths, uniform over min_prefix..max_prefix inclusive."""
    if not 1 <= min_prefix <= max_prefix:
        raise ConfigError(f"prefix range {min_prefix}..{max_prefix}: need 1 <= min_prefix <= max_prefix")
    return torch.randint(min_prefix, max_prefix + 1, (batch_size,), generator=generator)


def prefix_lm(
    windows: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    min_prefix: int = 1,
    max_prefix: int | None = None,
    prefix_lengths: torch.Tensor | None = None,
) -> Batch:
    """Prefix-LM batch from [B, T + 1] windows.

    Prefix lengths (in input positions, 1..T) are `prefix_lengths` when given, else drawn uniformly from
    min_prefix..max_prefix (max_prefix defaults to T - 1, leaving at least two continuation tokens) with
    `generator`, which is then required.
    """
    check_windows(windows, min_length=2)
    windows = windows.long()
    B, T = windows.shape[0], windows.shape[1] - 1
    if prefix_lengths is None:
        if generator is None:
            raise ConfigError("prefix_lm draws prefix lengths: pass a torch.Generator or prefix_lengths")
        upper = max(T - 1, 1) if max_prefix is None else max_prefix
        if upper > T:
            raise ConfigError(f"max_prefix = {upper}: longer than the {T} input positions")
        prefix_lengths = draw_prefix_lengths(B, min_prefix, upper, generator)
    prefix_lengths = prefix_lengths.long()
    if prefix_lengths.shape != (B,):
        raise DataError(f"prefix_lengths must have shape ({B},), got {tuple(prefix_lengths.shape)}")
    if bool(((prefix_lengths < 1) | (prefix_lengths > T)).any()):
        raise DataError(f"prefix lengths must lie in 1..{T}, got {prefix_lengths.tolist()}")

    input_ids = windows[:, :-1].contiguous()
    targets = windows[:, 1:].clone()
    # Target position i predicts window token i + 1: a continuation token iff i + 1 >= P.
    predicts_prefix = torch.arange(T)[None, :] + 1 < prefix_lengths[:, None]
    targets.masked_fill_(predicts_prefix, IGNORE_INDEX)
    return Batch(
        input_ids=input_ids,
        targets=targets,
        attention_mask=prefix_lm_attention_mask(prefix_lengths, T),
    )
