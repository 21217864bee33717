"""Progressive training: the sequence-length warmup schedule, and a real run that follows it."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from lmloom.artifacts.store import ArtifactStore
from lmloom.config import load_recipe
from lmloom.context import RunContext
from lmloom.pipeline import run_recipe
from lmloom.train.progressive import SeqLenWarmup, seq_len_at


def test_schedule_grows_linearly_in_coarse_steps_and_stays_full_after_warmup():
    warmup = SeqLenWarmup(steps=100, start=64)
    lengths = [seq_len_at(step, 256, warmup) for step in range(120)]
    assert lengths[0] == 64 and lengths[99] == 224 and lengths[100:] == [256] * 20
    assert lengths == sorted(lengths)  # never shrinks
    assert set(lengths) <= {32 * k for k in range(1, 9)}  # multiples of seq_len // 8: few compiled shapes
    assert len(set(lengths)) <= 8
    assert [seq_len_at(s, 256, SeqLenWarmup()) for s in (0, 50)] == [256, 256]  # off by default


RECIPE = """
name: progressive
stages:
  corpus:
    stage: data.prepare
    config:
      sources: [{{type: text-dir, path: {corpus}, patterns: ["*.py"]}}]
      executor: {{workers: 1}}
  tokenizer: {{stage: tokenizer.train, inputs: {{corpus: corpus}}, config: {{vocab_size: 300}}}}
  shards: {{stage: tokenizer.encode, inputs: {{corpus: corpus, tokenizer: tokenizer}}}}
  pretrain:
    stage: train.pretrain
    inputs: {{shards: shards, tokenizer: tokenizer}}
    config:
      model: {{seq_len: 64, d_model: 32, n_layers: 1, n_heads: 2}}
      batch_size: 4
      grad_accum: 2
      max_steps: 24
      precision: fp32
      compile: false
      log_every: 1
      eval_every: 1000
      seq_len_warmup: {{steps: 16, start: 8}}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "string.py", "shlex.py"):
        (folder / name).write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    recipe = tmp_path_factory.mktemp("recipe") / "r.yaml"
    recipe.write_text(RECIPE.format(corpus=folder))
    results = {
        r.name: r.artifact
        for r in run_recipe(load_recipe(str(recipe)), RunContext(ArtifactStore(tmp_path_factory.mktemp("s"))))
    }
    return results["pretrain"]


def test_a_run_trains_on_the_scheduled_lengths_and_counts_their_tokens(run):
    records = [json.loads(line) for line in run.read_bytes("metrics.jsonl").decode().splitlines()]
    steps = [r for r in records if "loss" in r]
    warmup = SeqLenWarmup(steps=16, start=8)
    expected = [seq_len_at(r["step"] - 1, 64, warmup) for r in steps]
    assert [r["seq_len"] for r in steps] == expected
    assert expected[0] == 8 and expected[-1] == 64
    assert steps[-1]["tokens"] == sum(4 * 2 * length for length in expected)
