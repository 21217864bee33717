import json

import pytest

from lmloom.errors import IntegrityError
from lmloom.security.audit import AuditLog


@pytest.fixture
def log(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl")
    for i in range(5):
        audit.append("stage.start", "alice@host", step=f"s{i}", inputs=[], config_hash="c" * 64)
    return audit


def lines(log):
    return log.path.read_bytes().splitlines(keepends=True)


def write(log, new_lines):
    log.path.write_bytes(b"".join(new_lines))


def test_fresh_log_verifies(log):
    report = log.verify()
    assert report.ok and report.entries == 5
    entries = list(log.entries())
    assert [e["seq"] for e in entries] == [0, 1, 2, 3, 4]
    assert entries[1]["prev"] == entries[0]["hash"]
    assert entries[0]["principal"] == "alice@host" and entries[0]["step"] == "s0"


def test_empty_log_verifies(tmp_path):
    assert AuditLog(tmp_path / "audit.jsonl").verify().ok


@pytest.mark.parametrize("index", range(5))
def test_editing_one_byte_of_any_entry_names_it(log, index):
    content = lines(log)
    line = content[index]
    pos = line.index(b'"step": "s') + len(b'"step": "s')
    content[index] = line[:pos] + b"X" + line[pos + 1 :]
    write(log, content)
    report = log.verify()
    assert not report.ok
    assert report.problem.seq == index and report.problem.line == index + 1
    assert "edited" in str(report.problem)


def test_flipping_a_byte_that_breaks_json_names_the_line(log):
    content = lines(log)
    content[2] = content[2][:5] + b"\xff" + content[2][6:]
    write(log, content)
    problem = log.verify().problem
    assert problem.line == 3 and "not a valid JSON" in problem.reason


@pytest.mark.parametrize("index", range(4))
def test_deleting_a_line_names_the_entry_after_it(log, index):
    content = lines(log)
    del content[index]
    write(log, content)
    problem = log.verify().problem
    assert problem is not None and problem.line == index + 1
    assert "deleted or reordered" in problem.reason


def test_swapping_two_lines_is_detected(log):
    content = lines(log)
    content[1], content[3] = content[3], content[1]
    write(log, content)
    problem = log.verify().problem
    assert problem.line == 2 and problem.seq == 3


def test_truncating_the_tail_is_detected(log):
    content = lines(log)
    write(log, content[:3])
    problem = log.verify().problem
    assert problem is not None and "truncated" in problem.reason and problem.seq == 3


def test_truncating_everything_is_detected(log):
    write(log, [])
    assert "truncated" in log.verify().problem.reason


def test_rewritten_chain_with_stale_head_is_detected(log):
    # An attacker who rewrites the last entry and recomputes its hash still disagrees with the head.
    from lmloom.security.audit import entry_hash

    content = lines(log)
    last = json.loads(content[-1])
    last["step"] = "forged"
    last["hash"] = entry_hash(last)
    content[-1] = (json.dumps(last) + "\n").encode()
    write(log, content)
    problem = log.verify().problem
    assert problem is not None and problem.seq == 4 and "head" in problem.reason


def test_append_refuses_to_extend_a_damaged_tail(log):
    content = lines(log)
    content[-1] = content[-1].replace(b"s4", b"s9")
    write(log, content)
    with pytest.raises(IntegrityError, match="damaged"):
        log.append("stage.start", "bob@host")


def test_appends_continue_the_chain(log):
    entry = log.append("stage.end", "bob@host", outcome="ok")
    assert entry["seq"] == 5
    assert log.verify().ok and log.verify().entries == 6


# -- signed head checkpoints ------------------------------------------------------------------------


@pytest.fixture
def signed_store(tmp_path, monkeypatch):
    from lmloom.security.signing import SigningKey, default_key_path
    from lmloom.security.trust import TrustStore, default_trust_dir

    for var in ("LMLOOM_SIGNING_KEY", "LMLOOM_TRUST_DIR", "LMLOOM_REQUIRE_SIGNATURES"):
        monkeypatch.delenv(var, raising=False)
    key = SigningKey.generate("ecdsa-p256")
    key.save(default_key_path(tmp_path))
    TrustStore(default_trust_dir(tmp_path)).add("local", key.public)
    return tmp_path


def signed_log(root):
    from lmloom.security.context import store_audit_log

    log = store_audit_log(root)
    for i in range(6):
        log.append("stage.end", "alice@host", step=f"s{i}", outcome="ok")
    return log


def rewrite_head_to(log, n):
    """What an attacker without the signing key can do: cut the log to n entries and fix the head."""
    kept = lines(log)[:n]
    write(log, kept)
    last = json.loads(kept[-1])
    log.head_path.write_text(json.dumps({"seq": last["seq"], "hash": last["hash"]}))


def test_signed_checkpoint_follows_every_append(signed_store):
    log = signed_log(signed_store)
    assert log.signed_head_path.exists() and log.signed_through() == 5
    assert log.verify().ok


def test_truncation_with_a_rewritten_head_is_caught_by_the_signed_checkpoint(signed_store):
    log = signed_log(signed_store)
    rewrite_head_to(log, 4)
    problem = log.verify().problem
    assert problem is not None and "signed checkpoint vouches for entries up to 5" in problem.reason


def test_removed_or_altered_or_untrusted_checkpoint_is_refused(signed_store):
    from lmloom.security.trust import TrustStore, default_trust_dir

    log = signed_log(signed_store)
    signed = json.loads(log.signed_head_path.read_text())
    forged = dict(signed, seq=3, hash=json.loads(lines(log)[3])["hash"])
    log.signed_head_path.write_text(json.dumps(forged))
    assert "does not verify" in str(log.verify().problem)

    log.signed_head_path.unlink()
    assert "signed head checkpoint audit.head.sig.json is missing" in str(log.verify().problem)

    log.append("stage.end", "alice@host")  # re-signed by the store key
    assert log.verify().ok
    TrustStore(default_trust_dir(signed_store)).remove("local")
    from lmloom.security.context import store_audit_log

    assert "not in the trust store" in str(store_audit_log(signed_store).verify().problem)


def test_without_a_signing_key_the_log_is_chained_but_unsigned(tmp_path, monkeypatch):
    monkeypatch.delenv("LMLOOM_SIGNING_KEY", raising=False)
    from lmloom.security.context import store_audit_log

    log = store_audit_log(tmp_path)
    log.append("stage.start", "bob@host")
    assert log.verify().ok and not log.signed_head_path.exists()
