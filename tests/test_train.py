"""Pre-training: schedule, weight-decay groups, checkpoints, and exact resume after `kill -9`."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmloom.errors import IntegrityError
from lmloom.models.decoder import Decoder, DecoderConfig
from lmloom.train.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from lmloom.train.optim import OptimConfig, build_optimizer, lr_at, param_groups

TINY = DecoderConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=2)


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(10, 100, cfg) == pytest.approx(1.0)
    assert lr_at(55, 100, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(100, 100, cfg) == pytest.approx(0.1)
    values = [lr_at(s, 100, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_weight_decay_applies_to_matrices_only():
    model = Decoder(TINY)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def step(model, optimizer, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, TINY.vocab_size, (2, TINY.seq_len), generator=g)
    loss = model(x, x)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.detach())


def test_checkpoint_round_trip_continues_identically(tmp_path):
    torch.manual_seed(0)
    model = Decoder(TINY)
    optimizer = build_optimizer(model, OptimConfig())
    for s in range(3):
        step(model, optimizer, s)
    save_checkpoint(tmp_path, model, optimizer, TrainState(step=3, sample=6, tokens=96))
    expected = [step(model, optimizer, s) for s in range(3, 6)]

    torch.manual_seed(123)  # a different process state: everything must come from the checkpoint
    fresh = Decoder(TINY)
    fresh_opt = build_optimizer(fresh, OptimConfig())
    state = load_checkpoint(latest_checkpoint(tmp_path), fresh, fresh_opt)
    assert (state.step, state.sample, state.tokens) == (3, 6, 96)
    assert [step(fresh, fresh_opt, s) for s in range(3, 6)] == expected


def test_checkpoints_keep_the_newest_and_refuse_tampering(tmp_path):
    model = Decoder(TINY)
    optimizer = build_optimizer(model, OptimConfig())
    for s in (10, 20, 30):
        save_checkpoint(tmp_path, model, optimizer, TrainState(step=s), keep=2)
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["step-00000020", "step-00000030"]
    weights = latest_checkpoint(tmp_path) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.safetensors does not match its checksum"):
        load_checkpoint(latest_checkpoint(tmp_path), model, optimizer)


# -- exact resume after kill -9, through the real CLI ---------------------------------------------

RECIPE = """
name: resume-test
stages:
  corpus:
    stage: data.prepare
    config:
      sources: [{{type: text-dir, path: {corpus}, patterns: ["*.py"]}}]
      val_fraction: 0.1
  tokenizer: {{stage: tokenizer.train, inputs: {{corpus: corpus}}, config: {{vocab_size: 512}}}}
  shards: {{stage: tokenizer.encode, inputs: {{corpus: corpus, tokenizer: tokenizer}}}}
  pretrain:
    stage: train.pretrain
    inputs: {{shards: shards, tokenizer: tokenizer}}
    config:
      model: {{seq_len: 32, d_model: 32, n_layers: 2, n_heads: 2}}
      batch_size: 4
      grad_accum: 2
      max_steps: {steps}
      precision: fp32
      compile: false
      checkpoint_every: 10
      eval_every: 50
      eval_windows: 8
      final_eval_windows: 16
      log_every: 1
      optim: {{lr: 0.003, warmup_steps: 10}}
"""


@pytest.fixture(scope="module")
def resume_recipe(tmp_path_factory):
    import sysconfig
    from pathlib import Path

    folder = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py"):
        (folder / name).write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    path = tmp_path_factory.mktemp("recipe") / "resume.yaml"
    path.write_text(RECIPE.format(corpus=folder, steps=300))
    return str(path)


def _default_sigint():
    # A shell starts background jobs with SIGINT ignored, and the child would inherit that, so Python
    # would never raise KeyboardInterrupt: Ctrl-C must behave as it does in a terminal whoever runs pytest.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def launch(store, recipe):
    env = {**os.environ, "LMLOOM_HOME": str(store), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lmloom", "run", recipe],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def checkpoint_artifact(store):
    for folder in (store / "artifacts").iterdir():
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest["kind"] == "checkpoint":
            return folder, manifest
    return None


def test_kill_9_during_pretraining_then_rerun_matches_an_uninterrupted_run(tmp_path, resume_recipe):
    killed_store, clean_store = tmp_path / "killed", tmp_path / "clean"

    proc = launch(killed_store, resume_recipe)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list(killed_store.glob("work/*/checkpoints/step-00000040")):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.communicate()[1][-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint_artifact(killed_store) is None  # killed mid-training, nothing published

    resumed = launch(killed_store, resume_recipe)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert "resuming from step-000000" in err

    clean = launch(clean_store, resume_recipe)
    _, err = clean.communicate(timeout=600)
    assert clean.returncode == 0, err[-3000:]

    (killed_dir, killed), (clean_dir, uninterrupted) = (
        checkpoint_artifact(killed_store),
        checkpoint_artifact(clean_store),
    )
    assert (
        killed["metadata"]["resumed_from_step"] >= 40 and uninterrupted["metadata"]["resumed_from_step"] == 0
    )
    assert killed["metadata"]["steps"] == uninterrupted["metadata"]["steps"] == 300
    assert math.isclose(
        killed["metadata"]["train_loss"], uninterrupted["metadata"]["train_loss"], abs_tol=1e-6
    )
    assert math.isclose(killed["metadata"]["val_loss"], uninterrupted["metadata"]["val_loss"], abs_tol=1e-6)
    # Stronger than the loss: the weights are bit-identical, and so is every logged loss.
    assert killed["files"]["model.safetensors"] == uninterrupted["files"]["model.safetensors"]

    def losses(folder):
        return [
            (r["step"], r["loss"])
            for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
        ]

    assert losses(killed_dir) == losses(clean_dir)
    assert len(losses(clean_dir)) == 300


# -- a whole (tiny) run through the CLI: samples, generate, verification -------------------------


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory, resume_recipe):
    from pathlib import Path

    text = Path(resume_recipe).read_text()
    text += "  samples:\n    stage: serve.samples\n    inputs: {checkpoint: pretrain}\n"
    text += "    config: {prompts: ['def ', 'import '], max_new_tokens: 12, seed: 3}\n"
    recipe = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    recipe.write_text(text)
    store = tmp_path_factory.mktemp("store")
    proc = subprocess.run(
        [sys.executable, "-m", "lmloom", "run", str(recipe)],
        env={**os.environ, "LMLOOM_HOME": str(store), "COLUMNS": "200"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return store, proc.stdout


def cli(store, *args):
    env = {**os.environ, "LMLOOM_HOME": str(store), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "lmloom", *args], env=env, capture_output=True, text=True)


def test_run_prints_the_summary_the_samples_and_beats_the_unigram_baseline(trained_store):
    store, stdout = trained_store
    for label in (
        "documents kept",
        "vocabulary",
        "train tokens",
        "parameters",
        "training steps",
        "train loss",
        "validation perplexity",
        "unigram baseline perplexity",
        "training throughput",
    ):
        assert label in stdout, label
    assert stdout.count("sample (samples)") == 2
    folder, manifest = checkpoint_artifact(store)
    meta = manifest["metadata"]
    assert meta["val_ppl"] < meta["unigram_val_ppl"]  # the quickstart itself lands ~20x below
    assert {"model.safetensors", "model.json", "tokenizer.json", "metrics.jsonl"} <= manifest["files"].keys()


def test_generate_continues_a_prompt_reproducibly(trained_store):
    store, _ = trained_store
    checkpoint = checkpoint_artifact(store)[0].name[:10]
    args = ("generate", checkpoint, "--prompt", "def ", "--max-tokens", "16", "--seed", "7")
    first, second = cli(store, *args), cli(store, *args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("def ") and len(first.stdout) > 5
    greedy = cli(
        store, "generate", checkpoint, "--prompt", "import", "--temperature", "0", "--max-tokens", "8"
    )
    assert greedy.returncode == 0 and greedy.stdout.startswith("import")
    empty = cli(store, "generate", checkpoint, "--max-tokens", "8", "--seed", "1")
    assert empty.returncode == 0 and empty.stdout.strip()  # starts a new document
    too_long = cli(store, "generate", checkpoint, "--prompt", "x", "--max-tokens", "5000")
    assert too_long.returncode == 1 and "Traceback" not in too_long.stderr
    assert "exceeds the model's seq_len (32)" in too_long.stderr


def test_everything_verifies_and_a_flipped_weight_byte_is_refused(trained_store, tmp_path):
    import shutil

    store, _ = trained_store
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    assert cli(copy, "artifacts", "verify").returncode == 0
    assert cli(copy, "audit", "verify").returncode == 0
    folder, _ = checkpoint_artifact(copy)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    verify = cli(copy, "artifacts", "verify")
    assert verify.returncode == 3 and "model.safetensors does not match its sha256" in verify.stdout
    refused = cli(copy, "generate", folder.name[:10], "--prompt", "x")
    assert refused.returncode == 3 and "Traceback" not in refused.stderr
    assert "model.safetensors does not match its sha256" in refused.stderr


def test_ctrl_c_during_pretraining_is_audited_and_a_rerun_resumes(tmp_path, resume_recipe):
    # Ten times the steps of the shared recipe, so the run is still training when the SIGINT arrives.
    recipe = tmp_path / "long.yaml"
    recipe.write_text(Path(resume_recipe).read_text().replace("max_steps: 300", "max_steps: 3000"))
    assert "max_steps: 3000" in recipe.read_text()
    resume_recipe = str(recipe)
    store = tmp_path / "store"
    proc = launch(store, resume_recipe)
    deadline = time.time() + 300
    while (
        time.time() < deadline and proc.poll() is None and not list(store.glob("work/*/checkpoints/step-*"))
    ):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err
    assert "interrupted" in err and "run the same command again" in err
    entries = [json.loads(line) for line in (store / "audit.jsonl").read_text().splitlines()]
    assert entries[-1]["event"] == "stage.end" and entries[-1]["outcome"] == "interrupted"
    assert entries[-1]["step"] == "pretrain"

    again = launch(store, resume_recipe)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0 and "resuming from step-" in err
    assert cli(store, "audit", "verify").returncode == 0


def test_flipping_one_byte_of_any_file_of_any_artifact_is_named(trained_store):
    from lmloom.artifacts.store import ArtifactStore

    store = ArtifactStore(trained_store[0])
    checked = 0
    for artifact_id in store.ids():
        artifact = store.open(artifact_id)
        for name, entry in artifact.manifest.files.items():
            if entry.size == 0:
                continue
            path = artifact.path / name
            original = path.read_bytes()
            flipped = bytearray(original)
            flipped[len(flipped) // 2] ^= 0x01
            path.write_bytes(bytes(flipped))
            try:
                with pytest.raises(IntegrityError, match=f"file {name} does not match its sha256"):
                    store.open(artifact_id)
            finally:
                path.write_bytes(original)
            checked += 1
    assert len(store.ids()) == 5 and checked >= 15
