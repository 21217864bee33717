"""Multi-task pre-training: a weighted mixture of shards inputs, per-task shares and validation losses."""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from lmloom.artifacts.store import ArtifactStore
from lmloom.config import load_recipe
from lmloom.context import RunContext
from lmloom.errors import ConfigError
from lmloom.pipeline import run_recipe

RECIPE = """
name: multitask
stages:
  code:
    stage: data.prepare
    config:
      sources: [{{type: text-dir, path: {code}, patterns: ["*.py"]}}]
      val_fraction: 0.2
      executor: {{workers: 1}}
  prose:
    stage: data.prepare
    config:
      sources: [{{type: text-dir, path: {prose}, patterns: ["*.txt"]}}]
      val_fraction: 0.2
      executor: {{workers: 1}}
  tokenizer: {{stage: tokenizer.train, inputs: {{corpus: code}}, config: {{vocab_size: 300}}}}
  code_shards: {{stage: tokenizer.encode, inputs: {{corpus: code, tokenizer: tokenizer}}}}
  prose_shards: {{stage: tokenizer.encode, inputs: {{corpus: prose, tokenizer: tokenizer}}}}
  pretrain:
    stage: train.pretrain
    inputs: {{shards: code_shards, tokenizer: tokenizer, prose: prose_shards}}
    config:
      model: {{seq_len: 32, d_model: 32, n_layers: 1, n_heads: 2}}
      batch_size: 8
      max_steps: 40
      precision: fp32
      compile: false
      log_every: 1
      eval_every: 1000
      final_eval_windows: 32
      task_weights: {weights}
"""


def write_recipe(tmp_path, weights="{shards: 3, prose: 1}"):
    code, prose = tmp_path / "code", tmp_path / "prose"
    code.mkdir()
    prose.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "string.py", "shlex.py", "fnmatch.py"):
        (code / name).write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    rng = random.Random(3)
    words = "the river north village winter market bridge garden people music of and to in a was".split()
    for i in range(30):
        (prose / f"p{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(300)).capitalize() + ".")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(code=code, prose=prose, weights=weights))
    return recipe


def test_the_mixture_follows_its_weights_and_reports_each_task(tmp_path):
    recipe = write_recipe(tmp_path)
    results = {
        r.name: r.artifact
        for r in run_recipe(load_recipe(str(recipe)), RunContext(ArtifactStore(tmp_path / "s")))
    }
    pretrain = results["pretrain"]
    records = [json.loads(line) for line in pretrain.read_bytes("metrics.jsonl").decode().splitlines()]
    shares = [r["task_share/shards"] for r in records if "task_share/shards" in r]
    assert len(shares) == 40 and abs(np.mean(shares) - 0.75) < 0.06
    meta = pretrain.manifest.metadata
    assert set(meta["task_val_loss"]) == {"shards", "prose"} and meta["task_weights"] == {
        "shards": 3.0,
        "prose": 1.0,
    }
    assert pretrain.manifest.inputs["prose"] == results["prose_shards"].id  # lineage names every task


def test_a_weight_for_an_unknown_task_is_a_clear_error(tmp_path):
    recipe = write_recipe(tmp_path, weights="{shards: 1, web: 2}")
    with pytest.raises(ConfigError, match="task_weights: no shards input named web"):
        run_recipe(load_recipe(str(recipe)), RunContext(ArtifactStore(tmp_path / "s")))
