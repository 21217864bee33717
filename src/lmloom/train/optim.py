"""AdamW with weight-decay groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from pydantic import ConfigDict, Field

from lmloom.config import StrictConfig


class OptimConfig(StrictConfig):
    # `lr: .inf` (YAML's infinity) passes `gt=0` and would only fail after the guard's rollbacks.
    model_config = ConfigDict(allow_inf_nan=False)

    lr: float = Field(3e-3, gt=0, description="peak learning rate, reached after warmup")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr as a fraction of the peak")
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.95, gt=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables clipping")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights); never decay norms' gains or biases."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay)
    # fused=True runs one kernel over all params (also on CPU); it matches the foreach result. It cannot
    # take a mix of DTensor and plain parameters (tensor parallelism shards some, not norms/embeddings).
    kinds = {type(p).__name__ == "DTensor" for group in groups for p in group["params"]}
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=len(kinds) < 2,
    )


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup to the peak, then cosine decay to `min_lr_ratio * lr` at `total_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)
