"""The tamper matrix: every artifact kind of a (tiny) default run x every way to alter it at rest.

Each alteration must be refused on read with an error naming the artifact and the file, and nothing
may consume the altered artifact: re-running the recipe (whose next stages read it) fails too.
"""

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

QUIET = Console(file=open(os.devnull, "w"))  # noqa: SIM115

TINY_DEFAULT_RUN = """
name: tiny-default
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


def run_cli(store, *args):
    env = {**os.environ, "LMLOOM_HOME": str(store), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "lmloom", *args], env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "shlex.py", "fnmatch.py", "bisect.py", "heapq.py"):
        shutil.copyfile(stdlib / name, corpus / name)
    recipe = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    recipe.write_text(TINY_DEFAULT_RUN.format(corpus=corpus))
    store = tmp_path_factory.mktemp("store")
    proc = run_cli(store, "run", str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return store, recipe


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


@pytest.fixture
def fresh(tiny_run, tmp_path):
    store, recipe = tiny_run
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    return copy, recipe


def assert_refused(store_root, artifact_dir, manifest, file_name, recipe):
    store = ArtifactStore(store_root)
    with pytest.raises(IntegrityError) as exc:
        store.open(artifact_dir.name)
    message = str(exc.value)
    assert artifact_dir.name[:12] in message and manifest["kind"] in message
    assert file_name in message
    # Nothing consumes it: re-running the recipe (its reuse or its next stage reads it) stops there,
    # and no new artifact appears.
    before = sorted(p.name for p in (Path(store_root) / "artifacts").iterdir())
    with pytest.raises(IntegrityError, match=file_name):
        run_recipe(load_recipe(str(recipe)), RunContext(ArtifactStore(store_root), console=QUIET))
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
