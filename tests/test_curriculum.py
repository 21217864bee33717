"""Curriculum learning: pacing functions, the easy-first order (by unigram surprisal or by a trained
reference model's loss), exact resume, a batch-size ramp, and a real run."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from lmloom.artifacts.store import ArtifactStore
from lmloom.config import load_recipe
from lmloom.context import RunContext
from lmloom.errors import ConfigError
from lmloom.models.decoder import Decoder, DecoderConfig
from lmloom.models.io import model_files
from lmloom.pipeline import run_recipe
from lmloom.train.curriculum import CurriculumConfig, CurriculumLoader, pool_fraction, reference_difficulty
from lmloom.train.optim import OptimConfig, build_optimizer
from lmloom.train.stage import PretrainConfig, _reference_model


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


def test_with_a_batch_ramp_each_sample_is_paced_by_the_step_it_belongs_to():
    difficulty = np.arange(100, dtype=float)
    cfg = CurriculumConfig(by="unigram", pacing="step", start_fraction=0.1, steps=8)
    per_step = [2, 2, 4, 4, 8, 8, 8, 8]  # a ramped step holds fewer samples
    loader = CurriculumLoader(FakeBase(), difficulty, cfg, samples_per_step=per_step, total_steps=8)
    starts = np.concatenate([[0], np.cumsum(per_step)])
    for step in range(8):
        drawn = loader.windows(int(starts[step]), per_step[step])
        pool = math.ceil(pool_fraction(step, cfg, 8) * 100)
        assert drawn.max() < pool, step  # the easiest `pool` windows are 0 .. pool - 1
    assert loader.describe(2)["curriculum_pool"] == pytest.approx(pool_fraction(2, cfg, 8))
    whole = loader.windows(0, 60)
    assert np.array_equal(np.concatenate([loader.windows(0, 7), loader.windows(7, 53)]), whole)
    assert np.array_equal(whole[sum(per_step) :], FakeBase().windows(0, 60 - sum(per_step)))


# -- difficulty by a trained reference model -----------------------------------------------------------

REF = DecoderConfig(vocab_size=32, seq_len=8, d_model=32, n_layers=1, n_heads=2)


class FakeShards:
    """A token stream of 40 windows of 16 tokens: the even ones a counting pattern a model can learn,
    the odd ones random tokens."""

    def __init__(self):
        g = np.random.default_rng(0)
        windows = [(np.arange(16) + w) % 16 if w % 2 == 0 else g.integers(0, 32, 16) for w in range(40)]
        self.stream = np.concatenate([*windows, [0]])

    def tokens(self, start, end):
        return self.stream[start:end]


@pytest.fixture(scope="module")
def reference():
    """A tiny reference model trained on the counting pattern (not on the random windows)."""
    torch.manual_seed(0)
    model = Decoder(REF)
    optimizer = build_optimizer(model, OptimConfig(lr=0.01, warmup_steps=0))
    for _ in range(40):
        starts = torch.randint(0, 16, (8, 1))
        x = (starts + torch.arange(REF.seq_len + 1)) % 16
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_windows_the_reference_finds_easy_come_first(reference):
    shards = FakeShards()
    seen = []
    # 16-token windows under an 8-token reference: each window is scored in two pieces
    scores = reference_difficulty(reference, shards, 16, 40, batch_size=6, advance=seen.append)
    assert sum(seen) == 40 and len(seen) == 7  # progress in batches
    assert scores[0::2].max() < scores[1::2].min()  # every pattern window beats every random one
    assert scores[1::2].mean() > math.log(32) * 0.8  # random tokens: about uniform, log(32) nats

    # the scores are the loss: one window by hand, as the model's own mean loss over its two pieces
    x = torch.from_numpy(shards.tokens(32, 49)).long()
    with torch.no_grad():
        pieces = [float(reference(x[None, a : a + 8], x[None, a + 1 : a + 9])) for a in (0, 8)]
    assert scores[2] == pytest.approx(sum(pieces) / 2, abs=1e-5)

    class Base(FakeBase):
        n_windows = 40

    cfg = CurriculumConfig(by="reference", pacing="linear", start_fraction=0.5, steps=10)
    loader = CurriculumLoader(Base(), scores, cfg, samples_per_step=8, total_steps=20)
    assert set(loader.windows(0, 8).tolist()) <= set(range(0, 40, 2))  # step 0: only easy windows
    late = loader.windows(9 * 8, 8 * 10)  # the last step of the curriculum draws from (almost) all
    assert any(w % 2 for w in late)


class FakeArtifact:
    def __init__(self, kind, files=None, tokenizer=None, id="a" * 64):
        self.kind, self.id, self.short_id, self.files = kind, id, id[:12], files or {}
        self.manifest = type("M", (), {"metadata": {"tokenizer": tokenizer}})()

    def read_bytes(self, name):
        return self.files[name]


def test_the_reference_must_be_given_trained_and_share_the_tokenizer(reference):
    tok = FakeArtifact("tokenizer", id="t" * 64)
    cfg = PretrainConfig(curriculum=CurriculumConfig(by="reference"))
    ref = FakeArtifact("checkpoint", model_files(reference), tokenizer=tok.id)
    loaded = _reference_model(cfg, {"reference": ref}, tok, "pretrain")
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), reference.state_dict().values(), strict=True)
    )
    other = FakeArtifact("checkpoint", model_files(reference), tokenizer="u" * 64)
    with pytest.raises(ConfigError, match="trained with tokenizer uuuuuuuuuuuu, this run uses tttttttttttt"):
        _reference_model(cfg, {"reference": other}, tok, "pretrain")
    with pytest.raises(ConfigError, match="curriculum.by = reference needs an input `reference`"):
        _reference_model(cfg, {}, tok, "pretrain")
    with pytest.raises(ConfigError, match="only used by curriculum.by = reference"):
        _reference_model(PretrainConfig(), {"reference": ref}, tok, "pretrain")
    with pytest.raises(ConfigError, match="is a shards, not a checkpoint"):
        _reference_model(cfg, {"reference": FakeArtifact("shards", tokenizer=tok.id)}, tok, "pretrain")


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
