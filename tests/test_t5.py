"""The T5 encoder-decoder against Hugging Face `T5ForConditionalGeneration` (the independent reference):
the same random tiny weights both ways (export and import), T5 1.0 (ReLU, tied, rescaled) and v1.1
(gated GELU, untied), with encoder padding; HF's loss; the relative position buckets; a span batch."""

import pytest
import torch
from pydantic import ValidationError

from lmloom.models.encoder_decoder import T5, T5Config, relative_position_bucket
from lmloom.models.hf_t5 import (
    export_hf_dir,
    from_hf_config,
    from_hf_state_dict,
    import_hf_dir,
    to_hf_config,
    to_hf_state_dict,
)
from lmloom.objectives.span import SpanCorruptionConfig, span_corruption

transformers = pytest.importorskip("transformers")
from transformers.models.t5.modeling_t5 import T5Attention  # noqa: E402

TOL = 1e-4
# Odd sizes on purpose: n_heads * d_kv != d_model, d_ff unlike both, decoder deeper than the encoder.
TINY = dict(
    vocab_size=97,
    d_model=32,
    d_kv=12,
    d_ff=40,
    n_layers=2,
    n_decoder_layers=3,
    n_heads=3,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
)
FLAVOURS = {
    "t5-1.0": dict(feed_forward="relu", tie_word_embeddings=True),
    "t5-v1.1": dict(feed_forward="gated-gelu", tie_word_embeddings=False),
}


def perturbed_t5(cfg: T5Config, seed: int = 0) -> T5:
    """A T5 whose every parameter (norms included) is random: a mapping mistake cannot hide behind a one."""
    torch.manual_seed(seed)
    model = T5(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def padded_batch(vocab_size: int) -> dict[str, torch.Tensor]:
    """Encoder inputs longer than the bucket range (distances reach the log buckets and the cap), the second
    row padded after 7 tokens; labels with an ignored (and decoder-padded) tail in the first row."""
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, vocab_size, (2, 21), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    input_ids[1, 7:] = 0
    labels = torch.randint(2, vocab_size, (2, 19), generator=g)
    labels[0, 15:] = -100
    # Decoder padding where the labels are ignored (the first real token's inputs stay visible).
    decoder_attention_mask = (labels != -100).long()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "decoder_attention_mask": decoder_attention_mask,
    }


def ours_vs_hf(ours: T5, hf, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max |logit difference|, |loss difference|), both models given the same decoder inputs."""
    decoder_input_ids = ours.shift_right(batch["labels"])
    with torch.no_grad():
        out = hf(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_attention_mask=batch["decoder_attention_mask"],
            labels=batch["labels"],  # HF shifts these itself
        )
        assert torch.equal(hf._shift_right(batch["labels"]), decoder_input_ids)
        masks = {k: batch[k] for k in ("attention_mask", "decoder_attention_mask")}
        logits = ours(batch["input_ids"], decoder_input_ids, **masks)
        loss = ours(batch["input_ids"], decoder_input_ids, **masks, targets=batch["labels"])
    return (logits - out.logits).abs().max().item(), (loss - out.loss).abs().item()


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_export_matches_hf(flavour, tmp_path):
    cfg = T5Config(**TINY, **FLAVOURS[flavour])
    ours = perturbed_t5(cfg)
    export_hf_dir(ours, tmp_path)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert hf.config.scale_decoder_outputs == cfg.tie_word_embeddings
    # Untied really untied in HF: its head is not the embedding.
    assert (hf.lm_head.weight is hf.shared.weight) == cfg.tie_word_embeddings
    logit_diff, loss_diff = ours_vs_hf(ours, hf, padded_batch(cfg.vocab_size))
    assert logit_diff < TOL
    assert loss_diff < TOL


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_import_matches_hf(flavour, tmp_path):
    cfg = T5Config(**TINY, **FLAVOURS[flavour])
    torch.manual_seed(2)
    hf = transformers.T5ForConditionalGeneration(to_hf_config(cfg, dropout_rate=0.0))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if not cfg.tie_word_embeddings:
            # transformers 5 ties lm_head in memory whatever the config: give it a head of its own.
            hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.shared.weight))
    hf.eval()
    # The directory transformers itself writes (v1.1: tie_word_embeddings true, scale_decoder_outputs false).
    hf.save_pretrained(tmp_path)
    ours, ours_cfg = import_hf_dir(tmp_path)
    assert ours_cfg == cfg.model_copy(update={"dropout": 0.0})
    logit_diff, loss_diff = ours_vs_hf(ours, hf, padded_batch(cfg.vocab_size))
    assert logit_diff < TOL
    assert loss_diff < TOL


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_export_import_round_trip(flavour, tmp_path):
    ours = perturbed_t5(T5Config(**TINY, **FLAVOURS[flavour]))
    export_hf_dir(ours, tmp_path)
    back, cfg = import_hf_dir(tmp_path)
    assert cfg == ours.config
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 16), (10, 20)])
def test_buckets_match_hf(bidirectional, num_buckets, max_distance):
    relative = torch.arange(-300, 301)[:, None] + torch.arange(-3, 4)[None, :]
    ours = relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    theirs = T5Attention._relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    assert torch.equal(ours, theirs)
    assert 0 <= int(ours.min()) and int(ours.max()) == num_buckets - 1


def test_bucket_layout():
    """Worked values for the default 32 buckets / 128 distance."""
    r = torch.tensor([0, -1, 1, -7, -8, -127, -128, -1000, 8, 1000])
    assert relative_position_bucket(r, bidirectional=True).tolist() == [0, 1, 17, 7, 8, 15, 15, 15, 24, 31]
    # Causal: keys after the query all land in bucket 0; 16 exact distances, then log bins up to 31.
    causal = relative_position_bucket(r, bidirectional=False).tolist()
    assert causal == [0, 1, 0, 7, 8, 31, 31, 31, 0, 0]


def test_span_batch_runs_and_trains():
    cfg = T5Config.preset("tiny", vocab_size=64)
    span = SpanCorruptionConfig(
        first_sentinel_id=63, n_sentinels=10, decoder_start_id=cfg.decoder_start_token_id
    )
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(3, 50, (3, 24), generator=g)
    windows[2, 15:] = span.pad_id  # a shorter row: encoder padding
    batch = span_corruption(windows, span, g)
    # The batch mask is [B, Te, Te] (each query's visible keys); a key is real when every query sees it.
    key_is_real = batch.attention_mask.all(dim=1)
    assert not key_is_real[2].all() and key_is_real[0].all()
    model = T5(cfg)
    loss = model(batch.input_ids, batch.decoder_input_ids, attention_mask=key_is_real, targets=batch.targets)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.shared.weight.grad is not None


def test_config_checks_and_presets():
    assert T5Config.preset("t5-small").model_dump() == T5Config().model_dump()
    small = T5Config.preset("t5-v1_1-small")
    assert (small.feed_forward, small.tie_word_embeddings, small.n_layers) == ("gated-gelu", False, 8)
    with pytest.raises(ValueError, match="unknown T5 preset"):
        T5Config.preset("t5-xxl-imaginary")
    with pytest.raises(ValidationError):
        T5Config(vocab_size=10, pad_id=10)
    with pytest.raises(ValueError, match="feed_forward_proj"):
        from_hf_config(to_hf_config(T5Config(**TINY), feed_forward_proj="gated-silu"))
    # T5 1.0 parameter count matches transformers' for the same config (one shared embedding, tied head).
    for flavour in FLAVOURS.values():
        cfg = T5Config(**TINY, **flavour)
        hf = transformers.T5ForConditionalGeneration(to_hf_config(cfg))
        hf_params = sum(p.numel() for p in hf.parameters())
        extra_head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.d_model  # HF ties in memory
        assert T5(cfg).num_params() == hf_params + extra_head


def test_import_refuses_untied_head_when_rescaled():
    cfg = T5Config(**TINY)  # T5 1.0: rescaled, so the head must be the embedding
    state = to_hf_state_dict(T5(cfg).state_dict(), cfg)
    state["lm_head.weight"] = torch.randn(cfg.vocab_size, cfg.d_model)
    with pytest.raises(ValueError, match="differs from shared"):
        from_hf_state_dict(state, cfg)
