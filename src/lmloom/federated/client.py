"""A federated client: `python -m lmloom.federated.client --server 127.0.0.1:PORT --id 0 --tokens shard0.npy`
(or `--shards ID [--store PATH]`: slice `--id` of that verified shards artifact's train split).

It takes the run's config from the server, keeps its model and AdamW state across rounds, and each round
trains `local_steps` steps on its own shard from the global weights, then sends the change in weights:
clipped and noised when DP is on, masked when secure aggregation is on (the server cannot read it alone).
`--dump-true DIR` (test mode) writes the update as it was before masking, for comparison.
"""

from __future__ import annotations

import argparse
import base64
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lmloom.errors import DataError, LmloomError, SecurityError
from lmloom.federated import protocol, secagg
from lmloom.federated.local import (
    FederatedConfig,
    build_optimizer,
    get_vector,
    init_model,
    load_tokens,
    privatize,
    set_vector,
    train_steps,
)


def connect(address: str, timeout: float) -> socket.socket:
    host, _, port = address.rpartition(":")
    protocol.check_loopback(host)
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection((host, int(port)), timeout=timeout)
            return sock
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def run_client(
    sock: socket.socket,
    client_id: int,
    tokens: np.ndarray | Callable[[FederatedConfig], np.ndarray],
    dump_true: Path | None = None,
) -> int:
    """`tokens`: this client's shard, or a function of the run's config that reads it (a shards slice)."""
    protocol.send(sock, {"type": "hello", "client": client_id})
    header, _ = protocol.recv(sock, "config")
    cfg = FederatedConfig.model_validate(header["config"])
    if callable(tokens):
        tokens = tokens(cfg)
    run_id = header["run_id"]
    model = init_model(cfg)
    optimizer = build_optimizer(model, cfg)
    rng = np.random.default_rng([cfg.seed, client_id])
    private = None
    rounds = 0
    while True:
        header, body = protocol.recv(sock)
        kind = header["type"]
        if kind == "done":
            return rounds
        if kind == "round":
            private, public = secagg.new_keypair()
            protocol.send(
                sock, {"type": "key", "round": header["round"], "public": base64.b64encode(public).decode()}
            )
            continue
        if kind != "train":
            raise DataError(f"unexpected message {kind!r}")
        rnd = header["round"]
        weights = protocol.body_array(header, body, "float32")
        set_vector(model, weights)
        loss = train_steps(model, optimizer, tokens, rng, cfg.local_steps, cfg.batch_size, cfg)
        update, _ = privatize(get_vector(model).astype(np.float64) - weights, cfg)
        if dump_true is not None:
            dump_true.mkdir(parents=True, exist_ok=True)
            np.save(dump_true / f"round{rnd:03d}-client{client_id}.npy", np.asarray(update, dtype=np.float64))
        if cfg.secure:
            keys = {int(k): base64.b64decode(v) for k, v in header["keys"].items()}
            if private is None or set(keys) != set(range(cfg.clients)):
                raise SecurityError(
                    f"round {rnd}: the server relayed keys for clients {sorted(keys)}, expected all {cfg.clients}"
                )
            context = f"run={run_id}|round={rnd}".encode()
            payload = secagg.mask_update(
                update, client_id, private, keys, context, cfg.fixed_point_scale, cfg.fixed_point_clip
            )
            private = None  # one key pair per round
        else:
            payload = np.asarray(update, dtype=np.float32)
        head, raw = protocol.array_body(payload)
        protocol.send(sock, {"type": "update", "round": rnd, "train_loss": loss, **head}, raw)
        rounds += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmloom.federated.client", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--server", required=True, help="HOST:PORT of the server (loopback)")
    parser.add_argument("--id", type=int, required=True, help="this client's number, 0..clients-1")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--tokens", type=Path, help="this client's token shard (.npy)")
    data.add_argument(
        "--shards", help="a shards artifact id: this client trains on slice --id of its train split"
    )
    parser.add_argument("--store", type=Path, help="artifact store (default: $LMLOOM_HOME or ~/.lmloom)")
    parser.add_argument("--dump-true", type=Path, help="test mode: write each unmasked update here")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(1)
        if args.shards:
            from lmloom.federated.publish import client_slice, open_shards, open_store

            shards = open_shards(open_store(args.store), args.shards)  # verified before it is read

            def tokens(cfg: FederatedConfig) -> np.ndarray:
                return client_slice(shards, cfg.clients, args.id)

        else:
            tokens = load_tokens(args.tokens)
        with connect(args.server, args.timeout) as sock:
            sock.settimeout(args.timeout)
            rounds = run_client(sock, args.id, tokens, args.dump_true)
        print(f"client {args.id}: {rounds} rounds done", file=sys.stderr)
    except (LmloomError, ValueError, OSError) as exc:
        print(f"error: client {args.id}: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
