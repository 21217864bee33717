"""The one shape every pre-training objective hands to a model: a `Batch`, plus the checks they share.

An objective is a pure function of (token windows [B, T], config, `torch.Generator`): the same windows and
the same generator state give the same `Batch`, whatever else the process has drawn from torch's global
generator. Loss positions are marked the way `lmloom.models.decoder` reads them: a target equal to
`IGNORE_INDEX` adds nothing to the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmloom.errors import ConfigError, DataError
from lmloom.models.decoder import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "Batch", "check_probability", "check_windows", "key_padding_attention_mask"]


@dataclass(frozen=True)
class Batch:
    """Model inputs and loss targets for one batch.

    input_ids         [B, T'] int64: what the model (the encoder, for encoder-decoder objectives) reads.
    targets           [B, T'] int64, IGNORE_INDEX where no loss. Aligned with `input_ids` for decoder-only
                      objectives; with `decoder_input_ids` (shape [B, T'']) when that is set.
    attention_mask    [B, T', T'] bool, True where query i may attend to key j; None means plain causal.
    decoder_input_ids [B, T''] int64 for encoder-decoder objectives: the targets shifted right behind a
                      start token (teacher forcing); the decoder attends causally. None otherwise.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    attention_mask: torch.Tensor | None = None
    decoder_input_ids: torch.Tensor | None = None

    @property
    def labels(self) -> torch.Tensor:
        """`targets` under the name Hugging Face encoder-decoder models take them."""
        return self.targets


def check_windows(windows: torch.Tensor, min_length: int) -> None:
    """Refuse anything but a [B, T] integer tensor with T >= min_length, before any randomness is drawn."""
    if windows.dim() != 2:
        raise DataError(f"token windows must be a [batch, length] tensor, got shape {tuple(windows.shape)}")
    if windows.dtype not in (torch.int64, torch.int32):
        raise DataError(f"token windows must hold integer ids, got dtype {windows.dtype}")
    if windows.shape[1] < min_length:
        raise DataError(
            f"token windows of length {windows.shape[1]}: this objective needs at least {min_length}"
        )


def check_probability(name: str, value: float, *, open_low: bool = False, open_high: bool = False) -> None:
    """A ConfigError unless `value` lies in [0, 1] (each end excluded when asked)."""
    low_ok = value > 0 if open_low else value >= 0
    high_ok = value < 1 if open_high else value <= 1
    if not (low_ok and high_ok):
        lo, hi = "(" if open_low else "[", ")" if open_high else "]"
        raise ConfigError(f"{name} = {value}: must lie in {lo}0, 1{hi}")


def key_padding_attention_mask(key_is_real: torch.Tensor) -> torch.Tensor:
    """Bidirectional [B, T, T] mask: every query sees every real key, and itself.

    The diagonal is kept for padding queries too: a query row with no visible key would make softmax
    produce NaN, which then spreads through the backward pass even though padding carries no loss.
    Real queries are unaffected, since their own key is real anyway.
    """
    B, T = key_is_real.shape
    eye = torch.eye(T, dtype=torch.bool, device=key_is_real.device)
    return key_is_real[:, None, :].expand(B, T, T) | eye
