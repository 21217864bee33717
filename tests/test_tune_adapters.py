"""LoRA (PEFT-injected) and prefix tuning on our decoder, and their PEFT adapter files on the HF Llama export."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lmloom.models.decoder import Decoder, DecoderConfig
from lmloom.models.hf_llama import _pairs_to_halves
from lmloom.serve.generate import generate
from lmloom.tune.lora import (
    LoraSettings,
    apply_lora,
    load_peft_adapter,
    lora_state_dict,
    merge_lora,
    save_peft_adapter,
    unmerge_lora,
)
from lmloom.tune.prefix import PrefixSettings, PrefixTuned, load_peft_prefix, save_peft_prefix, to_peft_layout

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

# Grouped-query attention (4 query heads, 2 kv heads) so the q / k / v row blocks all differ in size.
CFG = DecoderConfig.preset("tiny", vocab_size=64, seq_len=32, n_kv_heads=2, d_model=64, ffn_hidden=96)


def make_model(seed: int = 0) -> Decoder:
    model = Decoder(CFG)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """The HF Llama export of make_model()'s base weights."""
    path = tmp_path_factory.mktemp("hf_llama")
    model = make_model()
    try:
        from lmloom.models.hf_llama import export_hf_dir
    except ImportError:  # older hf_llama: write the directory here
        from lmloom.models.hf_llama import to_hf_config, to_hf_state_dict

        to_hf_config(CFG).save_pretrained(path)
        state = to_hf_state_dict({k: v.detach() for k, v in model.state_dict().items()}, CFG)
        save_file(
            {k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"), {"format": "pt"}
        )
    else:
        export_hf_dir(model, path)
    return path


def load_llama(path):
    llama = transformers.LlamaForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    return llama.eval()


def randomize_lora_b(model, std: float = 0.05, seed: int = 2) -> None:
    """PEFT starts B at zero; a random B makes every adapter count in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def hf_loss(hf_model, idx: torch.Tensor) -> torch.Tensor:
    """The mean next-token loss our models compute for (idx[:, :-1], idx[:, 1:])."""
    logits = hf_model(input_ids=idx[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())


def train_steps(module, params, steps: int, lr: float, idx: torch.Tensor) -> list[float]:
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    module.train()
    for _ in range(steps):
        loss = module(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    module.eval()
    return losses


# ---------------------------------------------------------------------------------------------------- LoRA


def test_lora_only_adapters_get_gradients():
    model = apply_lora(make_model(), LoraSettings(rank=4, alpha=8))
    randomize_lora_b(model)
    idx = tokens(2, 12)
    model.train()
    model(idx[:, :-1], idx[:, 1:]).backward()
    lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    base = {n: p for n, p in model.named_parameters() if ".lora_" not in n}
    assert len(lora) == 2 * 5 * CFG.n_layers
    assert base and all(p.grad is None and not p.requires_grad for p in base.values())
    for name, p in lora.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_lora_settings_select_modules_and_layers():
    model = apply_lora(
        make_model(), LoraSettings(rank=2, target_modules=["qkv", "down"], layers_to_transform=[1])
    )
    assert sorted(lora_state_dict(model)) == [
        "layers.1.attn.qkv.lora_A.weight",
        "layers.1.attn.qkv.lora_B.weight",
        "layers.1.mlp.down.lora_A.weight",
        "layers.1.mlp.down.lora_B.weight",
    ]
    with pytest.raises(ValueError, match="unknown target_modules"):
        LoraSettings(target_modules=["q_proj"])
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoraSettings())


def test_lora_merge_unmerge_restores_base():
    model = apply_lora(make_model(), LoraSettings(rank=4, alpha=8))
    randomize_lora_b(model)
    base = {n: t.clone() for n, t in model.state_dict().items() if ".lora_" not in n}
    idx = tokens(2, 16)
    with torch.no_grad():
        unmerged = model(idx)
        merge_lora(model)
        merged_weights = model.layers[0].attn.qkv.base_layer.weight.clone()
        merged = model(idx)
        unmerge_lora(model)
        again = model(idx)
    assert not torch.allclose(merged_weights, base["layers.0.attn.qkv.base_layer.weight"])  # merge did merge
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=0)
    for name, tensor in model.state_dict().items():
        if ".lora_" not in name:
            assert (tensor - base[name]).abs().max() <= 1e-6, name


def test_lora_adapter_loads_in_peft_on_hf_llama(hf_dir, tmp_path):
    model = apply_lora(make_model(), LoraSettings(rank=4, alpha=8))
    randomize_lora_b(model)
    train_steps(model, [p for p in model.parameters() if p.requires_grad], 2, 1e-2, tokens(4, 17, seed=3))
    save_peft_adapter(
        model, LoraSettings(rank=4, alpha=8), tmp_path / "lora", base_model_name_or_path=str(hf_dir)
    )

    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    saved = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight" in saved
    assert saved["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (
        CFG.kv_heads * CFG.head_dim,
        4,
    )

    idx = tokens(2, 16)
    llama = load_llama(hf_dir)
    with torch.no_grad():
        base_logits = llama(idx).logits
        ours = model(idx)
        theirs = peft.PeftModel.from_pretrained(llama, tmp_path / "lora").eval()(input_ids=idx).logits
    diff = (ours - theirs).abs().max().item()
    print(
        f"LoRA: max |logit ours - PEFT| = {diff:.3g}; adapter effect {(ours - base_logits).abs().max():.3g}"
    )
    assert (ours - base_logits).abs().max() > 1e-2  # the adapter matters, so equality is not trivial
    assert diff < 1e-4

    # Gradients too: ours (through the fused qkv and its in-place backward) against PEFT's on HF Llama.
    model.train()
    model.zero_grad()
    model(idx[:, :-1], idx[:, 1:]).backward()
    peft_model = peft.PeftModel.from_pretrained(load_llama(hf_dir), tmp_path / "lora", is_trainable=True)
    hf_loss(peft_model, idx).backward()
    grads = {
        n.replace(".default", ""): p.grad for n, p in peft_model.named_parameters() if p.grad is not None
    }
    hf = "base_model.model.model.layers.{}.{}.lora_{}.weight"
    q_rows, kv_rows = CFG.n_heads * CFG.head_dim, CFG.kv_heads * CFG.head_dim
    for i in range(CFG.n_layers):
        qkv = model.layers[i].attn.qkv
        shared_a = sum(grads[hf.format(i, f"self_attn.{x}_proj", "A")] for x in "qkv")  # A feeds q, k and v
        torch.testing.assert_close(qkv.lora_A["default"].weight.grad, shared_a, atol=1e-7, rtol=1e-5)
        gq, gk, gv = qkv.lora_B["default"].weight.grad.split([q_rows, kv_rows, kv_rows])
        for ours_b, name in (
            (_pairs_to_halves(gq, CFG.n_heads), "q"),
            (_pairs_to_halves(gk, CFG.kv_heads), "k"),
        ):
            torch.testing.assert_close(
                ours_b, grads[hf.format(i, f"self_attn.{name}_proj", "B")], atol=1e-7, rtol=1e-5
            )
        torch.testing.assert_close(gv, grads[hf.format(i, "self_attn.v_proj", "B")], atol=1e-7, rtol=1e-5)
        down = model.layers[i].mlp.down.lora_B["default"].weight.grad
        torch.testing.assert_close(down, grads[hf.format(i, "mlp.down_proj", "B")], atol=1e-7, rtol=1e-5)


def test_load_peft_adapter_round_trip_and_refusals(tmp_path):
    settings = LoraSettings(rank=3, alpha=6, target_modules=["qkv", "proj", "up"], layers_to_transform=[0])
    model = apply_lora(make_model(), settings)
    randomize_lora_b(model)
    save_peft_adapter(model, settings, tmp_path / "a")

    fresh = make_model()
    loaded = load_peft_adapter(fresh, tmp_path / "a")
    assert loaded == settings
    ours, theirs = lora_state_dict(model), lora_state_dict(fresh)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    idx = tokens(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx), model(idx), atol=0, rtol=0)

    # q_proj + v_proj only (PEFT's usual Llama choice): k becomes a zero block of the fused B.
    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    partial = {k: v for k, v in weights.items() if ".k_proj." not in k}
    (tmp_path / "qv").mkdir()
    (tmp_path / "qv" / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
    save_file(partial, str(tmp_path / "qv" / "adapter_model.safetensors"))
    qv = make_model()
    load_peft_adapter(qv, tmp_path / "qv")
    b = qv.layers[0].attn.qkv.lora_B["default"].weight
    q_rows, kv_rows = CFG.n_heads * CFG.head_dim, CFG.kv_heads * CFG.head_dim
    assert b[q_rows : q_rows + kv_rows].abs().sum() == 0 and b[:q_rows].abs().sum() > 0

    # Different A for q and k: a fused qkv cannot hold it.
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    bad = dict(weights) | {key: weights[key] + 0.01}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text(
        (tmp_path / "a" / "adapter_config.json").read_text()
    )
    save_file(bad, str(tmp_path / "bad" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="one A shared by q, k and v"):
        load_peft_adapter(make_model(), tmp_path / "bad")


# -------------------------------------------------------------------------------------------------- prefix


@pytest.mark.parametrize("hidden", [None, 16])
def test_prefix_gradients_only_in_prefix(hidden):
    tuned = PrefixTuned(make_model(), PrefixSettings(n_prefix=4, init="random", projection_hidden=hidden))
    idx = tokens(2, 12)
    tuned.train()
    tuned(idx[:, :-1], idx[:, 1:]).backward()
    assert all(p.grad is None and not p.requires_grad for p in tuned.model.parameters())
    trainable = {name: p for name, p in tuned.named_parameters() if p.requires_grad}
    assert trainable and set(trainable) == set(tuned.prefix_state_dict())
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    if hidden is None:  # every layer's keys and values, each virtual token: all reached through the cache
        assert (tuned.prefix.grad.abs().sum(dim=(2, 4)) > 0).all()


def test_prefix_training_lowers_loss():
    # The tiny task: text over 4 of the 64 tokens. The frozen random model predicts near-uniformly (ln 64 =
    # 4.16); the prefix alone must learn to steer it toward those tokens.
    tuned = PrefixTuned(make_model(), PrefixSettings(n_prefix=4, init="from_vocab"))
    words = torch.tensor([3, 17, 29, 41])
    idx = words[torch.randint(0, 4, (4, 17), generator=torch.Generator().manual_seed(5))]
    losses = train_steps(tuned, tuned.prefix_parameters(), 8, 0.2, idx)
    assert losses[-1] < losses[0] - 0.2, losses
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses


@pytest.mark.parametrize("hidden", [None, 16])
def test_prefix_adapter_loads_in_peft_on_hf_llama(hf_dir, tmp_path, hidden):
    settings = PrefixSettings(n_prefix=5, init="from_vocab", projection_hidden=hidden)
    tuned = PrefixTuned(make_model(), settings)
    train_steps(tuned, tuned.prefix_parameters(), 2, 5e-2, tokens(4, 13, seed=4))
    save_peft_prefix(tuned, tmp_path / "prefix", base_model_name_or_path=str(hf_dir))
    config = json.loads((tmp_path / "prefix" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 5
    emb = load_file(tmp_path / "prefix" / "adapter_model.safetensors")["prompt_embeddings"]
    assert emb.shape == (5, CFG.n_layers * 2 * CFG.kv_heads * CFG.head_dim)

    idx = tokens(2, 12)
    llama = load_llama(hf_dir)
    with torch.no_grad():
        base_logits = llama(idx).logits
        ours = tuned(idx)
        theirs = peft.PeftModel.from_pretrained(llama, tmp_path / "prefix").eval()(input_ids=idx).logits
    diff = (ours - theirs).abs().max().item()
    print(
        f"prefix: max |logit ours - PEFT| = {diff:.3g}; prefix effect {(ours - base_logits).abs().max():.3g}"
    )
    assert (ours - base_logits).abs().max() > 1e-2
    assert diff < 1e-4

    loaded = load_peft_prefix(make_model(), tmp_path / "prefix")
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), ours, atol=1e-5, rtol=0)

    if hidden is None:  # gradients: ours through the cache's in-place writes, PEFT's through its DynamicCache
        tuned.train()
        tuned.zero_grad()
        tuned(idx[:, :-1], idx[:, 1:]).backward()
        peft_model = peft.PeftModel.from_pretrained(
            load_llama(hf_dir), tmp_path / "prefix"
        )  # inference mode:
        weight = peft_model.prompt_encoder["default"].embedding.weight  # PEFT will not load a prompt adapter
        weight.requires_grad_(True)  # as trainable, but its inference path is differentiable all the same
        hf_loss(peft_model, idx).backward()
        torch.testing.assert_close(to_peft_layout(tuned.prefix.grad), weight.grad, atol=1e-7, rtol=1e-5)


def test_prefix_generation_with_prefilled_cache():
    tuned = PrefixTuned(make_model(), PrefixSettings(n_prefix=3, init="random", seed=7))
    prompt = tokens(1, 5, seed=9)[0].tolist()
    out = generate(tuned, prompt, max_new_tokens=6, temperature=0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):  # greedy by recomputing the whole sequence behind the prefix
            ids.append(int(tuned(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt) :]
    assert tuned.config.seq_len == CFG.seq_len - 3
    with pytest.raises(ValueError, match="exceed"):
        tuned(tokens(1, CFG.seq_len - 2))
