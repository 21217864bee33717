"""The DPO loss family on sequence log-probs: sigmoid (DPO), IPO, hinge (SLiC) and robust (rDPO).

Every loss reads the same four [B] tensors, the summed completion log-probs of the policy and of the
reference on the chosen and the rejected answer, and one number per pair,

    delta = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected),

and matches TRL 1.16 (`DPOTrainer._compute_loss`, f_divergence_type="reverse_kl") term for term:

    sigmoid  -logsigmoid(beta * delta)                                 Rafailov et al. 2023
    hinge    relu(1 - beta * delta)                                    Zhao et al. 2023 (SLiC)
    ipo      (delta_ipo - 1 / (2 * beta))^2                            Azar et al. 2023, Eq. 17 (beta = tau)
    robust   ((1 - eps) * -logsigmoid(beta * delta) - eps * -logsigmoid(-beta * delta)) / (1 - 2 * eps)
                                                                       Chowdhury et al. 2024, eps = flip rate

IPO and length: TRL divides each policy/reference log-ratio by its completion's token count before the
square (its comment: confirmed with the IPO authors; the paper's results use that form). Here that is
what `chosen_lengths` / `rejected_lengths` do; without them IPO is the paper's Eq. 17 on whole-sequence
log-ratios, whose square grows with completion length, so beta would mean something different for every
length. `PreferenceConfig.ipo_length_normalized` (default True, TRL's choice) says which one a trainer asks for.

label_smoothing: TRL 1.16 reads it only in `robust` (and `exo_pair`); its `sigmoid` ignores it (older TRL
used it there for cDPO). Rather than ignore a setting, a non-zero value with another loss is an error.

The logged rewards are TRL's: chosen_rewards = beta * (policy_chosen - ref_chosen), likewise rejected;
accuracy = chosen_rewards > rejected_rewards; margin = their difference. They use the whole-sequence
log-ratios for every loss type, IPO included, and are detached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from lmloom.config import StrictConfig

LossType = Literal["sigmoid", "ipo", "hinge", "robust"]
LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "robust")


class PreferenceConfig(StrictConfig):
    """How a DPO-family stage scores a preference pair (defaults are TRL's DPOConfig)."""

    loss_type: LossType = "sigmoid"
    beta: float = Field(0.1, gt=0, description="KL strength; IPO's tau")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="robust loss only: probability that a preference label is flipped"
    )
    reference: Literal["model", "precomputed"] = Field(
        "model",
        description="'model': run the frozen reference each step; 'precomputed': read its log-probs "
        "from the dataset (computed once before training)",
    )
    ipo_length_normalized: bool = Field(
        True, description="IPO on per-token average log-ratios (TRL) instead of whole-sequence ones"
    )

    @model_validator(mode="after")
    def _check_smoothing(self) -> PreferenceConfig:
        if self.label_smoothing and self.loss_type != "robust":
            raise ValueError(
                f"label_smoothing={self.label_smoothing} is only used by loss_type='robust' "
                f"(got loss_type={self.loss_type!r}); set it to 0 or choose 'robust'"
            )
        return self


@dataclass
class PreferenceOutput:
    """Per-pair losses [B] (take `.mean()`), and TRL's detached reward statistics [B]."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracies(self) -> torch.Tensor:
        return (self.chosen_rewards > self.rejected_rewards).float()

    def metrics(self) -> dict[str, float]:
        """The batch means TRL logs under the same names."""
        return {
            "rewards/chosen": self.chosen_rewards.mean().item(),
            "rewards/rejected": self.rejected_rewards.mean().item(),
            "rewards/accuracies": self.accuracies.mean().item(),
            "rewards/margins": self.margins.mean().item(),
        }


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    loss_type: LossType = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PreferenceOutput:
    """The per-pair loss of `loss_type` and the reward statistics; all inputs [B] summed log-probs.

    chosen_lengths / rejected_lengths [B]: completion token counts, used by IPO only (TRL's per-token form).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose from {list(LOSS_TYPES)}")
    if label_smoothing and loss_type != "robust":
        raise ValueError(f"label_smoothing is only used by loss_type='robust', got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("give both chosen_lengths and rejected_lengths, or neither")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(logits)
    elif loss_type == "hinge":
        losses = torch.relu(1 - logits)
    elif loss_type == "ipo":
        if chosen_lengths is not None:
            ipo_delta = chosen_logratios / chosen_lengths.clamp(min=1.0) - rejected_logratios / (
                rejected_lengths.clamp(min=1.0)
            )
        else:
            ipo_delta = chosen_logratios - rejected_logratios
        losses = (ipo_delta - 1 / (2 * beta)) ** 2
    else:  # robust
        eps = label_smoothing  # the probability that this pair's label is flipped
        clean = -(1 - eps) * F.logsigmoid(logits)
        flipped = -eps * F.logsigmoid(-logits)
        losses = (clean - flipped) / (1 - 2 * eps)  # unbiased for the clean-label loss (their Eq. 6)

    return PreferenceOutput(
        losses=losses,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
    )


def preference_loss_from_config(
    config: PreferenceConfig,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PreferenceOutput:
    """`preference_loss` with the config's settings; IPO needs the lengths when `ipo_length_normalized`."""
    if config.loss_type == "ipo" and config.ipo_length_normalized:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo_length_normalized=True needs chosen_lengths and rejected_lengths")
    else:
        chosen_lengths = rejected_lengths = None
    return preference_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        loss_type=config.loss_type,
        beta=config.beta,
        label_smoothing=config.label_smoothing,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
