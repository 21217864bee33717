"""The decoder against Hugging Face Llama (the independent reference), its KV cache, init and precisions."""

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from lmloom.models.decoder import (
    IGNORE_INDEX,
    Decoder,
    DecoderConfig,
    blocked_causal_attention,
    linear_cross_entropy,
)
from lmloom.models.hf_llama import (
    from_hf_config,
    from_hf_state_dict,
    hf_config_dict,
    to_hf_config,
    to_hf_state_dict,
)

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=97, seq_len=64, d_model=64, n_layers=2, n_heads=4)
SHAPES = {
    "mha": DecoderConfig(**SMALL),
    "gqa": DecoderConfig(**SMALL, n_kv_heads=2),
    "mqa-untied": DecoderConfig(**SMALL, n_kv_heads=1, tie_embeddings=False, ffn_hidden=96, rope_theta=500.0),
}


def make_pair(cfg: DecoderConfig, seed: int = 0):
    """Our decoder and the HF Llama holding the same (converted) weights."""
    torch.manual_seed(seed)
    ours = Decoder(cfg)
    hf = transformers.LlamaForCausalLM(to_hf_config(cfg, attn_implementation="sdpa"))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    if cfg.tie_embeddings:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
    return ours, hf


def next_token_targets(idx: torch.Tensor) -> torch.Tensor:
    """Targets as our forward takes them: idx shifted left, the last position ignored (as HF's labels)."""
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = IGNORE_INDEX
    return targets


# --- config -------------------------------------------------------------------------------------------


def test_config_defaults_and_derived_sizes():
    cfg = DecoderConfig(d_model=384, n_heads=6)
    assert (cfg.head_dim, cfg.kv_heads, cfg.hidden_dim) == (64, 6, 1024)
    assert DecoderConfig(d_model=100, n_heads=2, multiple_of=32).hidden_dim == 288  # 266 rounded up
    assert DecoderConfig(d_model=64, n_heads=4, ffn_hidden=100).hidden_dim == 100


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(d_model=100, n_heads=3), "divisible by n_heads"),
        (dict(d_model=64, n_heads=4, n_kv_heads=3), "must divide n_heads"),
        (dict(d_model=60, n_heads=4), "must be even"),
        (dict(dropout=1.0), "less than 1"),
        (dict(n_layer=3), "Extra inputs are not permitted"),
    ],
)
def test_config_rejects_bad_shapes_with_clear_messages(fields, message):
    with pytest.raises(ValidationError, match=message):
        DecoderConfig(**fields)


# --- parity with Hugging Face ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHAPES)
def test_logits_loss_and_gradients_match_hf_llama(name):
    cfg = SHAPES[name]
    ours, hf = make_pair(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 29), generator=torch.Generator().manual_seed(1))

    torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)

    loss = ours(idx, next_token_targets(idx))
    hf_loss = hf(idx, labels=idx).loss
    torch.testing.assert_close(loss, hf_loss, atol=1e-5, rtol=1e-5)

    loss.backward()
    hf_loss.backward()
    our_grads = to_hf_state_dict({k: p.grad for k, p in ours.named_parameters()}, cfg)
    for key, grad in our_grads.items():
        torch.testing.assert_close(grad, hf.get_parameter(key).grad, atol=1e-6, rtol=1e-4, msg=key)


@pytest.mark.parametrize("name", SHAPES)
def test_conversion_round_trips(name):
    cfg = SHAPES[name]
    ours, hf = make_pair(cfg)
    back = from_hf_state_dict(hf.state_dict(), cfg)
    assert back.keys() == ours.state_dict().keys()
    for key, tensor in ours.state_dict().items():
        assert torch.equal(back[key], tensor), key
    round_trip = from_hf_config(hf.config)
    assert hf_config_dict(round_trip) == hf_config_dict(cfg)
    assert from_hf_config(hf_config_dict(cfg)) == round_trip  # the config.json dict form too


def test_conversion_refuses_what_it_cannot_represent():
    fields = hf_config_dict(SHAPES["mha"])
    with pytest.raises(ValueError, match="rope_type='linear'"):
        from_hf_config(
            fields | {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}
        )
    with pytest.raises(ValueError, match="attention_bias"):
        from_hf_config(fields | {"attention_bias": True})
    state = to_hf_state_dict(Decoder(SHAPES["mha"]).state_dict(), SHAPES["mha"])
    with pytest.raises(ValueError, match="does not use"):
        from_hf_state_dict(state | {"model.extra.weight": torch.zeros(1)}, SHAPES["mha"])
    del state["model.norm.weight"]
    with pytest.raises(ValueError, match="missing 'model.norm.weight'"):
        from_hf_state_dict(state, SHAPES["mha"])


def test_state_dict_keys_are_plain_and_stable():
    keys = set(Decoder(SHAPES["gqa"]).state_dict())
    assert keys == {"tok_emb.weight", "norm.weight"} | {
        f"layers.{i}.{name}"
        for i in range(2)
        for name in (
            "attn_norm.weight",
            "attn.qkv.weight",
            "attn.proj.weight",
            "mlp_norm.weight",
            "mlp.gate.weight",
            "mlp.up.weight",
            "mlp.down.weight",
        )
    }
    assert "lm_head.weight" in Decoder(SHAPES["mqa-untied"]).state_dict()


# --- loss ---------------------------------------------------------------------------------------------


def test_chunked_loss_equals_cross_entropy_with_ignored_targets():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=g, requires_grad=True)
    w = torch.randn(30, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 30, (50,), generator=g)
    targets[::7] = IGNORE_INDEX
    loss = linear_cross_entropy(h, w, targets, chunk_elems=8 * 30)  # 7 chunks, the last one short
    ref = F.cross_entropy(h @ w.t(), targets, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, ref)
    (2 * loss).backward()  # the upstream gradient is honoured
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    (2 * ref).backward()
    torch.testing.assert_close(grads, (h.grad, w.grad))
    with torch.no_grad():  # evaluation: no gradients computed or kept
        torch.testing.assert_close(linear_cross_entropy(h, w, targets), ref)


def test_a_second_backward_through_the_same_graph_is_refused_not_wrong():
    model = Decoder(SHAPES["mha"])
    idx = torch.randint(0, 97, (2, 8))
    loss = model(idx, next_token_targets(idx))
    loss.backward(retain_graph=True)  # backward reuses dead activations' memory for gradients...
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()  # ...so autograd's version check refuses a second pass


# --- KV cache -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_kv_cache_decoding_matches_full_forward(name):
    cfg = SHAPES[name]
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_kv_cache(batch_size=2, max_len=20)
        steps = [model(idx[:, :8], kv_cache=cache, start_pos=0)]  # prefill
        steps.append(model(idx[:, 8:12], kv_cache=cache, start_pos=8))  # a chunk after a prefix
        steps += [model(idx[:, t : t + 1], kv_cache=cache, start_pos=t) for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_positions_beyond_seq_len_are_refused():
    model = Decoder(SHAPES["mha"])
    with pytest.raises(ValueError, match="exceed seq_len 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    cache = model.new_kv_cache(1, max_len=4)
    with pytest.raises(ValueError, match="KV cache holds 4 positions"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


# --- attention used under torch.compile on CPU ------------------------------------------------------------


@pytest.mark.parametrize(("T", "kv_heads"), [(200, 4), (64, 2)])
def test_blocked_attention_equals_sdpa(T, kv_heads):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, T, 16, generator=g)
    k, v = torch.randn(2, 2, kv_heads, T, 16, generator=g)
    bias = torch.full((T, T), float("-inf")).triu(1)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != 4)
    torch.testing.assert_close(blocked_causal_attention(q, k, v, bias), expected, atol=1e-5, rtol=1e-5)


# --- init, sizes --------------------------------------------------------------------------------------


def test_init_is_deterministic_under_a_seed():
    states = []
    for _ in range(2):
        torch.manual_seed(123)
        states.append(Decoder(SHAPES["gqa"]).state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    model = Decoder(SHAPES["gqa"])
    model.init_weights(torch.Generator().manual_seed(5))
    again = Decoder(SHAPES["gqa"])
    again.init_weights(torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))
    # residual output projections are scaled down by sqrt(2 * n_layers)
    assert model.layers[0].attn.proj.weight.std() < 0.6 * model.layers[0].attn.qkv.weight.std()
    assert torch.equal(model.norm.weight, torch.ones(64))


def test_param_count_and_flops():
    model, hf = make_pair(SHAPES["gqa"])
    n = model.num_params()
    assert n == sum(p.numel() for p in hf.parameters())
    assert model.num_params(exclude_embedding=True) == n - 97 * 64
    attention = 12 * 2 * 4 * 16 * 32
    assert model.flops_per_token(32) == 6 * n + attention  # tied: the embedding is the LM head
    untied = Decoder(SHAPES["mqa-untied"])
    assert untied.flops_per_token(32) == 6 * untied.num_params(exclude_embedding=True) + attention


# --- precisions and compilation -------------------------------------------------------------------------


def test_bf16_autocast_forward_and_backward():
    cfg = SHAPES["gqa"]
    model = Decoder(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    fp32_loss = model(idx, next_token_targets(idx))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
        loss = model(idx, next_token_targets(idx))
    assert logits.dtype == torch.bfloat16
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(loss, fp32_loss, atol=2e-2, rtol=2e-2)


def test_compiled_training_step_matches_eager():
    cfg = SHAPES["gqa"]
    torch.manual_seed(0)
    model = Decoder(cfg)
    # A hooked projection keeps the generic path (`_RotaryQKV`): both compiled attention paths are checked.
    model.layers[0].attn.qkv.register_forward_pre_hook(lambda module, args: None)
    idx = torch.randint(0, cfg.vocab_size, (2, 32))
    targets = next_token_targets(idx)
    eager_loss = model(idx, targets)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = compiled(idx, targets)  # uses blocked_causal_attention on CPU
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    for grad, expected in zip((p.grad for p in model.parameters()), eager_grads, strict=True):
        torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)
    opt.step()
    assert compiled(idx, targets).item() < loss.item()


@pytest.mark.parametrize("shape", ["mha", "mqa-untied"])
def test_compiled_bf16_training_matches_eager_autocast(shape):
    """Compiled bf16 autocast computes what eager bf16 autocast computes, up to bf16 rounding (the compiled
    path reorders q/k dims for RoPE, recomputes attention by blocks, takes other GEMM layouts)."""
    cfg = SHAPES[shape]
    torch.manual_seed(0)
    model = Decoder(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 48))
    targets = next_token_targets(idx)
    results = []
    for forward in (model, torch.compile(model)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = forward(idx, targets)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
    (eager_loss, eager_grads), (loss, grads) = results
    torch.testing.assert_close(loss, eager_loss, atol=1e-3, rtol=0)
    for grad, expected in zip(grads, eager_grads, strict=True):
        assert grad.dtype == torch.float32
        # bf16 GEMMs: compare each gradient as a whole, relative to its size
        assert (grad - expected).norm() <= 0.015 * expected.norm() + 1e-6
