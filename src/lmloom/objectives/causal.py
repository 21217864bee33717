"""Next-token prediction, the objective `WindowLoader` windows were cut for.

A window of T + 1 tokens gives inputs `window[:, :-1]` and targets `window[:, 1:]`: position i predicts
token i + 1 and sees tokens 0..i, which plain causal attention (attention_mask None) enforces.
"""

from __future__ import annotations

import torch

from lmloom.objectives.batch import Batch, check_windows


def causal_lm(windows: torch.Tensor, generator: torch.Generator | None = None) -> Batch:
    """Shift [B, T + 1] windows into a [B, T] next-token batch.

    `generator` is unused (nothing here is random); it is accepted so every objective is called alike.
    """
    del generator
    check_windows(windows, min_length=2)
    windows = windows.long()
    return Batch(input_ids=windows[:, :-1].contiguous(), targets=windows[:, 1:].contiguous())
