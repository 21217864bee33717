"""The speed-tuned `Decoder` is the Llama/PaLM member of the model family built from `blocks.py`.

A Llama (or PaLM-parallel) stack composed from the shared `TransformerBlock` with the same weights must
give the same logits; so must the prefix-LM mask path. The presets are the sizes they claim to be.
"""

import pytest
import torch
from torch import nn

from lmloom.models.blocks import BlockConfig, RotaryEmbedding, TransformerBlock
from lmloom.models.decoder import PRESETS, Decoder, DecoderConfig
from lmloom.models.hf_llama import _pairs_to_halves, to_hf_config
from lmloom.objectives.prefix import prefix_lm_attention_mask


class BlocksLlama(nn.Module):
    """Llama (parallel=False) or PaLM (parallel=True) wiring of the readable shared blocks."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        block = BlockConfig(
            d_model=cfg.d_model,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.kv_heads,
            ffn_hidden=cfg.hidden_dim,
            norm="rmsnorm",
            norm_eps=cfg.norm_eps,
            norm_bias=False,
            activation="swiglu",
            bias=False,
            parallel=cfg.parallel,
        )
        self.emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(TransformerBlock(block) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.seq_len, cfg.rope_theta)

    @torch.no_grad()
    def load_from(self, ours: Decoder) -> None:
        cfg = ours.config
        q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.emb.weight.copy_(ours.tok_emb.weight)
        self.norm.weight.copy_(ours.norm.weight)
        for mine, theirs in zip(self.layers, ours.layers, strict=True):
            q, k, v = theirs.attn.qkv.weight.split((q_rows, kv_rows, kv_rows))
            # Our decoder pairs RoPE dims (2i, 2i+1); the readable blocks pair (i, i + D/2), like HF.
            mine.attn.q.weight.copy_(_pairs_to_halves(q, cfg.n_heads))
            mine.attn.k.weight.copy_(_pairs_to_halves(k, cfg.kv_heads))
            mine.attn.v.weight.copy_(v)
            mine.attn.proj.weight.copy_(theirs.attn.proj.weight)
            for name in ("gate", "up", "down"):
                getattr(mine.mlp, name).weight.copy_(getattr(theirs.mlp, name).weight)
            mine.attn_norm.weight.copy_(theirs.attn_norm.weight)
            if theirs.mlp_norm is not None:
                mine.mlp_norm.weight.copy_(theirs.mlp_norm.weight)

    def forward(self, idx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.emb(idx)
        for layer in self.layers:
            if mask is None:
                x = layer(x, is_causal=True, rotary=self.rotary)
            else:
                x = layer(x, mask=mask[:, None], rotary=self.rotary)
        return self.norm(x) @ self.emb.weight.t()


@pytest.mark.parametrize("parallel", [False, True], ids=["llama", "palm-parallel"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_decoder_equals_the_shared_blocks(parallel, kv_heads):
    cfg = DecoderConfig.preset("tiny", vocab_size=101, seq_len=32, n_kv_heads=kv_heads, parallel=parallel)
    torch.manual_seed(0)
    ours = Decoder(cfg).eval()
    reference = BlocksLlama(cfg).eval()
    reference.load_from(ours)
    idx = torch.randint(0, cfg.vocab_size, (3, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), reference(idx), atol=1e-5, rtol=1e-5)
        # Prefix LM: bidirectional over each row's prefix, causal after it.
        mask = prefix_lm_attention_mask(torch.tensor([5, 0, 24]), 24)
        torch.testing.assert_close(ours(idx, attention_mask=mask), reference(idx, mask), atol=1e-5, rtol=1e-5)


def test_prefix_mask_changes_only_what_it_should():
    cfg = DecoderConfig.preset("tiny", vocab_size=101, seq_len=32)
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 16))
    causal = torch.ones(16, 16, dtype=torch.bool).tril()[None]
    with torch.no_grad():
        torch.testing.assert_close(model(idx, attention_mask=causal), model(idx), atol=1e-6, rtol=1e-6)
        prefixed = model(idx, attention_mask=prefix_lm_attention_mask(torch.tensor([8]), 16))
        plain = model(idx)
    # Positions inside the prefix now also see the later prefix tokens, so they change...
    assert (prefixed[0, :7] - plain[0, :7]).abs().amax() > 1e-3
    # ...and a mask that is not boolean is refused with a clear error.
    with pytest.raises(ValueError, match="boolean"):
        model(idx, attention_mask=causal.float())


def test_presets_have_the_published_sizes():
    # TinyLlama-1.1B and Llama-2-7B parameter counts (32000-token vocabulary, untied heads).
    for name, expected in (("1b", 1_100_048_384), ("7b", 6_738_415_616)):
        cfg = DecoderConfig.preset(name, vocab_size=32000, tie_embeddings=False)
        with torch.device("meta"):
            assert Decoder(cfg).num_params() == expected, name
    assert set(PRESETS) >= {"tiny", "small", "125m", "350m", "1b", "7b"}
    with pytest.raises(ValueError, match="unknown decoder preset"):
        DecoderConfig.preset("huge")


def test_parallel_block_does_not_export_to_llama():
    with pytest.raises(ValueError, match="parallel"):
        to_hf_config(DecoderConfig.preset("tiny", parallel=True))
