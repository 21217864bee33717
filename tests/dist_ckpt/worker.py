"""A tiny training job for the distributed-checkpoint and stability-guard tests.

Run it under `torchrun --nproc_per_node N` (FSDP2 over gloo on CPU) or as a plain `python worker.py
--plain` (one process, no process group). The global batch is the same at every world size: rank r of
W trains on its 1/W slice of samples [sample, sample + BATCH), and FSDP2 averages the gradients, so
one process and two ranks take the same steps up to float summation order.

rank 0 appends one JSON line per event to --log: {"step", "loss"} after each step, {"resumed": step,
"params": sha} after a resume, {"saved": step, "params": sha} after each checkpoint, and the guard's
events ({"kind", "action", ...}).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lmloom.models.decoder import Decoder, DecoderConfig
from lmloom.train import dist_checkpoint as dc
from lmloom.train.checkpoint import TrainState
from lmloom.train.guards import ParamSnapshot, StabilityGuard, StabilityMonitor, global_grad_norm

VOCAB, SEQ, BATCH, SEED = 256, 32, 8, 1234


def batch(start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples start..start+count-1, each a pure function of its index (tokens 0..63 of 256: learnable)."""
    rows = []
    for i in range(start, start + count):
        g = torch.Generator().manual_seed(SEED * 1_000_003 + i)
        rows.append(torch.randint(0, 64, (SEQ + 1,), generator=g))
    data = torch.stack(rows)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def params_sha(model: torch.nn.Module) -> str:
    """sha256 of the full fp32 weights (a collective under FSDP2): equal = bitwise-identical state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    h = hashlib.sha256()
    for key in sorted(full):
        h.update(key.encode())
        h.update(full[key].detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--events", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--keep", type=int, default=10)
    ap.add_argument("--plain", action="store_true", help="one process, no process group, no FSDP")
    ap.add_argument("--resume-from", help="a checkpoint directory to start from (else the latest in --ckpt)")
    ap.add_argument("--kill-at", type=int, default=0, help="rank 1 SIGKILLs itself before this step")
    ap.add_argument("--kill-in-save", type=int, default=0, help="rank 1 dies half-way through this save")
    ap.add_argument("--async-save", action="store_true")
    ap.add_argument("--guard", action="store_true")
    ap.add_argument("--nan-batch", type=int, default=-1, help="the batch starting at this sample: loss*nan")
    ap.add_argument("--spike-batch", type=int, default=-1, help="the batch starting at this sample: loss*50")
    ap.add_argument("--export")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    if not args.plain:
        dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank, world = (dist.get_rank(), dist.get_world_size()) if not args.plain else (0, 1)
    model = Decoder(DecoderConfig.preset("tiny", vocab_size=VOCAB, seq_len=SEQ))
    if not args.plain:
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))

    def log(**record) -> None:
        if rank == 0:
            with open(args.events, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    ckpt = Path(args.ckpt)
    state = TrainState()
    start = Path(args.resume_from) if args.resume_from else dc.latest_complete(ckpt)
    if start is not None:
        state = dc.load_checkpoint(start, model, optimizer)
        log(resumed=state.step, params=params_sha(model), world=world)

    guard = (
        StabilityMonitor(StabilityGuard(window=20, min_history=5, spike_zscore=6.0)) if args.guard else None
    )
    if guard is not None and state.extra and "guard" in state.extra:
        guard.load_state_dict(state.extra["guard"])
    if args.kill_in_save:
        _install_save_killer(args.kill_in_save, rank, args.events)

    local = BATCH // world
    mean = torch.zeros(())
    pending = None
    while state.step < args.steps:
        step = state.step + 1
        if args.kill_at == step and rank == 1:
            _die(args.events)
        first = state.sample
        x, y = batch(first + rank * local, local)
        loss = model(x, y)
        if first == args.nan_batch:
            loss = loss * float("nan")
        if first == args.spike_batch:
            loss = loss * 50
        loss.backward()
        # the global mean loss and the global gradient norm: every rank sees the same numbers
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        state.sample += BATCH
        if guard is not None:
            grad_norm = global_grad_norm(model.parameters())
            event = guard.check(step, float(mean), grad_norm, batch=(first, state.sample))
            if event is not None:  # the reference loop: drop this step, roll back, skip, continue
                optimizer.zero_grad(set_to_none=True)
                if pending is not None:
                    pending.wait()
                good = dc.latest_complete(ckpt, cleanup=False)
                restored = dc.load_checkpoint(good, model, optimizer) if good is not None else None
                state = guard.rollback(event, restored, state)
                log(**event)
                continue
        snapshot = ParamSnapshot(model.parameters()) if guard is not None else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step = step
        state.tokens += BATCH * SEQ
        if guard is None:
            log(step=step, loss=float(mean))
        else:
            log(
                step=step,
                loss=float(mean),
                first=first,
                grad_norm=grad_norm,
                update_ratio=snapshot.update_ratio(),
            )
        if step % args.every == 0 or step == args.steps:
            if pending is not None:
                pending.wait()
            state.extra = {"guard": guard.state_dict()} if guard is not None else None
            pending = dc.save_checkpoint(
                ckpt, model, optimizer, state, keep=args.keep, async_save=args.async_save
            )
            log(saved=step, params=params_sha(model), blocked_s=pending.seconds_blocked)
    if pending is not None:
        pending.wait()
    if args.export:
        dc.export_full_model(model, Path(args.export))
    if not args.plain:
        dist.destroy_process_group()
    return 0 if math.isfinite(float(mean)) else 1


def _install_save_killer(step: int, rank: int, events: str) -> None:
    """Make rank 1 die in the middle of writing the checkpoint of `step`: after DCP wrote its shard,
    truncate the shard to half (a torn write) and SIGKILL, before the barrier that precedes the marker."""
    real_save = dc.dcp.save

    def save(state_dict, *, storage_writer, **kw):
        result = real_save(state_dict, storage_writer=storage_writer, **kw)
        tmp = Path(storage_writer.path)
        if rank == 1 and tmp.name.startswith(f"{dc.PREFIX}{step:08d}"):
            for shard in tmp.glob("__1_*.distcp"):
                with open(shard, "r+b") as handle:
                    handle.truncate(shard.stat().st_size // 2)
            _die(events)
        return result

    dc.dcp.save = save


def _die(events: str) -> None:
    """SIGKILL this process (no cleanup, no exception), noting the time for the test to measure."""
    Path(events + ".killed").write_text(str(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
