"""Latency the security gateway adds on loopback: the same non-streamed chat request sent N times
straight to a small OpenAI-compatible upstream and N times through the gateway (auth, validation,
injection scan, rate limit, forwarding, PII filter, audit), both on 127.0.0.1 with keep-alive.

    python benchmarks/gateway_latency.py [--requests 500]

Prints p50/p99 of each and the difference (target: <= 2 ms added at p50). The audit entries are
written by a background thread during the run, so their cost shows up as contention, not as a wait.
"""

from __future__ import annotations

import argparse
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


def measure(url: str, headers: dict[str, str], n: int) -> list[float]:
    times = []
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        for _ in range(20):  # warm-up: connections, caches
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


def run_server(kind: str, port: int, upstream_url: str, store: str) -> None:
    import uvicorn

    if kind == "upstream":
        app = create_upstream()
    else:
        app = create_gateway(upstream_url, GatewayConfig(port=port), Path(store))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", http="h11", loop="asyncio")


def start(kind: str, port: int, upstream_url: str = "", store: str = "") -> multiprocessing.Process:
    """Each server in its own process, as deployed (threads in one process would share a GIL)."""
    process = multiprocessing.get_context("spawn").Process(
        target=run_server, args=(kind, port, upstream_url, store), daemon=True
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        _, key = ApiKeyStore.for_store(store).create(rpm=10**6, tpm=10**9)
        upstream_port, gateway_port = free_port(), free_port()
        upstream_url = f"http://127.0.0.1:{upstream_port}"
        servers = [start("upstream", upstream_port)]
        servers.append(start("gateway", gateway_port, upstream_url, str(store)))
        try:
            direct, through = [], []
            for _ in range(2):  # interleave, so drift in machine load hits both alike
                direct += measure(upstream_url, {}, args.requests // 2)
                through += measure(f"http://127.0.0.1:{gateway_port}", {"Authorization": f"Bearer {key}"},
                                   args.requests // 2)  # fmt: skip
        finally:
            for server in servers:
                server.terminate()
                server.join(10)
    print(f"requests: {len(direct)} each, non-streamed chat, loopback, sequential")
    print(f"{'':10s} {'p50 ms':>8s} {'p99 ms':>8s}")
    print(f"{'upstream':10s} {pct(direct, 50):8.3f} {pct(direct, 99):8.3f}")
    print(f"{'gateway':10s} {pct(through, 50):8.3f} {pct(through, 99):8.3f}")
    print(
        f"{'added':10s} {pct(through, 50) - pct(direct, 50):8.3f} {pct(through, 99) - pct(direct, 99):8.3f}"
    )


if __name__ == "__main__":
    main()
