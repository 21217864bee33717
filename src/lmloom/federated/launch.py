"""Start a server and N clients as separate processes on loopback and wait for the result:

    python -m lmloom.federated.launch --tokens train.npy --val val.npy --workdir runs/fed [--set rounds=8]
    python -m lmloom.federated.launch --shards SHARDS_ID --workdir runs/fed [--store PATH]

The training tokens are cut into `clients` contiguous parts, one per client: with `--tokens`, files (each
client reads only its own; their sha256 go into the checkpoint's metadata); with `--shards`, slices of the
artifact's train split that each client reads from the verified artifact (the server evaluates its val
split). The result is a checkpoint artifact in the store (`--store`, default $LMLOOM_HOME or ~/.lmloom),
whose id is printed. `run_local` is the same thing as a function (the tests use it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from lmloom.federated.local import FederatedConfig, load_tokens


def split_shards(tokens: np.ndarray, n: int, workdir: Path) -> list[Path]:
    paths = []
    for i, part in enumerate(np.array_split(tokens, n)):
        path = workdir / f"shard{i}.npy"
        np.save(path, part)
        paths.append(path)
    return paths


def run_local(
    cfg: FederatedConfig,
    shards: list[Path] | str,
    val: Path | None,
    workdir: Path,
    *,
    store: Path | None = None,
    data: dict | None = None,
    log_received: bool = False,
    dump_true: bool = False,
    timeout: float = 300.0,
) -> dict:
    """Run the server and one client per shard as subprocesses; the server's result JSON (with
    `checkpoint`, the id of the published checkpoint artifact in `store`).

    `shards`: one .npy file per client, or the id of a shards artifact in `store` (val None: its val
    split). `data`: extra facts about the token files for the checkpoint's metadata."""
    from lmloom.federated.publish import file_record

    from_store = isinstance(shards, str)
    if not from_store and len(shards) != cfg.clients:
        raise ValueError(f"{len(shards)} shards for {cfg.clients} clients")
    if not from_store:
        data = {**(data or {}), "clients": [file_record(path) for path in shards]}
    workdir.mkdir(parents=True, exist_ok=True)
    config_path, port_file, out = workdir / "fed.yaml", workdir / "port", workdir / "result.json"
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    port_file.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server_cmd = [
        sys.executable,
        "-m",
        "lmloom.federated.server",
        "--config",
        str(config_path),
    ]
    if val is not None:
        server_cmd += ["--val", str(val)]
    store_args = ["--store", str(store)] if store is not None else []
    server_cmd += ["--port-file", str(port_file), "--out", str(out), *store_args]
    server_cmd += ["--save-model", str(workdir / "model")]  # a plain copy of the checkpoint's model files
    if from_store:
        server_cmd += ["--shards", shards]
    if data:
        server_cmd += ["--data-record", json.dumps(data)]
    if log_received:
        server_cmd += ["--log-received", str(workdir / "received")]
    logs = [open(workdir / "server.log", "w")]  # noqa: SIM115 (closed below)
    procs = [subprocess.Popen(server_cmd, stdout=logs[0], stderr=subprocess.STDOUT, env=env)]
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            if procs[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {(workdir / 'server.log').read_text()}")
            time.sleep(0.1)
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        for i in range(cfg.clients):
            cmd = [sys.executable, "-m", "lmloom.federated.client", "--server", address, "--id", str(i)]
            cmd += ["--shards", shards, *store_args] if from_store else ["--tokens", str(shards[i])]
            if dump_true:
                cmd += ["--dump-true", str(workdir / "true")]
            logs.append(open(workdir / f"client{i}.log", "w"))  # noqa: SIM115
            procs.append(subprocess.Popen(cmd, stdout=logs[-1], stderr=subprocess.STDOUT, env=env))
        for proc in procs:
            proc.wait(timeout=timeout)
        failed = [i for i, p in enumerate(procs) if p.returncode != 0]
        if failed:
            names = ["server.log" if i == 0 else f"client{i - 1}.log" for i in failed]
            raise RuntimeError(
                "federated run failed: "
                + "; ".join(f"{n}: {(workdir / n).read_text()[-2000:]}" for n in names)
            )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for handle in logs:
            handle.close()
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmloom.federated.launch", description=__doc__.split("\n")[0]
    )
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--tokens", type=Path, help="training tokens (.npy), split among clients")
    data.add_argument("--shards", help="shards artifact id: its train split is split among clients")
    parser.add_argument("--val", type=Path, help="validation tokens (.npy); default: the --shards val split")
    parser.add_argument("--store", type=Path, help="artifact store (default: $LMLOOM_HOME or ~/.lmloom)")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--config", type=Path, help="FederatedConfig YAML")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    from lmloom.federated.server import load_config

    cfg = load_config(args.config, args.set)
    if args.tokens is not None and args.val is None:
        parser.error("--tokens needs --val (validation tokens, .npy)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.shards:
        shards, data = args.shards, None
    else:
        from lmloom.federated.publish import file_record

        shards = split_shards(load_tokens(args.tokens), cfg.clients, args.workdir)
        data = {"tokens": file_record(args.tokens)}
    result = run_local(cfg, shards, args.val, args.workdir, store=args.store, data=data)
    keys = ("checkpoint", "initial_val_loss", "val_loss", "tokens")
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
