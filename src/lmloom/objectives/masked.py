"""BERT's masked language modelling (Devlin et al., 2019), over fixed-length token windows.

Per row, round(mask_prob * n) of the n eligible positions are chosen uniformly without replacement
(eligible: not a special id, not padding, not the mask token itself). As in BERT's own data pipeline the
count is exact rather than a Bernoulli draw per position, so every row carries the same share of loss.
Of the chosen positions, each independently becomes the mask token with probability `replace_with_mask`,
a random ordinary token with probability `replace_with_random`, and stays unchanged otherwise (80/10/10 by
default): the model cannot tell from the input which unmasked tokens it will be asked about.

Targets hold the original id at chosen positions and IGNORE_INDEX elsewhere. Attention is bidirectional,
except that no query sees a padding key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmloom.errors import ConfigError
from lmloom.objectives.batch import (
    IGNORE_INDEX,
    Batch,
    check_probability,
    check_windows,
    key_padding_attention_mask,
)
from lmloom.tokenizers.base import BOS_ID, EOS_ID, PAD_ID


@dataclass(frozen=True)
class MaskedLMConfig:
    """What masked LM needs to know about the vocabulary, and its rates.

    mask_token_id: the [MASK] id. lmloom tokenizers have no such token, so the caller reserves one
    (an added token, or an unused id); it is never chosen as a position and never drawn as a random token.
    special_ids: ids never chosen and never drawn as random replacements (bos, eos, pad; add unk if the
    tokenizer has one). `pad_id` and `mask_token_id` are excluded whether listed or not.
    """

    mask_token_id: int
    vocab_size: int
    special_ids: frozenset[int] = field(default_factory=lambda: frozenset({BOS_ID, EOS_ID, PAD_ID}))
    pad_id: int = PAD_ID
    mask_prob: float = 0.15
    replace_with_mask: float = 0.8
    replace_with_random: float = 0.1

    def __post_init__(self) -> None:
        check_probability("mask_prob", self.mask_prob)
        check_probability("replace_with_mask", self.replace_with_mask)
        check_probability("replace_with_random", self.replace_with_random)
        if self.replace_with_mask + self.replace_with_random > 1:
            raise ConfigError(
                f"replace_with_mask + replace_with_random = "
                f"{self.replace_with_mask + self.replace_with_random}: must be at most 1"
            )
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ConfigError(
                f"mask_token_id = {self.mask_token_id}: not an id of a {self.vocab_size}-token vocabulary"
            )
        if not self.ordinary_ids().numel():
            raise ConfigError(
                "the vocabulary has no ordinary (non-special) token to draw random replacements from"
            )

    def excluded_ids(self) -> frozenset[int]:
        """Ids that are never a loss position and never a random replacement."""
        return self.special_ids | {self.pad_id, self.mask_token_id}

    def ordinary_ids(self) -> torch.Tensor:
        """The ids random replacements are drawn from, ascending."""
        keep = torch.ones(self.vocab_size, dtype=torch.bool)
        excluded = [i for i in self.excluded_ids() if 0 <= i < self.vocab_size]
        keep[torch.tensor(excluded, dtype=torch.long)] = False
        return keep.nonzero().squeeze(1)


def choose_positions(eligible: torch.Tensor, mask_prob: float, generator: torch.Generator) -> torch.Tensor:
    """Exactly round(mask_prob * eligible.sum(row)) positions per row, uniformly among the eligible ones.

    Each position gets a uniform score in [0, 1); ineligible ones get 2, so sorting puts every eligible
    position first, in random order, and the lowest-ranked k of them are chosen.
    """
    B, T = eligible.shape
    scores = torch.rand(B, T, generator=generator)
    scores = scores.masked_fill(~eligible, 2.0)
    order = scores.argsort(dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(T).expand(B, T))
    n_chosen = torch.round(eligible.sum(dim=1) * mask_prob).long()
    return rank < n_chosen[:, None]


def masked_lm(windows: torch.Tensor, config: MaskedLMConfig, generator: torch.Generator) -> Batch:
    """Corrupt [B, T] windows BERT-style; the batch has input_ids, targets and attention_mask [B, T, T]."""
    check_windows(windows, min_length=1)
    original = windows.long()
    excluded = torch.tensor(sorted(config.excluded_ids()), dtype=torch.long)
    eligible = ~torch.isin(original, excluded)
    chosen = choose_positions(eligible, config.mask_prob, generator)

    # Every draw has the batch's full shape, so the stream a generator yields is the same whatever was
    # chosen: a batch depends on (windows, config, seed) only.
    action = torch.rand(original.shape, generator=generator)
    ordinary = config.ordinary_ids()
    random_ids = ordinary[torch.randint(len(ordinary), original.shape, generator=generator)]

    to_mask = chosen & (action < config.replace_with_mask)
    to_random = (
        chosen
        & (action >= config.replace_with_mask)
        & (action < config.replace_with_mask + config.replace_with_random)
    )
    input_ids = original.masked_fill(to_mask, config.mask_token_id)
    input_ids = torch.where(to_random, random_ids, input_ids)
    targets = original.masked_fill(~chosen, IGNORE_INDEX)
    return Batch(
        input_ids=input_ids,
        targets=targets,
        attention_mask=key_padding_attention_mask(original != config.pad_id),
    )
