"""Serving throughput: our continuous-batching `Engine` against sequential Hugging Face `generate()`.

Same model on both sides (the quickstart shape, random weights; ours converted with `hf_llama` into a
`transformers.LlamaForCausalLM`), float32, greedy, the same prompts (random token ids of varied lengths)
and the same number of new tokens for every request (no EOS, so every request generates exactly
`--max-new-tokens`). Reported: generated tokens per second of wall time.

  hf-sequential   HF `generate()` one request after another (what a plain HF script serves)
  ours-sequential `lmloom.serve.generate.generate` one request after another (our KV-cached loop)
  engine@C        C closed-loop clients submitting to one `Engine` (each sends its next request when its
                  previous one finished), through the engine's Python API
  http@C          the same through the OpenAI-compatible API on a local uvicorn (`--http`)

The first request's greedy tokens are checked equal between HF and the engine before timing. HF's
sequential run is timed before and after the engine runs and the ratios use both together; on a shared
machine compare the two HF rows to see how much the load moved, and run it twice.

Usage:  python benchmarks/serving.py [--requests 32] [--max-new-tokens 64] [--concurrency 1,4,16] [--http]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import threading
import time

import torch

from lmloom.models.decoder import Decoder, DecoderConfig
from lmloom.models.hf_llama import to_hf_config, to_hf_state_dict
from lmloom.serve.engine import Engine, SamplingParams
from lmloom.serve.generate import generate

# The quickstart model (src/lmloom/recipes/quickstart.yaml).
SHAPE = dict(vocab_size=8192, seq_len=256, d_model=256, n_layers=4, n_heads=4)


def build_models(seed: int):
    import transformers

    torch.manual_seed(seed)
    cfg = DecoderConfig(**SHAPE)
    ours = Decoder(cfg).eval()
    hf = transformers.LlamaForCausalLM(to_hf_config(cfg, attn_implementation="sdpa"))
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    return ours, hf.eval()


def make_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, SHAPE["vocab_size"]) for _ in range(rng.randint(16, 64))] for _ in range(n)]


def hf_generate(hf, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def timed_sequential(fn, prompts, new_tokens) -> tuple[int, float]:
    start = time.perf_counter()
    total = sum(len(fn(p, new_tokens)) for p in prompts)
    return total, time.perf_counter() - start


def closed_loop(prompts: list[list[int]], concurrency: int, send) -> tuple[int, float]:
    """`concurrency` workers take the next prompt when their last request is done; `send` returns the
    number of generated tokens."""
    todo = list(reversed(prompts))
    lock = threading.Lock()
    generated = [0] * concurrency

    def worker(i: int) -> None:
        while True:
            with lock:
                if not todo:
                    return
                prompt = todo.pop()
            generated[i] += send(prompt)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(generated), time.perf_counter() - start


def start_server(engine: Engine):
    import uvicorn

    from lmloom.serve.api import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "bench"), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32, help="requests per measurement")
    parser.add_argument("--hf-requests", type=int, default=8, help="requests for the sequential baselines")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--http", action="store_true", help="also measure through the HTTP API")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]
    n_new = args.max_new_tokens

    ours, hf = build_models(args.seed)
    prompts = make_prompts(args.requests, args.seed + 1)
    params = SamplingParams(max_tokens=n_new, temperature=0)
    engine = Engine(ours, max_batch_size=max(levels)).start()

    # Same weights, same greedy tokens (and a warmup of both).
    (first,) = engine.generate([prompts[0]], params)
    assert first.token_ids == hf_generate(hf, prompts[0], n_new), "engine and HF disagree on greedy tokens"

    rows: list[tuple[str, int, float]] = []
    base = prompts[: args.hf_requests]
    total, secs = timed_sequential(lambda p, n: hf_generate(hf, p, n), base, n_new)
    rows.append(("hf-sequential", total, secs))
    total, secs = timed_sequential(
        lambda p, n: generate(ours, p, max_new_tokens=n, temperature=0), base, n_new
    )
    rows.append(("ours-sequential", total, secs))

    def send_engine(prompt: list[int]) -> int:
        return engine.generate([prompt], params)[0].completion_tokens

    for c in levels:
        rows.append((f"engine@{c}", *closed_loop(prompts, c, send_engine)))

    # The sequential HF baseline again at the end: on a shared machine, the two runs bracket the load.
    total, secs = timed_sequential(lambda p, n: hf_generate(hf, p, n), base, n_new)
    rows.insert(1, ("hf-seq (again)", total, secs))

    if args.http:
        import httpx

        server, thread, url = start_server(engine)
        with httpx.Client(base_url=url, timeout=300, limits=httpx.Limits(max_connections=64)) as http:

            def send_http(prompt: list[int]) -> int:
                body = {"model": "bench", "prompt": prompt, "max_tokens": n_new, "temperature": 0}
                r = http.post("/v1/completions", json=body)
                r.raise_for_status()
                return r.json()["usage"]["completion_tokens"]

            send_http(prompts[0])
            for c in levels:
                rows.append((f"http@{c}", *closed_loop(prompts, c, send_http)))
        server.should_exit = True
        thread.join(10)
    engine.stop()

    hf_rate = (rows[0][1] + rows[1][1]) / (rows[0][2] + rows[1][2])  # both HF runs together
    print(
        f"model {SHAPE}, fp32, greedy, {n_new} new tokens/request, prompts 16-64 tokens, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'mode':<16}{'tokens':>8}{'seconds':>10}{'tokens/s':>11}{'vs HF':>8}")
    for name, total, secs in rows:
        rate = total / secs
        print(f"{name:<16}{total:>8}{secs:>10.2f}{rate:>11.1f}{rate / hf_rate:>7.2f}x")


if __name__ == "__main__":
    main()
