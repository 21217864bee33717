"""The tamper matrix: every artifact kind of a (tiny) default run x every way to alter it at rest.

Each alteration must be refused on read with an error naming the artifact and the file, and nothing
may consume the altered artifact: re-running the recipe (whose next stages read it) fails too. The
matrix runs twice: on a plaintext store and on an encrypted one (small chunks, so that chunks can be
swapped and dropped).
"""

import base64
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from rich.console import Console

from lmloom.artifacts.store import ArtifactStore
from lmloom.config import load_recipe
from lmloom.context import RunContext
from lmloom.errors import IntegrityError
from lmloom.pipeline import run_recipe
from lmloom.security.context import store_security

QUIET = Console(file=open(os.devnull, "w"))  # noqa: SIM115

TINY_DEFAULT_RUN = """
name: tiny-default
security: {{encrypt: {encrypt}}}
stages:
  corpus:
    stage: data.prepare
    config:
      sources: [{{type: text-dir, path: {corpus}, patterns: ["*.py"]}}]
      val_fraction: 0.2
  tokenizer: {{stage: tokenizer.train, inputs: {{corpus: corpus}}, config: {{vocab_size: 300}}}}
  shards: {{stage: tokenizer.encode, inputs: {{corpus: corpus, tokenizer: tokenizer}}}}
  pretrain:
    stage: train.pretrain
    inputs: {{shards: shards, tokenizer: tokenizer}}
    config:
      model: {{seq_len: 16, d_model: 16, n_layers: 1, n_heads: 2}}
      batch_size: 2
      max_steps: 3
      precision: fp32
      compile: false
      eval_windows: 2
      final_eval_windows: 2
  samples:
    stage: serve.samples
    inputs: {{checkpoint: pretrain}}
    config: {{prompts: ["def "], max_new_tokens: 4}}
"""

KINDS = ["corpus", "tokenizer", "shards", "checkpoint", "samples"]
CHUNK = 64  # encrypted mode: tiny chunks, so every file has several
HEADER, TAG_AND_NONCE = 20, 28  # lmloom.security.encryption's file layout
KEK = base64.b64encode(bytes(range(32))).decode()
ENCRYPTED_ENV = {"LMLOOM_KEK": KEK, "LMLOOM_ENCRYPTION_CHUNK_SIZE": str(CHUNK)}


def run_cli(store, *args, env=None):
    env = {**os.environ, **(env or {}), "LMLOOM_HOME": str(store), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "lmloom", *args], env=env, capture_output=True, text=True)


def make_run(tmp_path_factory, encrypted):
    env = ENCRYPTED_ENV if encrypted else {}
    corpus = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "shlex.py", "fnmatch.py", "bisect.py", "heapq.py"):
        shutil.copyfile(stdlib / name, corpus / name)
    recipe = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    recipe.write_text(TINY_DEFAULT_RUN.format(corpus=corpus, encrypt=str(encrypted).lower()))
    store = tmp_path_factory.mktemp("store")
    if encrypted:
        assert run_cli(store, "keys", "init", env=env).returncode == 0
    proc = run_cli(store, "run", str(recipe), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return store, recipe, env


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    return make_run(tmp_path_factory, encrypted=False)


@pytest.fixture(scope="module")
def encrypted_run(tmp_path_factory):
    return make_run(tmp_path_factory, encrypted=True)


def by_kind(store_root):
    found = {}
    for folder in (Path(store_root) / "artifacts").iterdir():
        manifest = json.loads((folder / "manifest.json").read_text())
        found[manifest["kind"]] = (folder, manifest)
    return found


def largest_file(manifest):
    return max(manifest["files"], key=lambda name: manifest["files"][name]["size"])


def flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:-1])


def append(path):
    path.write_bytes(path.read_bytes() + b"\n")


def empty(path):
    path.write_bytes(b"")


TAMPERS = {"flip a byte": flip, "truncate": truncate, "append": append, "empty the file": empty}


def copy_of(run, tmp_path, monkeypatch):
    store, recipe, env = run
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    return copy, recipe


@pytest.fixture(params=["plain", "encrypted"])
def fresh(request, tmp_path, monkeypatch):
    return copy_of(request.getfixturevalue(f"{request.param}_run"), tmp_path, monkeypatch)


@pytest.fixture
def fresh_encrypted(encrypted_run, tmp_path, monkeypatch):
    return copy_of(encrypted_run, tmp_path, monkeypatch)


def assert_refused(store_root, artifact_dir, manifest, file_name, recipe):
    store = ArtifactStore(store_root, security=store_security(store_root))
    with pytest.raises(IntegrityError) as exc:
        store.open(artifact_dir.name)
    message = str(exc.value)
    assert artifact_dir.name[:12] in message and manifest["kind"] in message
    assert file_name in message
    # Nothing consumes it: re-running the recipe (its reuse or its next stage reads it) stops there,
    # and no new artifact appears.
    before = sorted(p.name for p in (Path(store_root) / "artifacts").iterdir())
    with pytest.raises(IntegrityError, match=file_name):
        run_recipe(load_recipe(str(recipe)), RunContext(store, console=QUIET))
    assert sorted(p.name for p in (Path(store_root) / "artifacts").iterdir()) == before


@pytest.mark.parametrize("tamper", TAMPERS)
@pytest.mark.parametrize("kind", KINDS)
def test_altered_file_is_refused_and_not_consumed(fresh, kind, tamper):
    store_root, recipe = fresh
    folder, manifest = by_kind(store_root)[kind]
    name = largest_file(manifest)
    TAMPERS[tamper](folder / name)
    assert_refused(store_root, folder, manifest, name, recipe)


@pytest.mark.parametrize("kind", KINDS)
def test_file_replaced_by_another_artifacts_file_is_refused(fresh, kind):
    store_root, recipe = fresh
    artifacts = by_kind(store_root)
    folder, manifest = artifacts[kind]
    name = largest_file(manifest)
    other_kind = KINDS[(KINDS.index(kind) + 1) % len(KINDS)]
    other_folder, other_manifest = artifacts[other_kind]
    shutil.copyfile(other_folder / largest_file(other_manifest), folder / name)
    assert_refused(store_root, folder, manifest, name, recipe)


@pytest.mark.parametrize("kind", KINDS)
def test_deleted_file_is_refused(fresh, kind):
    store_root, recipe = fresh
    folder, manifest = by_kind(store_root)[kind]
    name = largest_file(manifest)
    (folder / name).unlink()
    assert_refused(store_root, folder, manifest, name, recipe)


@pytest.mark.parametrize("kind", KINDS)
def test_added_file_is_refused(fresh, kind):
    store_root, recipe = fresh
    folder, manifest = by_kind(store_root)[kind]
    (folder / "smuggled.bin").write_bytes(b"payload")
    assert_refused(store_root, folder, manifest, "smuggled.bin", recipe)


@pytest.mark.parametrize("kind", KINDS)
def test_edited_manifest_is_refused(fresh, kind):
    store_root, recipe = fresh
    folder, manifest = by_kind(store_root)[kind]
    edited = dict(manifest, principal="mallory@elsewhere")
    (folder / "manifest.json").write_text(json.dumps(edited, sort_keys=True, separators=(",", ":")))
    assert_refused(store_root, folder, manifest, "manifest.json", recipe)


def chunk_spans(path):
    """Byte spans of the encrypted chunks of a file (its header says how big the plaintext is)."""
    data = path.read_bytes()
    assert data[:6] == b"LMLENC", "expected an encrypted file"
    size = int.from_bytes(data[12:20], "little")
    spans, offset = [], HEADER
    for i in range(max(1, -(-size // CHUNK))):
        length = min(CHUNK, size - i * CHUNK) + TAG_AND_NONCE
        spans.append((offset, offset + length))
        offset += length
    return data, spans


def swap_chunks(path):
    data, spans = chunk_spans(path)
    (a0, a1), (b0, b1) = spans[0], spans[1]  # two full chunks: same length, so only order changes
    path.write_bytes(data[:a0] + data[b0:b1] + data[a0:a1] + data[b1:])


def drop_chunk(path):
    data, spans = chunk_spans(path)
    start, stop = spans[1]
    path.write_bytes(data[:start] + data[stop:])


@pytest.mark.parametrize("tamper", [swap_chunks, drop_chunk], ids=["reorder chunks", "drop a chunk"])
@pytest.mark.parametrize("kind", KINDS)
def test_reordered_or_dropped_encrypted_chunks_are_refused(fresh_encrypted, kind, tamper):
    store_root, recipe = fresh_encrypted
    folder, manifest = by_kind(store_root)[kind]
    assert manifest["encryption"] is not None
    name = largest_file(manifest)
    tamper(folder / name)
    assert_refused(store_root, folder, manifest, name, recipe)


def test_every_artifact_of_the_encrypted_run_is_encrypted(encrypted_run, plain_run):
    assert all(m["encryption"] is not None for _, m in by_kind(encrypted_run[0]).values())
    assert all(m["encryption"] is None for _, m in by_kind(plain_run[0]).values())
    assert sorted(by_kind(encrypted_run[0])) == sorted(KINDS)
