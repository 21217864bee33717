"""T5's span corruption (Raffel et al., 2020, section 3.1.4), for an encoder-decoder model.

The noise mask follows `random_spans_noise_mask` of the T5 code base:

    n_noise  = round(n * noise_density), kept within [1, n - 1]
    n_spans  = round(n_noise / mean_noise_span_length), at least 1 (and at most n - n_noise)

The noise tokens are cut into n_spans non-empty spans and the other tokens into as many non-empty runs,
every such cut equally likely; runs and spans then alternate, starting with a run of kept tokens. So the
first token is never noise and the last always is, and the lengths depend on n only.

From the mask (sentinel k is `first_sentinel_id - k`, T5's <extra_id_k>):

    encoder input : kept tokens, each noise span replaced by its sentinel, then eos
    decoder target: each sentinel followed by the tokens of its span, then eos

Rows lose their trailing padding before corruption, so they can differ in length; encoder inputs are
padded with pad_id, targets with IGNORE_INDEX, to the batch's longest row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmloom.errors import ConfigError, DataError
from lmloom.objectives.batch import (
    IGNORE_INDEX,
    Batch,
    check_probability,
    check_windows,
    key_padding_attention_mask,
)
from lmloom.tokenizers.base import BOS_ID, EOS_ID, PAD_ID


@dataclass(frozen=True)
class SpanCorruptionConfig:
    """Span corruption's rates and ids.

    first_sentinel_id: the id of sentinel 0; sentinel k is first_sentinel_id - k, for k < n_sentinels.
    T5 uses vocab_size - 1 and 100 sentinels. With lmloom tokenizers the caller reserves the ids.
    decoder_start_id: the token the decoder reads before its first target (T5 uses its pad id, 0).
    """

    first_sentinel_id: int
    n_sentinels: int = 100
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    eos_id: int = EOS_ID
    pad_id: int = PAD_ID
    decoder_start_id: int = BOS_ID

    def __post_init__(self) -> None:
        check_probability("noise_density", self.noise_density, open_low=True, open_high=True)
        if self.mean_noise_span_length < 1:
            raise ConfigError(f"mean_noise_span_length = {self.mean_noise_span_length}: must be at least 1")
        if self.n_sentinels < 1:
            raise ConfigError(f"n_sentinels = {self.n_sentinels}: must be at least 1")
        if self.first_sentinel_id - (self.n_sentinels - 1) < 0:
            raise ConfigError(
                f"first_sentinel_id = {self.first_sentinel_id} leaves no room for {self.n_sentinels} "
                "sentinels counting down from it"
            )


def noise_counts(n_tokens: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a row of n_tokens >= 2 tokens; deterministic, as in T5."""
    if n_tokens < 2:
        raise DataError(f"a row of {n_tokens} token(s) cannot be span-corrupted: it needs at least 2")
    # Both counts stay positive so that neither a noise span nor a kept run can be empty.
    n_noise = min(max(round(n_tokens * noise_density), 1), n_tokens - 1)
    n_spans = max(round(n_noise / mean_noise_span_length), 1)
    # T5 leaves this case undefined; more spans than kept tokens would need an empty kept run.
    n_spans = min(n_spans, n_tokens - n_noise)
    return n_noise, n_spans


def span_corruption_lengths(n_tokens: int, config: SpanCorruptionConfig) -> tuple[int, int]:
    """(encoder input length, decoder target length), eos included, for a row of n_tokens tokens."""
    n_noise, n_spans = noise_counts(n_tokens, config.noise_density, config.mean_noise_span_length)
    return n_tokens - n_noise + n_spans + 1, n_noise + n_spans + 1


def tokens_length_for_inputs(inputs_length: int, config: SpanCorruptionConfig) -> int:
    """The longest window whose encoder input fits in inputs_length tokens (T5's `random_spans_helper`).

    Use it to size windows: a loader cutting windows of this many tokens fills the encoder with no padding.
    """
    n_tokens = 2
    if span_corruption_lengths(n_tokens, config)[0] > inputs_length:
        raise ConfigError(f"inputs_length = {inputs_length}: too short for even a two-token window")
    # Encoder length never shrinks as n grows (a new token is kept, or it adds noise inside spans).
    while span_corruption_lengths(n_tokens + 1, config)[0] <= inputs_length:
        n_tokens += 1
    return n_tokens


def random_segmentation(n_items: int, n_segments: int, generator: torch.Generator) -> torch.Tensor:
    """Lengths of n_segments non-empty segments summing to n_items, every composition equally likely.

    A segment starts after each of n_segments - 1 cut points, drawn without replacement from the
    n_items - 1 gaps between items.
    """
    cut_after = torch.zeros(n_items, dtype=torch.long)
    gaps = torch.randperm(n_items - 1, generator=generator)[: n_segments - 1]
    cut_after[gaps + 1] = 1
    segment_id = cut_after.cumsum(0)
    return torch.bincount(segment_id, minlength=n_segments)


def random_spans_noise_mask(
    n_tokens: int, noise_density: float, mean_noise_span_length: float, generator: torch.Generator
) -> torch.Tensor:
    """A [n_tokens] bool mask, True on noise: kept runs and noise spans alternate, kept first."""
    n_noise, n_spans = noise_counts(n_tokens, noise_density, mean_noise_span_length)
    noise_lengths = random_segmentation(n_noise, n_spans, generator)
    kept_lengths = random_segmentation(n_tokens - n_noise, n_spans, generator)
    interleaved = torch.stack([kept_lengths, noise_lengths], dim=1).reshape(-1)
    is_noise = torch.tensor([False, True]).repeat(n_spans)
    return is_noise.repeat_interleave(interleaved)


def corrupt_row(
    tokens: torch.Tensor, noise: torch.Tensor, config: SpanCorruptionConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder input, decoder target) of one row, both ending in eos."""
    span_start = noise & ~torch.cat([noise.new_zeros(1), noise[:-1]])
    span_index = span_start.long().cumsum(0) - 1
    n_spans = int(span_start.sum())
    if n_spans > config.n_sentinels:
        raise DataError(
            f"a row needs {n_spans} sentinels but only {config.n_sentinels} are configured "
            "(raise n_sentinels or mean_noise_span_length, or use shorter windows)"
        )
    sentinel = config.first_sentinel_id - span_index
    eos = tokens.new_tensor([config.eos_id])

    # Encoder: a kept token stays; a span's first token becomes its sentinel; the rest of the span goes.
    encoder = torch.where(span_start, sentinel, tokens)[~noise | span_start]
    # Decoder: each noise token, preceded by its span's sentinel when it opens the span.
    pairs = torch.stack([sentinel, tokens], dim=1)[noise]  # [n_noise, 2]
    keep = torch.stack([span_start, torch.ones_like(span_start)], dim=1)[noise]
    decoder = pairs[keep]
    return torch.cat([encoder, eos]), torch.cat([decoder, eos])


def unpadded_length(row: torch.Tensor, pad_id: int) -> int:
    """Tokens up to and including the last non-padding one."""
    real = (row != pad_id).nonzero()
    return int(real[-1]) + 1 if len(real) else 0


def span_corruption(windows: torch.Tensor, config: SpanCorruptionConfig, generator: torch.Generator) -> Batch:
    """Span-corrupt [B, T] windows into an encoder-decoder batch.

    input_ids [B, Te] (pad_id after each row's end), attention_mask [B, Te, Te] (no padding keys),
    targets [B, Td] (IGNORE_INDEX after each row's end), decoder_input_ids [B, Td]: decoder_start_id,
    then the targets shifted right, pad_id where the targets are padding.
    """
    check_windows(windows, min_length=2)
    encoders, decoders = [], []
    for row in windows.long():
        tokens = row[: unpadded_length(row, config.pad_id)]
        noise = random_spans_noise_mask(
            len(tokens), config.noise_density, config.mean_noise_span_length, generator
        )
        encoder, decoder = corrupt_row(tokens, noise, config)
        encoders.append(encoder)
        decoders.append(decoder)

    input_ids = torch.nn.utils.rnn.pad_sequence(encoders, batch_first=True, padding_value=config.pad_id)
    targets = torch.nn.utils.rnn.pad_sequence(decoders, batch_first=True, padding_value=IGNORE_INDEX)
    encoder_lengths = torch.tensor([len(e) for e in encoders])
    key_is_real = torch.arange(input_ids.shape[1])[None, :] < encoder_lengths[:, None]

    start = targets.new_full((targets.shape[0], 1), config.decoder_start_id)
    decoder_input_ids = torch.cat([start, targets[:, :-1]], dim=1)
    decoder_input_ids = decoder_input_ids.masked_fill(decoder_input_ids == IGNORE_INDEX, config.pad_id)
    return Batch(
        input_ids=input_ids,
        targets=targets,
        attention_mask=key_padding_attention_mask(key_is_real),
        decoder_input_ids=decoder_input_ids,
    )
