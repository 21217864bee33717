"""Bad input to the artifact-store and security commands: one clear `error:` line, the right exit code,
no traceback, nothing created, lost or corrupted on the way."""

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import yaml
from typer.testing import CliRunner

from lmloom.artifacts.store import ArtifactStore
from lmloom.cli import app
from lmloom.security import policy as policy_module
from lmloom.security.audit import AuditLog
from lmloom.security.context import store_security

KEK = base64.b64encode(bytes(range(32))).decode()
CLEAN_ENV = ("LMLOOM_TOKEN", "LMLOOM_POLICY", "LMLOOM_PRINCIPAL", "LMLOOM_KEK", "LMLOOM_KEK_FILE")


def lmloom(store, *args, check=None, **env):
    full = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    full.update({"LMLOOM_HOME": str(store), "COLUMNS": "200", **env})
    proc = subprocess.run([sys.executable, "-m", "lmloom", *args], capture_output=True, text=True, env=full)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    if check is not None:
        assert proc.returncode == check, proc.stdout + proc.stderr
    return proc


def make_artifact(root, kind="corpus", stage="data.prepare", encrypt=False):
    store = ArtifactStore(root, security=store_security(root, "tester"))
    writer = store.create(kind=kind, stage=stage, config={}, principal="tester", encrypt=encrypt)
    writer.write_text("train.jsonl", '{"text": "hello"}\n')
    return writer.commit()


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "store"
    artifact = make_artifact(root)
    AuditLog(root / "audit.jsonl").append("stage.end", "tester", step="corpus", outcome="ok", seconds=0.1)
    return root, artifact


# -- the store path ------------------------------------------------------------------------------


def test_store_path_that_is_a_file_is_one_error(tmp_path):
    path = tmp_path / "not-a-dir"
    path.write_text("x")
    proc = lmloom(path, "artifacts", "ls", check=1)
    assert proc.stderr.startswith("error: cannot use") and "give a directory" in proc.stderr
    assert path.read_text() == "x"


def test_read_only_commands_do_not_create_a_missing_store(tmp_path):
    missing = tmp_path / "typo"
    for args in (("artifacts", "ls"), ("artifacts", "verify"), ("audit", "verify"), ("audit", "show")):
        proc = lmloom(missing, *args, check=1)
        assert "no artifact store at" in proc.stderr and str(missing) in proc.stderr
    assert not missing.exists()


def test_stray_folder_in_artifacts_does_not_stop_ls_or_verify(store):
    root, artifact = store
    (root / "artifacts" / "ABCDEF").mkdir()  # not an id: not an artifact
    (root / "artifacts" / "xy").mkdir()
    assert artifact.short_id in lmloom(root, "artifacts", "ls", check=0).stdout
    proc = lmloom(root, "artifacts", "verify", check=0)
    assert f"ok   {artifact.short_id}" in proc.stdout and "1 artifacts verified" in proc.stdout


def test_index_entry_that_is_not_an_id_is_no_cached_result(store):
    root, _ = store
    (root / "index" / "stage-keys" / "k").write_text("../index")  # edited by hand: a folder, not an id
    assert ArtifactStore(root).find_by_stage_key("k") is None


def test_malformed_manifest_is_named_cleanly(store):
    root, artifact = store
    (artifact.path / "manifest.json").write_text("{bad")
    proc = lmloom(root, "artifacts", "show", artifact.id[:8], check=3)
    assert "malformed manifest (Invalid JSON" in proc.stderr and "(: " not in proc.stderr


def test_ls_keeps_its_columns_beside_a_damaged_artifact(store):
    root, artifact = store
    (artifact.path / "manifest.json").write_text("{bad")
    proc = lmloom(root, "artifacts", "ls", check=0, COLUMNS="100")
    header = proc.stdout.strip().splitlines()[0]
    assert "created (UTC)" in header and "…" not in header
    assert "string at line 1" in proc.stdout  # the whole message, wrapped, not cut off


def test_verify_names_the_artifact_when_the_key_is_missing(tmp_path, monkeypatch):
    root = tmp_path / "store"
    monkeypatch.setenv("LMLOOM_KEK", KEK)
    lmloom(root, "keys", "init", check=0, LMLOOM_KEK=KEK)
    artifact = make_artifact(root, encrypt=True)
    proc = lmloom(root, "artifacts", "verify", check=4)  # no KEK in this process
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert artifact.short_id in line and "KEK" in line


# -- report --------------------------------------------------------------------------------------


def test_report_out_that_is_a_directory_or_under_a_file_is_one_error(store, tmp_path):
    root, artifact = store
    proc = lmloom(root, "report", artifact.short_id, "-o", str(tmp_path), check=2)
    assert "is a directory; give a file name" in proc.stderr
    blocker = tmp_path / "afile"
    blocker.write_text("keep me")
    proc = lmloom(root, "report", artifact.short_id, "-o", str(blocker / "r.html"), check=2)
    assert "is a file, not a directory" in proc.stderr and blocker.read_text() == "keep me"


# -- audit ---------------------------------------------------------------------------------------


def test_audit_show_survives_damaged_lines(store):
    root, _ = store
    log = AuditLog(root / "audit.jsonl")
    log.append("stage.end", "tester", step="after", outcome="ok")
    lines = log.path.read_text().splitlines(keepends=True)
    lines[0] = lines[0][:40] + "\n"  # cut mid-entry
    lines.insert(1, "[1, 2]\n")  # JSON, but no entry
    log.path.write_text("".join(lines))
    proc = lmloom(root, "audit", "show", "--last", "0", check=0)
    assert proc.stdout.count("audit.damaged") == 2 and "line 1 is not a valid entry" in proc.stdout
    assert "after" in proc.stdout  # the intact entries are still shown
    entries = json.loads(lmloom(root, "audit", "show", "--json", check=0).stdout)
    assert [e["event"] for e in entries] == ["audit.damaged", "audit.damaged", "stage.end"]
    assert "line 1" in lmloom(root, "audit", "verify", check=3).stderr


def test_audit_show_negative_last_is_refused(store):
    root, _ = store
    assert "Invalid value for '--last'" in lmloom(root, "audit", "show", "--last", "-3", check=2).stderr


def test_audit_show_prints_names_literally(store):
    root, _ = store
    AuditLog(root / "audit.jsonl").append("test.event", "[/bold]", detail="[red]hidden", seconds="x")
    proc = lmloom(root, "audit", "show", check=0)
    assert "[/bold]" in proc.stdout and "[red]hidden" in proc.stdout and "xs" in proc.stdout


def test_principal_with_brackets_is_shown_literally(store):
    root, _ = store
    proc = lmloom(root, "keys", "list", check=4, LMLOOM_PRINCIPAL="[/bold]")
    assert "allowed for [/bold])" in proc.stderr
    assert lmloom(root, "policy", "whoami", check=0, LMLOOM_PRINCIPAL="[red]eve").stdout.startswith(
        "[red]eve"
    )


def test_unreadable_audit_log_is_one_error(store):
    root, _ = store
    (root / "audit.jsonl").unlink()
    (root / "audit.jsonl").mkdir()
    assert "the log cannot be read" in lmloom(root, "audit", "verify", check=3).stderr
    assert "cannot be read" in lmloom(root, "audit", "show", check=3).stderr
    (root / "audit.jsonl").rmdir()
    (root / "audit.head.json").unlink()
    (root / "audit.head.json").mkdir()
    assert "head file audit.head.json is damaged" in lmloom(root, "audit", "verify", check=3).stderr


def test_audit_verify_is_not_fooled_by_an_append_in_progress(store, monkeypatch):
    """An append writes its entry, then the head: a verify that read the log before the entry and the
    head after it reported the log truncated. Here an append lands exactly between the two reads."""
    root, _ = store
    real_check_head = AuditLog._check_head

    def append_meanwhile(self, count, last_hash):
        writer = threading.Thread(target=lambda: AuditLog(self.path).append("stage.start", "other"))
        writer.start()
        writer.join(timeout=1.0)  # with the fix it waits for this verify to finish
        return real_check_head(self, count, last_hash)

    monkeypatch.setattr(AuditLog, "_check_head", append_meanwhile)
    env = {"LMLOOM_HOME": str(root), "LMLOOM_TOKEN": None, "LMLOOM_POLICY": None, "COLUMNS": "200"}
    result = CliRunner().invoke(app, ["audit", "verify"], env=env)
    assert result.exit_code == 0, result.output
    assert "audit log ok" in result.output


# -- keys ----------------------------------------------------------------------------------------


def test_kek_file_cannot_enter_the_store_by_dotdot_or_symlink(store, tmp_path):
    root, _ = store
    (tmp_path / "other").mkdir()
    (tmp_path / "link").symlink_to(root)
    for target in (tmp_path / "other" / ".." / "store" / "kek", tmp_path / "link" / "kek"):
        proc = lmloom(root, "keys", "init", "--generate-kek-file", str(target), check=4)
        assert "is inside the store" in proc.stderr
    assert not (root / "kek").exists() and not (root / "security" / "keyring.json").exists()


def test_generate_kek_file_under_a_file_is_one_error(store, tmp_path):
    root, _ = store
    blocker = tmp_path / "afile"
    blocker.write_text("keep me")
    proc = lmloom(root, "keys", "init", "--generate-kek-file", str(blocker / "kek"), check=4)
    assert "is a file, not a folder" in proc.stderr and blocker.read_text() == "keep me"
    assert not (root / "security" / "keyring.json").exists()


# -- policy --------------------------------------------------------------------------------------


def test_policy_token_print_only_prints_a_line_that_loads(store):
    root, _ = store
    lmloom(root, "policy", "init", check=0)
    proc = lmloom(root, "policy", "token", "ci", "--print-only", "-r", "trainer", "-r", "evaluator", check=0)
    [line] = [line for line in proc.stderr.splitlines() if "tokens:" in line]
    assert yaml.safe_load(line.strip())["ci"]["roles"] == ["trainer", "evaluator"]
    proc = lmloom(root, "policy", "token", "ci", "--print-only", "-r", "bogus", check=2)
    assert "--role bogus: unknown role" in proc.stderr and "lml_" not in proc.stdout


def test_concurrent_tokens_are_all_kept(store, monkeypatch):
    root, _ = store
    lmloom(root, "policy", "init", check=0)
    path = root / "security" / "policy.yaml"
    real_read = policy_module._read_yaml

    def slow_read(p):  # widen the window between reading the policy and writing it back
        raw = real_read(p)
        time.sleep(0.2)
        return raw

    monkeypatch.setattr(policy_module, "_read_yaml", slow_read)
    tokens = [policy_module.mint_token() for _ in range(3)]
    threads = [
        threading.Thread(target=policy_module.add_token, args=(path, f"bot{i}", ["trainer"], token))
        for i, token in enumerate(tokens)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    policy = policy_module.load_policy(path)
    assert [policy.principal_for_token(token) for token in tokens] == ["bot0", "bot1", "bot2"]


# -- signing and export --------------------------------------------------------------------------


def test_signing_init_with_a_bad_trust_name_creates_nothing(store):
    root, _ = store
    proc = lmloom(root, "signing", "init", "--trust-as", "bad name", check=4)
    assert "invalid signer name 'bad name'" in proc.stderr
    assert not (root / "security" / "signing").exists()
    assert "key id" in lmloom(root, "signing", "init", "--trust-as", "ok-name", check=0).stdout


def test_export_set_with_unparsable_yaml_is_one_error(tmp_path):
    root = tmp_path / "store"
    checkpoint = make_artifact(root, kind="checkpoint", stage="train.pretrain")
    proc = lmloom(root, "export", "hf", checkpoint.short_id, "--set", "dtype=[1", check=2)
    assert "stages.hf.config.dtype = '[1'" in proc.stderr


def test_signing_key_that_is_a_folder_is_named_as_such(store, tmp_path):
    root, artifact = store
    proc = lmloom(root, "artifacts", "sign", artifact.short_id, check=4, LMLOOM_SIGNING_KEY=str(tmp_path))
    assert f"signing key {tmp_path} is not a file" in proc.stderr


def test_policy_naming_a_principal_twice_is_refused(store):
    root, _ = store
    lmloom(root, "policy", "init", check=0)
    path = root / "security" / "policy.yaml"
    user = yaml.safe_load(path.read_text())["principals"].popitem()[0]
    # the later entry would silently win: the reader of the first one is misled
    path.write_text(
        f"version: 1\nprincipals:\n  {user}: {{roles: [auditor]}}\n  {user}: {{roles: [admin]}}\n"
    )
    proc = lmloom(root, "artifacts", "ls", check=2)
    assert f"duplicate key '{user}'" in proc.stderr and "line 4" in proc.stderr


def test_lineage_names_a_deleted_input(tmp_path):
    root = tmp_path / "store"
    corpus = make_artifact(root)
    store = ArtifactStore(root)
    writer = store.create(kind="tokenizer", stage="tokenizer.train", config={}, inputs={"corpus": corpus.id})
    writer.write_text("tokenizer.json", "{}")
    tokenizer = writer.commit()
    shutil.rmtree(corpus.path)
    proc = lmloom(root, "artifacts", "lineage", tokenizer.short_id, check=3)
    assert f"artifact {tokenizer.short_id} (tokenizer) was made from corpus {corpus.short_id}" in proc.stderr
    assert "not in the store" in proc.stderr


def test_policy_init_file_under_a_file_is_one_error(store, tmp_path):
    root, _ = store
    blocker = tmp_path / "afile"
    blocker.write_text("keep me")
    proc = lmloom(root, "policy", "init", "--file", str(blocker / "policy.yaml"), check=2)
    assert "cannot write the policy to" in proc.stderr and blocker.read_text() == "keep me"


def test_api_key_with_zero_lifetime_is_refused_not_made_eternal(store):
    root, _ = store
    proc = lmloom(root, "keys", "api", "create", "--expires", "0d", check=2)
    assert "--expires '0d'" in proc.stderr and "llm-" not in proc.stdout
    assert "no gateway API keys" in lmloom(root, "keys", "api", "list", check=0).stdout


def test_api_key_list_prints_names_literally(store):
    root, _ = store
    lmloom(root, "keys", "api", "create", "--name", "[/x]", check=0)
    assert "[/x]" in lmloom(root, "keys", "api", "list", check=0).stdout
