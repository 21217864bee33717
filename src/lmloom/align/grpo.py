"""GRPO as pure tensor functions: group-relative advantages, the k3 KL estimator, the clipped loss.

Definitions follow TRL 1.16 (`GRPOTrainer._generate_and_score_completions` and `_compute_loss`) with its
defaults: importance_sampling_level="token", scale_rewards="group", use_bias_correction_kl=True,
loss_type="dapo". Shapes: N = prompts * num_generations completions, generations of one prompt adjacent;
per-token tensors are [N, T] aligned with the completion mask.

- advantage_i = (r_i - mean_group) / (std_group + 1e-4); std is Bessel-corrected (n - 1), NaN rewards
  (unscorable) are left out of mean and std and get advantage 0. scale_rewards="batch" divides by the std
  of the whole batch instead (still centred per group); "none" only centres (Dr. GRPO).
- k3 KL (Schulman's estimator of KL(pi || ref) from samples of pi): exp(ref - logp) - (ref - logp) - 1 >= 0.
- ratio = exp(logp - old_logp); per-token loss = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
  + beta * kl, where with bias correction (TRL's default) kl is multiplied by the ratio (DeepSeek-V3.2:
  then the KL gradient is the unbiased reverse-KL gradient; on-policy the value is unchanged, the gradient
  is not). `delta` (INTELLECT-2's two-sided clip) caps the unclipped ratio from above.
- "dapo" aggregation: sum over every active token of the batch / number of active tokens in the *global
  accumulated* batch (`num_items`; default the local mask's count, which is the same thing on one device
  without accumulation). Also "grpo" (mean per sequence, then over sequences: length-biased), "bnpo"
  (local token mean) and "dr_grpo" (sum / (N * max_completion_length)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from lmloom.config import StrictConfig

ScaleRewards = Literal["group", "batch", "none"]
Aggregation = Literal["dapo", "grpo", "bnpo", "dr_grpo"]
ADVANTAGE_EPS = 1e-4  # TRL's constant


class GRPOConfig(StrictConfig):
    """The loss settings of a GRPO stage (defaults are TRL 1.16's GRPOConfig)."""

    num_generations: int = Field(8, ge=2, description="completions sampled per prompt (the group)")
    beta: float = Field(0.0, ge=0, description="KL coefficient; 0 = no reference model")
    epsilon: float = Field(0.2, gt=0, description="lower clip: ratio >= 1 - epsilon")
    epsilon_high: float | None = Field(None, gt=0, description="upper clip; None = epsilon (DAPO: 0.28)")
    delta: float | None = Field(None, gt=1, description="two-sided clipping: cap the unclipped ratio")
    scale_rewards: ScaleRewards = "group"
    loss_type: Aggregation = "dapo"
    use_bias_correction_kl: bool = True
    max_completion_length: int = Field(256, ge=1, description="dr_grpo's normaliser")


def _nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Bessel-corrected std ignoring NaNs (NaN where fewer than two values)."""
    dims = tuple(range(x.dim())) if dim is None else dim
    mean = torch.nanmean(x, dim=dims, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dims, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dims, keepdim=True)
    var = var * torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    std = var.sqrt()
    return std if keepdim else std.squeeze(dims) if dim is not None else std.reshape(())


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale_rewards: ScaleRewards = "group",
    eps: float = ADVANTAGE_EPS,
) -> torch.Tensor:
    """[N] advantages from [N] scalar rewards, each prompt's `num_generations` completions adjacent."""
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(
            f"rewards must be [N] with N a multiple of num_generations={num_generations}, "
            f"got shape {tuple(rewards.shape)}"
        )
    rewards = rewards.float()
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale_rewards == "group":
        if num_generations > 1:
            std = _nanstd(grouped, dim=1).repeat_interleave(num_generations)
        else:
            std = torch.zeros_like(rewards)
        advantages = advantages / (std + eps)
    elif scale_rewards == "batch":
        std = _nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = advantages / (std + eps)
    elif scale_rewards != "none":
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; choose 'group', 'batch' or 'none'")
    return torch.nan_to_num(advantages, nan=0.0)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || ref): exp(ref - logp) - (ref - logp) - 1 (never negative)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


@dataclass
class GRPOOutput:
    loss: torch.Tensor  # scalar, aggregated as asked
    per_token_loss: torch.Tensor  # [N, T], before masking
    ratio: torch.Tensor  # [N, T] exp(logp - old_logp), before any clipping
    kl: torch.Tensor | None  # [N, T] k3 KL (without the ratio), None when beta == 0
    low_clipped: torch.Tensor  # [N, T] bool: ratio < 1 - eps_low where A < 0
    high_clipped: torch.Tensor  # [N, T] bool: ratio > 1 + eps_high where A > 0


def grpo_per_token_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    use_bias_correction_kl: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(per-token loss [N, T], ratio [N, T], k3 KL or None). old_logps None = on-policy (logps detached)."""
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    old_logps = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
    per_token = -torch.min(unclipped * advantages, clipped * advantages)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps")
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * (kl * ratio if use_bias_correction_kl else kl)
    return per_token, ratio, kl


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: Aggregation = "dapo",
    *,
    num_items: torch.Tensor | float | None = None,
    max_completion_length: int | None = None,
) -> torch.Tensor:
    """Reduce [N, T] to a scalar over `mask`. dapo: `num_items` = active tokens of the whole accumulated,
    all-device batch (None = this mask's count); a trainer then does not rescale for accumulation."""
    mask = mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    if loss_type == "dapo":
        n = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=mask.dtype)
        return masked.sum() / n.clamp(min=1.0)
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        return masked.sum() / (per_token_loss.shape[0] * max_completion_length)
    raise ValueError(f"unknown loss_type {loss_type!r}; choose 'dapo', 'grpo', 'bnpo' or 'dr_grpo'")


def grpo_loss(
    config: GRPOConfig,
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    *,
    num_items: torch.Tensor | float | None = None,
) -> GRPOOutput:
    """The GRPO objective of one micro-batch with the config's settings (TRL's `_compute_loss` maths)."""
    eps_high = config.epsilon if config.epsilon_high is None else config.epsilon_high
    per_token, ratio, kl = grpo_per_token_loss(
        logps,
        old_logps,
        advantages,
        ref_logps,
        beta=config.beta,
        epsilon_low=config.epsilon,
        epsilon_high=eps_high,
        delta=config.delta,
        use_bias_correction_kl=config.use_bias_correction_kl,
    )
    loss = aggregate_loss(
        per_token,
        mask,
        config.loss_type,
        num_items=num_items,
        max_completion_length=config.max_completion_length,
    )
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    return GRPOOutput(
        loss=loss,
        per_token_loss=per_token,
        ratio=ratio,
        kl=kl,
        low_clipped=(ratio < 1 - config.epsilon) & (adv < 0),
        high_clipped=(ratio > 1 + eps_high) & (adv > 0),
    )
