"""Sampling with the KV cache, checked against Hugging Face's generate on the same (converted) weights."""

import pytest
import torch

from lmloom.models.decoder import Decoder, DecoderConfig
from lmloom.models.hf_llama import to_hf_config, to_hf_state_dict
from lmloom.serve.generate import filter_logits, generate, generate_stream

transformers = pytest.importorskip("transformers")

# A larger init spread than training's 0.02 gives a random model varied, confident next-token choices.
CFG = DecoderConfig(vocab_size=89, seq_len=48, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.3)
PROMPT = [3, 17, 42, 8, 61]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Decoder(CFG)


def test_greedy_equals_hf_generate(model):
    hf = transformers.LlamaForCausalLM(to_hf_config(CFG, attn_implementation="sdpa"))
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), CFG), strict=False)
    expected = hf.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False)[0, len(PROMPT) :]
    tokens = generate(model, PROMPT, max_new_tokens=12, temperature=0)
    assert tokens == expected.tolist()
    assert len(set(tokens)) > 2  # a meaningful comparison, not one repeated token


def test_sampling_is_reproducible_per_seed_and_leaves_global_rng_alone(model):
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    first = generate(model, PROMPT, max_new_tokens=16, seed=1)
    assert torch.equal(torch.rand(1), before)  # the global RNG was not consumed
    assert generate(model, PROMPT, max_new_tokens=16, seed=1) == first
    assert generate(model, PROMPT, max_new_tokens=16, seed=2) != first
    assert len(first) == 16 and all(0 <= t < CFG.vocab_size for t in first)


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    greedy = generate(model, PROMPT, max_new_tokens=10, temperature=0)
    assert generate(model, PROMPT, max_new_tokens=10, top_k=1, seed=3) == greedy
    assert generate(model, PROMPT, max_new_tokens=10, top_p=1e-6, seed=4) == greedy


def test_an_extreme_temperature_still_samples(model):
    # 5e-324 is 0 in float32: dividing the logits by it made 0 / 0 = nan, and multinomial refused them.
    greedy = generate(model, [1, 2, 3], max_new_tokens=6, temperature=0)
    assert generate(model, [1, 2, 3], max_new_tokens=6, temperature=5e-324, seed=3) == greedy


def test_filter_logits_keeps_top_k_and_the_nucleus():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0]).log()  # probabilities 1/6, 3/6, 2/6, 0
    kept = lambda out: torch.isfinite(out).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [1, 2]
    assert kept(filter_logits(logits, top_p=0.5)) == [1]  # the top token alone holds 0.5
    assert kept(filter_logits(logits, top_p=0.6)) == [1, 2]
    assert kept(filter_logits(logits, top_p=1.0)) == [0, 1, 2]  # -inf stays -inf


def test_stops_at_eos_or_stop_ids_and_includes_it(model):
    free = generate(model, PROMPT, max_new_tokens=12, temperature=0)
    eos = free[4]
    first = free.index(eos)
    assert generate(model, PROMPT, max_new_tokens=12, temperature=0, eos_id=eos) == free[: first + 1]
    assert generate(model, PROMPT, max_new_tokens=12, temperature=0, stop_ids=[eos]) == free[: first + 1]


def test_stream_yields_the_same_tokens(model):
    stream = generate_stream(model, PROMPT, max_new_tokens=8, seed=5)
    assert list(stream) == generate(model, PROMPT, max_new_tokens=8, seed=5)
    assert generate(model, PROMPT, max_new_tokens=0) == []
    assert model.training  # the model's mode is restored


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=-0.5), "temperature must be"),
        (dict(temperature=float("nan")), "temperature must be"),
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
        (dict(max_new_tokens=44), r"exceeds the model's seq_len \(48\)"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(model, kwargs, message):
    kwargs = dict(max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=message):
        generate_stream(model, PROMPT, **kwargs)  # raises on the call, not on first iteration


def test_bad_prompts_are_refused(model):
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"\[0, 89\)"):
        generate(model, [1, 89], max_new_tokens=2)
