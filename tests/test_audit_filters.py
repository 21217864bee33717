"""`lmloom audit show` filters (principal, event, artifact, time) and its --json output for tooling."""

import json
from datetime import datetime, timedelta, timezone

import pytest
from typer.testing import CliRunner

from lmloom.cli import app
from lmloom.security.audit import AuditLog, AuditQuery

CORPUS = "c0ffee" + "1" * 58
TOKENIZER = "beef00" + "2" * 58
runner = CliRunner()


@pytest.fixture
def store(tmp_path):
    store = tmp_path / "store"
    log = AuditLog(store / "audit.jsonl")
    log.append("stage.start", "alice@host-a", step="corpus", inputs=[])
    log.append("stage.end", "alice@host-a", step="corpus", outcome="ok", outputs=[CORPUS], seconds=1.5)
    log.append("stage.start", "bob@host-b", step="tok", inputs=[CORPUS])
    log.append("stage.end", "bob@host-b", step="tok", outcome="ok", outputs=[TOKENIZER], seconds=0.5)
    log.append("security.read_refused", "bob@host-b", artifact=TOKENIZER[:8], error="IntegrityError")
    log.append("security.denied", "carol", action="`audit show`", permission="read-audit")
    log.append("stage.reuse", "alice", step="corpus", outputs=[CORPUS])
    return store


def show(store, *args):
    env = {"LMLOOM_HOME": str(store), "LMLOOM_TOKEN": None, "LMLOOM_POLICY": None, "COLUMNS": "200"}
    result = runner.invoke(app, ["audit", "show", *args], env=env)
    return result


def shown(store, *args):
    result = show(store, "--json", *args)
    assert result.exit_code == 0, result.output
    return [(e["seq"], e["event"]) for e in json.loads(result.stdout)]


def test_json_is_every_entry_unabridged(store):
    result = show(store, "--json")
    entries = json.loads(result.stdout)
    assert [e["seq"] for e in entries] == list(range(7))
    assert entries == list(AuditLog(store / "audit.jsonl").entries())  # hash, prev and all fields
    assert "single-user" not in result.output  # reading is not acting: no notice, stdout is pure JSON


def test_principal_matches_exactly_or_a_user_on_any_host(store):
    assert shown(store, "--principal", "alice") == [(0, "stage.start"), (1, "stage.end"), (6, "stage.reuse")]
    assert shown(store, "--principal", "alice@host-a") == [(0, "stage.start"), (1, "stage.end")]
    assert shown(store, "--principal", "ali") == []
    assert shown(store, "--principal", "carol") == [(5, "security.denied")]


def test_event_is_a_prefix(store):
    assert shown(store, "--event", "security.") == [(4, "security.read_refused"), (5, "security.denied")]
    assert shown(store, "--event", "stage.end") == [(1, "stage.end"), (3, "stage.end")]


def test_artifact_finds_inputs_outputs_and_refusals_by_id_or_prefix(store):
    corpus = [(1, "stage.end"), (2, "stage.start"), (6, "stage.reuse")]
    assert shown(store, "--artifact", CORPUS) == corpus
    assert shown(store, "--artifact", CORPUS[:12]) == corpus
    assert shown(store, "--artifact", CORPUS[:12].upper()) == corpus
    # the refused read recorded the short reference the user typed; the full id still finds it
    assert shown(store, "--artifact", TOKENIZER) == [(3, "stage.end"), (4, "security.read_refused")]
    assert shown(store, "--artifact", "ffff") == []


def test_filters_combine(store):
    assert shown(store, "--principal", "bob", "--event", "stage.", "--artifact", CORPUS) == [
        (2, "stage.start")
    ]


def test_since_and_until_are_inclusive_iso_bounds(store):
    entries = list(AuditLog(store / "audit.jsonl").entries())
    third = entries[2]["time"]
    # entries written within one clock tick share a time: the bounds are inclusive of all of them
    at = datetime.fromisoformat(third)
    same = [e["seq"] for e in entries if datetime.fromisoformat(e["time"]) == at]
    after = [e["seq"] for e in entries if datetime.fromisoformat(e["time"]) >= at]
    before = [e["seq"] for e in entries if datetime.fromisoformat(e["time"]) <= at]
    assert 2 in same and after[-1] == 6 and before[0] == 0
    assert [seq for seq, _ in shown(store, "--since", third)] == after
    assert [seq for seq, _ in shown(store, "--until", third)] == before
    naive_utc = at.astimezone(timezone.utc).replace(tzinfo=None).isoformat()
    assert [seq for seq, _ in shown(store, "--since", naive_utc, "--until", naive_utc)] == same
    today = datetime.fromisoformat(third).date()
    assert len(shown(store, "--since", str(today), "--until", str(today))) == 7  # a date is its whole day
    assert shown(store, "--until", str(today - timedelta(days=1))) == []
    assert shown(store, "--since", str(today + timedelta(days=1))) == []


def test_bad_time_is_a_usage_error_naming_the_option(store):
    result = show(store, "--since", "yesterday")
    assert result.exit_code == 2
    assert "--since" in result.output and "not an ISO date" in result.output


def test_table_shows_security_details_and_counts_hidden_entries(store):
    log = AuditLog(store / "audit.jsonl")
    for i in range(60):
        log.append("stage.reuse", "alice", step=f"s{i}", outputs=[CORPUS])
    table = show(store).stdout
    assert "s59" in table and "s9 " not in table  # the last 50 by default
    assert "17 earlier entries not shown" in table
    denied = show(store, "--event", "security.denied").stdout
    assert "permission read-audit" in denied and "carol" in denied
    assert len(json.loads(show(store, "--json", "--event", "stage.reuse").stdout)) == 61  # --json: all
    assert len(json.loads(show(store, "--json", "--last", "5").stdout)) == 5


def test_query_object_for_tooling(store):
    query = AuditQuery(event="security.", since=datetime.now(timezone.utc) - timedelta(hours=1))
    assert [e["event"] for e in query.select(AuditLog(store / "audit.jsonl").entries())] == [
        "security.read_refused",
        "security.denied",
    ]
    assert not AuditQuery(principal="x").matches({"event": "stage.start"})
    assert not AuditQuery(since=datetime(2000, 1, 1)).matches({"time": "not a time"})
