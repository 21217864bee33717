"""Worker for tests/test_parallel.py, run under torchrun: trains the tiny Decoder in each requested mode
and writes per-step losses and gradient norms (rank 0, JSON) and the final full state dict (safetensors).

    python -m torch.distributed.run --nproc_per_node 2 tests/dist/parallel_worker.py OUT_DIR ddp fsdp ...

The single-process reference (`reference_run`) lives here too, so both sides share one model, data and
optimiser definition.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmloom.models.decoder import Decoder, DecoderConfig
from lmloom.train import parallel as par

SEED, STEPS, GLOBAL_BATCH, SEQ, VOCAB = 0, 5, 4, 32, 256
LR, CLIP = 3e-3, 0.5  # large enough that the weights move and clipping is active in every step
# tiny = 2 layers, d_model 128, 4 heads; 2 kv heads so TP splits grouped-query attention (1 kv head/rank)
MODEL = dict(vocab_size=VOCAB, seq_len=SEQ, n_kv_heads=2)

MODES: dict[str, dict] = {
    "ddp": dict(dp_replicate=2),
    "fsdp": dict(dp_shard=2, activation_checkpointing=True),
    "tp": dict(tp=2),
    "pp_gpipe": dict(pp=2, pp_schedule="gpipe", pp_microbatches=4),
    "pp_1f1b": dict(pp=2, pp_schedule="1f1b", pp_microbatches=2),
    "fsdp_bf16": dict(dp_shard=2, mixed_precision="bf16"),  # compared loosely (bf16 compute)
    # 4 processes
    "fsdp_tp": dict(dp_shard=2, tp=2),
    "hsdp": dict(dp_replicate=2, dp_shard=2),
    "pp_fsdp": dict(pp=2, dp_shard=2, pp_schedule="1f1b", pp_microbatches=2),
    "pp_tp": dict(pp=2, tp=2, pp_schedule="gpipe", pp_microbatches=2),
}


def make_model() -> Decoder:
    torch.manual_seed(SEED)
    return Decoder(DecoderConfig.preset("tiny", **MODEL))


def make_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    data = torch.randint(0, VOCAB, (STEPS, GLOBAL_BATCH, SEQ + 1), generator=g)
    return [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in data]


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.1)


def reference_run() -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """One process, the whole global batch: the numbers every mode must reproduce."""
    model = make_model()
    opt = make_optimizer(model.parameters())
    losses, norms = [], []
    for x, y in make_batches():
        loss = model(x, y)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_mode(mode: str, world: int) -> dict:
    pcfg = par.ParallelConfig(**MODES[mode])
    mesh = par.build_mesh(pcfg, world, "cpu")
    model = par.parallelize(make_model(), pcfg, mesh)
    opt = make_optimizer(model.parameters())
    dp_rank, dp_size = par.data_parallel_rank(mesh)
    losses, norms = [], []
    start = time.perf_counter()
    for x, y in make_batches():
        xs, ys = x.chunk(dp_size)[dp_rank], y.chunk(dp_size)[dp_rank]
        if pcfg.pp > 1:
            loss = model.step(xs, ys)
        else:
            loss = model(xs, ys)
            loss.backward()
        norms.append(par.clip_grad_norm_(model.parameters(), CLIP, mesh).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(par.mean_over_data_parallel(loss, mesh).item())
    result = {"losses": losses, "grad_norms": norms, "train_s": time.perf_counter() - start}

    state = par.full_state_dict(model)
    # Reload the saved weights into a freshly parallelized model: the same weights come back out ...
    fresh = par.parallelize(make_model(), pcfg, mesh)
    par.load_full_state_dict(fresh, state)
    again = par.full_state_dict(fresh)
    result["reload_state_diff"] = max((again[k] - v).abs().max().item() for k, v in state.items())
    if pcfg.pp == 1:  # ... and give the same loss on the first batch
        x, y = make_batches()[0]
        xs, ys = x.chunk(dp_size)[dp_rank], y.chunk(dp_size)[dp_rank]
        with torch.no_grad():
            a = par.mean_over_data_parallel(model(xs, ys), mesh)
            b = par.mean_over_data_parallel(fresh(xs, ys), mesh)
        result["reload_loss_diff"] = abs(a - b).item()
    writes = torch.distributed.get_rank() == 0 or (
        pcfg.pp > 1 and all(mesh[d].get_local_rank() == 0 for d in ("dp_replicate", "dp_shard", "tp"))
    )
    if writes:
        stage = mesh["pp"].get_local_rank()
        save_file(
            {k: v.contiguous() for k, v in state.items()}, str(OUT / f"{mode}.stage{stage}.safetensors")
        )
    return result


if __name__ == "__main__":
    OUT = Path(sys.argv[1])
    torch.set_num_threads(1)
    info = par.init_distributed(timeout_s=120)
    results = {}
    try:
        for mode in sys.argv[2:]:
            try:
                results[mode] = run_mode(mode, info.world_size)
            except Exception:  # recorded, so one broken mode does not hide the others' results
                results[mode] = {"error": traceback.format_exc()}
                raise
    finally:
        if info.rank == 0:
            (OUT / f"results.{'-'.join(sys.argv[2:])}.json").write_text(json.dumps(results, indent=1))
        par.destroy_distributed()
