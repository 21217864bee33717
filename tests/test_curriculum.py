"""Curriculum learning: pacing functions, the easy-first order, exact resume, and a real run."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from lmloom.artifacts.store import ArtifactStore
from lmloom.config import load_recipe
from lmloom.context import RunContext
from lmloom.pipeline import run_recipe
from lmloom.train.curriculum import CurriculumConfig, CurriculumLoader, pool_fraction


@pytest.mark.parametrize("pacing", ["linear", "root", "step"])
def test_pacing_grows_from_the_start_fraction_to_everything(pacing):
    cfg = CurriculumConfig(by="unigram", pacing=pacing, start_fraction=0.25, steps=100)
    fractions = [pool_fraction(step, cfg, 1000) for step in range(0, 130, 10)]
    assert fractions[0] == pytest.approx(0.25) and fractions[10:] == [1.0, 1.0, 1.0]
    assert fractions == sorted(fractions)
    if pacing == "root":  # competence pacing lets windows in faster early on
        assert pool_fraction(25, cfg, 1000) > pool_fraction(
            25, cfg.model_copy(update={"pacing": "linear"}), 1000
        )


class FakeBase:
    """The part of WindowLoader the curriculum uses: 100 windows in a fixed shuffled order."""

    n_windows, seq_len, seed, shards = 100, 4, 7, None

    def windows(self, start, count):
        return (np.arange(start, start + count) * 37) % 100


def test_early_samples_come_from_the_easiest_windows_and_resume_is_exact():
    difficulty = np.arange(100, dtype=float)[::-1].copy()  # window 99 is easiest, window 0 hardest
    cfg = CurriculumConfig(by="unigram", pacing="linear", start_fraction=0.1, steps=10)
    loader = CurriculumLoader(FakeBase(), difficulty, cfg, samples_per_step=20, total_steps=50)
    first_step = loader.windows(0, 20)
    assert set(first_step) <= set(range(90, 100))  # the easiest 10%
    by_step = [difficulty[loader.windows(s * 20, 20)].mean() for s in range(10)]
    assert by_step[-1] > by_step[0] + 20  # harder windows come in as the pool grows
    whole = loader.windows(0, 400)
    assert np.array_equal(np.concatenate([loader.windows(0, 123), loader.windows(123, 277)]), whole)
    # after the curriculum (10 steps x 20 samples), the normal order starts from its beginning
    assert np.array_equal(whole[200:], FakeBase().windows(0, 200))


RECIPE = """
name: curriculum
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
      model: {{seq_len: 32, d_model: 32, n_layers: 1, n_heads: 2}}
      batch_size: 4
      max_steps: 30
      precision: fp32
      compile: false
      log_every: 1
      eval_every: 1000
      curriculum: {{by: unigram, pacing: root, start_fraction: 0.1, steps: 20}}
"""


def test_a_run_logs_its_pool_growing_and_its_windows_getting_harder(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "string.py", "shlex.py", "fnmatch.py"):
        (folder / name).write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(corpus=folder))
    results = {
        r.name: r.artifact
        for r in run_recipe(load_recipe(str(recipe)), RunContext(ArtifactStore(tmp_path / "s")))
    }
    records = [
        json.loads(line) for line in results["pretrain"].read_bytes("metrics.jsonl").decode().splitlines()
    ]
    during = [r for r in records if "curriculum_pool" in r]
    assert [r["step"] for r in during] == list(range(1, 21))
    pools = [r["curriculum_pool"] for r in during]
    assert pools[0] == pytest.approx(0.1) and pools == sorted(pools) and pools[-1] < 1
    difficulty = [r["curriculum_difficulty"] for r in during]
    assert np.mean(difficulty[-5:]) > np.mean(difficulty[:5])
