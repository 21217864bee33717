"""Distributed checkpoints: resharding between 1 and 2 ranks, kill -9 safety, torn writes, async, export.

The multi-rank runs are real `torchrun` jobs (FSDP2 over gloo on CPU) of tests/dist_ckpt/worker.py.
They are started in three waves of concurrent jobs (a module fixture) to keep the file fast on two
cores; each test then checks one story against the recorded events.

Tolerances. A run resumed at the *same* world size must repeat the uninterrupted run's losses
bit for bit: same weights, same data, same reduction order. A run resumed at a *different* world size
gets bitwise-identical weights (checked by sha256 of the full state), but its gradient is summed in a
different order (FSDP2 averages two half-batch gradients, one process takes the mean over the whole
batch in one pass), so its losses agree to float32 rounding only: rtol 1e-5 (observed ~1e-7).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmloom.errors import IntegrityError
from lmloom.models.decoder import Decoder, DecoderConfig
from lmloom.train import dist_checkpoint as dc
from lmloom.train.checkpoint import TrainState

WORKER = Path(__file__).parent / "dist_ckpt" / "worker.py"
STEPS = 10
ROOT: list[Path] = []  # the fixture's directory, for wave()
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


@dataclass
class Run:
    rc: int
    seconds: float
    ended: float
    events: list[dict] = field(default_factory=list)
    killed_at: float | None = None
    output: str = ""

    def losses(self, after: int = 0, upto: int = STEPS) -> dict[int, float]:
        """The loss of each step in (after, upto], the last record per step (a redo replaces it)."""
        found = {}
        for e in self.events:
            if "loss" in e and "kind" not in e and after < e["step"] <= upto:
                found[e["step"]] = e["loss"]
        return found

    def record(self, key: str, step: int) -> dict:
        return next(e for e in self.events if e.get(key) == step)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(root: Path, name: str, *args: str, ranks: int = 2, timeout: float = 150) -> Run:
    """Run the worker (torchrun with `ranks` processes, or one plain process when ranks == 1)."""
    events = root / f"{name}.jsonl"
    if ranks == 1:
        cmd = [sys.executable, str(WORKER), "--plain"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
        cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--max-restarts", "0"]
        cmd += ["--monitor-interval", "0.2", str(WORKER)]
    cmd += ["--events", str(events), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    ended = time.time()
    run = Run(proc.returncode, ended - started, ended, output=proc.stdout[-3000:] + proc.stderr[-3000:])
    if events.exists():
        run.events = [json.loads(line) for line in events.read_text().splitlines()]
    killed = Path(f"{events}.killed")
    if killed.exists():
        run.killed_at = float(killed.read_text())
    return run


def wave(*jobs):
    """Run (name, args, ranks) jobs concurrently; return their Runs in order."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(launch, ROOT[0], name, *args, ranks=ranks) for name, args, ranks in jobs]
        return [f.result() for f in futures]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    ROOT[:] = [root]
    ck = {name: root / name for name in ("ref2", "ref1", "crash", "r21", "r12")}
    common = ("--steps", str(STEPS), "--every", "3")
    out: dict = {"root": root, "ck": ck}
    t0 = time.time()
    # wave 1: the uninterrupted references (2 ranks FSDP2 saving asynchronously, 1 plain process
    # saving synchronously), and a run whose rank 1 dies half-way through writing step 6 (sync)
    ref2, ref1, crash_a = wave(
        ("ref2", ("--ckpt", ck["ref2"], *common, "--async-save", "--export", root / "ref2.safetensors"), 2),
        ("ref1", ("--ckpt", ck["ref1"], *common), 1),
        ("crash_a", ("--ckpt", ck["crash"], *common, "--kill-in-save", "6"), 2),
    )
    out["after_torn_save"] = sorted(p.name for p in ck["crash"].iterdir())
    out["latest_after_torn_save"] = dc.latest_complete(ck["crash"], cleanup=False)
    # wave 2: resharding both ways, and the crashed run re-run, this time killed mid-step at step 8
    r21, r12, crash_b = wave(
        ("r21", ("--ckpt", ck["r21"], *common, "--resume-from", ck["ref2"] / "step-00000006"), 1),
        ("r12", ("--ckpt", ck["r12"], *common, "--resume-from", ck["ref1"] / "step-00000006"), 2),
        ("crash_b", ("--ckpt", ck["crash"], *common, "--kill-at", "8"), 2),
    )
    out["after_kill"] = sorted(p.name for p in ck["crash"].iterdir())
    # wave 3: the crashed run re-run again, to the end
    (crash_c,) = wave(("crash_c", ("--ckpt", ck["crash"], *common), 2))
    out.update(ref2=ref2, ref1=ref1, crash_a=crash_a, r21=r21, r12=r12)
    out.update(crash_b=crash_b, crash_c=crash_c)
    print(
        f"distributed runs: {time.time() - t0:.1f}s",
        {k: round(v.seconds, 1) for k, v in out.items() if isinstance(v, Run)},
    )
    for name in ("ref2", "ref1", "r21", "r12", "crash_c"):
        assert out[name].rc == 0, f"{name} failed:\n{out[name].output}"
    return out


def test_two_rank_fsdp_and_one_process_runs_agree(runs):
    ref1, ref2 = runs["ref1"].losses(), runs["ref2"].losses()
    assert sorted(ref2) == list(range(1, STEPS + 1))
    assert ref2 == pytest.approx(ref1, rel=1e-5)  # same global batch; only summation order differs


def test_saved_on_two_ranks_resumes_on_one_process(runs):
    ref2, r21 = runs["ref2"], runs["r21"]
    resumed = r21.record("resumed", 6)
    assert resumed["world"] == 1
    assert resumed["params"] == ref2.record("saved", 6)["params"]  # the state moved bit for bit
    assert r21.losses(after=6) == pytest.approx(ref2.losses(after=6), rel=1e-5)
    assert sorted(r21.losses(after=6)) == [7, 8, 9, 10]


def test_saved_on_one_process_resumes_on_two_ranks(runs):
    ref1, r12 = runs["ref1"], runs["r12"]
    resumed = r12.record("resumed", 6)
    assert resumed["world"] == 2
    assert resumed["params"] == ref1.record("saved", 6)["params"]
    assert r12.losses(after=6) == pytest.approx(ref1.losses(after=6), rel=1e-5)
    assert sorted(r12.losses(after=6)) == [7, 8, 9, 10]


def test_a_save_torn_by_kill_9_never_replaces_the_previous_checkpoint(runs):
    crash_a = runs["crash_a"]
    assert crash_a.rc != 0 and crash_a.killed_at is not None
    assert crash_a.ended - crash_a.killed_at < 20  # torchrun tore the job down, nobody hung in a barrier
    assert runs["after_torn_save"] == ["step-00000003", "step-00000006.tmp"]  # no marker, no final name
    assert runs["latest_after_torn_save"].name == "step-00000003"


def test_kill_9_of_one_rank_mid_run_stops_the_job_and_resume_repeats_the_run(runs):
    ref2, b, c = runs["ref2"], runs["crash_b"], runs["crash_c"]
    # b started from step 3 (the torn step-6 was cleaned up), saved 6, lost rank 1 before step 8
    assert b.record("resumed", 3)["params"] == ref2.record("saved", 3)["params"]
    assert b.rc != 0 and b.killed_at is not None and b.ended - b.killed_at < 20
    assert runs["after_kill"] == ["step-00000003", "step-00000006"]
    assert b.losses(after=3, upto=7) == ref2.losses(after=3, upto=7)  # bit for bit: same world size
    # c resumed from the last complete checkpoint and repeats the uninterrupted run exactly
    assert c.record("resumed", 6)["params"] == ref2.record("saved", 6)["params"]
    assert c.losses(after=6) == ref2.losses(after=6)
    assert c.record("saved", 10)["params"] == ref2.record("saved", 10)["params"]


def test_async_save_over_gloo_writes_the_state_of_the_moment_of_the_call(runs):
    """ref2 saved with dcp.async_save on a dedicated gloo group while training went on; the crash
    runs saved synchronously and reproduced the same states (see the kill test)."""
    for step in (3, 6, 9, 10):
        model = _tiny()
        dc.load_checkpoint(runs["ck"]["ref2"] / f"step-{step:08d}", model)
        assert worker.params_sha(model) == runs["ref2"].record("saved", step)["params"]
    assert all(r["blocked_s"] < 5 for r in runs["ref2"].events if "saved" in r)


def test_export_gathers_the_sharded_model_into_one_safetensors_file(runs):
    model = _tiny()
    model.load_state_dict(load_file(str(runs["root"] / "ref2.safetensors")))
    assert worker.params_sha(model) == runs["ref2"].record("saved", STEPS)["params"]


# -- single process, no process group --------------------------------------------------------------


def _tiny() -> Decoder:
    torch.manual_seed(0)
    return Decoder(DecoderConfig.preset("tiny", vocab_size=worker.VOCAB, seq_len=worker.SEQ))


def _train(model, optimizer, state: TrainState, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        x, y = worker.batch(state.sample, 4)
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.sample += 4
        losses.append(float(loss.detach()))
    return losses


def _setup():
    model = _tiny()
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))


def test_single_process_resume_is_exact_and_keeps_only_the_last_k(tmp_path):
    model, opt = _setup()
    state = TrainState()
    _train(model, opt, state, 2)
    for _ in range(3):
        _train(model, opt, state, 1)
        state.extra = {"note": "json only"}
        dc.save_checkpoint(tmp_path, model, opt, state, keep=2)
    expected = _train(model, opt, state, 3)
    assert [p.name for p in dc.list_complete(tmp_path)] == ["step-00000004", "step-00000005"]

    model2, opt2 = _setup()
    resumed = dc.load_checkpoint(dc.latest_complete(tmp_path), model2, opt2)
    assert (resumed.step, resumed.sample, resumed.extra) == (5, 20, {"note": "json only"})
    assert isinstance(opt2.param_groups[0]["betas"], tuple)
    assert _train(model2, opt2, resumed, 3) == expected


def test_non_tensor_state_stays_out_of_dcp_and_rng_is_restored(tmp_path):
    model, opt = _setup()
    state = TrainState()
    _train(model, opt, state, 1)
    torch.manual_seed(77)
    path = dc.save_checkpoint(tmp_path, model, opt, state).wait()
    expected = torch.rand(3)
    meta = dc.dcp.FileSystemReader(str(path)).read_metadata()  # our own, verified file
    kinds = {type(m).__name__ for m in meta.state_dict_metadata.values()}
    assert kinds == {"TensorStorageMetadata"}  # nothing DCP would pickle
    assert json.loads((path / dc.TRAIN_STATE).read_text())["param_groups"][0]["lr"] == 3e-3
    dc.load_checkpoint(path, *_setup())
    assert torch.equal(torch.rand(3), expected)


def test_incomplete_and_replaced_checkpoints_are_never_returned(tmp_path):
    model, opt = _setup()
    good = dc.save_checkpoint(tmp_path, model, opt, TrainState(step=1)).wait()
    torn = tmp_path / "step-00000002.tmp"  # a save that died before its marker
    torn.mkdir()
    (torn / "__0_0.distcp").write_bytes(b"half")
    assert dc.latest_complete(tmp_path, cleanup=False) == good
    # a redo of step 1 that died between moving the old one aside and renaming the new one in
    (tmp_path / "step-00000001").rename(tmp_path / "step-00000001.old")
    assert dc.latest_complete(tmp_path) == good  # the old one is put back, the torn one removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]
    dc.save_checkpoint(tmp_path, model, opt, TrainState(step=1, sample=8)).wait()  # a redo replaces it
    assert dc.load_checkpoint(good, *_setup()).sample == 8


@pytest.mark.parametrize("victim", [".metadata", "__0_0.distcp", "train_state.json", "rank-00000.json"])
def test_a_tampered_file_is_refused_before_dcp_unpickles_anything(tmp_path, victim):
    model, opt = _setup()
    path = dc.save_checkpoint(tmp_path, model, opt, TrainState(step=1)).wait()
    with open(path / victim, "r+b") as handle:
        handle.seek(5)
        byte = handle.read(1)
        handle.seek(5)
        handle.write(bytes([byte[0] ^ 1]))
    with pytest.raises(IntegrityError, match=victim):
        dc.load_checkpoint(path, *_setup())


def test_async_save_in_one_process_snapshots_the_state_at_the_call(tmp_path):
    model, opt = _setup()
    _train(model, opt, TrainState(), 1)
    before = worker.params_sha(model)
    pending = dc.save_checkpoint(tmp_path, model, opt, TrainState(step=1), async_save=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on while the writer runs
    path = pending.wait()
    model2, _ = _setup()
    dc.load_checkpoint(path, model2)
    assert worker.params_sha(model2) == before


def test_export_and_load_full_model_without_a_process_group(tmp_path):
    model, _ = _setup()
    out = dc.export_full_model(model, tmp_path / "model.safetensors")
    model2 = Decoder(DecoderConfig.preset("tiny", vocab_size=worker.VOCAB, seq_len=worker.SEQ))
    dc.load_full_model(model2, out)
    assert worker.params_sha(model2) == worker.params_sha(model)
