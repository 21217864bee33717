"""Training throughput of our `Decoder` against Hugging Face `LlamaForCausalLM` of the same shape.

One training step = zero_grad + forward with loss + backward + AdamW step, identical optimizer settings on
both sides, random tokens, both models starting from the same weights (ours converted to HF, so the first
losses agree). Modes:

  eager-fp32    plain PyTorch, float32
  compile-bf16  torch.compile (default options) + torch.autocast(bfloat16), the fastest mode both support

HF gets its fastest attention per mode: with `--hf-attn auto` (the default) its `sdpa` and `eager`
implementations are both timed and the faster one is used (under torch.compile, inductor fuses HF's
eager attention and it beats SDPA's CPU kernel). Compilation and warmup are never timed; timed steps
alternate between the models so that background load hits both alike; the median step is reported.

Shape: the quickstart model by default; `--preset NAME` takes the layers, width, heads and MLP width of
one of the decoder's named presets (tiny, small, 125m, ...); explicit shape flags override either.

Usage:  python benchmarks/train_throughput.py [--modes eager-fp32,compile-bf16] [--steps 10] [--d-model ...]
        python benchmarks/train_throughput.py --preset 125m --batch-size 4
        python benchmarks/train_throughput.py --threads 1 --clock cpu    # on a shared machine
        python benchmarks/train_throughput.py --device cuda --d-model 1024 --n-layers 8 --batch-size 32
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import time

import torch

from lmloom.models.decoder import PRESETS, Decoder, DecoderConfig
from lmloom.models.hf_llama import to_hf_config, to_hf_state_dict
from lmloom.train.heap import keep_freed_memory

# The benchmark shape, in one place: the quickstart recipe's model and batch (src/lmloom/recipes/quickstart.yaml).
DEFAULTS = dict(vocab_size=8192, seq_len=256, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, batch_size=16)
SHAPE = (*DEFAULTS, "ffn_hidden")  # ffn_hidden: None is the decoder's own rule (SwiGLU ~8/3 d_model)
MODES = ("eager-fp32", "compile-bf16")
HF_ATTENTION = ("sdpa", "eager")
# fused=True: torch's one-kernel CPU AdamW, on both sides (the for-loop default cost each side ~15 ms/step
# at the default shape, time that says nothing about either model).
OPTIMIZER = dict(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)


def build_ours(args, device: str = "cpu") -> Decoder:
    cfg = DecoderConfig(
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
        ffn_hidden=args.ffn_hidden,
    )
    torch.manual_seed(0)
    return Decoder(cfg).to(device).train()


def build_hf(ours: Decoder, attn_implementation: str) -> torch.nn.Module:
    """HF Llama with our config and weights, the LM head tied like ours."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(to_hf_config(ours.config, attn_implementation=attn_implementation))
    hf = hf.to(ours.tok_emb.weight.device)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), ours.config), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    assert hf.config._attn_implementation == attn_implementation
    return hf.train()


def make_step(model: torch.nn.Module, is_hf: bool, mode: str, tokens: torch.Tensor):
    """A closure running one full training step; returns the loss tensor."""
    opt = torch.optim.AdamW(model.parameters(), **OPTIMIZER)
    fwd = torch.compile(model) if mode == "compile-bf16" else model
    device = tokens.device.type
    autocast = (
        (lambda: torch.autocast(device, dtype=torch.bfloat16))
        if mode == "compile-bf16"
        else contextlib.nullcontext
    )
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with autocast():
            # Each side as its users call it: HF shifts `labels` itself, ours takes the next tokens.
            loss = fwd(input_ids=inputs, labels=inputs).loss if is_hf else fwd(inputs, targets)
        loss.backward()
        opt.step()
        return loss

    return step


def warm_up(name: str, step, n: int) -> None:
    start = time.perf_counter()
    loss = step().item()
    for _ in range(n - 1):
        step()
    print(
        f"  {name:10s} warmup {n} steps (compilation included) {time.perf_counter() - start:6.1f}s, "
        f"first loss {loss:.4f}",
        flush=True,
    )


def _cuda_wall() -> float:
    torch.cuda.synchronize()  # a step's kernels are queued: time them when they have run
    return time.perf_counter()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def alternate(steps: dict, n: int, faults: dict | None = None) -> dict[str, list[float]]:
    """Per-step seconds, one step of each model in turn, the order flipped every round; with `faults`,
    each step's minor page faults too (~2 us each on this project's machine; how many depends on the
    state the process's heap is in, see benchmarks/README.md)."""
    times = {name: [] for name in steps}
    names = list(steps)
    for i in range(n):
        for name in names if i % 2 == 0 else names[::-1]:
            before = minor_faults()
            start = clock()
            steps[name]()
            times[name].append(clock() - start)
            if faults is not None:
                faults.setdefault(name, []).append(minor_faults() - before)
    return times


def run_mode(mode: str, args) -> None:
    tokens = torch.randint(
        0, args.vocab_size, (args.batch_size, args.seq_len + 1), generator=torch.Generator().manual_seed(1)
    ).to(args.device)
    tok_per_step = args.batch_size * args.seq_len
    ours = build_ours(args, args.device)
    candidates = HF_ATTENTION if args.hf_attn == "auto" else (args.hf_attn,)
    hf_models = {impl: build_hf(ours, impl) for impl in candidates}  # from the same initial weights
    our_step = make_step(ours, False, mode, tokens)
    warm_up("ours", our_step, args.warmup)
    hf_steps = {}
    for impl, hf in hf_models.items():
        hf_steps[impl] = make_step(hf, True, mode, tokens)
        warm_up(f"hf-{impl}", hf_steps[impl], args.warmup)
    if len(hf_steps) > 1:  # HF's fastest attention for this mode, by measurement
        probe = {impl: statistics.median(ts) for impl, ts in alternate(hf_steps, args.probe_steps).items()}
        best = min(probe, key=probe.get)
        print(
            "  HF attention probe: "
            + ", ".join(f"{impl} {tok_per_step / t:,.0f} tokens/s" for impl, t in probe.items())
            + f" -> using {best!r}"
        )
    else:
        best = candidates[0]

    faults = {}
    times = alternate({"ours": our_step, "hf": hf_steps[best]}, args.steps, faults)
    rate = {name: tok_per_step / statistics.median(ts) for name, ts in times.items()}
    for name, label in (("ours", "ours"), ("hf", f"HF ({best})")):
        ts = times[name]
        print(
            f"  {label:36s} {rate[name]:8,.0f} tokens/s  (median of {len(ts)} steps; "
            f"fastest {tok_per_step / min(ts):,.0f}, slowest {tok_per_step / max(ts):,.0f}; "
            f"median {statistics.median(faults[name]):,.0f} page faults a step)"
        )
    paired = statistics.median(h / o for o, h in zip(times["ours"], times["hf"], strict=True))
    print(
        f"  ratio ours/HF: {rate['ours'] / rate['hf']:.2f}x  (median of per-step pairs {paired:.2f}x)",
        flush=True,
    )


def shape_of_preset(args) -> None:
    """Fill in the shape flags not given: the layers, widths and heads from `--preset` (as
    `DecoderConfig.preset` builds them), everything else from DEFAULTS."""
    base = dict(DEFAULTS, ffn_hidden=None)
    if args.preset:
        preset = DecoderConfig.preset(args.preset)
        base |= {
            k: getattr(preset, k) for k in ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden")
        }
    for key in SHAPE:
        if getattr(args, key) is None:
            setattr(args, key, base[key])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a named decoder size (its layers, d_model, heads, kv heads, MLP width) instead of the "
        "quickstart's; vocab, seq_len and batch stay the defaults unless given",
    )
    for key, value in DEFAULTS.items():  # None: not given (the preset's, else the default)
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None, help=f"default {value}")
    p.add_argument("--ffn-hidden", type=int, default=None, help="MLP width [default: the decoder's rule]")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model, alternating the models")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model (compilation included)")
    p.add_argument("--probe-steps", type=int, default=4, help="steps per HF attention candidate (auto)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--hf-attn", default="auto", choices=("auto", *HF_ATTENTION))
    p.add_argument("--device", default="cpu", help="cpu, or cuda (timed by wall clock after a synchronize)")
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="set glibc's thresholds as lmloom's training loop does (lmloom/train/heap.py), for both models: "
        "freed memory stays mapped between steps (blocks over 32 MiB are still mapped and unmapped each time)",
    )
    p.add_argument(
        "--clock",
        default="wall",
        choices=tuple(CLOCKS),
        help="wall: elapsed time; cpu: this process's CPU time (user + system, page faults included), "
        "for a shared machine: with --threads 1 it does not count the time other processes hold the core",
    )
    args = p.parse_args()
    shape_of_preset(args)
    global clock
    clock = CLOCKS[args.clock]
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: this torch has no usable CUDA device")
        if args.clock != "wall":
            p.error("--device cuda is timed by wall clock only")
        clock = _cuda_wall
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        p.error(f"unknown mode(s) {sorted(unknown)}; choose from {', '.join(MODES)}")
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory and not keep_freed_memory():
        p.error("--keep-freed-memory: not glibc on Linux, or a MALLOC_* variable is set")

    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{args.clock} clock, device {args.device}"
        + (", glibc keeps freed memory" if args.keep_freed_memory else "")
        + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.startswith("cuda") else "")
    )
    print(
        "shape: "
        + (f"preset {args.preset}: " if args.preset else "")
        + ", ".join(f"{k}={getattr(args, k)}" for k in SHAPE)
        + f"; {args.batch_size * args.seq_len} tokens/step; AdamW {OPTIMIZER} on both"
    )
    ours = build_ours(args)
    print(
        f"params: {ours.num_params():,} (HF: same weights, tied head); "
        f"ours attends with _CausalAttention in eager float32 and with "
        f"blocked_causal_attention under torch.compile on CPU (SDPA elsewhere)"
    )
    del ours
    for mode in modes:
        print(f"[{mode}]", flush=True)
        run_mode(mode, args)


if __name__ == "__main__":
    main()
