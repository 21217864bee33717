"""The GPT-2-style decoder against Hugging Face `transformers` `GPT2LMHeadModel` (the independent
reference): random tiny weights both ways, the loss, the prefix-LM mask path, and the preset sizes."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmloom.models.gpt import GPT, IGNORE_INDEX, PRESETS, GPTConfig
from lmloom.models.hf_gpt2 import (
    export_hf_dir,
    from_hf_config,
    from_hf_state_dict,
    import_hf_dir,
    to_hf_config,
    to_hf_state_dict,
)
from lmloom.objectives.prefix import prefix_lm, prefix_lm_attention_mask

transformers = pytest.importorskip("transformers")

TOL = 1e-4
TINY = dict(vocab_size=97, seq_len=16, d_model=32, n_layers=2, n_heads=4)


def perturbed_gpt(cfg: GPTConfig, seed: int = 0) -> GPT:
    """A model whose every parameter (biases and LayerNorms included) is random: a mapping mistake cannot
    hide behind a zero or a one."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def token_batch(vocab_size: int, length: int = 12) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, vocab_size, (2, length))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=ids).logits


# --- against Hugging Face, random weights -----------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_export_then_load_in_transformers(tmp_path, tie):
    cfg = GPTConfig(**TINY, tie_embeddings=tie)
    ours = perturbed_gpt(cfg)
    export_hf_dir(ours, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == tie
    ids = token_batch(cfg.vocab_size)
    with torch.no_grad():
        assert max_diff(ours(ids), hf_logits(hf, ids)) < TOL


def test_transformers_model_imports_into_ours(tmp_path):
    cfg = GPTConfig(**TINY)
    torch.manual_seed(2)
    hf = transformers.GPT2LMHeadModel(to_hf_config(cfg)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids = token_batch(cfg.vocab_size)
    expected = hf_logits(hf, ids)

    in_memory = GPT(cfg).eval()
    in_memory.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    hf.save_pretrained(tmp_path)
    from_dir, dir_cfg = import_hf_dir(tmp_path)
    assert dir_cfg.model_dump() == cfg.model_dump()
    with torch.no_grad():
        for ours in (in_memory, from_dir):
            assert max_diff(ours(ids), expected) < TOL


def test_loss_matches_transformers_shifted_labels():
    """HF shifts labels inside (logits[:, :-1] vs labels[:, 1:]); ours takes next-token targets."""
    cfg = GPTConfig(**TINY)
    ours = perturbed_gpt(cfg)
    hf = transformers.GPT2LMHeadModel(to_hf_config(cfg)).eval()
    loaded = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    assert set(loaded.missing_keys) <= {"lm_head.weight"} and not loaded.unexpected_keys  # tied head
    ids = token_batch(cfg.vocab_size)
    labels = ids.clone()
    labels[0, 7:] = IGNORE_INDEX  # ignored labels count in neither mean
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    with torch.no_grad():
        hf_loss = hf(input_ids=ids, labels=labels).loss
        loss = ours(ids, targets)
    assert abs(loss.item() - hf_loss.item()) < TOL
    with torch.no_grad():
        assert ours(ids, torch.full_like(ids, IGNORE_INDEX)).item() == 0.0  # nothing to predict: 0, not NaN


def test_state_dict_round_trip_layouts_and_key_checks():
    cfg = GPTConfig(**TINY)
    ours = perturbed_gpt(cfg)
    state = ours.state_dict()
    hf_state = to_hf_state_dict(state, cfg)
    assert hf_state["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: [in, out]
    back = from_hf_state_dict(hf_state, cfg)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in back)
    # GPT2Model layout (OpenAI's upload): no prefix, and the old causal-mask buffers.
    base = to_hf_state_dict(state, cfg, "base") | {"h.0.attn.bias": torch.ones(1, 1, 16, 16)}
    back = from_hf_state_dict(base, cfg)
    assert all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="missing"):
        from_hf_state_dict({k: v for k, v in hf_state.items() if ".h.1." not in k}, cfg)
    with pytest.raises(ValueError, match="does not use"):
        from_hf_state_dict(hf_state | {"transformer.extra": torch.zeros(1)}, cfg)
    with pytest.raises(ValueError, match="differs"):
        from_hf_state_dict(hf_state | {"lm_head.weight": torch.zeros(97, 32)}, cfg)


def test_config_round_trip_and_refusals():
    cfg = GPTConfig(**TINY, ffn_hidden=48, dropout=0.1, attn_dropout=0.05, norm_eps=1e-6)
    assert from_hf_config(to_hf_config(cfg)) == cfg
    hf = to_hf_config(cfg).to_dict()
    for bad in ({"scale_attn_by_inverse_layer_idx": True}, {"activation_function": "silu"}):
        with pytest.raises(ValueError, match="cannot convert"):
            from_hf_config(hf | bad)
    with pytest.raises(ValueError, match="biases"):
        to_hf_config(cfg.model_copy(update={"bias": False}))


# --- attention mask (prefix LM) ----------------------------------------------------------------------------


def test_causal_mask_given_equals_default():
    cfg = GPTConfig(**TINY)
    model = perturbed_gpt(cfg)
    ids = token_batch(cfg.vocab_size)
    T = ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril().expand(2, T, T)
    with torch.no_grad():
        default = model(ids)
        assert max_diff(model(ids, attention_mask=causal), default) < 1e-5
        assert max_diff(model(ids, attention_mask=causal[:, None]), default) < 1e-5  # [B, 1, T, T]


def test_prefix_mask_is_bidirectional_inside_and_causal_after():
    """Prefix lengths 3 and 5 in one batch of 8 positions, each row checked against separate runs:

    - the prefix positions compute exactly a bidirectional model over the prefix alone;
    - position i >= P depends on tokens 0..i only: equal to a run truncated after i (the later tokens do
      not reach it), and yet different from plain causal attention (it sees the bidirectional prefix).
    """
    cfg = GPTConfig(**TINY)
    model = perturbed_gpt(cfg)
    T = 8
    ids = token_batch(cfg.vocab_size, T)
    prefix_lengths = torch.tensor([3, 5])
    mask = prefix_lm_attention_mask(prefix_lengths, T)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        causal = model(ids)
        for b, P in enumerate(prefix_lengths.tolist()):
            row = ids[b : b + 1]
            everywhere = torch.ones(1, P, P, dtype=torch.bool)
            assert max_diff(out[b, :P], model(row[:, :P], attention_mask=everywhere)[0]) < 1e-5
            # Bidirectional: position 0 sees tokens 1..P-1, which causal attention hides from it.
            assert max_diff(out[b, 0], causal[b, 0]) > 1e-3
            for i in range(P, T):
                truncated = model(row[:, : i + 1], attention_mask=mask[b : b + 1, : i + 1, : i + 1])
                assert max_diff(out[b, i], truncated[0, i]) < 1e-5
                assert max_diff(out[b, i], causal[b, i]) > 1e-3


def test_prefix_lm_batch_trains():
    """A `prefix_lm` batch runs forward and backward: its loss is the cross-entropy of the masked logits
    over the continuation targets."""
    cfg = GPTConfig(**TINY)
    model = perturbed_gpt(cfg).train()
    windows = token_batch(cfg.vocab_size, 9)
    batch = prefix_lm(windows, prefix_lengths=torch.tensor([2, 4]))
    loss = model(batch.input_ids, batch.targets, attention_mask=batch.attention_mask)
    logits = model(batch.input_ids, attention_mask=batch.attention_mask)
    expected = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
    assert abs(loss.item() - expected.item()) < 1e-5
    loss.backward()
    assert model.tok_emb.weight.grad is not None and model.pos_emb.weight.grad.abs().sum() > 0


def test_mask_and_length_checks():
    model = GPT(GPTConfig(**TINY)).eval()
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="boolean"):
        model(ids, attention_mask=torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="must be"):
        model(ids, attention_mask=torch.ones(1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


# --- sizes and init ----------------------------------------------------------------------------------------


def test_gpt2_preset_has_124m_parameters_like_transformers():
    assert GPTConfig.preset("gpt2").num_params() == 124_439_808
    for name in PRESETS:
        cfg = GPTConfig.preset(name)
        # The meta device: shapes without memory, so even gpt2-xl is counted in milliseconds.
        with torch.device("meta"):
            ours = GPT(cfg)
            hf = transformers.GPT2LMHeadModel(to_hf_config(cfg))
        assert ours.num_params() == cfg.num_params(), name
        assert hf.num_parameters() == cfg.num_params(), name  # the tied head counted once, like ours
    untied = GPTConfig(**TINY, tie_embeddings=False)
    assert GPT(untied).num_params() == untied.num_params() == GPTConfig(**TINY).num_params() + 97 * 32


def test_gpt2_init():
    cfg = GPTConfig(vocab_size=512, seq_len=64, d_model=256, n_layers=8, n_heads=4)
    torch.manual_seed(0)
    model = GPT(cfg)
    layer = model.layers[0]
    assert abs(layer.attn.q.weight.std().item() - 0.02) < 0.002
    residual = 0.02 / math.sqrt(2 * cfg.n_layers)
    for proj in (layer.attn.proj, layer.mlp.down):
        assert abs(proj.weight.std().item() - residual) < 0.1 * residual
        assert not proj.bias.any()
    assert torch.equal(model.norm.weight, torch.ones(256)) and not model.norm.bias.any()
