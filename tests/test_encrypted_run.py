"""An encrypted run end to end, through the real CLI: `security: {encrypt: true}` in a recipe.

One run is killed with SIGKILL during pre-training (its scratch checkpoints are inspected on disk) and
then resumed; a second store makes the same run uninterrupted. Then: every manifest is encrypted,
resume is exact, `generate` needs the key, and no key or corpus text is anywhere in the store or logs.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from lmloom.security.encryption import SCHEME
from lmloom.security.keyring import Keyring, read_kek_file

CORPUS_FILES = ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py")

RECIPE = """
name: encrypted-test
security: {{encrypt: true}}
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
      max_steps: 300
      precision: fp32
      compile: false
      checkpoint_every: 10
      eval_every: 50
      eval_windows: 8
      final_eval_windows: 16
      log_every: 1
      optim: {{lr: 0.003, warmup_steps: 10}}
  samples:
    stage: serve.samples
    inputs: {{checkpoint: pretrain}}
    config: {{prompts: ['def ', 'import '], max_new_tokens: 12, seed: 3}}
"""


def env_for(store: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMLOOM_")}
    env.update(LMLOOM_HOME=str(store), COLUMNS="200", OMP_NUM_THREADS="1", **extra)
    return env


class Run:
    """Every CLI call of the module, so the leak test can search all of their output."""

    outputs: list[str] = []

    @classmethod
    def cli(cls, store: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "lmloom", *args],
            env=env_for(store, **extra),
            capture_output=True,
            text=True,
            timeout=600,
        )
        cls.outputs += [proc.stdout, proc.stderr]
        return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("encrypted")
    corpus = base / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in CORPUS_FILES:
        (corpus / name).write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    recipe = base / "recipe.yaml"
    recipe.write_text(RECIPE.format(corpus=corpus))
    kek_file = base / "keys" / "kek"
    killed, clean = base / "killed", base / "clean"

    init = Run.cli(killed, "keys", "init", "--generate-kek-file", str(kek_file))
    assert init.returncode == 0, init.stderr
    key_env = {"LMLOOM_KEK_FILE": str(kek_file)}
    assert Run.cli(clean, "keys", "init", **key_env).returncode == 0

    proc = subprocess.Popen(
        [sys.executable, "-m", "lmloom", "run", str(recipe)],
        env=env_for(killed, **key_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list(killed.glob("work/*/checkpoints/step-00000040")):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.communicate()[1][-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    Run.outputs += [out, err]
    at_kill = {p: p.read_bytes() for p in killed.rglob("*") if p.is_file()}  # scratch state included

    resumed = Run.cli(killed, "run", str(recipe), **key_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted = Run.cli(clean, "run", str(recipe), **key_env)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    return {
        "corpus": corpus,
        "kek_file": kek_file,
        "key_env": key_env,
        "killed": killed,
        "clean": clean,
        "at_kill": at_kill,
        "resumed": resumed,
    }


def manifests(store: Path) -> dict[str, dict]:
    return {
        folder.name: json.loads((folder / "manifest.json").read_text())
        for folder in (store / "artifacts").iterdir()
    }


def checkpoint_id(store: Path) -> str:
    return next(i for i, m in manifests(store).items() if m["kind"] == "checkpoint")


def test_every_artifact_of_the_run_is_encrypted_with_the_active_key(run):
    active = next(r.id for r in Keyring.for_store(run["killed"]).records() if r.status == "active")
    found = manifests(run["killed"])
    assert {m["kind"] for m in found.values()} == {"corpus", "tokenizer", "shards", "checkpoint", "samples"}
    for manifest in found.values():
        header = manifest["encryption"]
        assert header["scheme"] == SCHEME and header["dek"] == active and len(header["binding"]) == 32
    bindings = [m["encryption"]["binding"] for m in found.values()]
    assert len(set(bindings)) == len(bindings)
    verify = Run.cli(run["killed"], "artifacts", "verify", **run["key_env"])
    assert verify.returncode == 0 and "5 artifacts verified" in verify.stdout, verify.stdout + verify.stderr


def test_scratch_checkpoints_were_encrypted_on_disk(run):
    checkpoint_files = {p: raw for p, raw in run["at_kill"].items() if "/checkpoints/step-" in p.as_posix()}
    assert {p.name for p in checkpoint_files} >= {
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
        "encryption.json",
    }
    for path, raw in checkpoint_files.items():
        for marker in (b'"dtype"', b"data_offsets", b"param_groups", b"rng_torch", b'"sample"'):
            assert marker not in raw, f"{path.name} holds plaintext ({marker!r})"
        if path.name == "encryption.json":
            assert json.loads(raw)["scheme"] == SCHEME


def test_the_resumed_run_ends_with_exactly_the_uninterrupted_weights(run):
    assert "resuming from step-000000" in run["resumed"].stderr
    assert all(
        manifests(run[n])[checkpoint_id(run[n])]["metadata"]["steps"] == 300 for n in ("killed", "clean")
    )
    plain = {
        name: tuple(
            read_decrypted(run, name, "checkpoint", f) for f in ("model.safetensors", "metrics.jsonl")
        )
        for name in ("killed", "clean")
    }
    assert plain["killed"][0] == plain["clean"][0]  # bit-identical weights
    losses = [
        [(r["step"], r["loss"]) for r in map(json.loads, m.decode().splitlines())] for _, m in plain.values()
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 300


def test_generate_works_with_the_key_and_fails_cleanly_without_it(run, tmp_path):
    store, checkpoint = run["killed"], checkpoint_id(run["killed"])[:10]
    args = ("generate", checkpoint, "--prompt", "def ", "--max-tokens", "12", "--seed", "1")
    ok = Run.cli(store, *args, **run["key_env"])
    assert ok.returncode == 0 and ok.stdout.startswith("def "), ok.stderr
    missing = Run.cli(store, *args)
    assert missing.returncode == 4 and "Traceback" not in missing.stderr
    assert (
        "no key-encryption key (KEK) is configured" in missing.stderr and "LMLOOM_KEK_FILE" in missing.stderr
    )
    wrong = Run.cli(store, *args, LMLOOM_KEK=base64.b64encode(os.urandom(32)).decode())
    assert wrong.returncode == 4 and "Traceback" not in wrong.stderr
    assert f"artifact {checkpoint_id(store)[:12]}" in wrong.stderr or "wrapped by KEK" in wrong.stderr
    loose = tmp_path / "loose-kek"
    loose.write_bytes(run["kek_file"].read_bytes())
    os.chmod(loose, 0o644)
    refused = Run.cli(store, *args, LMLOOM_KEK_FILE=str(loose))
    assert refused.returncode == 4 and "chmod 600" in refused.stderr
    events = [json.loads(line)["event"] for line in (store / "audit.jsonl").read_text().splitlines()]
    assert events.count("security.read_refused") >= 3


def read_decrypted(run, store: str, kind: str, name: str) -> bytes:
    from lmloom.artifacts.store import ArtifactStore
    from lmloom.security.context import LmloomSecurity

    root = run[store]
    artifact_id = next(i for i, m in manifests(root).items() if m["kind"] == kind)
    os.environ["LMLOOM_KEK_FILE"] = str(run["kek_file"])
    try:
        return ArtifactStore(root, security=LmloomSecurity(root, "t")).open(artifact_id).read_bytes(name)
    finally:
        del os.environ["LMLOOM_KEK_FILE"]


def test_an_encrypted_recipe_in_a_store_without_keys_stops_with_what_to_do(run, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(corpus=run["corpus"]))
    proc = Run.cli(tmp_path / "bare", "run", str(recipe), **run["key_env"])
    assert proc.returncode == 4 and "Traceback" not in proc.stderr
    assert "run `lmloom keys init` first" in proc.stderr
    assert not list((tmp_path / "bare" / "artifacts").iterdir())


def corpus_samples(corpus: Path) -> list[str]:
    """40-character slices of every input file, from several places, skipping blank-ish ones."""
    samples = []
    for path in sorted(corpus.iterdir()):
        text = path.read_text(encoding="utf-8")
        for k in range(1, 8):
            start = len(text) * k // 8
            piece = text[start : start + 40]
            if len(piece.split()) >= 4:
                samples.append(piece)
    return samples


def test_no_key_and_no_corpus_text_anywhere_in_the_store_or_the_logs(run):
    kek = base64.b64decode(run["kek_file"].read_text())
    needles: dict[str, bytes] = {}
    keys = {"KEK": kek}
    for name in ("killed", "clean"):
        keyring = Keyring.for_store(run[name])
        for record in keyring.records():
            keys[f"DEK {record.id}"] = keyring.unwrap(record.id, read_kek_file(run["kek_file"]))
    for label, key in keys.items():
        needles[f"{label} raw"] = key
        needles[f"{label} hex"] = key.hex().encode()
        needles[f"{label} HEX"] = key.hex().upper().encode()
        needles[f"{label} base64"] = base64.b64encode(key)
        needles[f"{label} base64url"] = base64.urlsafe_b64encode(key).rstrip(b"=")
    samples = corpus_samples(run["corpus"])
    assert len(samples) >= 30
    for i, sample in enumerate(samples):
        needles[f"corpus sample {i} {sample!r}"] = sample.encode("utf-8")
        needles[f"corpus sample {i} as JSON"] = json.dumps(sample, ensure_ascii=False)[1:-1].encode("utf-8")

    haystacks: dict[str, bytes] = {}
    for name in ("killed", "clean"):
        for path in run[name].rglob("*"):
            if path.is_file():
                haystacks[str(path)] = path.read_bytes()
    haystacks.update({f"{p} (at kill)": raw for p, raw in run["at_kill"].items()})
    haystacks.update({f"cli output {i}": text.encode("utf-8") for i, text in enumerate(Run.outputs)})
    searched = {Path(p.removesuffix(" (at kill)")).name for p in haystacks}
    assert {"manifest.json", "keyring.json", "audit.jsonl", "metrics.jsonl", "model.safetensors"} <= searched
    assert {
        "train.jsonl",
        "train-00000.bin",
        "tokenizer.json",
        "state.json",
        "optimizer.safetensors",
    } <= searched

    # The control: the same needles do find the corpus text once it is decrypted.
    decrypted = b"".join(
        read_decrypted(run, "killed", "corpus", name) for name in ("train.jsonl", "val.jsonl")
    )
    found = [label for label, needle in needles.items() if "as JSON" in label and needle in decrypted]
    assert len(found) >= 0.9 * len(samples), (len(found), len(samples))

    leaks = [
        (label, where)
        for where, hay in haystacks.items()
        for label, needle in needles.items()
        if needle in hay
    ]
    assert not leaks, leaks[:10]
