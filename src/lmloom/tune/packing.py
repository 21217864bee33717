"""Sequence packing: encoded conversations placed whole into fixed-length windows, loss masks carried along.

A window is `seq_len` tokens:

    <|eos|> conversation 1 <|eos|> conversation 2 ... <|pad|> <|pad|>

- Every conversation is preceded by EOS, as every pre-training document is (the shard encoder ends
  each document with EOS), so "after EOS" means "a new document starts" in both stages. EOS and PAD
  carry no loss.
- A conversation is **never split** across windows: every assistant token is in the same window as
  its whole conversation so far, so no window begins mid-turn without its context. A conversation that
  cannot fit (1 + its length > `seq_len`) is skipped and counted (`PackStats.too_long`); encode with
  `max_len <= seq_len - 1` to refuse those earlier, with a reason per row.
- Placement is first-fit in the given order (each conversation goes into the first window with room),
  deterministic and usually under a few percent padding; shuffle before packing if order matters.
- Document boundaries are kept as data, not enforced: each window carries `segment_ids` (1, 2, ... per
  conversation, 0 for padding) and `position_ids` (restarting at 0 on each EOS). The default training
  path ignores both and lets a conversation attend to the earlier ones in its window across the EOS,
  exactly as pre-training does with documents; `isolation_mask` turns the segment ids into a
  block-diagonal causal mask for a trainer that wants conversations isolated.

`loss_mask[i] == 1` means token i is a loss target (predicted from tokens 0..i-1); `sft_batch` shifts
windows into the `Batch` (inputs, targets with IGNORE_INDEX) the models read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lmloom.errors import DataError
from lmloom.tokenizers.base import EOS_ID, PAD_ID

if TYPE_CHECKING:  # torch is imported only by the helpers that build tensors
    import torch

    from lmloom.objectives.batch import Batch


@dataclass
class PackedWindow:
    input_ids: list[int]
    loss_mask: list[int]
    segment_ids: list[int]  # 1, 2, ... per conversation; 0 on padding
    position_ids: list[int]  # restart at 0 on the EOS that opens each conversation
    examples: list[int] = field(default_factory=list)  # indices (in the input) of its conversations


@dataclass
class PackStats:
    conversations: int = 0  # packed
    windows: int = 0
    tokens: int = 0  # real tokens, EOS separators included
    loss_tokens: int = 0
    padding: int = 0
    too_long: list[int] = field(default_factory=list)  # indices of the conversations that did not fit

    @property
    def padding_fraction(self) -> float:
        total = self.tokens + self.padding
        return self.padding / total if total else 0.0


def pack(
    examples: Iterable[tuple[Sequence[int], Sequence[int]]],
    seq_len: int,
    *,
    eos_id: int = EOS_ID,
    pad_id: int = PAD_ID,
) -> tuple[list[PackedWindow], PackStats]:
    """Pack (input_ids, loss_mask) pairs into windows of exactly `seq_len` tokens (see module doc)."""
    if seq_len < 2:
        raise DataError(f"seq_len = {seq_len}: a window needs room for EOS and at least one token")
    windows: list[PackedWindow] = []
    room: list[int] = []  # free tokens per window, same order
    stats = PackStats()
    for index, (ids, mask) in enumerate(examples):
        if len(ids) != len(mask):
            raise DataError(f"example {index}: {len(ids)} ids but {len(mask)} loss-mask entries")
        need = 1 + len(ids)
        if not ids or need > seq_len:
            stats.too_long.append(index)  # an empty example has nothing to learn; counted alike
            continue
        slot = next((w for w, free in enumerate(room) if free >= need), None)
        if slot is None:
            windows.append(PackedWindow([], [], [], []))
            room.append(seq_len)
            slot = len(windows) - 1
        window = windows[slot]
        segment = len(window.examples) + 1
        window.input_ids += [eos_id, *ids]
        window.loss_mask += [0, *(int(bool(m)) for m in mask)]
        window.segment_ids += [segment] * need
        window.position_ids += range(need)
        window.examples.append(index)
        room[slot] -= need
        stats.conversations += 1
        stats.tokens += need
        stats.loss_tokens += sum(1 for m in mask if m)
    for window, free in zip(windows, room, strict=True):
        window.input_ids += [pad_id] * free
        window.loss_mask += [0] * free
        window.segment_ids += [0] * free
        window.position_ids += [0] * free
        stats.padding += free
    stats.windows = len(windows)
    return windows, stats


def window_tensors(windows: Sequence[PackedWindow]) -> dict[str, torch.Tensor]:
    """The windows as [N, seq_len] int64 tensors: input_ids, loss_mask, segment_ids, position_ids."""
    import torch

    names = ("input_ids", "loss_mask", "segment_ids", "position_ids")
    return {name: torch.tensor([getattr(w, name) for w in windows], dtype=torch.long) for name in names}


def sft_batch(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> Batch:
    """Shift [B, T] packed windows into a [B, T - 1] next-token `Batch` with loss only where masked."""
    from lmloom.objectives.batch import IGNORE_INDEX, Batch

    targets = input_ids[:, 1:].masked_fill(loss_mask[:, 1:] == 0, IGNORE_INDEX)
    return Batch(input_ids=input_ids[:, :-1].contiguous(), targets=targets.contiguous())


def isolation_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, T, T] bool: causal attention within each conversation only (padding sees itself only)."""
    import torch

    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    eye = torch.eye(T, dtype=torch.bool, device=segment_ids.device)
    return (same & causal & (segment_ids[:, :, None] != 0)) | eye
