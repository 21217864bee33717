"""The stability guard inside the real training loop: an injected NaN and an injected loss spike each roll
back to the last checkpoint, skip the offending batch, are logged as events, and the run finishes."""

from __future__ import annotations

import json
import math

import torch

from lmloom.models.decoder import Decoder, DecoderConfig
from lmloom.monitor.metrics import JsonlMetrics
from lmloom.train.optim import OptimConfig, build_optimizer
from lmloom.train.trainer import LoopConfig, train_loop

VOCAB, SEQ, BATCH = 64, 16, 4
POISON = {("nan", 9), ("spike", 14)}  # (kind, step): the batch of that optimizer step is poisoned


class Patterned:
    """Windows of a repeating pattern (quickly learnt, so a spike stands out), a marker id in poisoned ones."""

    def __init__(self):
        self.seen: list[int] = []  # first sample of every batch handed out

    def batch(self, start: int, size: int):
        self.seen.append(start)
        rows = torch.stack([(torch.arange(SEQ + 1) * 3 + i + start) % 32 for i in range(size)])
        step = start // BATCH
        for kind, poisoned in POISON:
            if step == poisoned:
                rows[0, 0] = VOCAB - 1 if kind == "nan" else VOCAB - 2
        return rows[:, :-1], rows[:, 1:]


class Injecting(torch.nn.Module):
    """The decoder, with its loss made NaN or 50x on a batch that carries a marker id."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        loss = self.model(x, y)
        if (x == VOCAB - 1).any():
            return loss * math.nan
        if (x == VOCAB - 2).any():
            return loss * 50
        return loss


def test_nan_and_spike_roll_back_skip_the_batch_and_the_run_finishes(tmp_path):
    torch.manual_seed(0)
    model = Injecting(Decoder(DecoderConfig.preset("tiny", vocab_size=VOCAB, seq_len=SEQ)))
    cfg = LoopConfig(
        batch_size=BATCH,
        max_steps=24,
        precision="fp32",
        compile=False,
        checkpoint_every=4,
        eval_every=100,
        eval_windows=1,
        final_eval_windows=1,
        log_every=1,
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        guard={"min_history": 4, "spike_zscore": 6},
    )
    data = Patterned()
    val = [data.batch(10_000, BATCH)]
    metrics = JsonlMetrics(tmp_path / "metrics.jsonl")
    optimizer = build_optimizer(model, cfg.optim)
    messages = []
    result = train_loop(
        model, optimizer, data, lambda n: val, cfg, SEQ, tmp_path / "ckpt", metrics, log=messages.append
    )

    assert result.state.step == 24 and math.isfinite(result.train_loss)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in rows if "event" in r]
    assert [(e["event"], e["action"]) for e in events] == [
        ("nonfinite_loss", "rollback"),
        ("loss_spike", "rollback"),
    ]
    # Each rolled back to the last checkpoint before it (steps 8 and 12) and skipped its batch.
    assert [e["rolled_back_to"] for e in events] == [8, 12]
    assert events[0]["skipped_samples"] == [9 * BATCH, 10 * BATCH]
    assert events[1]["zscore"] > 6
    assert any("loss_spike" in m for m in messages) and any("nonfinite_loss" in m for m in messages)
    # A poisoned batch is handed out once and never again; the run's later batches all lie past it.
    for _kind, step in POISON:
        assert data.seen.count(step * BATCH) == 1
    # The logged losses that remain are all finite, one per step, in order.
    steps = [r["step"] for r in rows if "loss" in r and "event" not in r]
    assert steps == list(range(1, 25))
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r and "event" not in r)


def test_fp16_trains_with_a_gradient_scaler(tmp_path):
    """precision fp16: autocast to float16 with a GradScaler; the loss falls and the scale is logged."""
    torch.manual_seed(0)
    model = Decoder(DecoderConfig.preset("tiny", vocab_size=VOCAB, seq_len=SEQ))
    cfg = LoopConfig(
        batch_size=BATCH,
        max_steps=12,
        precision="fp16",
        compile=False,
        checkpoint_every=100,
        eval_every=100,
        eval_windows=1,
        final_eval_windows=1,
        log_every=1,
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
    )
    data = Patterned()
    val = [data.batch(10_000, BATCH)]
    metrics = JsonlMetrics(tmp_path / "metrics.jsonl")
    result = train_loop(
        model, build_optimizer(model, cfg.optim), data, lambda n: val, cfg, SEQ, tmp_path / "ckpt", metrics
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result.state.step == 12 and all("loss_scale" in r for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] and math.isfinite(result.val_loss)
