"""Latency the security gateway adds on loopback: the same non-streamed chat request sent N times
straight to a small OpenAI-compatible upstream and N times through the gateway (auth, validation,
injection scan, rate limit, forwarding, PII filter, audit), both on 127.0.0.1 with keep-alive.

    python benchmarks/gateway_latency.py [--requests 500] [--http h11|httptools|auto] [--loop asyncio|uvloop|auto]

Prints p50/p99 of each and the difference (target: <= 2 ms added at p50). The audit entries are
written by a background thread during the run, so their cost shows up as contention, not as a wait.
Both servers run uvicorn with `--http`/`--loop` (default h11/asyncio, pure Python; `lmloom serve`
uses uvicorn's `auto`: httptools and uvloop when installed). With psutil installed it also prints the
CPU time each server process spent per request (all its threads): on a busy machine wall-clock
percentiles move with other work, CPU time much less.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gateway_upstream import create_upstream  # noqa: E402

from lmloom.serve.gateway import ApiKeyStore, GatewayConfig, create_gateway  # noqa: E402

BODY = {
    "model": "echo-1",
    "max_tokens": 32,
    "messages": [{"role": "user", "content": "Summarise the design of a token bucket in one sentence."}],
}


WARMUP = 20  # requests before each timed run


def cpu_seconds(pid: int) -> float:
    try:
        import psutil
    except ImportError:
        return math.nan
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def measure(url: str, headers: dict[str, str], n: int) -> list[float]:
    times = []
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        for _ in range(WARMUP):  # connections, caches
            http.post("/v1/chat/completions", json=BODY).raise_for_status()
        for _ in range(n):
            t = time.perf_counter()
            http.post("/v1/chat/completions", json=BODY).raise_for_status()
            times.append(time.perf_counter() - t)
    return times


def pct(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000
        if q < 100
        else max(values) * 1000
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_server(kind: str, port: int, upstream_url: str, store: str, http: str, loop: str) -> None:
    import uvicorn

    if kind == "upstream":
        app = create_upstream()
    else:
        app = create_gateway(upstream_url, GatewayConfig(port=port), Path(store))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", http=http, loop=loop)


def start(
    kind: str, port: int, upstream_url: str = "", store: str = "", http: str = "h11", loop: str = "asyncio"
) -> multiprocessing.Process:
    """Each server in its own process, as deployed (threads in one process would share a GIL)."""
    process = multiprocessing.get_context("spawn").Process(
        target=run_server, args=(kind, port, upstream_url, store, http, loop), daemon=True
    )
    process.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(
                f"http://127.0.0.1:{port}/livez" if kind == "gateway" else f"http://127.0.0.1:{port}/health"
            )
            return process
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{kind} did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--http", choices=["h11", "httptools", "auto"], default="h11")
    parser.add_argument("--loop", choices=["asyncio", "uvloop", "auto"], default="asyncio")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        _, key = ApiKeyStore.for_store(store).create(rpm=10**6, tpm=10**9)
        upstream_port, gateway_port = free_port(), free_port()
        upstream_url = f"http://127.0.0.1:{upstream_port}"
        servers = [start("upstream", upstream_port, http=args.http, loop=args.loop)]
        servers.append(start("gateway", gateway_port, upstream_url, str(store), args.http, args.loop))
        upstream_pid, gateway_pid = servers[0].pid, servers[1].pid
        cpu = {"upstream alone": 0.0, "upstream behind": 0.0, "gateway": 0.0}
        try:
            direct, through = [], []
            for _ in range(2):  # interleave, so drift in machine load hits both alike
                u0 = cpu_seconds(upstream_pid)
                direct += measure(upstream_url, {}, args.requests // 2)
                u1, g1 = cpu_seconds(upstream_pid), cpu_seconds(gateway_pid)
                through += measure(f"http://127.0.0.1:{gateway_port}", {"Authorization": f"Bearer {key}"},
                                   args.requests // 2)  # fmt: skip
                time.sleep(0.2)  # the audit writer catches up: its CPU time counts too
                u2, g2 = cpu_seconds(upstream_pid), cpu_seconds(gateway_pid)
                cpu["upstream alone"] += u1 - u0
                cpu["upstream behind"] += u2 - u1
                cpu["gateway"] += g2 - g1
        finally:
            for server in servers:
                server.terminate()
                server.join(10)
    print(
        f"requests: {len(direct)} each, non-streamed chat, loopback, sequential, uvicorn {args.http}/{args.loop}"
    )
    print(f"{'':10s} {'p50 ms':>8s} {'p99 ms':>8s}")
    print(f"{'upstream':10s} {pct(direct, 50):8.3f} {pct(direct, 99):8.3f}")
    print(f"{'gateway':10s} {pct(through, 50):8.3f} {pct(through, 99):8.3f}")
    print(
        f"{'added':10s} {pct(through, 50) - pct(direct, 50):8.3f} {pct(through, 99) - pct(direct, 99):8.3f}"
    )
    if not math.isnan(cpu["gateway"]):
        n = len(direct) + 2 * WARMUP  # CPU time is counted over the warm-up requests too
        print(
            "CPU ms/request: "
            + ", ".join(f"{name} {1000 * seconds / n:.3f}" for name, seconds in cpu.items())
        )


if __name__ == "__main__":
    main()
