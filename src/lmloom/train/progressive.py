"""Progressive training: sequence-length warmup (Li et al., 2022, "The Stability-Efficiency Dilemma").

Early steps train on short sequences, which are cheap and keep the first, noisiest updates small; the
length grows linearly to the model's full context over `steps` optimizer steps. The length is a pure
function of the step, so a resumed run replays the same schedule. Lengths are multiples of
`seq_len // 8` (at least 8), so `torch.compile` sees at most eight shapes.

The loader still hands out full windows, one per sequence: a shortened step uses the beginning of each
window and skips the rest, so the data order and the data position (one integer) stay exactly those
of a run without warmup.
"""

from __future__ import annotations

from pydantic import Field

from lmloom.config import StrictConfig


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
