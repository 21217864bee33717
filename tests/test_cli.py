"""The command line as a user meets it: real subprocesses, real files, exit codes, no tracebacks."""

import json
import os
import subprocess
import sys

import pytest


def lmloom(store, *args, check=None):
    env = {**os.environ, "LMLOOM_HOME": str(store), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "lmloom", *args], capture_output=True, text=True, env=env)
    assert "Traceback" not in proc.stderr, proc.stderr
    if check is not None:
        assert proc.returncode == check, proc.stdout + proc.stderr
    return proc


@pytest.fixture
def jsonl(tmp_path):
    good = [{"text": f"record number {i} has enough words to be kept by the length filter"} for i in range(6)]
    lines = [json.dumps(r).encode() for r in good]
    lines.insert(2, b"{not json")
    lines.insert(3, b'{"text": "bad utf8 \xff\xfe here"}')
    lines.insert(4, b'{"body": "no text field"}')
    lines.insert(5, b'{"text": 42}')
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def data_recipe(tmp_path, source, extra=""):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"name: data-only\nstages:\n  corpus:\n    stage: data.prepare\n    config:\n"
        f"      sources: [{source}]\n      min_chars: 20\n{extra}"
    )
    return str(path)


def test_help_teaches(tmp_path):
    out = lmloom(tmp_path, "--help", check=0).stdout
    for command in ("run", "generate", "artifacts", "audit", "recipes", "stages"):
        assert command in out
    assert "--set" in lmloom(tmp_path, "run", "--help", check=0).stdout
    # Arguments' own help is shown too (typer < 0.26 with click >= 8.5 silently dropped it).
    assert "Artifact id or unique prefix" in lmloom(tmp_path, "artifacts", "show", "--help", check=0).stdout


def test_malformed_jsonl_is_quarantined_and_counted(tmp_path, jsonl):
    store = tmp_path / "store"
    proc = lmloom(store, "run", data_recipe(tmp_path, f"{{type: jsonl, path: {jsonl}}}"), check=0)
    assert "documents kept" in proc.stdout and "6 of 6" in proc.stdout
    assert "rejected records" in proc.stdout and "4 (" in proc.stdout
    for reason in ("invalid-json", "invalid-utf8", "missing-field", "field-not-string"):
        assert reason in proc.stdout
    artifact = next((store / "artifacts").iterdir())
    rejects = [json.loads(line) for line in (artifact / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in rejects) == sorted(
        ["invalid-json", "invalid-utf8", "missing-field", "field-not-string"]
    )
    assert all(r["location"].startswith(str(jsonl)) for r in rejects)


def test_empty_corpus_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = lmloom(
        tmp_path / "store", "run", data_recipe(tmp_path, f"{{type: text-dir, path: {empty}}}"), check=1
    )
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no documents")


def test_unknown_key_is_one_line(tmp_path):
    proc = lmloom(tmp_path / "store", "run", "--set", "corpus.min_chars_typo=3", check=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "stages.corpus.config.min_chars_typo: unknown key (value 3); allowed:" in lines[0]
    assert "min_chars" in lines[0]


def test_bad_value_names_key_value_and_rule(tmp_path):
    proc = lmloom(tmp_path / "store", "run", "--set", "tokenizer.vocab_size=many", check=2)
    assert "stages.tokenizer.config.vocab_size = 'many': Input should be a valid integer" in proc.stderr


def test_artifact_commands_and_tamper_detection(tmp_path, jsonl):
    store = tmp_path / "store"
    lmloom(store, "run", data_recipe(tmp_path, f"{{type: jsonl, path: {jsonl}}}"), check=0)
    artifact = next((store / "artifacts").iterdir())
    short = artifact.name[:12]
    assert short in lmloom(store, "artifacts", "ls", check=0).stdout
    shown = lmloom(store, "artifacts", "show", short, check=0).stdout
    assert '"kind": "corpus"' in shown and '"sha256"' in shown
    assert "corpus" in lmloom(store, "artifacts", "lineage", short, check=0).stdout
    assert "1 artifacts verified" in lmloom(store, "artifacts", "verify", check=0).stdout

    target = artifact / "val.jsonl" if (artifact / "val.jsonl").stat().st_size else artifact / "train.jsonl"
    data = bytearray(target.read_bytes())
    data[0] ^= 0x01
    target.write_bytes(bytes(data))
    proc = lmloom(store, "artifacts", "verify", check=3)
    assert f"file {target.name} does not match its sha256" in proc.stdout


def test_audit_verify_and_show(tmp_path, jsonl):
    store = tmp_path / "store"
    lmloom(store, "run", data_recipe(tmp_path, f"{{type: jsonl, path: {jsonl}}}"), check=0)
    assert "audit log ok: 2 entries" in lmloom(store, "audit", "verify", check=0).stdout
    assert "stage.start" in lmloom(store, "audit", "show", check=0).stdout
    log = store / "audit.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(lines[1] + lines[0])
    proc = lmloom(store, "audit", "verify", check=3)
    assert "entry 1 (line 1)" in proc.stderr


@pytest.mark.parametrize("ref", ["[/x]abcd", "[bold]abcd"])
def test_error_lines_print_what_the_user_typed_literally(tmp_path, ref):
    """An error quoting a bracketed argument: no markup error, nothing of it swallowed as a style tag."""
    (tmp_path / "store").mkdir()
    proc = lmloom(tmp_path / "store", "artifacts", "show", ref, check=1)
    assert f"no artifact with id '{ref}'" in proc.stderr
