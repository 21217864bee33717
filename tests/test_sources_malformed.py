"""Malformed input is quarantined with its reason while everything else is read."""

from __future__ import annotations

import gzip
import hashlib
import json
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmloom.data.documents import Document, Reject
from lmloom.data.provenance import SourceLedger
from lmloom.data.sources import JsonlSource, ParquetSource, TextDirSource, read_source


def split(records):
    records = list(records)
    return [r for r in records if isinstance(r, Document)], [r for r in records if isinstance(r, Reject)]


def records(n):
    return b"".join(json.dumps({"text": f"record number {i}"}).encode() + b"\n" for i in range(n))


def test_truncated_gzip_keeps_what_was_read_and_rejects_the_rest(tmp_path):
    data = gzip.compress(records(3000))
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "fine.jsonl").write_bytes(records(2))
    ledger = SourceLedger("s", "jsonl")
    docs, rejects = split(read_source(JsonlSource(path=tmp_path), ledger=ledger))
    cut = [d for d in docs if d.meta["file"] == "cut.jsonl.gz"]
    assert 0 < len(cut) < 3000 and [d.meta["file"] for d in docs].count("fine.jsonl") == 2
    assert [r.reason for r in rejects] == ["unreadable-file"]
    assert rejects[0].location == f"{tmp_path / 'cut.jsonl.gz'}:{len(cut) + 1}"
    assert ledger.files[0].sha256 == hashlib.sha256(data[: len(data) // 2]).hexdigest()


def test_truncated_zstd_is_noticed_not_silently_shortened(tmp_path):
    data = zstandard.ZstdCompressor().compress(records(30000))  # several 128 KiB blocks
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(data[: len(data) // 2])
    ledger = SourceLedger("s", "jsonl")
    docs, rejects = split(read_source(JsonlSource(path=path), ledger=ledger))
    assert 0 < len(docs) < 30000 and docs[0].text == "record number 0"
    assert [r.reason for r in rejects] == ["unreadable-file"]
    assert "truncated zstd" in rejects[0].detail
    assert ledger.files[0].size == len(data) // 2


def test_corrupt_zstd_is_unreadable(tmp_path):
    (tmp_path / "junk.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"\xff" * 64)
    (tmp_path / "ok.jsonl").write_bytes(records(1))
    docs, rejects = split(read_source(JsonlSource(path=tmp_path)))
    assert [d.text for d in docs] == ["record number 0"]
    assert [r.reason for r in rejects] == ["unreadable-file"]


def test_bad_parquet_is_rejected_and_the_next_file_is_read(tmp_path):
    (tmp_path / "a_bad.parquet").write_bytes(b"PAR1 this is not really parquet PAR1")
    pq.write_table(pa.table({"text": ["good row"]}), tmp_path / "b_good.parquet")
    whole = tmp_path / "c_cut.parquet"
    pq.write_table(pa.table({"text": ["x" * 100] * 100}), whole)
    whole.write_bytes(whole.read_bytes()[:-40])  # footer gone
    ledger = SourceLedger("s", "parquet")
    docs, rejects = split(read_source(ParquetSource(path=tmp_path), ledger=ledger))
    assert [d.text for d in docs] == ["good row"]
    assert [(r.location.rsplit("/", 1)[1], r.reason) for r in rejects] == [
        ("a_bad.parquet:row 0", "unreadable-file"),
        ("c_cut.parquet:row 0", "unreadable-file"),
    ]
    assert all(r.detail for r in rejects)
    assert all(f.sha256 for f in ledger.files)  # damaged files are still recorded with their bytes


def test_binary_and_invalid_utf8_files_in_a_text_dir(tmp_path):
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (tmp_path / "noise.txt").write_bytes(bytes(range(128, 256)) * 8)  # no NUL, but not text
    (tmp_path / "typo.txt").write_bytes(b"fine line\nbad \xff byte\n")
    (tmp_path / "good.txt").write_text("plain good text")
    docs, rejects = split(read_source(TextDirSource(path=tmp_path)))
    assert [d.id for d in docs] == ["good.txt"]
    assert [(r.location.rsplit("/", 1)[1], r.reason) for r in rejects] == [
        ("image.txt", "binary-file"),
        ("noise.txt", "binary-file"),
        ("typo.txt:2", "invalid-utf8"),
    ]


@pytest.mark.parametrize("name", ["huge.jsonl", "huge.jsonl.zst"])
def test_a_100_mb_line_is_rejected_without_holding_it_in_memory(tmp_path, name):
    path = tmp_path / name
    with open(path, "wb") as raw:
        # written in 1 MiB pieces (through zstd for .zst), so the test itself never holds the line
        handle = zstandard.ZstdCompressor().stream_writer(raw) if name.endswith(".zst") else raw
        handle.write(b'{"text": "before"}\n{"text": "')
        chunk = b"a" * (1 << 20)
        for _ in range(100):
            handle.write(chunk)
        handle.write(b'"}\n{"text": "after"}\n')
        if handle is not raw:
            handle.flush(zstandard.FLUSH_FRAME)
    tracemalloc.start()
    try:
        docs, rejects = split(read_source(JsonlSource(path=path)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [d.text for d in docs] == ["before", "after"]
    assert [(r.location, r.reason) for r in rejects] == [(f"{path}:2", "record-too-large")]
    assert "104,857," in rejects[0].detail  # the size it had, measured while skipping
    # bounded by max_record_bytes (16 MiB) plus read buffers, far from the line's 100 MiB
    # (measured: ~33 MiB plain, ~42 MiB for .zst, whose 3 kB of input inflate in small steps)
    assert peak < 50 << 20, f"peak {peak / 2**20:.1f} MiB"


def test_max_record_bytes_is_configurable_and_also_bounds_gzip(tmp_path):
    path = tmp_path / "long.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "' + b"b" * 5000 + b'"}\n{"text": "short"}\n'))
    docs, rejects = split(read_source(JsonlSource(path=path, max_record_bytes=1000)))
    assert [d.text for d in docs] == ["short"]
    assert [r.reason for r in rejects] == ["record-too-large"]
