"""Progressive training: the sequence-length warmup, batch-size ramp and depth-growth schedules, layer
stacking, exact resume across ramp and growth, and a real run that follows them."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from lmloom.artifacts.store import ArtifactStore
from lmloom.config import load_recipe
from lmloom.context import RunContext
from lmloom.models.decoder import Decoder, DecoderConfig
from lmloom.monitor.metrics import JsonlMetrics
from lmloom.pipeline import run_recipe
from lmloom.train.checkpoint import latest_checkpoint
from lmloom.train.optim import OptimConfig, build_optimizer
from lmloom.train.progressive import (
    BatchSizeRamp,
    DepthGrowth,
    SeqLenWarmup,
    batch_size_at,
    depth_at,
    depth_sizes,
    first_sample,
    layer_sources,
    seq_len_at,
    stack_layers,
)
from lmloom.train.trainer import LoopConfig, train_loop


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


# -- batch-size ramp ---------------------------------------------------------------------------------


def test_batch_ramp_grows_linearly_in_coarse_steps_and_its_data_position_is_a_function_of_the_step():
    ramp = BatchSizeRamp(steps=100, start=4)
    sizes = [batch_size_at(step, 32, ramp) for step in range(120)]
    assert sizes[0] == 4 and sizes[50] == 16 and sizes[99] == 28 and sizes[100:] == [32] * 20
    assert sizes == sorted(sizes)
    assert set(sizes) <= {4 * k for k in range(1, 9)}  # multiples of batch_size // 8: few compiled shapes
    assert [batch_size_at(s, 32, BatchSizeRamp()) for s in (0, 50)] == [32, 32]  # off by default
    assert batch_size_at(0, 4, BatchSizeRamp(steps=10, start=1)) == 1  # grain 1 below 8 sequences
    # the sample a step starts at: grad_accum micro-batches of each earlier step's size
    assert [first_sample(s, 32, 2, ramp) for s in (0, 1, 2, 120)] == [
        0,
        8,
        16,
        2 * (sum(sizes[:100]) + 20 * 32),
    ]


# -- depth growth ------------------------------------------------------------------------------------

TINY = DecoderConfig(vocab_size=32, seq_len=16, d_model=16, n_layers=2, n_heads=2)


def test_depth_doubles_at_the_growth_steps_and_the_last_growth_reaches_n_layers():
    growth = DepthGrowth(start_layers=1, at_steps=[10, 20, 30])
    assert [depth_at(s, 6, growth) for s in (0, 9, 10, 19, 20, 29, 30, 99)] == [1, 1, 2, 2, 4, 4, 6, 6]
    assert depth_sizes(6, growth) == [1, 2, 4, 6]
    assert depth_sizes(6, DepthGrowth()) == [6] and depth_at(5, 6, DepthGrowth()) == 6
    with pytest.raises(ValueError, match="each growth must add layers"):
        depth_sizes(2, growth)  # 1 -> 2 -> 2: the third growth would add nothing
    with pytest.raises(ValueError, match="increasing"):
        DepthGrowth(start_layers=1, at_steps=[20, 10])


def test_stack_layers_copies_the_trained_stack_on_top_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = Decoder(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    deep = stack_layers(model, 5)
    assert torch.equal(torch.get_rng_state(), rng)  # deterministic: the global RNG did not move
    assert deep.config.n_layers == 5 and len(deep.layers) == 5 and model.config.n_layers == 2
    assert layer_sources(2, 5) == [0, 1, 0, 1, 0]
    state = deep.state_dict()
    for name, value in state.items():
        source = name
        if name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            source = f"layers.{int(index) % 2}.{rest}"
        assert torch.equal(value, before[source]), name
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # input untouched
    with torch.no_grad():
        next(deep.parameters()).add_(1.0)  # nothing shared with the shallow model
    assert torch.equal(model.state_dict()["tok_emb.weight"], before["tok_emb.weight"])
    assert [block.attn.layer_idx for block in deep.layers] == list(range(5))  # KV-cache slots


# -- exact resume through the loop: the ramp and the growth replay ------------------------------------


class SyntheticData:
    """Windows that are a pure function of the sample number: a noisy cyclic pattern (learnable)."""

    seq_len = TINY.seq_len

    def batch(self, start_sample, batch_size):
        rows = []
        for sample in range(start_sample, start_sample + batch_size):
            g = torch.Generator().manual_seed(sample)
            offset = int(torch.randint(0, 8, (1,), generator=g))
            row = (torch.arange(self.seq_len + 1) * 3 + offset) % 16
            noise = torch.rand(self.seq_len + 1, generator=g) < 0.1
            rows.append(torch.where(noise, torch.randint(16, 32, (self.seq_len + 1,), generator=g), row))
        block = torch.stack(rows)
        return block[:, :-1], block[:, 1:]


class Interrupt(Exception):
    pass


class InterruptAt(SyntheticData):
    def __init__(self, stop_samples):
        self.stop_samples = set(stop_samples)

    def batch(self, start_sample, batch_size):
        if start_sample in self.stop_samples:
            self.stop_samples.discard(start_sample)
            raise Interrupt
        return super().batch(start_sample, batch_size)


def val_batches(limit):
    data = SyntheticData()
    return [data.batch(10_000 + i, 4) for i in range(0, min(limit, 8), 4)]


def run_loop(folder, cfg, data, growth=None):
    torch.manual_seed(0)
    start = depth_at(0, TINY.n_layers * 2, growth) if growth else TINY.n_layers
    model = Decoder(TINY.model_copy(update={"n_layers": start}))
    optimizer = build_optimizer(model, cfg.optim)
    metrics = JsonlMetrics(folder / "metrics.jsonl")
    kwargs = {"depth_growth": growth, "n_layers": TINY.n_layers * 2} if growth else {}
    return train_loop(
        model,
        optimizer,
        data,
        val_batches,
        cfg,
        TINY.seq_len,
        folder / "ckpt",
        metrics,
        log=lambda m: None,
        **kwargs,
    )


def run_with_interruptions(folder, cfg, stop_steps, growth=None):
    """Train, getting interrupted at the start of each of `stop_steps`, re-running until done."""
    stops = [first_sample(s, cfg.batch_size, cfg.grad_accum, cfg.batch_size_ramp) for s in stop_steps]
    data, resumes = InterruptAt(stops), 0
    while True:
        try:
            return run_loop(folder, cfg, data, growth), resumes
        except Interrupt:
            resumes += 1


def losses(folder):
    """The metrics log, without its wall-clock fields (the only ones that may differ between runs)."""
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in records]


LOOP = LoopConfig(
    batch_size=8,
    grad_accum=2,
    max_steps=14,
    precision="fp32",
    compile=False,
    eval_every=1000,
    eval_windows=8,
    final_eval_windows=8,
    checkpoint_every=3,
    log_every=1,
    optim=OptimConfig(lr=0.01, warmup_steps=2),
)


def test_a_run_with_a_batch_ramp_resumed_twice_equals_an_uninterrupted_one(tmp_path):
    cfg = LOOP.model_copy(update={"batch_size_ramp": BatchSizeRamp(steps=8, start=2)})
    clean = run_loop(tmp_path / "clean", cfg, SyntheticData())
    resumed, resumes = run_with_interruptions(tmp_path / "resumed", cfg, stop_steps=[5, 10])
    assert resumes == 2 and resumed.resumed_from == 9
    expected = [batch_size_at(s, 8, cfg.batch_size_ramp) * 2 for s in range(14)]
    records = losses(tmp_path / "clean")
    assert [r["sequences_per_step"] for r in records] == expected and expected[0] == 4 and expected[-1] == 16
    assert [r["tokens_per_step"] for r in records] == [n * TINY.seq_len for n in expected]
    assert [r["micro_batch"] for r in records] == [n // 2 for n in expected]
    assert clean.state.sample == first_sample(14, 8, 2, cfg.batch_size_ramp) == sum(expected)
    assert losses(tmp_path / "resumed") == records  # every loss, lr, grad norm, batch size: identical
    assert _same_weights(clean.model, resumed.model)


def test_depth_growth_stacks_layers_and_resume_across_the_growth_points_is_exact(tmp_path):
    growth = DepthGrowth(start_layers=1, at_steps=[4, 8])  # 1 -> 2 -> 4 layers
    clean = run_loop(tmp_path / "clean", LOOP, SyntheticData(), growth)
    assert clean.model.config.n_layers == 4
    records = losses(tmp_path / "clean")
    assert [r["depth"] for r in records] == [1] * 4 + [2] * 4 + [4] * 6
    grown = [r for r in records if "growth_val_before" in r]
    assert [(r["step"], r["depth_from"], r["depth"]) for r in grown] == [(5, 1, 2), (9, 2, 4)]
    # Interrupted at step 4 (latest checkpoint: step 3, before the first growth) and at step 10
    # (latest: step 9, after the second): the resumed run replays one growth and loads the other.
    resumed, resumes = run_with_interruptions(tmp_path / "resumed", LOOP, stop_steps=[4, 10], growth=growth)
    assert resumes == 2 and resumed.resumed_from == 9 and resumed.model.config.n_layers == 4
    assert losses(tmp_path / "resumed") == records  # every loss, lr, grad norm, batch size: identical
    assert _same_weights(clean.model, resumed.model)
    saved = json.loads((latest_checkpoint(tmp_path / "clean" / "ckpt") / "state.json").read_text())
    assert saved["train"]["depth"] == 4  # a checkpoint knows its depth


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
