"""Sources and the corpus sink on fsspec URLs: a real S3 API (moto's server on 127.0.0.1) and memory://."""

from __future__ import annotations

import gzip
import hashlib
import io
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moto.server import ThreadedMotoServer
from pydantic import ValidationError

from lmloom.artifacts.store import ArtifactStore
from lmloom.config import Recipe
from lmloom.context import RunContext
from lmloom.data.documents import Document, Reject
from lmloom.data.provenance import SourceLedger
from lmloom.data.sinks import export_corpus
from lmloom.data.sources import JsonlSource, ParquetSource, TextDirSource, read_source, source_fingerprint
from lmloom.errors import IntegrityError
from lmloom.pipeline import run_recipe

SECRET = "s3cr3t-value-never-stored"


def split(records):
    records = list(records)
    return [r for r in records if isinstance(r, Document)], [r for r in records if isinstance(r, Reject)]


def sha256(data):
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def s3_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """A fresh bucket with jsonl, jsonl.gz and parquet objects; returns (endpoint, fs, objects)."""
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    fs = fsspec.filesystem("s3", endpoint_url=s3_endpoint, skip_instance_cache=True)
    bucket = f"corpus-{id(monkeypatch) % 10**8}"
    fs.mkdir(bucket)
    table = io.BytesIO()
    pq.write_table(pa.table({"body": [f"parquet row {i}" for i in range(5)]}), table, row_group_size=2)
    objects = {
        "data/a.jsonl": b"".join(json.dumps({"text": f"plain {i}"}).encode() + b"\n" for i in range(3)),
        "data/sub/b.jsonl.gz": gzip.compress(b'{"text": "zipped"}\nnot json\n'),
        "data/.hidden/c.jsonl": b'{"text": "hidden"}\n',
        "tables/t.parquet": table.getvalue(),
        "pages/p.txt": b"a page of text",
    }
    for key, data in objects.items():
        fs.pipe(f"{bucket}/{key}", data)
    return s3_endpoint, fs, bucket, objects


def test_jsonl_from_s3_with_provenance_of_the_objects(s3):
    endpoint, _, bucket, objects = s3
    ledger = SourceLedger("s3", "jsonl")
    cfg = JsonlSource(path=f"s3://{bucket}/data/", storage_options={"endpoint_url": endpoint})
    assert cfg.path == f"s3://{bucket}/data"  # URLs stay URLs (no trailing slash), never made local
    docs, rejects = split(read_source(cfg, ledger=ledger))
    assert [(d.id, d.text) for d in docs] == [
        ("a.jsonl:1", "plain 0"), ("a.jsonl:2", "plain 1"), ("a.jsonl:3", "plain 2"), ("sub/b.jsonl.gz:1", "zipped"),
    ]  # fmt: skip
    assert [(r.location, r.reason) for r in rejects] == [
        (f"s3://{bucket}/data/sub/b.jsonl.gz:2", "invalid-json")
    ]
    assert [(f.path, f.relpath, f.sha256, f.size) for f in ledger.files] == [
        (
            f"s3://{bucket}/data/a.jsonl",
            "a.jsonl",
            sha256(objects["data/a.jsonl"]),
            len(objects["data/a.jsonl"]),
        ),
        (
            f"s3://{bucket}/data/sub/b.jsonl.gz",
            "sub/b.jsonl.gz",
            sha256(objects["data/sub/b.jsonl.gz"]),
            len(objects["data/sub/b.jsonl.gz"]),
        ),
    ]


def test_parquet_and_text_dir_from_s3(s3):
    endpoint, _, bucket, objects = s3
    options = {"endpoint_url": endpoint}
    ledger = SourceLedger("pq", "parquet")
    cfg = ParquetSource(path=f"s3://{bucket}/tables/t.parquet", text_column="body", storage_options=options)
    docs, _ = split(read_source(cfg, ledger=ledger))
    assert [d.text for d in docs] == [f"parquet row {i}" for i in range(5)]
    assert ledger.files[0].sha256 == sha256(objects["tables/t.parquet"])
    [page] = read_source(TextDirSource(path=f"s3://{bucket}/pages", storage_options=options))
    assert (page.id, page.text) == ("p.txt", "a page of text")


def test_pins_and_fingerprint_on_s3(s3):
    endpoint, fs, bucket, objects = s3
    options = {"endpoint_url": endpoint}
    good = sha256(objects["data/a.jsonl"])
    pinned = JsonlSource(path=f"s3://{bucket}/data/a.jsonl", sha256=good, storage_options=options)
    assert len(split(read_source(pinned))[0]) == 3
    with pytest.raises(IntegrityError, match="does not match its pin"):
        list(read_source(pinned.model_copy(update={"sha256": "0" * 64})))
    missing = JsonlSource(path=f"s3://{bucket}/data", pins={"gone.jsonl": good}, storage_options=options)
    with pytest.raises(IntegrityError, match="gone.jsonl is missing"):
        list(read_source(missing))
    cfg = JsonlSource(path=f"s3://{bucket}/data", storage_options=options)
    before = source_fingerprint(cfg)
    assert source_fingerprint(cfg) == before
    fs.pipe(f"{bucket}/data/a.jsonl", b'{"text": "changed"}\n')
    assert source_fingerprint(cfg) != before  # size and etag of the object changed


def test_secrets_only_as_env_references_and_never_stored(s3, monkeypatch, tmp_path):
    endpoint, _, bucket, _ = s3
    with pytest.raises(ValidationError) as refused:
        JsonlSource(path=f"s3://{bucket}/data", storage_options={"endpoint_url": endpoint, "secret": SECRET})
    assert SECRET not in str(refused.value) and "env:" in str(refused.value)

    monkeypatch.setenv("LMLOOM_TEST_KEY", "testing")
    monkeypatch.setenv("LMLOOM_TEST_SECRET", SECRET)
    options = {
        "endpoint_url": endpoint,
        "key": "${env:LMLOOM_TEST_KEY}",
        "secret": "${env:LMLOOM_TEST_SECRET}",
    }
    source = {"type": "jsonl", "path": f"s3://{bucket}/data", "storage_options": options}
    store = ArtifactStore(tmp_path / "store")
    recipe = Recipe(
        name="s3",
        stages={"corpus": {"stage": "data.prepare", "config": {"sources": [source], "min_chars": 1}}},
    )
    [result] = run_recipe(recipe, RunContext(store))
    assert result.artifact.manifest.metadata["documents"]["kept"] == 4
    stored = b"".join(p.read_bytes() for p in (tmp_path / "store").rglob("*") if p.is_file())
    assert SECRET.encode() not in stored and b"${env:LMLOOM_TEST_SECRET}" in stored

    # export the corpus to S3 and read it back
    written = export_corpus(result.artifact, f"s3://{bucket}/export/", {"endpoint_url": endpoint})
    fs = fsspec.filesystem("s3", endpoint_url=endpoint, skip_instance_cache=True)
    for entry in written:
        data = fs.cat_file(f"{bucket}/export/{entry.name}")
        assert data == result.artifact.read_bytes(entry.name)
        assert (entry.url, entry.sha256, entry.size) == (
            f"s3://{bucket}/export/{entry.name}",
            sha256(data),
            len(data),
        )
    assert [e.name for e in written] == ["train.jsonl", "val.jsonl"]


def test_memory_urls_and_a_local_export(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/mem-corpus/x.jsonl", b'{"text": "in memory"}\n')
    ledger = SourceLedger("m", "jsonl")
    [doc] = read_source(JsonlSource(path="memory://mem-corpus"), ledger=ledger)
    assert doc.text == "in memory" and ledger.files[0].path == "memory://mem-corpus/x.jsonl"
    local = JsonlSource(path=f"file://{tmp_path}/x.jsonl")
    assert str(local.path) == f"{tmp_path}/x.jsonl"  # file:// URLs are local paths
