"""data.score: CCNet-style perplexity under a reference model lmloom trained, checked against
Hugging Face transformers on the same weights, filtering and curriculum order through a real run."""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

import pytest
import torch

from lmloom.artifacts.store import ArtifactStore
from lmloom.config import load_recipe
from lmloom.context import RunContext
from lmloom.data.lm_score import score_texts
from lmloom.models.io import model_from_files
from lmloom.pipeline import run_recipe

RECIPE = """
name: score-test
stages:
  corpus:
    stage: data.prepare
    config:
      sources: [{{type: text-dir, path: {corpus}, patterns: ["*.py", "*.txt"]}}]
      val_fraction: 0.1
      executor: {{workers: 1}}
  reference:
    stage: data.prepare
    config:
      sources: [{{type: text-dir, path: {corpus}, patterns: ["*.py"]}}]
      executor: {{workers: 1}}
  tokenizer: {{stage: tokenizer.train, inputs: {{corpus: reference}}, config: {{vocab_size: 400}}}}
  shards: {{stage: tokenizer.encode, inputs: {{corpus: reference, tokenizer: tokenizer}}}}
  pretrain:
    stage: train.pretrain
    inputs: {{shards: shards, tokenizer: tokenizer}}
    config:
      model: {{seq_len: 64, d_model: 48, n_layers: 2, n_heads: 2}}
      batch_size: 8
      max_steps: 80
      precision: fp32
      compile: false
      eval_every: 1000
      optim: {{lr: 0.005, warmup_steps: 5}}
  scored:
    stage: data.score
    inputs: {{corpus: corpus, checkpoint: pretrain}}
    config: {{keep_fraction: 0.8, order: ascending, precision: fp32, max_tokens: 64}}
"""


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in (
        "textwrap.py",
        "string.py",
        "shlex.py",
        "fnmatch.py",
        "glob.py",
        "bisect.py",
        "heapq.py",
        "colorsys.py",
        "keyword.py",
        "this.py",
        "numbers.py",
        "abc.py",
    ):
        (folder / name).write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    rng = random.Random(0)
    for i in range(3):  # noise the reference model has never seen anything like
        noise = "".join(rng.choice("qzxj#@%&~^ QZXJ") for _ in range(600))
        (folder / f"noise{i}.txt").write_text(noise)
    recipe = tmp_path_factory.mktemp("recipe") / "r.yaml"
    recipe.write_text(RECIPE.format(corpus=folder))
    store = ArtifactStore(tmp_path_factory.mktemp("store"))
    results = {r.name: r.artifact for r in run_recipe(load_recipe(str(recipe)), RunContext(store))}
    return results


def records(artifact, name):
    return [json.loads(line) for line in artifact.read_bytes(name).decode().splitlines()]


def test_noise_scores_worst_and_is_removed_and_order_is_ascending(scored_run):
    scored = scored_run["scored"]
    kept = records(scored, "train.jsonl") + records(scored, "val.jsonl")
    removed = records(scored, "removed.jsonl")
    assert {r["id"] for r in removed} >= {"noise0.txt", "noise1.txt", "noise2.txt"}
    assert all(r["reason"] == "lm_score.perplexity" and "text" in r for r in removed)
    train = records(scored, "train.jsonl")
    ppl = [r["meta"]["perplexity"] for r in train]
    assert ppl == sorted(ppl) and len(train) >= 8
    meta = scored.manifest.metadata
    assert meta["documents"]["kept"] == len(kept) and meta["reference_model"] == scored_run["pretrain"].id
    assert meta["perplexity"]["threshold"] >= max(ppl)


def test_scores_match_hugging_face_llama_on_the_same_weights(scored_run):
    transformers = pytest.importorskip("transformers")
    from lmloom.models.hf_llama import to_hf_config, to_hf_state_dict

    model = model_from_files(scored_run["pretrain"].read_bytes).eval()
    hf = transformers.LlamaForCausalLM(to_hf_config(model.config)).eval()
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.config), strict=False)
    hf.tie_weights()
    rng = random.Random(1)
    lists = [[1] + [rng.randrange(3, 400) for _ in range(rng.randint(5, 60))] for _ in range(6)]
    ours = score_texts(model, lists, pad_id=2)
    for ids, ppl in zip(lists, ours, strict=True):
        with torch.no_grad():
            loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
        assert ppl == pytest.approx(float(torch.tensor(loss).exp()), rel=1e-4)
