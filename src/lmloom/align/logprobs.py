"""Log-probabilities of completion tokens under a `Decoder`, without the logits of the whole batch.

Convention (TRL's): `input_ids` [B, T] is prompt + completion (right-padded), `loss_mask` [B, T] is 1 on the
tokens whose log-probability counts (the completion) and 0 on prompt and padding. Token t is predicted by
the hidden state at t - 1, so the per-token result is [B, T - 1], aligned with `loss_mask[:, 1:]`.

Only the masked positions go through the LM head, a chunk of rows at a time: log p = logit[target] -
logsumexp(logits). Under autograd each chunk is checkpointed, so its [rows, V] logits are rebuilt in
backward instead of being kept: peak memory is one chunk's logits, not B * T * V.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmloom.models.decoder import Decoder

# Logits per chunk (rows * vocab): 4M floats = 16 MiB, the size decoder.linear_cross_entropy measured fastest.
DEFAULT_CHUNK_ELEMS = 1 << 22


def decoder_hidden_states(model: Decoder, input_ids: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states [B, T, d_model]: `Decoder.forward` up to, not including, the LM head.

    Causal attention, so with right padding the states of real tokens do not depend on the padding.
    """
    T = input_ids.shape[1]
    if T > model.config.seq_len:
        raise ValueError(f"sequence length {T} exceeds the model's seq_len {model.config.seq_len}")
    cos, sin = model.rope_cos[:T, None].float(), model.rope_sin[:T, None].float()
    x = model.tok_emb(input_ids)
    for layer in model.layers:
        x = layer(x, cos, sin)
    return model.norm(x)


def decoder_layer_states(model: Decoder, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """The output [B, T, d_model] of every block, the last one through the final norm (so the last entry is
    `decoder_hidden_states`)."""
    T = input_ids.shape[1]
    if T > model.config.seq_len:
        raise ValueError(f"sequence length {T} exceeds the model's seq_len {model.config.seq_len}")
    cos, sin = model.rope_cos[:T, None].float(), model.rope_sin[:T, None].float()
    x = model.tok_emb(input_ids)
    states = []
    for layer in model.layers:
        x = layer(x, cos, sin)
        states.append(x)
    states[-1] = model.norm(x)
    return states


def _target_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float):
    logits = (h @ weight.t()).float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=1)


def hidden_to_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> torch.Tensor:
    """log softmax(hidden @ weight.T / temperature)[target] for hidden [N, d], targets [N] -> [N] float32."""
    chunk = max(1, chunk_elems // weight.shape[0])
    use_ckpt = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    parts = []
    for s in range(0, hidden.shape[0], chunk):
        args = (hidden[s : s + chunk], weight, targets[s : s + chunk], temperature)
        if use_ckpt:
            parts.append(checkpoint(_target_logprobs, *args, use_reentrant=False))
        else:
            parts.append(_target_logprobs(*args))
    if not parts:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(parts)


def per_token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> torch.Tensor:
    """[B, T - 1] float32: log p(input_ids[:, t + 1] | input_ids[:, : t + 1]) where loss_mask[:, t + 1], else 0.

    `temperature` divides the logits first (GRPO scores completions at the sampling temperature).
    """
    if input_ids.shape != loss_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and loss_mask {tuple(loss_mask.shape)} differ")
    hidden = decoder_hidden_states(model, input_ids)[:, :-1]  # position t predicts token t + 1
    targets, mask = input_ids[:, 1:], loss_mask[:, 1:].bool()
    picked = hidden_to_token_logprobs(
        hidden[mask], model.head_weight, targets[mask], temperature=temperature, chunk_elems=chunk_elems
    )
    out = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    return out.masked_scatter(mask, picked)


def sequence_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    average: bool = False,
    temperature: float = 1.0,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> torch.Tensor:
    """[B]: the sum of the completion tokens' log-probs (their mean with `average=True`; 0 for none)."""
    per_token = per_token_logprobs(
        model, input_ids, loss_mask, temperature=temperature, chunk_elems=chunk_elems
    )
    total = per_token.sum(dim=1)
    if average:
        total = total / loss_mask[:, 1:].sum(dim=1).clamp(min=1)
    return total


def completion_lengths(loss_mask: torch.Tensor) -> torch.Tensor:
    """[B] number of target tokens that get a log-prob: loss_mask[:, 1:].sum(1).

    TRL's IPO divides by completion_mask.sum(1), the whole mask; the two agree unless loss_mask[:, 0] is
    set (a completion with no prompt, whose first token has no log-prob and so is not counted here).
    """
    return loss_mask[:, 1:].sum(dim=1)
