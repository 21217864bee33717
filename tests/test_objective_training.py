"""train.objective: GPT-2 (causal and prefix LM), BERT (masked LM) and T5 (span corruption) trained
through the real pipeline, their loss falling, and the artifact loading in `transformers`."""

from __future__ import annotations

import json
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
      seq_len: 64
      batch_size: 8
      max_steps: 40
      precision: fp32
      log_every: 1
      eval_every: 1000
      final_eval_windows: 16
      optim: {{lr: 0.003, warmup_steps: 5}}
"""

HF_CLASS = {"gpt": "GPT2LMHeadModel", "bert": "BertForMaskedLM", "t5": "T5ForConditionalGeneration"}


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
    "architecture,objective", [("gpt", "clm"), ("gpt", "prefix_lm"), ("bert", "mlm"), ("t5", "span")]
)
def test_each_architecture_learns_its_objective_and_loads_in_transformers(
    corpus, store, tmp_path, architecture, objective
):
    transformers = pytest.importorskip("transformers")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(corpus=corpus, architecture=architecture, objective=objective))
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


def test_an_objective_that_does_not_fit_the_architecture_is_refused(corpus, store, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(corpus=corpus, architecture="bert", objective="span"))
    with pytest.raises(ConfigError, match="objective 'span' does not fit architecture 'bert'; it takes mlm"):
        run_recipe(load_recipe(str(recipe)), RunContext(store))


def test_every_builtin_recipe_plans():
    from lmloom.config import builtin_recipes, read_recipe_text
    from lmloom.pipeline import plan

    names = builtin_recipes()
    assert {"quickstart", "gpt-clm", "gpt-prefixlm", "bert-mlm", "t5-span", "continual"} <= set(names)
    for name in names:
        assert plan(load_recipe(name)), read_recipe_text(name)[0]
