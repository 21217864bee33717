"""data.prepare as a whole: the step chain from a recipe, the record of every removal and edit,
sensitive sources, worker-count independence, mixtures, and `lmloom data stats`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmloom.artifacts.store import ArtifactStore
from lmloom.config import Recipe
from lmloom.context import RunContext
from lmloom.data.documents import Document
from lmloom.data.mixture import MixtureConfig, MixturePlan
from lmloom.pipeline import run_recipe


def recipe(config):
    return Recipe(name="t", stages={"corpus": {"stage": "data.prepare", "config": config}})


def read_jsonl(artifact, name):
    return [json.loads(line) for line in artifact.read_bytes(name).decode().splitlines()]


@pytest.fixture
def two_sources(tmp_path):
    prose, code = tmp_path / "prose", tmp_path / "code"
    prose.mkdir()
    code.mkdir()
    for i in range(60):
        (prose / f"p{i:02d}.txt").write_text(
            f"Prose document {i} talks about rivers and hills, at length. " * 3
        )
        (code / f"c{i:02d}.txt").write_text(f"def function_{i}(x):\n    return x * {i}  # code\n" * 2)
    (prose / "dup.txt").write_text((prose / "p07.txt").read_text())
    return prose, code


def sources(prose, code, sensitive_code=False):
    code_source = {"type": "text-dir", "path": str(code), "kind": "code", "name": "code"}
    if sensitive_code:
        code_source["sensitive"] = True
    return [{"type": "text-dir", "path": str(prose), "name": "prose"}, code_source]


def test_worker_count_does_not_change_the_corpus(tmp_path, two_sources):
    files = {}
    for workers in (1, 2):
        store = ArtifactStore(tmp_path / f"store{workers}")
        config = {"sources": sources(*two_sources), "executor": {"workers": workers, "batch_docs": 7}}
        [result] = run_recipe(recipe(config), RunContext(store))
        art = result.artifact
        files[workers] = {name: art.read_bytes(name) for name in art.manifest.files}
        steps = [{k: v for k, v in s.items() if k != "seconds"} for s in art.manifest.metadata["steps"]]
        files[workers]["steps"] = json.dumps(steps).encode()
    assert files[1] == files[2]


def test_removed_documents_keep_their_text_unless_the_source_is_sensitive(tmp_path, two_sources):
    prose, code = two_sources
    (code / "dup_code.txt").write_text((code / "c03.txt").read_text())
    config = {"sources": sources(prose, code, sensitive_code=True), "executor": {"workers": 1}}
    [result] = run_recipe(recipe(config), RunContext(ArtifactStore(tmp_path / "s")))
    removed = {r["id"]: r for r in read_jsonl(result.artifact, "removed.jsonl")}
    # files are read in path order: dup.txt comes first, so its twin p07.txt is the duplicate
    assert removed["p07.txt"]["step"] == "dedup" and removed["p07.txt"]["reason"] == "duplicate"
    assert "rivers and hills" in removed["p07.txt"]["text"]
    assert removed["dup_code.txt"]["reason"] == "duplicate" and "text" not in removed["dup_code.txt"]


def test_mixture_hits_its_target_shares_by_bytes(tmp_path, two_sources):
    config = {
        "sources": sources(*two_sources),
        "executor": {"workers": 1},
        "mixture": {"by": "kind", "weights": {"prose": 3, "code": 1}},
    }
    [result] = run_recipe(recipe(config), RunContext(ArtifactStore(tmp_path / "s")))
    meta = result.artifact.manifest.metadata
    groups = meta["mixture"]["groups"]
    assert groups["prose"]["rate"] == 1.0 and groups["code"]["rate"] < 1.0
    assert abs(groups["prose"]["effective_share"] - 0.75) < 0.06
    removed = read_jsonl(result.artifact, "removed.jsonl")
    sampled_out = [r for r in removed if r["reason"] == "mixture.sampled_out"]
    assert sampled_out and all(r["step"] == "mixture" for r in sampled_out)
    assert meta["documents"]["kept"] == groups["prose"]["documents_after"] + groups["code"]["documents_after"]
    assert "mixture" in [s["name"] for s in meta["steps"]]


def test_upsampling_repeats_documents_deterministically():
    config = MixtureConfig(by="kind", weights={"prose": 1, "code": 1}, mode="upsample")
    plan = MixturePlan.from_sizes(config, {"prose": 1000, "code": 400})
    assert plan.rates["prose"] == 1.0 and plan.rates["code"] == 2.5
    docs = [Document(str(i), "x", "code", "s") for i in range(2000)]
    copies = [plan.copies(d) for d in docs]
    assert set(copies) == {2, 3} and abs(sum(copies) / len(docs) - 2.5) < 0.05
    assert copies == [plan.copies(d) for d in docs]


def test_a_weighted_group_without_documents_is_a_clear_error():
    from lmloom.errors import DataError

    with pytest.raises(DataError, match="no documents left in web"):
        MixturePlan.from_sizes(MixtureConfig(weights={"web": 1, "books": 1}), {"books": 10})


def test_data_stats_prints_the_per_step_table(tmp_path, two_sources):
    store_root = tmp_path / "s"
    config = {"sources": sources(*two_sources), "executor": {"workers": 1}}
    [result] = run_recipe(recipe(config), RunContext(ArtifactStore(store_root)))
    env = {**os.environ, "LMLOOM_HOME": str(store_root), "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "lmloom", "data", "stats", result.artifact.id[:10]],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert "normalize" in proc.stdout and "dedup" in proc.stdout and "duplicate 1" in proc.stdout
    assert "read 121 documents, kept 120" in proc.stdout
    as_json = subprocess.run(
        [sys.executable, "-m", "lmloom", "data", "stats", result.artifact.id[:10], "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert json.loads(as_json.stdout)["documents"]["kept"] == 120


def test_ray_executor_makes_the_same_corpus_as_local_workers(tmp_path, two_sources):
    ray = pytest.importorskip("ray")
    files = {}
    steps = [{"type": "whitespace"}, {"type": "markup"}]
    try:
        for executor in ({"workers": 2}, {"type": "ray", "workers": 2, "batch_docs": 16}):
            store = ArtifactStore(tmp_path / executor.get("type", "local"))
            config = {"sources": sources(*two_sources), "steps": steps, "executor": executor}
            [result] = run_recipe(recipe(config), RunContext(store))
            art = result.artifact
            files[executor.get("type", "local")] = {name: art.read_bytes(name) for name in art.manifest.files}
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert files["ray"] == files["local"]


def test_poisoning_scan_in_the_stage_reports_and_removes_planted_documents(tmp_path):
    from test_poisoning import poisoned_corpus

    docs, trigger_ids, span_ids = poisoned_corpus()
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": d.id, "text": d.text}) + "\n" for d in docs))
    config = {
        "sources": [{"type": "jsonl", "path": str(path), "id_field": "id"}],
        "executor": {"workers": 1},
        "poisoning": {"remove": True, "scan": {"table_width": 1 << 18}},
    }
    [result] = run_recipe(recipe(config), RunContext(ArtifactStore(tmp_path / "s")))
    art = result.artifact
    removed = {r["id"]: r["reason"] for r in read_jsonl(art, "removed.jsonl") if r["step"] == "poisoning"}
    assert removed == {
        **dict.fromkeys(trigger_ids, "poisoning.trigger"),
        **dict.fromkeys(span_ids, "poisoning.repeated_span"),
    }
    kept = {r["id"] for r in read_jsonl(art, "train.jsonl") + read_jsonl(art, "val.jsonl")}
    assert not kept & (trigger_ids | span_ids)
    findings = art.manifest.metadata["poisoning"]["findings"]
    assert {f["kind"] for f in findings} == {"trigger", "repeated_span"}
    assert not list((tmp_path / "s").rglob("spool.jsonl"))  # the scratch copy is gone


def test_data_export_copies_the_corpus_and_audits_it(tmp_path, two_sources):
    store_root = tmp_path / "s"
    config = {"sources": sources(*two_sources), "executor": {"workers": 1}}
    [result] = run_recipe(recipe(config), RunContext(ArtifactStore(store_root)))
    env = {**os.environ, "LMLOOM_HOME": str(store_root), "COLUMNS": "200"}
    target = tmp_path / "exported"
    proc = subprocess.run(
        [sys.executable, "-m", "lmloom", "data", "export", result.artifact.id[:10], str(target)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert (target / "train.jsonl").read_bytes() == result.artifact.read_bytes("train.jsonl")
    assert "sha256" in proc.stdout
    entries = [json.loads(line) for line in (store_root / "audit.jsonl").read_text().splitlines()]
    export = [e for e in entries if e["event"] == "data.export"]
    assert len(export) == 1 and export[0]["destination"] == str(target)
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmloom",
            "data",
            "export",
            result.artifact.id[:10],
            str(target),
            "-o",
            "novalue",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and "expected KEY=VALUE" in bad.stderr


def test_removed_text_is_redacted_when_the_chain_redacts_pii(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    secret_mail = "jane.roe@corp-mail.net"
    (texts / "a.txt").write_text(f"Write to {secret_mail} about the hills and rivers of the north.")
    (texts / "b.txt").write_text("short")  # dropped by min_chars, after pii
    (texts / "d.txt").write_bytes(f"bad \xff bytes from {secret_mail}".encode("latin-1"))  # a reject
    # dropped by the language step, before pii ever sees it
    (texts / "c.txt").write_text(f"Bitte schreiben Sie an {secret_mail} über die Berge und Flüsse im Norden.")
    config = {
        "sources": [{"type": "text-dir", "path": str(texts)}],
        "min_chars": 10,
        "steps": [{"type": "language", "keep": ["en"]}, {"type": "pii"}],
        "executor": {"workers": 1},
    }
    [result] = run_recipe(recipe(config), RunContext(ArtifactStore(tmp_path / "s")))
    art = result.artifact
    removed = read_jsonl(art, "removed.jsonl")
    assert {r["step"] for r in removed} == {"language", "min_chars"}
    everything = b"".join(art.read_bytes(name) for name in art.manifest.files)
    assert secret_mail.encode() not in everything
    assert any("<EMAIL>" in r["text"] for r in removed)
    [reject] = read_jsonl(art, "rejects.jsonl")
    assert reject["reason"] == "invalid-utf8" and "<EMAIL>" in reject["excerpt"]
