"""A scalar reward model on the decoder trunk, and the Bradley–Terry pairwise loss.

`RewardModel` = a `Decoder`'s embedding, blocks and final norm (its LM head unused) + `score`, an
nn.Linear without bias over pooled hidden states. Two poolings:

    last        the hidden state of each sequence's last real token (right padding; attention is causal, so
                the padding after it cannot change the reward): Hugging Face's
                `AutoModelForSequenceClassification` and TRL's RewardTrainer read the same token.
    relevance   that, concatenated with a prompt-answer relevance term per block: the elementwise product
                of the block output's mean over the answer's tokens and its mean over the prompt's tokens,
                each scaled to unit RMS (the last block's output through the final norm). The score head
                then holds, for every block, a diagonal bilinear form answer^T diag(u) prompt next to the
                last-token readout: d_model * (n_layers + 1) features. Needs the completion mask (which
                tokens are the answer).

Why `relevance` exists: a small trunk's last-token state carries little about *whether the answer is about
what was asked*. On the built-in pairs, whose rejected answer is mostly a fluent answer to another
question, a head on the frozen 5M quickstart SFT trunk's last token reaches 57% held-out pairwise accuracy
(fine-tuning the whole trunk as well: 52-60%); with the relevance terms about 75-78% (docs/fine-tuning.md).
The earlier blocks matter: the final states alone give 70-77% on two quickstart SFT checkpoints.

No bias: the Bradley–Terry loss sees only reward differences, so a bias would get exactly zero gradient
(Hugging Face's sequence-classification `score` head has none either).

Loss as TRL's RewardTrainer: -logsigmoid(r_chosen - r_rejected - margin).mean(), plus optionally
center_rewards_coefficient * mean((r_chosen + r_rejected)^2) (Eisenstein et al. 2023) to pin the
otherwise free offset of the rewards.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmloom.align.logprobs import decoder_hidden_states, decoder_layer_states
from lmloom.models.decoder import Decoder, DecoderConfig

Pooling = Literal["last", "relevance"]
POOLINGS: tuple[str, ...] = ("last", "relevance")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the last position where attention_mask is set (0 for an all-zero row)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * positions).amax(dim=1)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, d] mean of hidden [B, T, d] over the positions where mask [B, T] is set (0 for none)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def _unit_rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


class RewardModel(nn.Module):
    """input_ids [B, T] (+ attention_mask [B, T], right-padded; + completion_mask [B, T], 1 on the answer's
    tokens, needed by `relevance` pooling) -> rewards [B] float32."""

    def __init__(self, trunk: Decoder, pooling: Pooling = "last"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose from {list(POOLINGS)}")
        self.trunk, self.pooling = trunk, pooling
        blocks = trunk.config.n_layers if pooling == "relevance" else 0
        features = trunk.config.d_model * (1 + blocks)
        self.score = nn.Linear(features, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1.0 / (features + 1) ** 0.5)

    @classmethod
    def from_config(cls, config: DecoderConfig, pooling: Pooling = "last") -> RewardModel:
        return cls(Decoder(config), pooling)

    def trunk_trainable(self) -> bool:
        return any(p.requires_grad for p in self.trunk.parameters())

    def features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        completion_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, features] what the score head reads."""
        if self.pooling == "relevance" and completion_mask is None:
            raise ValueError("relevance pooling needs completion_mask (1 on the answer's tokens)")
        # A frozen trunk (align.reward's default) runs without building a graph: only the head learns.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trunk_trainable()):
            if self.pooling == "last":
                states = [decoder_hidden_states(self.trunk, input_ids)]
            else:
                states = decoder_layer_states(self.trunk, input_ids)
        hidden = states[-1]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, last_token_index(attention_mask)]
        if self.pooling == "last":
            return last
        real = attention_mask.bool()
        answer = completion_mask.bool() & real
        prompt = real & ~answer
        relevance = [_unit_rms(masked_mean(h, answer)) * _unit_rms(masked_mean(h, prompt)) for h in states]
        return torch.cat([last, *relevance], dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        completion_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.score(self.features(input_ids, attention_mask, completion_mask)).squeeze(-1).float()


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
