"""`lmloom run` under a real torchrun (gloo, CPU): train.pretrain with FSDP2 and pipeline parallelism
reproduces the single-process run; a rank killed with SIGKILL stops the launch promptly; the run resumes
on another number of processes (DCP resharding, 2 -> 1 and 1 -> 2) and continues exactly.

Tolerance 2e-5 on per-step losses (around 5): the runs differ only in the order gradients are summed
(FSDP's reduce-scatter of two half-batch gradients, or a pipeline's micro-batches, against one
full-batch backward); measured differences are ~5e-7, 40 float32 ulps leave room for other BLAS paths.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

TOLERANCE = 2e-5
HERE = Path(__file__).parent
MAX_STEPS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RECIPE = """
name: dist
description: a tiny pre-training run for launch tests
stages:
  corpus:
    stage: data.prepare
    config: {{sources: [{{type: text-dir, path: {docs}}}], val_fraction: 0.2}}
  tokenizer:
    stage: tokenizer.train
    inputs: {{corpus: corpus}}
    config: {{vocab_size: 300}}
  shards:
    stage: tokenizer.encode
    inputs: {{corpus: corpus, tokenizer: tokenizer}}
  pretrain:
    stage: train.pretrain
    inputs: {{shards: shards, tokenizer: tokenizer}}
    config:
      model: {{seq_len: 32, d_model: 64, n_layers: 2, n_heads: 4}}
      batch_size: 8
      max_steps: {steps}
      precision: fp32
      compile: false
      log_every: 1
      checkpoint_every: 2
      eval_every: 4
      eval_windows: 8
      final_eval_windows: 16
      optim: {{warmup_steps: 2, lr: 0.003}}
"""


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A recipe and a store whose data stages are done (copied per test, so only training runs)."""
    root = tmp_path_factory.mktemp("dist")
    docs = root / "docs"
    docs.mkdir()
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog and then runs far away from home into a river".split()
    for i in range(30):
        (docs / f"d{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(400)) + "\n")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(docs=docs, steps=MAX_STEPS))
    store = root / "base"
    run_lmloom(store, recipe, "--set", "pretrain.max_steps=1")  # data stages + a throwaway model
    reference = root / "reference"
    shutil.copytree(store, reference)
    run_lmloom(reference, recipe)
    return recipe, store, losses(reference)


def run_lmloom(store: Path, recipe: Path, *args: str, timeout: float = 240) -> None:
    cmd = [sys.executable, "-m", "lmloom", "--store", str(store), "run", str(recipe), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


def torchrun(store, recipe, nproc, *args, script=None, env=None, timeout=240, check=True):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    launcher += ["--master_port", str(free_port()), "--max-restarts", "0"]
    target = [str(script)] if script else ["-m", "lmloom"]
    cmd = [*launcher, *target, "--store", str(store), "run", str(recipe), *args]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if check:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


def trained(store: Path) -> Path:
    """The directory of the store's fully trained model artifact."""
    found = []
    for manifest in (store / "artifacts").glob("*/manifest.json"):
        m = json.loads(manifest.read_text())
        if m["stage"] == "train.pretrain" and m["metadata"]["steps"] == MAX_STEPS:
            found.append(manifest.parent)
    assert len(found) == 1, found
    return found[0]


def losses(store: Path) -> dict[int, float]:
    """Per-step training loss of the store's pre-trained model (from its metrics.jsonl)."""
    rows = [json.loads(line) for line in (trained(store) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want) == list(range(1, MAX_STEPS + 1))
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst < TOLERANCE, (worst, got, want)


@pytest.mark.parametrize(
    "degrees",
    [["pretrain.parallel.dp_shard=2"], ["pretrain.parallel.pp=2", "pretrain.parallel.pp_microbatches=2"]],
    ids=["fsdp2", "pipeline-1f1b"],
)
def test_torchrun_reproduces_the_single_process_run(prepared, tmp_path, degrees):
    recipe, base, reference = prepared
    store = tmp_path / "store"
    shutil.copytree(base, store)
    sets = [arg for d in degrees for arg in ("--set", d)]
    torchrun(store, recipe, 2, *sets)
    assert_same_losses(losses(store), reference)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)], ids=["2-ranks-then-1", "1-rank-then-2"])
def test_killed_rank_stops_the_launch_and_the_run_resumes_on_another_world_size(
    prepared, tmp_path, before, after
):
    recipe, base, reference = prepared
    store = tmp_path / "store"
    shutil.copytree(base, store)
    stamp = tmp_path / "killed-at"
    env = {"KILL_AFTER_CHECKPOINT": "4", "KILL_RANK": str(before - 1), "KILL_STAMP": str(stamp)}
    killed = torchrun(
        store,
        recipe,
        before,
        "--set",
        f"pretrain.parallel.dp_shard={before}",
        script=HERE / "dist" / "lmloom_with_crash.py",
        env=env,
        check=False,
    )
    stopped = time.time()
    assert killed.returncode != 0
    assert stopped - float(stamp.read_text()) < 30, "the launch hung after a rank died"
    work = next((store / "work").iterdir())
    complete = sorted(p.name for p in (work / "dcp").glob("step-*") if (p / "COMPLETE.json").is_file())
    assert complete and complete[-1] <= "step-00000004", complete

    torchrun(store, recipe, after, "--set", f"pretrain.parallel.dp_shard={after}")
    metadata = json.loads((trained(store) / "manifest.json").read_text())["metadata"]
    assert metadata["resumed_from_step"] == int(complete[-1].split("-")[1]) > 0
    assert metadata["processes"] == after
    assert_same_losses(losses(store), reference)


def test_lmloom_train_on_existing_shards_under_torchrun(prepared, tmp_path):
    """`lmloom train SHARDS` (the tokenizer found from the shards' lineage) with tensor parallelism gives
    the recipe's single-process losses."""
    recipe, base, reference = prepared
    store = tmp_path / "store"
    shutil.copytree(base, store)
    shards = next(
        m.parent.name
        for m in (store / "artifacts").glob("*/manifest.json")
        if json.loads(m.read_text())["kind"] == "shards"
    )
    config = yaml.safe_load(recipe.read_text())["stages"]["pretrain"]["config"]
    sets = [f"{key}={json.dumps(value)}" for key, value in config.items()] + ["parallel.tp=2"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launcher += ["--master_port", str(free_port()), "--max-restarts", "0"]
    cmd = [*launcher, "-m", "lmloom", "--store", str(store), "train", shards[:12]]
    cmd += [arg for s in sets for arg in ("--set", s)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert_same_losses(losses(store), reference)
