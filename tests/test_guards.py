"""Stability guards: the detector, the rollback-and-skip policy, a reference loop, and the same loop on 2 ranks."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from lmloom.models.decoder import Decoder, DecoderConfig
from lmloom.train import dist_checkpoint as dc
from lmloom.train.checkpoint import TrainState
from lmloom.train.guards import (
    ParamSnapshot,
    StabilityGuard,
    StabilityMonitor,
    TrainingDiverged,
    global_grad_norm,
)

WORKER = Path(__file__).parent / "dist_ckpt" / "worker.py"
_spec = importlib.util.spec_from_file_location("dist_ckpt_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a small shared CPU, two threads for a tiny model mostly spin and wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the detector ----------------------------------------------------------------------------------


def _fed(losses, **cfg) -> StabilityMonitor:
    monitor = StabilityMonitor(StabilityGuard(**{"spike_zscore": 6.0, **cfg}))
    for step, loss in enumerate(losses, 1):
        assert monitor.check(step, loss) is None
    return monitor


def test_nonfinite_loss_and_gradient_are_flagged_from_the_first_step():
    monitor = StabilityMonitor(StabilityGuard())
    assert monitor.check(1, float("nan"))["kind"] == "nonfinite_loss"
    assert monitor.check(1, 5.0, grad_norm=float("inf"))["kind"] == "nonfinite_grad"
    event = monitor.check(1, float("inf"), batch=(0, 8))
    assert event == {
        "kind": "nonfinite_loss",
        "step": 1,
        "loss": "inf",
        "zscore": None,
        "grad_norm": None,
        "batch": [0, 8],
        "action": "flagged",
    }
    json.dumps(event, allow_nan=False)  # loggable as strict JSON
    assert len(monitor.history) == 0  # flagged losses never join the history


def test_a_spike_is_judged_by_the_zscore_over_the_trailing_window_of_good_steps():
    losses = [4.0 + 0.05 * (-1) ** i for i in range(20)]  # mean 4.0, std 0.05
    monitor = _fed(losses, spike_zscore=6.0, window=10, min_history=5, std_floor=0.0)
    assert monitor.check(21, 4.0 + 5.9 * 0.05) is None  # below the threshold: a good step
    monitor = _fed(losses, spike_zscore=6.0, window=10, min_history=5, std_floor=0.0)
    event = monitor.check(21, 4.0 + 6.5 * 0.05)
    assert event["kind"] == "loss_spike" and event["zscore"] == pytest.approx(6.5, abs=1e-3)
    assert monitor.check(22, 1.0) is None  # a sudden drop is not a spike
    assert len(monitor.history) == 10  # only the trailing window is kept


def test_no_spike_is_judged_before_min_history_and_a_flat_loss_has_a_std_floor():
    assert _fed([4.0] * 4, min_history=5).check(5, 40.0) is None
    assert _fed([4.0] * 10, min_history=5, std_floor=0.01).check(11, 4.2) is None  # std 0 -> 0.04: z = 5
    assert _fed([4.0] * 10, min_history=5, std_floor=0.01).check(11, 4.3)["zscore"] == pytest.approx(7.5)


def test_disabled_guard_flags_nothing_and_config_is_strict():
    assert StabilityMonitor(StabilityGuard(enabled=False)).check(1, float("nan")) is None
    with pytest.raises(ValidationError, match="spike_z"):
        StabilityGuard(spike_z=3)
    with pytest.raises(ValidationError):
        StabilityGuard(window=1)


# -- the policy ------------------------------------------------------------------------------------


def test_rollback_restores_the_checkpoint_state_and_skips_past_the_offending_batches():
    monitor = _fed([4.0] * 12, min_history=5, skip_batches_after_rollback=3)
    event = monitor.check(13, float("nan"), batch=(96, 104))
    restored = TrainState(step=10, sample=80, extra={"guard": {"history": [4.0] * 10}})
    state = monitor.rollback(event, restored, TrainState(step=12, sample=104))
    assert state is restored and (state.step, state.sample) == (10, 120)  # 96..119 never seen again
    assert event["action"] == "rollback" and event["rolled_back_to"] == 10
    assert event["skipped_samples"] == [96, 120] and event["rollbacks"] == 1
    assert list(monitor.history) == [4.0] * 10  # the history as it was at the checkpoint
    assert monitor.state_dict()["skipped"] == [[96, 120]]


def test_without_a_checkpoint_the_step_is_dropped_and_its_batch_skipped():
    monitor = StabilityMonitor(StabilityGuard())
    event = monitor.check(3, float("nan"), batch=(16, 24))
    state = monitor.rollback(event, None, TrainState(step=2, sample=24))
    assert (state.step, state.sample, event["action"]) == (2, 24, "skip_batch")


def test_max_rollbacks_stops_the_run_and_the_count_survives_a_resume():
    monitor = StabilityMonitor(StabilityGuard(max_rollbacks=1))
    monitor.rollback(monitor.check(1, math.nan, batch=(0, 8)), None, TrainState(sample=8))
    resumed = StabilityMonitor(StabilityGuard(max_rollbacks=1))
    resumed.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    with pytest.raises(TrainingDiverged, match="after 1 rollbacks"):
        resumed.rollback(resumed.check(2, math.nan, batch=(8, 16)), None, TrainState(sample=16))


# -- monitoring helpers ----------------------------------------------------------------------------


def test_grad_norm_and_update_ratio_match_their_definitions():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    model(torch.randn(4, 8)).square().sum().backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert global_grad_norm(model.parameters()) == pytest.approx(float(expected), rel=1e-6)
    before = [p.detach().clone() for p in model.parameters()]
    snapshot = ParamSnapshot(model.parameters())
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    norm = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert snapshot.update_ratio() == pytest.approx(float(delta.norm() / norm.norm()), rel=1e-6)


# -- a reference loop: how the training loop uses the guard (one process) ----------------------------

BATCH = 8


def reference_loop(ckpt: Path, steps: int, every: int, poison: dict[int, float], guard: StabilityGuard):
    """Train `steps` steps; `poison` multiplies the loss of the batch starting at a sample by a factor.
    Returns (losses by step, events, first samples of the batches that reached optimizer.step())."""
    torch.manual_seed(0)
    model = Decoder(DecoderConfig.preset("tiny", vocab_size=worker.VOCAB, seq_len=worker.SEQ))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    monitor = StabilityMonitor(guard)
    state = TrainState()
    dc.save_checkpoint(ckpt, model, optimizer, state)  # step 0: there is always a good checkpoint
    losses, events, trained = {}, [], []
    while state.step < steps:
        first = state.sample
        x, y = worker.batch(first, BATCH)
        loss = model(x, y) * poison.get(first, 1.0)
        loss.backward()
        state.sample += BATCH
        event = monitor.check(
            state.step + 1, float(loss.detach()), global_grad_norm(model.parameters()), (first, state.sample)
        )
        if event is not None:
            optimizer.zero_grad(set_to_none=True)  # these gradients never reach the weights
            good = dc.latest_complete(ckpt, cleanup=False)
            state = monitor.rollback(event, dc.load_checkpoint(good, model, optimizer), state)
            events.append(event)
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        losses[state.step] = float(loss.detach())
        trained.append(first)
        if state.step % every == 0:
            state.extra = {"guard": monitor.state_dict()}
            dc.save_checkpoint(ckpt, model, optimizer, state)
    return losses, events, trained


def test_reference_loop_rolls_back_on_nan_and_on_a_spike_skips_the_batches_and_finishes(tmp_path):
    guard = StabilityGuard(window=20, min_history=5, spike_zscore=6.0)
    poison = {72: math.nan, 104: 50.0}  # step 10's batch gives NaN; the batch at sample 104 is a x50 spike
    losses, events, trained = reference_loop(tmp_path, steps=14, every=4, poison=poison, guard=guard)
    assert [(e["kind"], e["step"], e["action"], e["rolled_back_to"]) for e in events] == [
        ("nonfinite_loss", 10, "rollback", 8),
        ("loss_spike", 12, "rollback", 8),  # after the first rollback, sample 104 came at step 12
    ]
    assert events[1]["zscore"] > 100 and events[1]["skipped_samples"] == [104, 112]
    assert 72 not in trained and 104 not in trained  # the bad batches never touched the weights
    assert sorted(losses) == list(range(1, 15)) and all(math.isfinite(v) for v in losses.values())
    assert losses[14] < losses[1] - 1.0  # and it kept learning


def test_clean_run_never_intervenes(tmp_path):
    losses, events, _ = reference_loop(
        tmp_path, steps=12, every=4, poison={}, guard=StabilityGuard(min_history=5)
    )
    assert events == [] and len(losses) == 12


# -- the same loop on two ranks (tests/dist_ckpt/worker.py --guard): every rank decides alike --------


def test_two_ranks_and_one_process_take_the_same_interventions(tmp_path):
    args = ["--steps", "14", "--every", "4", "--guard", "--nan-batch", "72", "--spike-batch", "104"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    port = worker_port()
    two = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
    ]
    two += ["--master_port", str(port), "--max-restarts", "0", str(WORKER), "--ckpt", str(tmp_path / "two")]
    one = [sys.executable, str(WORKER), "--plain", "--ckpt", str(tmp_path / "one")]
    jobs = [
        subprocess.Popen(
            [*cmd, "--events", str(tmp_path / f"{name}.jsonl"), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for name, cmd in (("two", two), ("one", one))
    ]
    for job in jobs:
        out, _ = job.communicate(timeout=150)
        assert job.returncode == 0, out.decode()[-3000:]
    two_events, one_events = (
        [json.loads(x) for x in (tmp_path / f"{n}.jsonl").read_text().splitlines()] for n in ("two", "one")
    )

    def interventions(events):
        return [
            (e["kind"], e["step"], e["action"], e["rolled_back_to"], e["skipped_samples"])
            for e in events
            if "kind" in e
        ]

    assert (
        interventions(two_events)
        == interventions(one_events)
        == [
            ("nonfinite_loss", 10, "rollback", 8, [72, 80]),
            ("loss_spike", 12, "rollback", 8, [104, 112]),
        ]
    )
    steps_two = [e for e in two_events if "loss" in e and "kind" not in e]
    steps_one = [e for e in one_events if "loss" in e and "kind" not in e]
    assert [e["first"] for e in steps_two] == [e["first"] for e in steps_one]
    assert all(math.isfinite(e["loss"]) for e in steps_two) and steps_two[-1]["step"] == 14
    # FSDP2 shards vs one process: the global grad norm and update ratio agree to float rounding
    for key in ("loss", "grad_norm", "update_ratio"):
        assert [e[key] for e in steps_two] == pytest.approx([e[key] for e in steps_one], rel=1e-4)


def worker_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
