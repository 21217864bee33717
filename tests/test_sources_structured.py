"""jsonl (.jsonl/.gz/.zst, dotted fields), json (arrays, a list under a key) and parquet sources."""

from __future__ import annotations

import gzip
import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmloom.data.documents import Document, Reject
from lmloom.data.provenance import SourceLedger
from lmloom.data.sources import JsonlSource, JsonSource, ParquetSource, read_source, source_fingerprint
from lmloom.errors import IntegrityError


def split(records):
    records = list(records)
    return [r for r in records if isinstance(r, Document)], [r for r in records if isinstance(r, Reject)]


def lines(n=3):
    return b"".join(
        json.dumps({"meta": {"body": f"text {i}"}, "id": f"r{i}"}).encode() + b"\n" for i in range(n)
    )


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst"])
def test_jsonl_reads_plain_gzip_and_zstd_with_a_dotted_text_field(tmp_path, name):
    data = lines()
    packed = gzip.compress(data) if name.endswith(".gz") else data
    packed = zstandard.ZstdCompressor().compress(data) if name.endswith(".zst") else packed
    path = tmp_path / name
    path.write_bytes(packed)
    ledger = SourceLedger("s", "jsonl")
    docs, rejects = split(
        read_source(JsonlSource(path=path, text_field="meta.body", id_field="id"), ledger=ledger)
    )
    assert [(d.id, d.text) for d in docs] == [("r0", "text 0"), ("r1", "text 1"), ("r2", "text 2")]
    assert rejects == [] and docs[0].meta == {"file": name, "line": 1}
    [entry] = ledger.files
    assert (entry.sha256, entry.size) == (hashlib.sha256(packed).hexdigest(), len(packed))


def test_zstd_with_several_frames_is_read_across_them(tmp_path):
    path = tmp_path / "multi.jsonl.zst"
    c = zstandard.ZstdCompressor()
    path.write_bytes(c.compress(b'{"text": "one"}\n') + c.compress(b'{"text": "two"}\n'))
    docs, rejects = split(read_source(JsonlSource(path=path)))
    assert [d.text for d in docs] == ["one", "two"] and rejects == []


def test_jsonl_sha256_pin_is_honoured(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(lines())
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(split(read_source(JsonlSource(path=path, text_field="meta.body", sha256=good)))[0]) == 3
    with pytest.raises(IntegrityError, match="does not match its pin"):
        list(read_source(JsonlSource(path=path, text_field="meta.body", sha256="0" * 64)))


def test_json_array_and_list_under_a_key(tmp_path):
    (tmp_path / "arr.json").write_text(json.dumps([{"text": "first"}, {"text": 5}, "nope"]))
    (tmp_path / "obj.json.gz").write_bytes(
        gzip.compress(json.dumps({"data": {"rows": [{"text": "inner"}]}}).encode())
    )
    docs, rejects = split(read_source(JsonSource(path=tmp_path / "arr.json")))
    assert [(d.id, d.text, d.meta) for d in docs] == [
        ("arr.json:0", "first", {"file": "arr.json", "index": 0})
    ]
    assert [(r.location, r.reason) for r in rejects] == [
        (f"{tmp_path / 'arr.json'}:[1]", "field-not-string"),
        (f"{tmp_path / 'arr.json'}:[2]", "not-an-object"),
    ]
    docs, rejects = split(read_source(JsonSource(path=tmp_path / "obj.json.gz", records_key="data.rows")))
    assert [d.text for d in docs] == ["inner"] and rejects == []
    # an object read without records_key is rejected as a whole, with a hint
    _, rejects = split(read_source(JsonSource(path=tmp_path / "obj.json.gz")))
    assert rejects[0].reason == "not-an-object" and "records_key" in rejects[0].detail


def write_parquet(path, n, row_group_size=10):
    table = pa.table(
        {"id": [f"p{i}" for i in range(n)], "body": [f"row {i}" if i != 3 else None for i in range(n)]}
    )
    pq.write_table(table, path, row_group_size=row_group_size)


def test_parquet_streams_batches_with_text_and_id_columns(tmp_path):
    write_parquet(tmp_path / "t.parquet", 25)
    ledger = SourceLedger("pq", "parquet")
    cfg = ParquetSource(path=tmp_path, text_column="body", id_column="id", batch_rows=7)
    docs, rejects = split(read_source(cfg, ledger=ledger))
    assert len(docs) == 24 and docs[0].id == "p0" and docs[-1].text == "row 24"
    assert docs[5].meta == {"file": "t.parquet", "row": 6}
    assert [(r.reason, r.location) for r in rejects] == [("missing-field", f"{tmp_path / 't.parquet'}:row 3")]
    assert ledger.files[0].sha256 == hashlib.sha256((tmp_path / "t.parquet").read_bytes()).hexdigest()
    # a missing text column rejects the file, naming the columns there are
    _, rejects = split(read_source(ParquetSource(path=tmp_path, text_column="nope")))
    assert rejects[0].reason == "missing-field" and "body" in rejects[0].detail


def test_parquet_reads_one_batch_at_a_time(tmp_path, monkeypatch):
    write_parquet(tmp_path / "t.parquet", 50)
    seen = []
    real = pq.ParquetFile.iter_batches

    def spy(self, batch_size, **kwargs):
        for batch in real(self, batch_size=batch_size, **kwargs):
            seen.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    docs, _ = split(read_source(ParquetSource(path=tmp_path / "t.parquet", text_column="body", batch_rows=8)))
    assert len(docs) == 49 and max(seen) <= 8


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(lines(1))
    cfg = JsonlSource(path=tmp_path)
    before = source_fingerprint(cfg)
    assert source_fingerprint(cfg) == before
    path.write_bytes(lines(2))
    assert source_fingerprint(cfg) != before
