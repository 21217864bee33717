"""Autoregressive sampling with a KV cache: prefill the prompt once, then feed one token at a time.

Works with any model that has the `Decoder` interface: `config.seq_len`, `config.vocab_size`,
`new_kv_cache(batch_size, max_len)` and `forward(idx, kv_cache=..., start_pos=...) -> logits`.

Length policy: the prompt plus the new tokens must fit in the model's `seq_len`; otherwise a `ValueError`
says so before any work is done (nothing is silently truncated).
Stop policy: a token in `stop_ids` (or `eos_id`) ends generation and is included as the last token.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch


def _check_args(model, prompt_ids, max_new_tokens, temperature, top_k, top_p) -> None:
    cfg = model.config
    if not prompt_ids:
        raise ValueError("prompt_ids is empty; generation needs at least one token")
    if any(not 0 <= t < cfg.vocab_size for t in prompt_ids):
        raise ValueError(f"prompt_ids must lie in [0, {cfg.vocab_size}) (the model's vocab_size)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if len(prompt_ids) + max_new_tokens > cfg.seq_len:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"seq_len ({cfg.seq_len}); shorten the prompt or ask for fewer tokens"
        )


def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Finite logits / temperature for a softmax, shifted so that the largest is 0 (the same distribution).

    Extreme but valid values must not turn into nan: 5e-324 is 0 once it meets float32 (0 / 0), a large
    logit over a tiny temperature overflows (inf - inf). Clamped to float32's range, the top token stays
    on top, so a temperature that small samples as greedy does."""
    info = torch.finfo(logits.dtype)
    finite = logits.clamp(-info.max, info.max)
    return ((finite - finite.max()) / max(temperature, info.tiny)).clamp(-info.max, info.max)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus (smallest set with mass >= top_p)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator,
) -> int:
    """One token id from the logits of one position ([V])."""
    if temperature == 0:
        return int(logits.argmax())
    logits = filter_logits(scale_logits(logits.float(), temperature), top_k, top_p)
    return int(torch.multinomial(logits.softmax(dim=-1), 1, generator=generator))


def _last_logits(model, ids: list[int], cache, start_pos: int, device) -> torch.Tensor:
    # Eval mode and inference mode only around the call, so nothing leaks while the stream is suspended.
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            idx = torch.tensor([ids], dtype=torch.long, device=device)
            return model(idx, kv_cache=cache, start_pos=start_pos)[0, -1].float()
    finally:
        model.train(was_training)


def generate_stream(
    model,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    stop_ids: Iterable[int] = (),
) -> Iterator[int]:
    """An iterator over the new token ids, one per step (see `generate`); arguments are checked now."""
    prompt_ids = list(prompt_ids)
    _check_args(model, prompt_ids, max_new_tokens, temperature, top_k, top_p)
    stop = set(stop_ids) | ({eos_id} if eos_id is not None else set())
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # a fresh non-deterministic seed, without touching the global RNG
    else:
        generator.manual_seed(seed)

    def stream() -> Iterator[int]:
        if max_new_tokens == 0:
            return
        cache = model.new_kv_cache(1, len(prompt_ids) + max_new_tokens)
        logits = _last_logits(model, prompt_ids, cache, 0, device)  # prefill: the whole prompt at once
        pos = len(prompt_ids)
        for i in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)
            yield token
            if token in stop or i == max_new_tokens - 1:
                return
            logits = _last_logits(model, [token], cache, pos, device)
            pos += 1

    return stream()


def generate(
    model,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    stop_ids: Iterable[int] = (),
) -> list[int]:
    """The new tokens after `prompt_ids`: temperature 0 is greedy, otherwise sampling after top-k and
    top-p (nucleus) filtering from a generator seeded with `seed`. Stops after `eos_id` / any of
    `stop_ids` (included) or after `max_new_tokens`. Raises ValueError for bad arguments or when prompt +
    new tokens would exceed the model's seq_len."""
    return list(
        generate_stream(
            model,
            prompt_ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            eos_id=eos_id,
            stop_ids=stop_ids,
        )
    )
