"""Start a server and N clients as separate processes on loopback and wait for the result:

    python -m lmloom.federated.launch --tokens train.npy --val val.npy --workdir runs/fed [--set rounds=8]

The training tokens are cut into `clients` contiguous shards, one per client (each client reads only its
own file). `run_local` is the same thing as a function (the tests use it).
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
    shards: list[Path],
    val: Path,
    workdir: Path,
    *,
    log_received: bool = False,
    dump_true: bool = False,
    timeout: float = 300.0,
) -> dict:
    """Run the server and one client per shard as subprocesses; the server's result JSON."""
    if len(shards) != cfg.clients:
        raise ValueError(f"{len(shards)} shards for {cfg.clients} clients")
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
        "--val",
        str(val),
    ]
    server_cmd += ["--port-file", str(port_file), "--out", str(out), "--save-model", str(workdir / "model")]
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
        for i, shard in enumerate(shards):
            cmd = [sys.executable, "-m", "lmloom.federated.client", "--server", address, "--id", str(i)]
            cmd += ["--tokens", str(shard)]
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
    parser.add_argument(
        "--tokens", type=Path, required=True, help="training tokens (.npy), split among clients"
    )
    parser.add_argument("--val", type=Path, required=True, help="validation tokens (.npy)")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--config", type=Path, help="FederatedConfig YAML")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    from lmloom.federated.server import load_config

    cfg = load_config(args.config, args.set)
    args.workdir.mkdir(parents=True, exist_ok=True)
    shards = split_shards(load_tokens(args.tokens), cfg.clients, args.workdir)
    result = run_local(cfg, shards, args.val, args.workdir)
    print(json.dumps({k: result[k] for k in ("initial_val_loss", "val_loss", "tokens")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
