"""Federated training: a server and 3 clients as separate processes on loopback, FedAvg with pairwise-mask
secure aggregation. One run shows both that it learns like centralised training on the same data and
that what the server receives from any one client is unreadable while the sum is exact.

Data: bytes of a few stdlib modules as tokens (vocabulary 256, no tokenizer needed) in a shards artifact:
90% the train split, which the clients cut into three contiguous slices (one each), 10% the val split.
Every process uses one torch thread. The result is a checkpoint artifact in the same store.
"""

from __future__ import annotations

import json
import socket
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lmloom.artifacts.hashing import sha256_file
from lmloom.artifacts.store import ArtifactStore
from lmloom.errors import ConfigError
from lmloom.federated import client, protocol, secagg, server
from lmloom.federated.launch import run_local, split_shards
from lmloom.federated.local import FederatedConfig, init_model, privatize, train_centralised, val_loss
from lmloom.federated.publish import STAGE, Publisher, client_slice, file_record, open_shards, open_store
from lmloom.models.io import load_model_dir
from lmloom.security.context import store_audit_log
from lmloom.serve.loading import load_checkpoint_artifact, model_from_files
from lmloom.tokenizers.shards import ShardWriter, TokenShards
from lmloom.tokenizers.training import train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ("textwrap.py", "string.py", "fnmatch.py", "bisect.py", "argparse.py")
CFG = FederatedConfig(rounds=8, local_steps=10, batch_size=8, lr=3e-3, seed=0, secure=True)
# FedAvg is judged against centralised training on the same tokens and the same number of optimizer steps
# per model (8 x 10 steps of 3 x 8 sequences). It trails it: each client takes its 10 steps on a third of
# the batch (noisier gradients) and the three drift apart before averaging, and AdamW's moments are not
# averaged. Measured here: 1.98 vs 1.79 nats (initial 5.28). The margin allows that gap with room for
# scheduling noise; much more than that would mean the averaging is broken, not merely slower.
MARGIN_NATS = 0.35


@pytest.fixture(scope="module")
def federated(tmp_path_factory):
    work = tmp_path_factory.mktemp("fed")
    text = "".join((STDLIB / name).read_text(encoding="utf-8") for name in MODULES)
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    cut = int(len(data) * 0.9)
    store = ArtifactStore(work / "store")
    out = store.create(kind="shards", stage="test.bytes", config={"modules": list(MODULES)})
    with ShardWriter(out, vocab_size=256, eos_id=0) as writer:  # byte 0 never occurs in the text
        writer.add("train", data[:cut])
        writer.add("val", data[cut:])
    shards = out.commit()
    result = run_local(
        CFG, shards.id, None, work / "run", store=store.root, log_received=True, dump_true=True
    )
    train = TokenShards(shards, "train").tokens(0, cut + 1).astype(np.int64)
    central = train_centralised(CFG, np.array_split(train, CFG.clients), data[cut:])
    return {"result": result, "central": central, "run": work / "run", "store": store, "shards": shards}


def test_three_client_processes_reach_centralised_validation_loss(federated):
    fed, central = federated["result"], federated["central"]
    assert fed["tokens"] == central["tokens"]  # the same amount of training data
    assert fed["initial_val_loss"] == pytest.approx(central["initial_val_loss"])  # the same initial model
    assert fed["val_loss"] < fed["initial_val_loss"] - 2.5  # it learnt (5.28 -> ~2)
    assert fed["val_loss"] <= central["val_loss"] + MARGIN_NATS, (fed["val_loss"], central["val_loss"])
    losses = [r["val_loss"] for r in fed["rounds"]]
    assert losses[-1] < losses[0]


def test_the_result_is_a_verified_checkpoint_artifact_linked_to_its_shards(federated):
    fed, store = federated["result"], federated["store"]
    artifact = store.verify(fed["checkpoint"])  # every file against its manifest hash
    manifest = artifact.manifest
    assert (manifest.kind, manifest.stage) == ("checkpoint", STAGE)
    assert manifest.config == CFG.model_dump(mode="json")
    assert manifest.inputs == {"shards": federated["shards"].id}  # lineage back to the data
    meta = manifest.metadata
    assert (meta["rounds"], meta["clients"], meta["secure"]) == (CFG.rounds, CFG.clients, True)
    assert meta["dp"] == {"clip": 0.0, "noise": 0.0}
    assert meta["val_losses"] == [r["val_loss"] for r in fed["rounds"]]
    assert meta["val_loss"] == fed["val_loss"]
    # The loader `lmloom generate` uses gives the server's final model: the same logits and val loss.
    model = model_from_files(artifact.read_bytes)
    server = load_model_dir(federated["run"] / "model")  # --save-model, written from the same weights
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), server(x))
    val = TokenShards(federated["shards"], "val").tokens(0, 64 * 64 + 1).astype(np.int64)
    assert val_loss(model, val, 64, CFG.eval_windows) == pytest.approx(fed["val_loss"], abs=1e-6)
    ends = [e for e in store_audit_log(store.root).entries() if e.get("event") == "stage.end"]
    assert ends[-1]["outputs"] == [artifact.id] and ends[-1]["stage"] == STAGE
    assert store_audit_log(store.root).verify().ok


def test_npy_token_files_still_work_and_are_recorded_by_hash(tmp_path):
    cfg = FederatedConfig(
        model={"vocab_size": 256, "seq_len": 16, "d_model": 16, "n_layers": 1, "n_heads": 2},
        clients=2,
        rounds=1,
        local_steps=1,
        batch_size=2,
        secure=False,
        eval_windows=2,
    )
    data = np.random.default_rng(0).integers(0, 256, 2000)
    np.save(tmp_path / "val.npy", data[:200])
    shards = split_shards(data[200:], cfg.clients, tmp_path)
    (tmp_path / "fed.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # The server's and the clients' entry points in threads of this process (no interpreter start-ups).
    port, out = tmp_path / "port", tmp_path / "result.json"
    argv = ["--config", str(tmp_path / "fed.yaml"), "--val", str(tmp_path / "val.npy"), "--timeout", "60"]
    argv += ["--port-file", str(port), "--out", str(out), "--store", str(tmp_path / "store")]
    record = {"clients": [file_record(path) for path in shards]}  # what `run_local` passes for its files
    argv += ["--data-record", json.dumps(record)]
    codes: dict[str, int] = {}
    threads = torch.get_num_threads()
    try:
        runner = threading.Thread(target=lambda: codes.update(server=server.main(argv)))
        runner.start()
        while runner.is_alive() and not (port.exists() and port.read_text()):
            time.sleep(0.05)
        address = f"127.0.0.1:{port.read_text()}"
        workers = [
            threading.Thread(
                target=lambda i=i: codes.update(
                    {
                        f"client{i}": client.main(
                            ["--server", address, "--id", str(i), "--tokens", str(shards[i])]
                        )
                    }
                )
            )
            for i in range(cfg.clients)
        ]
        for worker in workers:
            worker.start()
        for worker in [*workers, runner]:
            worker.join(120)
    finally:
        torch.set_num_threads(threads)
    assert codes == {"server": 0, "client0": 0, "client1": 0}
    artifact = ArtifactStore(tmp_path / "store").verify(json.loads(out.read_text())["checkpoint"])
    assert artifact.manifest.inputs == {}
    data_record = artifact.manifest.metadata["data"]
    assert data_record["val"]["sha256"] == sha256_file(tmp_path / "val.npy")
    assert [c["sha256"] for c in data_record["clients"]] == [sha256_file(p) for p in shards]
    assert model_from_files(artifact.read_bytes).config.seq_len == 16


def test_server_receives_masked_updates_whose_sum_is_exact(federated):
    run, n = federated["run"], CFG.clients
    tolerance = n * 0.5 / CFG.fixed_point_scale  # each client's rounding error is at most half a step
    for rnd in (1, CFG.rounds):
        received = [
            np.frombuffer((run / "received" / f"round{rnd:03d}-client{i}.bin").read_bytes(), "<u4")
            for i in range(n)
        ]
        true = [np.load(run / "true" / f"round{rnd:03d}-client{i}.npy") for i in range(n)]
        for i in range(n):
            # Read as the fixed-point number it would be without masks: noise, uncorrelated with the update
            # (|r| ~ 1/sqrt(123k parameters) = 0.003 for independent vectors).
            readable = secagg.decode(received[i], CFG.fixed_point_scale)
            assert abs(np.corrcoef(readable, true[i])[0, 1]) < 0.02
            assert np.abs(readable).mean() > 100 * np.abs(true[i]).mean()  # uniform over the whole range
        total = secagg.aggregate(received, CFG.fixed_point_scale)
        assert np.abs(total - np.sum(true, axis=0)).max() <= tolerance + 1e-12
        assert np.corrcoef(total, np.sum(true, axis=0))[0, 1] > 0.999999


def test_masks_cancel_only_in_the_full_sum_and_need_the_private_keys():
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, 0.01, 1000) for _ in range(3)]
    keys = [secagg.new_keypair() for _ in range(3)]
    public = {i: pub for i, (_, pub) in enumerate(keys)}
    masked = [secagg.mask_update(u, i, keys[i][0], public, b"r1") for i, u in enumerate(updates)]
    assert np.allclose(secagg.aggregate(masked), sum(updates), atol=2e-6)
    partial = secagg.aggregate(masked[:2])  # two of three: the masks with client 2 do not cancel
    assert abs(np.corrcoef(partial, updates[0] + updates[1])[0, 1]) < 0.1
    other_round = secagg.mask_update(updates[2], 2, keys[2][0], public, b"r2")  # seeds are bound to the round
    assert not np.allclose(secagg.aggregate([*masked[:2], other_round]), sum(updates), atol=1e-3)
    with pytest.raises(ValueError, match="overflows"):
        secagg.check_range(1000)


def test_dp_clips_each_update_and_adds_its_share_of_noise():
    cfg = FederatedConfig(dp_clip=1.0, dp_noise=0.5, clients=4)
    update = np.full(10_000, 0.1)  # norm 10
    noised, norm = privatize(update, cfg, np.random.default_rng(1))
    assert norm == pytest.approx(10.0)
    noise = noised - update * (1.0 / 10.0)
    assert noise.std() == pytest.approx(0.5 * 1.0 / 2, rel=0.05)  # z * C / sqrt(clients)
    clipped, _ = privatize(update, FederatedConfig(dp_clip=1.0))
    assert np.linalg.norm(clipped) == pytest.approx(1.0, rel=1e-6)


def test_transport_refuses_other_hosts_and_malformed_frames():
    with pytest.raises(ConfigError, match="loopback"):
        protocol.check_loopback("0.0.0.0")
    protocol.check_loopback("127.0.0.1")
    a, b = socket.socketpair()
    with a, b:
        head, body = protocol.array_body(np.arange(4, dtype=np.float32))
        protocol.send(a, {"type": "update", **head}, body)
        header, raw = protocol.recv(b, "update")
        with pytest.raises(Exception, match="expected a uint32 body"):
            protocol.body_array(header, raw, "uint32")
        a.sendall(b"\xff\xff\xff\xff")
        with pytest.raises(Exception, match="exceeds"):
            protocol.recv(b)


def test_a_checkpoint_of_shards_with_a_tokenizer_opens_like_any_other(tmp_path):
    """The tokenizer the shards were encoded with travels into the checkpoint (as pretrain's does), so the
    loader of `lmloom generate` gets model and tokenizer; a model too small for the shards is refused."""
    store = open_store(tmp_path / "store")
    tokenizer = train_tokenizer("bpe", [(STDLIB / "textwrap.py").read_text(encoding="utf-8")], vocab_size=300)
    out = store.create(kind="tokenizer", stage="test.bpe", config={})
    for name, data in tokenizer.files().items():
        out.write_bytes(name, data)
    tok_art = out.commit()
    out = store.create(kind="shards", stage="test.encode", config={}, inputs={"tokenizer": tok_art.id})
    with ShardWriter(out, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id) as writer:
        writer.add("train", tokenizer.encode("def f(x):\n    return x\n" * 40))
        writer.add("val", tokenizer.encode("def g(y):\n    return y\n" * 40))
    shards = out.commit()
    small = FederatedConfig(
        model={"vocab_size": 256, "seq_len": 16, "d_model": 16, "n_layers": 1, "n_heads": 2}
    )
    with pytest.raises(ConfigError, match="vocab_size = 300"):
        open_shards(store, shards.short_id, small)
    cfg = small.model_copy(update={"model": {**small.model, "vocab_size": tokenizer.vocab_size}, "rounds": 1})
    open_shards(store, shards.short_id, cfg)
    publisher = Publisher(store, cfg, shards=shards)
    model = init_model(cfg)
    result = {"run_id": "r", "initial_val_loss": 6.0, "val_loss": 5.0, "tokens": 1, "rounds": []}
    result["rounds"] = [{"round": 1, "val_loss": 5.0, "train_loss": 5.5, "seconds": 0.1}]
    artifact = store.verify(publisher.publish(model, result).id)
    assert artifact.manifest.inputs == {"shards": shards.id, "tokenizer": tok_art.id}
    assert artifact.manifest.metadata["tokenizer"] == tok_art.id
    loaded, loaded_tokenizer = load_checkpoint_artifact(artifact)
    assert loaded_tokenizer.encode("def f") == tokenizer.encode("def f")
    x = torch.tensor([tokenizer.encode("def f(x): return")])
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    parts = [client_slice(shards, 3, i) for i in range(3)]  # the clients' slices: the train split, cut in 3
    train = TokenShards(shards, "train").tokens(0, len(TokenShards(shards, "train")))
    assert np.array_equal(np.concatenate(parts), train)
