"""A scalar reward model on the decoder trunk, and the Bradley–Terry pairwise loss.

`RewardModel` = a `Decoder`'s embedding, blocks and final norm (its LM head unused) + `score`, an
nn.Linear(d_model, 1) without bias, read at each sequence's last real token (right padding; attention is
causal, so the padding after it cannot change the reward). No bias because the Bradley–Terry loss sees only
reward differences: a bias would get exactly zero gradient (Hugging Face's sequence-classification `score`
head has none either).

Loss as TRL's RewardTrainer: -logsigmoid(r_chosen - r_rejected - margin).mean(), plus optionally
center_rewards_coefficient * mean((r_chosen + r_rejected)^2) (Eisenstein et al. 2023) to pin the
otherwise free offset of the rewards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmloom.align.logprobs import decoder_hidden_states
from lmloom.models.decoder import Decoder, DecoderConfig


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the last position where attention_mask is set (0 for an all-zero row)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * positions).amax(dim=1)


class RewardModel(nn.Module):
    """input_ids [B, T] (+ attention_mask [B, T], right-padded) -> rewards [B] float32."""

    def __init__(self, trunk: Decoder):
        super().__init__()
        self.trunk = trunk
        self.score = nn.Linear(trunk.config.d_model, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1.0 / (trunk.config.d_model + 1) ** 0.5)

    @classmethod
    def from_config(cls, config: DecoderConfig) -> RewardModel:
        return cls(Decoder(config))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = decoder_hidden_states(self.trunk, input_ids)
        if attention_mask is None:
            last = hidden[:, -1]
        else:
            idx = last_token_index(attention_mask)
            last = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
        return self.score(last).squeeze(-1).float()


def bradley_terry_loss(
    rewards_chosen: torch.Tensor,
    rewards_rejected: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """Mean -log sigmoid(r_chosen - r_rejected - margin) (the BT negative log-likelihood) over pairs."""
    diff = rewards_chosen - rewards_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)
    return loss


def pairwise_accuracy(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> float:
    """Fraction of pairs whose chosen answer gets the strictly higher reward (TRL's `accuracy`)."""
    return (rewards_chosen > rewards_rejected).float().mean().item()
