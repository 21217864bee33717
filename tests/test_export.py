"""Exports for deployment: Hugging Face (loads in transformers, same logits), GGUF (read back by
gguf's own reader, llama.cpp's names and RoPE layout), ONNX with explicit past key/values (prefill and
decode agree in onnxruntime), int8 within its loss tolerance, every export a signed artifact, the CLI
and its permission, and the deployment files."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from lmloom.artifacts.store import ArtifactStore
from lmloom.config import Recipe
from lmloom.context import RunContext
from lmloom.errors import IntegrityError, LmloomError
from lmloom.export.gguf_file import read_gguf, state_from_gguf
from lmloom.export.onnx_model import OrtDecoder, export_onnx, past_names
from lmloom.export.onnx_stage import comparison_lines
from lmloom.models.io import model_from_files
from lmloom.pipeline import run_recipe
from lmloom.security.context import LmloomSecurity
from lmloom.security.policy import hash_token
from lmloom.security.signing import SigningKey, default_key_path, set_required
from lmloom.security.trust import TrustStore
from lmloom.tokenizers.loading import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = ("LMLOOM_SIGNING_KEY", "LMLOOM_TRUST_DIR", "LMLOOM_REQUIRE_SIGNATURES", "LMLOOM_POLICY", "LMLOOM_TOKEN")
MODEL = {"seq_len": 32, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2}  # head_dim 16, GQA


def recipe(prose: Path) -> Recipe:
    # One thread: on a shared 2-core machine torch's spinning second thread makes everything crawl.
    loop = {"batch_size": 8, "max_steps": 40, "threads": 1, "precision": "fp32", "compile": False, "eval_every": 1000,
            "final_eval_windows": 16, "optim": {"lr": 0.01, "warmup_steps": 5}}  # fmt: skip
    return Recipe.model_validate(
        {
            "name": "export-test",
            "stages": {
                "corpus": {
                    "stage": "data.prepare",
                    "config": {
                        "sources": [{"type": "text-dir", "path": str(prose)}],
                        "val_fraction": 0.2,
                        "executor": {"workers": 1},
                    },
                },  # fmt: skip
                "tok": {
                    "stage": "tokenizer.train",
                    "inputs": {"corpus": "corpus"},
                    "config": {"vocab_size": 300},
                },
                "shards": {"stage": "tokenizer.encode", "inputs": {"corpus": "corpus", "tokenizer": "tok"}},
                "pretrain": {
                    "stage": "train.pretrain",
                    "inputs": {"shards": "shards", "tokenizer": "tok"},
                    "config": {"model": MODEL, **loop},
                },  # fmt: skip
                "hf": {"stage": "export.hf", "inputs": {"checkpoint": "pretrain"}},
                "gguf": {"stage": "export.gguf", "inputs": {"checkpoint": "pretrain"}},  # f16
                "onnx": {
                    "stage": "export.onnx",
                    "inputs": {"checkpoint": "pretrain"},
                    "config": {"quantize": "int8", "eval_windows": 16, "bench_new_tokens": 12, "threads": 1},
                },  # fmt: skip
            },
        }
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A signed store (a local key, trusted) holding a tiny trained checkpoint and its three exports."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ENV:
            mp.delenv(name, raising=False)
        mp.setenv("LMLOOM_PRINCIPAL", "tester")
        prose = tmp_path_factory.mktemp("prose")
        rng = random.Random(3)
        words = "the river north village winter market bridge garden people music of and to in a was".split()
        for i in range(30):
            (prose / f"p{i}.txt").write_text(
                " ".join(rng.choice(words) for _ in range(300)).capitalize() + "."
            )
        root = tmp_path_factory.mktemp("store")
        key = SigningKey.generate("ecdsa-p256")
        key.save(default_key_path(root))
        TrustStore(root / "security" / "trust").add("local", key.public)
        store = ArtifactStore(root, security=LmloomSecurity(root))
        results = {r.name: r.artifact for r in run_recipe(recipe(prose), RunContext(store))}
        yield root, results


def materialize(artifact, folder: Path) -> Path:
    """The artifact's files in a plain directory, as a deployer would copy them out."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in artifact.manifest.files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(artifact.read_bytes(name))
    return folder


def our_model(run):
    return model_from_files(run[1]["pretrain"].read_bytes).eval()


# -- Hugging Face ---------------------------------------------------------------------------------
def test_hf_export_loads_in_transformers_with_equal_logits_and_tokens(run, tmp_path):
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    hf = run[1]["hf"]
    assert hf.kind == "hf-model" and {"config.json", "model.safetensors", "tokenizer.json"} <= set(
        hf.manifest.files
    )
    folder = materialize(hf, tmp_path / "hf")
    theirs = LlamaForCausalLM.from_pretrained(folder).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    ours = our_model(run)
    text = "the river north of the village market"
    ids = load_tokenizer(run[1]["pretrain"]).encode(text)
    assert tokenizer.encode(text, add_special_tokens=False) == ids
    x = torch.tensor([ids[:32]])
    with torch.no_grad():
        assert torch.allclose(theirs(x).logits, ours(x), atol=1e-4, rtol=0)
    assert theirs.config.eos_token_id == 1 and theirs.config.num_key_value_heads == 2
    # The chat template travels with the export: transformers renders a prompt exactly as lmloom does.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a set?"}]
    from lmloom.tune.chat import render_prompt

    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == render_prompt(messages)


# -- GGUF -----------------------------------------------------------------------------------------
def llama_cpp_permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, transcribed (HF q/k rows -> GGUF's)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def test_gguf_reads_back_with_llama_metadata_and_our_tensors(run, tmp_path):
    gguf_art = run[1]["gguf"]
    path = materialize(gguf_art, tmp_path / "g") / "model.gguf"
    meta, tensors = read_gguf(path)
    cfg = our_model(run).config
    expected = {
        "general.architecture": "llama",
        "llama.context_length": 32,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": cfg.hidden_dim,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.eos_token_id": 1,
    }
    assert {k: meta[k] for k in expected} == expected
    assert meta["llama.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    tok = load_tokenizer(run[1]["pretrain"])
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size and tokens[:3] == ["<|bos|>", "<|eos|>", "<|pad|>"]
    assert [tok.token(i) for i in range(3, cfg.vocab_size)] == tokens[3:]
    assert list(meta["tokenizer.ggml.token_type"][:4]) == [3, 3, 3, 1]  # CONTROL x3, NORMAL
    assert meta["tokenizer.ggml.merges"] and all(m.count(" ") == 1 for m in meta["tokenizer.ggml.merges"])
    # f16 matrices, f32 norms; reconstructs our state dict (f16-rounded) exactly.
    assert (
        tensors["blk.0.attn_q.weight"].dtype == np.float16
        and tensors["output_norm.weight"].dtype == np.float32
    )
    state = our_model(run).state_dict()
    back = state_from_gguf(tensors, cfg)
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(back[k], v.half().float() if v.dim() > 1 else v), k
    # RoPE layout: llama.cpp's converter permutes the HF export's q/k into exactly what we wrote.
    from safetensors.numpy import load as load_np

    hf_state = load_np(run[1]["hf"].read_bytes("model.safetensors"))
    for name, heads in (("q", 4), ("k", 2)):
        permuted = llama_cpp_permute(
            torch.from_numpy(hf_state[f"model.layers.1.self_attn.{name}_proj.weight"]), heads
        )
        assert torch.equal(permuted.half(), torch.from_numpy(tensors[f"blk.1.attn_{name}.weight"]))


# -- ONNX -----------------------------------------------------------------------------------------
def test_onnx_prefill_and_decode_agree_in_onnxruntime(run):
    onnx_art = run[1]["onnx"]
    meta = onnx_art.manifest.metadata
    assert meta["max_abs_logit_diff"] <= 1e-4 and meta["inputs"][:3] == [
        "input_ids",
        "attention_mask",
        "position_ids",
    ]
    model = our_model(run)
    runner = OrtDecoder.load(onnx_art.read_bytes("model.onnx"), model)
    names = [i.name for i in runner.session.get_inputs()]
    assert names == meta["inputs"] and past_names(2)[0] == "past_key_values.0.key"
    dims = {
        i.name: [d if isinstance(d, str) else int(d) for d in i.shape] for i in runner.session.get_inputs()
    }
    assert dims["past_key_values.1.value"] == ["batch", 2, "past_sequence", 16]
    ids = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(1))
    logits, past = runner.step(ids.numpy(), runner.empty_past(3))
    with torch.no_grad():
        assert np.abs(logits - model(ids).numpy()).max() < 1e-4
        seq = ids
        for step in range(5):  # decode steps feeding the presents back, against a full recompute
            nxt = torch.tensor(logits[:, -1:].argmax(-1))
            seq = torch.cat([seq, nxt], 1)
            logits, past = runner.step(nxt.numpy(), past)
            assert past[0].shape == (3, 2, 10 + step, 16)
            assert np.abs(logits - model(seq)[:, -1:].numpy()).max() < 1e-4


def test_onnx_attention_mask_handles_left_padding(run):
    model = our_model(run)
    runner = OrtDecoder.load(run[1]["onnx"].read_bytes("model.onnx"), model)
    short = [5, 17, 42, 8]
    padded = np.array([[2, 2, 2, *short]])
    mask = np.array([[0, 0, 0, 1, 1, 1, 1]])
    feeds = {"input_ids": padded, "attention_mask": mask, "position_ids": np.array([[0, 0, 0, 0, 1, 2, 3]])}
    feeds.update({n: np.zeros((1, 2, 0, 16), np.float32) for n in past_names(2)})
    logits = runner.session.run(["logits"], feeds)[0]
    with torch.no_grad():
        assert np.abs(logits[0, 3:] - model(torch.tensor([short]))[0].numpy()).max() < 1e-4


def test_int8_comparison_table_and_tolerance(run):
    meta = run[1]["onnx"].manifest.metadata
    print("\n" + "\n".join(comparison_lines(meta["comparison"])))  # shown under pytest -s
    rows = {r["format"]: r for r in meta["comparison"]}
    assert list(rows) == ["pytorch eager fp32", "onnxruntime fp32", "onnxruntime int8"]
    assert all(r["tokens_per_s"] > 0 and r["val_loss"] > 0 for r in rows.values())
    fp32, int8 = rows["onnxruntime fp32"], rows["onnxruntime int8"]
    assert fp32["val_loss"] == pytest.approx(rows["pytorch eager fp32"]["val_loss"], abs=1e-4)
    assert fp32["greedy_tokens_equal_to_eager"] == "12/12"
    assert int8["file_bytes"] < 0.5 * fp32["file_bytes"]
    assert abs(meta["int8_val_loss_change"]) <= 0.05 and int8["val_loss"] <= fp32["val_loss"] * 1.05
    assert meta["val_shards"] == run[1]["shards"].id  # found through the checkpoint's lineage


def test_torchscript_exporter_gives_the_same_interface(run):
    model = our_model(run)
    runner = OrtDecoder.load(export_onnx(model, "torchscript"), model)
    ids = torch.tensor([[3, 9, 27, 81, 4]])
    logits, past = runner.step(ids.numpy(), runner.empty_past(1))
    logits, past = runner.step(np.array([[7]]), past)
    with torch.no_grad():
        assert np.abs(logits[0, -1] - model(torch.tensor([[3, 9, 27, 81, 4, 7]]))[0, -1].numpy()).max() < 1e-4


# -- signed artifacts -----------------------------------------------------------------------------
def test_exports_are_signed_verify_and_a_tampered_export_is_refused(run, tmp_path, monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LMLOOM_PRINCIPAL", "tester")
    root = tmp_path / "store"
    shutil.copytree(run[0], root)
    set_required(root, True)
    store = ArtifactStore(root, security=LmloomSecurity(root))
    for step in ("hf", "gguf", "onnx"):
        opened = store.open(run[1][step].id)
        assert store.security.signing.report(opened).status == "trusted", step
        assert opened.manifest.inputs == {"checkpoint": run[1]["pretrain"].id}
    for step, name in (("gguf", "model.gguf"), ("onnx", "model.int8.onnx")):
        path = root / "artifacts" / run[1][step].id / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
        with pytest.raises(IntegrityError, match=name.replace(".", r"\.")):
            ArtifactStore(root, security=LmloomSecurity(root)).open(run[1][step].id)


# -- CLI ------------------------------------------------------------------------------------------
def test_cli_export_needs_the_export_permission_and_makes_a_verified_artifact(run, tmp_path):
    from lmloom.cli import app

    root = tmp_path / "store"
    shutil.copytree(run[0], root)
    tokens = {role: f"lml_test-token-for-{role}-0123456789abcdef" for role in ("deployer", "trainer")}
    policy = {
        "version": 1,
        "principals": {f"as-{r}": {"roles": [r], "tokens": [hash_token(t)]} for r, t in tokens.items()},
    }
    (root / "security" / "policy.yaml").write_text(yaml.safe_dump(policy))
    env = {"LMLOOM_HOME": str(root), "LMLOOM_POLICY": None, "LMLOOM_PRINCIPAL": None, "COLUMNS": "200",
           "LMLOOM_REQUIRE_SIGNATURES": None, "LMLOOM_SIGNING_KEY": None, "LMLOOM_TRUST_DIR": None}  # fmt: skip
    checkpoint = run[1]["pretrain"].id[:12]

    def cli(*args, role):
        result = CliRunner().invoke(app, list(args), env={**env, "LMLOOM_TOKEN": tokens[role]})
        exc = result.exception
        if isinstance(exc, LmloomError):
            return exc.exit_code, result.output + str(exc)
        if exc is not None and not isinstance(exc, SystemExit):
            raise exc
        return result.exit_code, result.output

    code, output = cli("export", "gguf", checkpoint, "--dtype", "f32", role="trainer")
    assert code == 5 and "export" in output
    code, output = cli("export", "gguf", checkpoint, "--dtype", "f32", role="deployer")
    assert code == 0, output
    made = [i for i in ArtifactStore(root).ids() if i not in {a.id for a in run[1].values()}]
    assert len(made) == 1 and made[0] in output
    art = ArtifactStore(root, security=LmloomSecurity(root)).open(made[0])
    assert art.kind == "gguf-model" and art.manifest.principal == "as-deployer"
    assert (art.path / "signatures").is_dir()
    _, tensors = read_gguf(art.file("model.gguf"))
    state = our_model(run).state_dict()
    assert all(torch.equal(v, state[k]) for k, v in state_from_gguf(tensors, our_model(run).config).items())
    code, output = cli("export", "hf", checkpoint, "--quantize", "int8", role="deployer")
    assert code == 2 and "--quantize applies to onnx" in output
    # An export that does not reproduce the model within the tolerance is refused, and nothing published.
    strict = ("--set", "exporter=torchscript", "--set", "tolerance=1e-12", "--set", "eval_windows=0")
    code, output = cli("export", "onnx", checkpoint, *strict, role="deployer")
    assert code != 0 and "does not reproduce the model" in output
    assert len(ArtifactStore(root).ids()) == len(run[1]) + 1


# -- deployment files -----------------------------------------------------------------------------
def test_deployment_files_parse_and_hold_what_a_deployment_needs():
    from lmloom.serve.gateway import load_gateway_config

    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "lmloom.yaml").read_text())}
    assert {"Deployment", "Service", "Secret", "ConfigMap", "PersistentVolumeClaim"} <= docs.keys()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/livez"
    assert pod["securityContext"]["runAsNonRoot"] and container["resources"]["limits"]["memory"]
    secret_volumes = {v["name"] for v in pod["volumes"] if "secret" in v}
    mounts = [m for m in container["volumeMounts"] if m["name"] in secret_volumes]
    assert mounts and all(m.get("readOnly") for m in mounts)
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
    gateway = yaml.safe_load(docs["ConfigMap"]["data"]["gateway.yaml"])
    assert load_gateway_config(None, **gateway).tls is not None  # 0.0.0.0 is allowed only with TLS
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile and "download.pytorch.org/whl/cpu" in dockerfile
    assert 'pip install ".[serve]"' in dockerfile and "EXPOSE 8000" in dockerfile
    assert 'ENTRYPOINT ["lmloom", "serve"]' in dockerfile and "USER 10001" in dockerfile
    assert json.dumps(gateway)  # plain data
