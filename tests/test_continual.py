"""Continual pre-training: replay of the checkpoint's own data, exact replay draws, and forgetting
measured on the old validation data, less with replay than without."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from lmloom.artifacts.store import ArtifactStore
from lmloom.config import load_recipe
from lmloom.context import RunContext
from lmloom.pipeline import run_recipe
from lmloom.train.continual import ReplayLoader

RECIPE = """
name: continual
stages:
  old_corpus:
    stage: data.prepare
    config:
      sources: [{{type: text-dir, path: {code}, patterns: ["*.py"]}}]
      val_fraction: 0.2
      executor: {{workers: 1}}
  new_corpus:
    stage: data.prepare
    config:
      sources: [{{type: text-dir, path: {prose}, patterns: ["*.txt"]}}]
      val_fraction: 0.2
      executor: {{workers: 1}}
  tokenizer: {{stage: tokenizer.train, inputs: {{corpus: old_corpus}}, config: {{vocab_size: 300}}}}
  old_shards: {{stage: tokenizer.encode, inputs: {{corpus: old_corpus, tokenizer: tokenizer}}}}
  new_shards: {{stage: tokenizer.encode, inputs: {{corpus: new_corpus, tokenizer: tokenizer}}}}
  pretrain:
    stage: train.pretrain
    inputs: {{shards: old_shards, tokenizer: tokenizer}}
    config: &loop
      model: {{seq_len: 32, d_model: 48, n_layers: 2, n_heads: 2}}
      batch_size: 8
      max_steps: 150
      precision: fp32
      compile: false
      eval_every: 1000
      final_eval_windows: 64
      optim: {{lr: 0.01, warmup_steps: 5}}
  no_replay:
    stage: train.continue
    inputs: {{checkpoint: pretrain, shards: new_shards}}
    config: {{replay: 0.0, batch_size: 8, max_steps: 100, precision: fp32, compile: false, eval_every: 1000, final_eval_windows: 64, optim: {{lr: 0.01, warmup_steps: 5}}}}
  with_replay:
    stage: train.continue
    inputs: {{checkpoint: pretrain, shards: new_shards}}
    config: {{replay: 0.5, batch_size: 8, max_steps: 100, precision: fp32, compile: false, eval_every: 1000, final_eval_windows: 64, optim: {{lr: 0.01, warmup_steps: 5}}}}
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    code = tmp_path_factory.mktemp("code")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py"):
        (code / name).write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    prose = tmp_path_factory.mktemp("prose")
    rng = random.Random(3)
    words = "the river north village winter market bridge garden people music of and to in a was".split()
    for i in range(40):
        text = " ".join(rng.choice(words) for _ in range(400))
        (prose / f"p{i}.txt").write_text(text.capitalize() + ".")
    recipe = tmp_path_factory.mktemp("recipe") / "r.yaml"
    recipe.write_text(RECIPE.format(code=code, prose=prose))
    store = ArtifactStore(tmp_path_factory.mktemp("store"))
    return {r.name: r.artifact for r in run_recipe(load_recipe(str(recipe)), RunContext(store))}


def test_replay_forgets_measurably_less_than_training_on_new_data_alone(runs):
    alone, replayed = runs["no_replay"].manifest.metadata, runs["with_replay"].manifest.metadata
    assert alone["old_val_loss_before"] == pytest.approx(replayed["old_val_loss_before"])
    assert alone["forgetting"] > 0.1  # training on the new data alone hurts the old
    assert replayed["forgetting"] < alone["forgetting"] / 2
    assert replayed["replay_shards"] == runs["pretrain"].manifest.inputs["shards"]
    assert alone["continued_from"] == runs["pretrain"].id


class Windows:
    def __init__(self, offset):
        self.offset, self.seq_len, self.shards = offset, 4, None

    def windows(self, sample, count):
        return np.arange(sample, sample + count) + self.offset


def test_replay_share_and_draws_are_a_pure_function_of_the_sample():
    loader = ReplayLoader(Windows(0), Windows(10_000), replay=0.3, seed=5)
    flags = loader.is_replay(np.arange(20_000))
    assert abs(flags.mean() - 0.3) < 0.01
    assert np.array_equal(flags[5_000:6_000], loader.is_replay(np.arange(5_000, 6_000)))
