"""The FedAvg server: `python -m lmloom.federated.server --config fed.yaml --val val.npy --out result.json`.

It waits for `clients` clients, sends each the run's config, then every round: (secure mode) collects one
fresh X25519 public key per client and relays all of them, sends the global weights, receives one update
per client, and moves the global model by their mean. In secure mode the updates arrive masked and only
their sum can be decoded (`secagg.py`). `--log-received DIR` writes every received payload as it came off
the wire (the test inspects them). The final model is published as a `checkpoint` artifact in the store
(`--store`, default $LMLOOM_HOME or ~/.lmloom; see `publish.py`) and its id printed; `--shards ID` takes
the validation tokens from that shards artifact's `val` split (and records it as the input) instead of
`--val FILE.npy`. `--save-model DIR` also writes the final weights there (model.safetensors + model.json).
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import socket
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from lmloom.errors import ConfigError, DataError, LmloomError
from lmloom.federated import protocol, secagg
from lmloom.federated.local import FederatedConfig, get_vector, init_model, load_tokens, set_vector, val_loss


class Server:
    def __init__(self, cfg: FederatedConfig, val: np.ndarray, log_received: Path | None = None):
        self.cfg = cfg
        self.val = val
        self.log_received = log_received
        self.run_id = secrets.token_hex(8)
        self.conns: dict[int, socket.socket] = {}

    def accept(self, listener: socket.socket, timeout: float) -> None:
        listener.settimeout(timeout)
        while len(self.conns) < self.cfg.clients:
            conn, _ = listener.accept()
            conn.settimeout(timeout)
            header, _ = protocol.recv(conn, "hello")
            cid = header.get("client")
            if not isinstance(cid, int) or not 0 <= cid < self.cfg.clients or cid in self.conns:
                protocol.send(
                    conn,
                    {
                        "type": "error",
                        "message": f"client id {cid!r} is not free in 0..{self.cfg.clients - 1}",
                    },
                )
                conn.close()
                continue
            self.conns[cid] = conn
        for conn in self.conns.values():
            protocol.send(
                conn, {"type": "config", "run_id": self.run_id, "config": self.cfg.model_dump(mode="json")}
            )

    def run(self, log=print) -> dict:
        cfg = self.cfg
        model = init_model(cfg)
        seq_len = cfg.decoder().seq_len
        weights = get_vector(model)
        initial = val_loss(model, self.val, seq_len, cfg.eval_windows)
        log(
            f"{model.num_params():,} parameters, {cfg.clients} clients, secure aggregation {cfg.secure}; val loss {initial:.4f}"
        )
        rounds = []
        for rnd in range(1, cfg.rounds + 1):
            started = time.perf_counter()
            keys = self._collect_keys(rnd) if cfg.secure else {}
            head, body = protocol.array_body(weights)
            for conn in self.conns.values():
                protocol.send(conn, {"type": "train", "round": rnd, "keys": keys, **head}, body)
            updates, losses = {}, []
            for cid, conn in sorted(self.conns.items()):
                header, raw = protocol.recv(conn, "update")
                if header.get("round") != rnd:
                    raise DataError(
                        f"client {cid} sent an update for round {header.get('round')}, expected {rnd}"
                    )
                if self.log_received is not None:
                    self._log(rnd, cid, header, raw)
                updates[cid] = protocol.body_array(header, raw, "uint32" if cfg.secure else "float32")
                losses.append(float(header.get("train_loss", float("nan"))))
            if cfg.secure:
                total = secagg.aggregate([updates[c] for c in sorted(updates)], cfg.fixed_point_scale)
            else:
                total = np.sum([updates[c].astype(np.float64) for c in sorted(updates)], axis=0)
            weights = (weights.astype(np.float64) + total / cfg.clients).astype(np.float32)
            set_vector(model, weights)
            loss = val_loss(model, self.val, seq_len, cfg.eval_windows)
            rounds.append(
                {
                    "round": rnd,
                    "val_loss": loss,
                    "train_loss": float(np.mean(losses)),
                    "seconds": round(time.perf_counter() - started, 3),
                }
            )
            log(f"round {rnd}/{cfg.rounds}: client train loss {np.mean(losses):.4f}, val loss {loss:.4f}")
        for conn in self.conns.values():
            protocol.send(conn, {"type": "done"})
            conn.close()
        self.model = model
        return {
            "run_id": self.run_id,
            "config": cfg.model_dump(mode="json"),
            "initial_val_loss": initial,
            "val_loss": rounds[-1]["val_loss"],
            "rounds": rounds,
            "tokens": cfg.rounds * cfg.local_steps * cfg.batch_size * cfg.clients * seq_len,
        }

    def _collect_keys(self, rnd: int) -> dict[str, str]:
        for conn in self.conns.values():
            protocol.send(conn, {"type": "round", "round": rnd})
        keys = {}
        for cid, conn in sorted(self.conns.items()):
            header, _ = protocol.recv(conn, "key")
            if header.get("round") != rnd:
                raise DataError(f"client {cid} sent a key for round {header.get('round')}, expected {rnd}")
            keys[str(cid)] = header["public"]
            if len(base64.b64decode(header["public"])) != 32:
                raise DataError(f"client {cid}: a public key must be 32 bytes")
        return keys

    def _log(self, rnd: int, cid: int, header: dict, raw: bytes) -> None:
        self.log_received.mkdir(parents=True, exist_ok=True)
        stem = self.log_received / f"round{rnd:03d}-client{cid}"
        stem.with_suffix(".json").write_text(json.dumps(header))
        stem.with_suffix(".bin").write_bytes(raw)


def load_config(path: Path | None, overrides: list[str]) -> FederatedConfig:
    data = yaml.safe_load(path.read_text()) if path else {}
    for item in overrides:
        key, _, value = item.partition("=")
        data[key] = yaml.safe_load(value)
    return FederatedConfig.model_validate(data or {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmloom.federated.server", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", type=Path, help="FederatedConfig YAML")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    parser.add_argument("--val", type=Path, help="validation tokens (.npy); default: the --shards val split")
    parser.add_argument("--store", type=Path, help="artifact store (default: $LMLOOM_HOME or ~/.lmloom)")
    parser.add_argument("--shards", help="shards artifact id the clients train on (recorded as the input)")
    parser.add_argument(
        "--tokenizer", help="tokenizer artifact id to ship in the checkpoint (default: the shards')"
    )
    parser.add_argument(
        "--data-record", help="JSON facts about the clients' token files, kept in the metadata"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port (see --port-file)")
    parser.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    parser.add_argument("--out", type=Path, required=True, help="result JSON (with the checkpoint id)")
    parser.add_argument("--log-received", type=Path, help="test mode: write every received payload here")
    parser.add_argument("--save-model", type=Path, help="write the final model (safetensors + json) here")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for any one message")
    args = parser.parse_args(argv)
    try:
        protocol.check_loopback(args.host)
        cfg = load_config(args.config, args.set)
        if cfg.secure:
            secagg.check_range(cfg.clients, cfg.fixed_point_scale, cfg.fixed_point_clip)
        import torch

        from lmloom.federated.publish import Publisher, file_record, open_shards, open_store, shards_val

        torch.set_num_threads(1)
        store = open_store(args.store)
        shards = open_shards(store, args.shards, cfg) if args.shards else None
        data = json.loads(args.data_record) if args.data_record else {}
        if args.val is not None:
            val = load_tokens(args.val)
            data["val"] = file_record(args.val)
        elif shards is not None:
            val = shards_val(shards, cfg)
        else:
            raise ConfigError("give --val FILE.npy or --shards ID (whose val split is evaluated)")
        publisher = Publisher(store, cfg, shards=shards, tokenizer=args.tokenizer, data=data)
        try:
            server = Server(cfg, val, args.log_received)
            with socket.create_server((args.host, args.port)) as listener:
                if args.port_file:
                    args.port_file.write_text(str(listener.getsockname()[1]))
                server.accept(listener, args.timeout)
                result = server.run(log=lambda m: print(m, file=sys.stderr, flush=True))
        except BaseException as exc:
            publisher.failed(exc)
            raise
        artifact = publisher.publish(server.model, result)
        result["checkpoint"] = artifact.id
        args.out.write_text(json.dumps(result, indent=2))
        if args.save_model:
            from lmloom.models.io import save_model_dir

            save_model_dir(server.model, args.save_model)
        print(f"checkpoint {artifact.id}", flush=True)
    except (LmloomError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
