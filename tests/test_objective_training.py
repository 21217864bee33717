"""train.objective: GPT-2 and Llama (causal and prefix LM), BERT (masked LM) and T5 (span corruption)
trained through the real pipeline, their loss falling, and the artifact loading in `transformers`; a
mixture of objectives with per-task metrics; and exact resume of an interrupted run."""

from __future__ import annotations

import hashlib
import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch

from lmloom.artifacts.store import ArtifactStore
from lmloom.config import load_recipe
from lmloom.context import RunContext
from lmloom.errors import ConfigError
from lmloom.pipeline import run_recipe

RECIPE = """
name: objectives
stages:
  corpus:
    stage: data.prepare
    config:
      sources: [{{type: text-dir, path: {corpus}, patterns: ["*.py"]}}]
      executor: {{workers: 1}}
  tokenizer: {{stage: tokenizer.train, inputs: {{corpus: corpus}}, config: {{vocab_size: 300}}}}
  shards: {{stage: tokenizer.encode, inputs: {{corpus: corpus, tokenizer: tokenizer}}}}
  model:
    stage: train.objective
    inputs: {{shards: shards, tokenizer: tokenizer}}
    config:
      architecture: {architecture}
      objective: {objective}
      model: {model}
      seq_len: 64
      batch_size: 8
      max_steps: 40
      precision: fp32
      log_every: 1
      eval_every: 1000
      final_eval_windows: 16
      optim: {{lr: 0.003, warmup_steps: 5}}
"""

HF_CLASS = {
    "gpt": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "bert": "BertForMaskedLM",
    "t5": "T5ForConditionalGeneration",
}
# A mixture (or any other config) in the same pipeline: the model stage's config as flow-style YAML.
MIXTURE_RECIPE = (
    RECIPE.split("  model:\n")[0]
    + """  model:
    stage: train.objective
    inputs: {{shards: shards, tokenizer: tokenizer}}
    config: {config}
"""
)
BASE = dict(
    architecture="llama",
    seq_len=32,
    batch_size=4,
    precision="fp32",
    eval_every=1000,
    final_eval_windows=16,
    optim={"lr": 0.003, "warmup_steps": 2},
)


def write_recipe(tmp_path, corpus, name="r.yaml", **config) -> str:
    path = tmp_path / name
    path.write_text(MIXTURE_RECIPE.format(corpus=corpus, config=json.dumps({**BASE, **config})))
    return str(path)


def records(art) -> list[dict]:
    return [json.loads(line) for line in art.read_bytes("metrics.jsonl").decode().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "string.py", "shlex.py", "fnmatch.py"):
        (folder / name).write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return ArtifactStore(tmp_path_factory.mktemp("store"))


@pytest.mark.parametrize(
    "architecture,objective,overrides",
    [
        ("gpt", "clm", {}),
        ("gpt", "prefix_lm", {}),
        ("llama", "clm", {}),
        ("llama", "prefix_lm", {"n_kv_heads": 2}),  # grouped-query attention, through `model:`
        ("bert", "mlm", {}),
        ("t5", "span", {}),
    ],
)
def test_each_architecture_learns_its_objective_and_loads_in_transformers(
    corpus, store, tmp_path, architecture, objective, overrides
):
    transformers = pytest.importorskip("transformers")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        RECIPE.format(
            corpus=corpus, architecture=architecture, objective=objective, model=json.dumps(overrides)
        )
    )
    results = {r.name: r.artifact for r in run_recipe(load_recipe(str(recipe)), RunContext(store))}
    art = results["model"]
    assert art.kind == "hf-model" and art.manifest.metadata["objective"] == objective
    losses = [json.loads(line)["loss"] for line in art.read_bytes("metrics.jsonl").decode().splitlines()]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3  # it learns
    out = tmp_path / "hf"
    out.mkdir()
    for name in art.manifest.files:
        (out / name).write_bytes(art.read_bytes(name))
    model = getattr(transformers, HF_CLASS[architecture]).from_pretrained(out).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        if architecture == "t5":
            logits = model(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
        else:
            logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    assert logits.shape[-1] == art.manifest.metadata["vocabulary"]
    assert art.manifest.metadata["hf_class"] == HF_CLASS[architecture]
    if architecture == "llama":
        # The trained decoder (read back from the directory) and transformers' Llama agree.
        from lmloom.models.hf_llama import import_hf_dir

        ours, cfg = import_hf_dir(out)
        assert cfg.kv_heads == overrides.get("n_kv_heads", cfg.n_heads)
        ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        hf = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
            hf_loss = hf(input_ids=ids, labels=ids).loss  # HF shifts the labels itself
            torch.testing.assert_close(ours(ids[:, :-1], ids[:, 1:]), hf_loss, atol=1e-4, rtol=1e-4)


def test_llama_hf_directory_round_trip_and_parallel_refusal(tmp_path):
    from lmloom.models.decoder import Decoder, DecoderConfig
    from lmloom.models.hf_llama import export_hf_dir, import_hf_dir

    torch.manual_seed(0)
    cfg = DecoderConfig.preset("tiny", vocab_size=97, seq_len=16, n_kv_heads=1, tie_embeddings=False)
    model = Decoder(cfg).eval()
    export_hf_dir(model, tmp_path / "hf", bos_token_id=1)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["bos_token_id"] == 1
    back, back_cfg = import_hf_dir(tmp_path / "hf")
    assert back_cfg.kv_heads == 1 and not back_cfg.tie_embeddings
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    parallel = Decoder(DecoderConfig.preset("tiny", vocab_size=97, seq_len=16, parallel=True))
    with pytest.raises(ValueError, match="parallel"):
        export_hf_dir(parallel, tmp_path / "palm")
    assert not (tmp_path / "palm").exists()  # refused before anything was written


def test_an_objective_that_does_not_fit_the_architecture_is_refused(corpus, store, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(corpus=corpus, architecture="bert", objective="span", model="{}"))
    with pytest.raises(ConfigError, match="objective 'span' does not fit architecture 'bert'; it takes mlm"):
        run_recipe(load_recipe(str(recipe)), RunContext(store))


def test_a_parallel_llama_is_refused_when_the_config_is_validated(corpus, tmp_path):
    from lmloom.pipeline import plan

    recipe = write_recipe(tmp_path, corpus, objective="clm", model={"parallel": True})
    with pytest.raises(ConfigError, match="parallel .PaLM-style. block has no Hugging Face Llama"):
        plan(load_recipe(recipe))  # planning, before any stage (data included) runs
    recipe = write_recipe(tmp_path, corpus, objective="clm", model={"n_kv_heads": 3})
    with pytest.raises(ConfigError, match="n_kv_heads"):
        plan(load_recipe(recipe))
    recipe = write_recipe(tmp_path, corpus, objective="clm", model={"widht": 3})
    with pytest.raises(ConfigError, match="widht"):
        plan(load_recipe(recipe))


@pytest.mark.parametrize(
    "config,message",
    [
        (
            {"objective": "prefix_lm", "objectives": {"clm": 1.0}},
            "objective 'prefix_lm' and objectives are alternatives",
        ),
        ({"architecture": "bert", "objectives": {"mlm": 1.0}}, "needs a decoder architecture"),
        ({"objectives": {"clm": 1.0, "mlm": 1.0}}, "'mlm' does not fit architecture 'llama'"),
        ({"objectives": {"clm": 1.0, "prefix_lm": 0.0}}, "weight of 'prefix_lm' must be a positive number"),
        ({"objective": "mixture"}, "needs objectives"),
    ],
)
def test_a_mixture_that_does_not_fit_is_refused(corpus, tmp_path, config, message):
    from lmloom.pipeline import plan

    with pytest.raises(ConfigError, match=message):
        plan(load_recipe(write_recipe(tmp_path, corpus, **config)))


def test_mixture_draws_match_the_weights_and_are_seeded():
    from lmloom.train.objective_stage import MixtureLoader

    def draws(seed):
        loader = MixtureLoader(None, {}, {"clm": 0.75, "prefix_lm": 0.25}, seed, None)
        return [loader.task_of(sample) for sample in range(0, 4000 * 8, 8)]

    tasks = draws(1337)
    assert tasks == draws(1337) and tasks != draws(1338)
    share = tasks.count("clm") / len(tasks)
    assert abs(share - 0.75) < 0.025, share  # 4000 draws: sd 0.007


def test_a_mixture_of_objectives_logs_per_task_losses_and_shares(corpus, store, tmp_path):
    from lmloom.train.objective_stage import MixtureLoader

    steps, accum = 24, 2
    weights = {"clm": 3.0, "prefix_lm": 1.0}
    recipe = write_recipe(
        tmp_path, corpus, objectives=weights, max_steps=steps, grad_accum=accum, log_every=1
    )
    art = run_recipe(load_recipe(recipe), RunContext(store))[-1].artifact
    meta = art.manifest.metadata
    assert meta["objective"] == "mixture" and meta["hf_class"] == "LlamaForCausalLM"
    assert meta["objectives"] == {"clm": 0.75, "prefix_lm": 0.25}
    assert set(meta["task_val_loss"]) == {"clm", "prefix_lm"}
    assert all(math.isfinite(v) and 0 < v < 10 for v in meta["task_val_loss"].values())
    # Each micro-batch's task is a pure function of (seed, first sample): recount them from the loader.
    loader = MixtureLoader(None, {}, {"clm": 0.75, "prefix_lm": 0.25}, 1337, None)
    drawn = [loader.task_of(micro * 4) for micro in range(steps * accum)]
    assert meta["task_share"] == {
        name: round(drawn.count(name) / len(drawn), 4) for name in ("clm", "prefix_lm")
    }
    recs = records(art)
    assert [r["step"] for r in recs] == list(range(1, steps + 1))
    for r in recs:
        step_tasks = drawn[(r["step"] - 1) * accum : r["step"] * accum]
        shares = {name: r.get(f"task_share/{name}", 0.0) for name in weights}
        assert shares == {name: step_tasks.count(name) / accum for name in weights}
        assert {k for k in r if k.startswith("loss/")} == {f"loss/{name}" for name in set(step_tasks)}
        # The step's loss is the mean over its micro-batches: the share-weighted per-task means.
        mixed = sum(shares[name] * r[f"loss/{name}"] for name in set(step_tasks))
        assert mixed == pytest.approx(r["loss"], abs=1e-6)


# -- exact resume ------------------------------------------------------------------------------------


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(corpus, tmp_path, monkeypatch):
    """Interrupt a llama mixture run right after its step-4 checkpoint (mid log window: the per-task
    sums travel in the checkpoint), rerun it, and compare with an uninterrupted run: every logged
    value and the weights are identical."""
    import lmloom.train.runners as trainer  # the single-process runner saves the checkpoints

    config = dict(
        objectives={"clm": 1.0, "prefix_lm": 1.0},
        max_steps=8,
        grad_accum=2,
        checkpoint_every=2,
        log_every=3,
        eval_every=4,
        eval_windows=8,
    )
    recipe = write_recipe(tmp_path, corpus, **config)
    interrupted_store = ArtifactStore(tmp_path / "interrupted")
    save = trainer.save_checkpoint

    def save_then_crash(directory, model, optimizer, state, **kw):
        save(directory, model, optimizer, state, **kw)
        if state.step == 4:
            raise KeyboardInterrupt("simulated interruption after the step-4 checkpoint")

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_recipe(recipe), RunContext(interrupted_store))
    assert not [i for i in interrupted_store.ids() if interrupted_store.open(i).kind == "hf-model"]
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    resumed = run_recipe(load_recipe(recipe), RunContext(interrupted_store))[-1].artifact
    clean = run_recipe(load_recipe(recipe), RunContext(ArtifactStore(tmp_path / "clean")))[-1].artifact

    def logged(art):
        timing = ("tokens_per_s", "elapsed_s")
        return [{k: v for k, v in r.items() if k not in timing} for r in records(art)]

    assert logged(resumed) == logged(clean)
    assert [r["step"] for r in logged(clean)] == [3, 4, 6, 8]
    assert any("loss/clm" in r for r in logged(clean)) and any("loss/prefix_lm" in r for r in logged(clean))
    for key in ("train_loss", "val_loss", "task_val_loss", "task_share", "steps", "tokens"):
        assert resumed.manifest.metadata[key] == clean.manifest.metadata[key], key
    digest = [hashlib.sha256(a.read_bytes("model.safetensors")).hexdigest() for a in (resumed, clean)]
    assert digest[0] == digest[1]


def test_every_builtin_recipe_plans():
    from lmloom.config import builtin_recipes, read_recipe_text
    from lmloom.pipeline import plan

    names = builtin_recipes()
    assert {
        "quickstart",
        "gpt-clm",
        "gpt-prefixlm",
        "llama-clm",
        "llama-prefixlm",
        "multi-objective",
        "bert-mlm",
        "t5-span",
        "continual",
    } <= set(names)
    for name in names:
        assert plan(load_recipe(name)), read_recipe_text(name)[0]
