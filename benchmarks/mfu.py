"""Training tokens/s and model FLOPs utilisation (MFU) of our Llama-style `Decoder`.

MFU = (model FLOPs per token x tokens/s) / peak matmul rate, where the peak is *measured in the same run*
on the same device (the best of a few square bf16 matrix products), not taken from a datasheet: it is the
ratio against what this machine's matmul engine actually does. FLOPs per token are the usual estimate
(`Decoder.flops_per_token`: 6 per matmul weight, plus attention 12 x layers x d_model x seq_len, as in the
PaLM paper's appendix and nanoGPT), so the figure compares with published MFUs.

One training step = forward with loss + backward + fused AdamW, gradients in fp32 master weights. On a GPU
the model runs as it would in production: FSDP2 (`fully_shard` per block and at the root, a one-rank
mesh here) with a bf16 mixed-precision policy (params cast to bf16 for compute, gradients reduced in
fp32) and each block compiled with `torch.compile`. On CPU: bf16 autocast and `torch.compile` of the
whole model, as `train.pretrain` runs it.

Usage:
  python benchmarks/mfu.py                         # CPU: the quickstart's model shape
  python benchmarks/mfu.py --preset 1b --seq-len 2048 --batch-size 8     # GPU: TinyLlama-1.1B shape
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from lmloom.models.decoder import Decoder, DecoderConfig


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_matmul_flops(device: torch.device, sizes: tuple[int, ...], repeats: int) -> tuple[float, int]:
    """Best measured bf16 matmul rate (FLOP/s) over square products of the given sizes, and its size."""
    best, best_n = 0.0, 0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        sync(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            sync(device)
            times.append(time.perf_counter() - start)
        rate = 2 * n**3 / statistics.median(times)
        if rate > best:
            best, best_n = rate, n
    return best, best_n


def init_single_rank_group(device: torch.device) -> None:
    """FSDP2 needs a process group; a one-rank one here (torchrun's env is used when present)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def build(args, device: torch.device) -> tuple[torch.nn.Module, Decoder]:
    """(the module a step calls, the underlying Decoder)."""
    cfg = DecoderConfig.preset(args.preset, vocab_size=args.vocab_size, seq_len=args.seq_len)
    torch.manual_seed(0)
    with torch.device(device):
        model = Decoder(cfg)
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        init_single_rank_group(device)
        mesh = init_device_mesh(device.type, (int(os.environ["WORLD_SIZE"]),))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.layers:
            if args.compile:
                block.compile()
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model, model
    return (torch.compile(model) if args.compile else model), model


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1b" if cuda else "small", help="DecoderConfig preset")
    p.add_argument("--vocab-size", type=int, default=32000 if cuda else 8192)
    p.add_argument("--seq-len", type=int, default=2048 if cuda else 256)
    p.add_argument("--batch-size", type=int, default=8 if cuda else 16)
    p.add_argument("--steps", type=int, default=20 if cuda else 8, help="timed steps")
    p.add_argument("--warmup", type=int, default=5 if cuda else 3, help="untimed steps (compilation)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument(
        "--fsdp",
        action=argparse.BooleanOptionalAction,
        default=cuda,
        help="FSDP2 with a bf16 mixed-precision policy (default on GPU); otherwise bf16 autocast",
    )
    p.add_argument(
        "--loss-chunk-elems",
        type=int,
        help="logits per chunk of the fused LM head + cross-entropy (default: the model's, sized for CPU caches)",
    )
    p.add_argument("--peak-sizes", default="8192,4096" if cuda else "2048,1024")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    if args.loss_chunk_elems:
        import lmloom.models.decoder as decoder_module

        decoder_module.linear_cross_entropy.__defaults__ = (args.loss_chunk_elems,)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"torch {torch.__version__} on {name}", flush=True)

    peak, peak_n = peak_matmul_flops(device, tuple(int(s) for s in args.peak_sizes.split(",")), 10)
    print(f"measured peak: {peak / 1e12:,.1f} TFLOP/s (bf16 {peak_n}x{peak_n} matmul)", flush=True)

    model, decoder = build(args, device)
    flops_per_token = decoder.flops_per_token(args.seq_len)
    n_params = decoder.num_params()
    print(
        f"model: {args.preset} ({n_params / 1e6:,.1f}M parameters, {flops_per_token / 1e9:.2f} GFLOP/token), "
        f"batch {args.batch_size} x {args.seq_len}, fsdp={args.fsdp}, compile={args.compile}",
        flush=True,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    gen = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randint(
        0, args.vocab_size, (args.batch_size, args.seq_len + 1), device=device, generator=gen
    )
    x, y = tokens[:, :-1], tokens[:, 1:]
    # FSDP's policy casts parameters to bf16 itself; elsewhere bf16 autocast on fp32 weights.
    use_autocast = not args.fsdp

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
            loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    start = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    sync(device)
    print(
        f"warmup {args.warmup} steps {time.perf_counter() - start:.1f}s, loss {float(loss):.3f}", flush=True
    )
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tok_s = args.batch_size * args.seq_len / step_s
    mfu = flops_per_token * tok_s / peak
    print(
        f"step {step_s * 1000:,.1f} ms (median of {len(times)}), {tok_s:,.0f} tokens/s, "
        f"{flops_per_token * tok_s / 1e12:,.3f} TFLOP/s model -> MFU {mfu:.1%} of the measured peak",
        flush=True,
    )
    if cuda:
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    if args.json:
        figures = dict(
            device=name,
            preset=args.preset,
            params=n_params,
            batch=args.batch_size,
            seq_len=args.seq_len,
            fsdp=args.fsdp,
            compile=args.compile,
            peak_tflops=peak / 1e12,
            tokens_per_s=tok_s,
            model_tflops=flops_per_token * tok_s / 1e12,
            mfu=mfu,
        )
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)
    if args.fsdp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
