"""Federated training: a server and 3 clients as separate processes on loopback, FedAvg with pairwise-mask
secure aggregation. One run shows both that it learns like centralised training on the same data and
that what the server receives from any one client is unreadable while the sum is exact.

Data: bytes of a few stdlib modules as tokens (vocabulary 256, no tokenizer needed), 90% split into three
contiguous shards, one per client, 10% held out. Every process uses one torch thread.
"""

from __future__ import annotations

import socket
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from lmloom.errors import ConfigError
from lmloom.federated import protocol, secagg
from lmloom.federated.launch import run_local, split_shards
from lmloom.federated.local import FederatedConfig, privatize, train_centralised

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
    np.save(work / "val.npy", data[cut:])
    shards = split_shards(data[:cut], CFG.clients, work)
    result = run_local(CFG, shards, work / "val.npy", work / "run", log_received=True, dump_true=True)
    central = train_centralised(CFG, [np.load(s) for s in shards], data[cut:])
    return {"result": result, "central": central, "run": work / "run"}


def test_three_client_processes_reach_centralised_validation_loss(federated):
    fed, central = federated["result"], federated["central"]
    assert fed["tokens"] == central["tokens"]  # the same amount of training data
    assert fed["initial_val_loss"] == pytest.approx(central["initial_val_loss"])  # the same initial model
    assert fed["val_loss"] < fed["initial_val_loss"] - 2.5  # it learnt (5.28 -> ~2)
    assert fed["val_loss"] <= central["val_loss"] + MARGIN_NATS, (fed["val_loss"], central["val_loss"])
    losses = [r["val_loss"] for r in fed["rounds"]]
    assert losses[-1] < losses[0]
    assert (federated["run"] / "model" / "model.safetensors").is_file()


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
