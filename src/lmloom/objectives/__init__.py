"""Pre-training objectives: pure, seeded transforms from token windows [B, T] to a model `Batch`.

    causal_lm          next-token prediction (decoder-only, causal attention)
    masked_lm          BERT masked LM, 80/10/10 replacement (encoder, bidirectional attention)
    span_corruption    T5 span corruption with sentinels (encoder-decoder)
    prefix_lm          bidirectional prefix, causal continuation, loss on the continuation (decoder-only)

Every random choice comes from the `torch.Generator` passed in, never from torch's global generator, so a
batch is a function of (windows, config, generator state) and a resumed run redraws it exactly.
"""

from lmloom.objectives.batch import IGNORE_INDEX, Batch
from lmloom.objectives.causal import causal_lm
from lmloom.objectives.masked import MaskedLMConfig, masked_lm
from lmloom.objectives.prefix import prefix_lm, prefix_lm_attention_mask
from lmloom.objectives.span import (
    SpanCorruptionConfig,
    random_spans_noise_mask,
    span_corruption,
    span_corruption_lengths,
    tokens_length_for_inputs,
)

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "MaskedLMConfig",
    "SpanCorruptionConfig",
    "causal_lm",
    "masked_lm",
    "prefix_lm",
    "prefix_lm_attention_mask",
    "random_spans_noise_mask",
    "span_corruption",
    "span_corruption_lengths",
    "tokens_length_for_inputs",
]
