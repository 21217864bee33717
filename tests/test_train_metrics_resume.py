"""A restarted run's metrics.jsonl holds each step once: a fresh start (the dead run left no checkpoint)
begins an empty log, a resume from step N keeps the dead run's lines up to N and drops the rest."""

from __future__ import annotations

import json

import pytest
import torch

from lmloom.models.decoder import Decoder, DecoderConfig
from lmloom.monitor.metrics import JsonlMetrics
from lmloom.train.optim import OptimConfig, build_optimizer
from lmloom.train.trainer import LoopConfig, train_loop

VOCAB, SEQ, BATCH, STEPS = 64, 16, 2, 6


class Killed(RuntimeError):
    pass


class Data:
    """Fixed windows; the batch of optimizer step `die_at` (1-based) kills the run."""

    def __init__(self, die_at: int | None = None):
        self.die_at = die_at

    def batch(self, start: int, size: int):
        if self.die_at is not None and start // BATCH + 1 == self.die_at:
            raise Killed
        rows = torch.stack([(torch.arange(SEQ + 1) * 3 + i + start) % VOCAB for i in range(size)])
        return rows[:, :-1], rows[:, 1:]


def run(folder, *, checkpoint_every: int, die_at: int | None = None, warmup_steps: int = 1, log=None):
    torch.manual_seed(0)
    model = Decoder(DecoderConfig.preset("tiny", vocab_size=VOCAB, seq_len=SEQ))
    cfg = LoopConfig(
        batch_size=BATCH,
        max_steps=STEPS,
        precision="fp32",
        compile=False,
        checkpoint_every=checkpoint_every,
        eval_every=100,
        eval_windows=1,
        final_eval_windows=1,
        log_every=1,
        optim=OptimConfig(lr=1e-3, warmup_steps=warmup_steps),
    )
    val = [Data().batch(10_000, BATCH)]
    metrics = JsonlMetrics(folder / "metrics.jsonl")
    return train_loop(
        model,
        build_optimizer(model, cfg.optim),
        Data(die_at),
        lambda n: val,
        cfg,
        SEQ,
        folder / "checkpoints",
        metrics,
        log=log or (lambda _msg: None),
    )


def logged_steps(folder):
    return [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("checkpoint_every", "resumed_from"),
    [(100, 0), (2, 2)],  # dies at step 4: before its first checkpoint / after the one at step 2
    ids=["fresh-start", "resume"],
)
def test_restarted_run_logs_each_step_once(tmp_path, checkpoint_every, resumed_from):
    with pytest.raises(Killed):
        run(tmp_path, checkpoint_every=checkpoint_every, die_at=4)
    assert logged_steps(tmp_path) == [1, 2, 3]  # the dead run's lines

    result = run(tmp_path, checkpoint_every=checkpoint_every)
    assert result.resumed_from == resumed_from
    assert logged_steps(tmp_path) == list(range(1, STEPS + 1))


def test_a_warmup_longer_than_the_run_is_said_at_the_start(tmp_path):
    """Allowed (a short run keeps the recipe's warmup), but the learning rate never reaches optim.lr: say so."""
    lines: list[str] = []
    run(tmp_path / "long", checkpoint_every=100, warmup_steps=4 * STEPS, log=lines.append)
    assert any(
        "warmup_steps (24) is longer than max_steps (6)" in line and "25% of optim.lr" in line
        for line in lines
    )
    lines.clear()
    run(tmp_path / "short", checkpoint_every=100, warmup_steps=2, log=lines.append)
    assert not any("warmup_steps" in line for line in lines)
