import json
import os

import pytest

from lmloom.artifacts.hashing import sha256_bytes
from lmloom.artifacts.store import ArtifactStore
from lmloom.errors import IntegrityError, LmloomError


def make_artifact(store, files, kind="corpus", inputs=None, config=None):
    writer = store.create(kind=kind, stage="test.stage", config=config or {"a": 1}, inputs=inputs)
    for name, data in files.items():
        path = writer.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    writer.metadata["note"] = "hello"
    return writer.commit()


def test_commit_records_hashes_and_id_is_manifest_hash(tmp_path):
    store = ArtifactStore(tmp_path)
    art = make_artifact(store, {"a.txt": b"alpha", "sub/b.bin": b"\x00\x01"})
    raw = (art.path / "manifest.json").read_bytes()
    assert art.id == sha256_bytes(raw)
    manifest = json.loads(raw)
    assert manifest["files"]["a.txt"] == {"sha256": sha256_bytes(b"alpha"), "size": 5}
    assert manifest["files"]["sub/b.bin"]["size"] == 2
    assert manifest["kind"] == "corpus" and manifest["stage"] == "test.stage"
    assert manifest["tool"]["name"] == "lmloom" and manifest["created"]
    reopened = store.open(art.id[:8])
    assert reopened.id == art.id and reopened.manifest.metadata == {"note": "hello"}


def test_staging_leaves_nothing_visible_until_commit(tmp_path):
    store = ArtifactStore(tmp_path)
    writer = store.create(kind="corpus", stage="s", config={})
    (writer.path / "x").write_text("partial")
    assert store.ids() == []
    writer.abort()
    assert store.ids() == [] and not writer.path.exists()


@pytest.mark.parametrize("name", ["a.txt", "sub/b.bin"])
def test_flipping_one_byte_of_any_file_is_named(tmp_path, name):
    store = ArtifactStore(tmp_path)
    art = make_artifact(store, {"a.txt": b"alpha", "sub/b.bin": b"\x00\x01"})
    path = art.path / name
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=name):
        store.open(art.id)


def test_edited_manifest_is_refused(tmp_path):
    store = ArtifactStore(tmp_path)
    art = make_artifact(store, {"a.txt": b"alpha"})
    path = art.path / "manifest.json"
    path.write_bytes(path.read_bytes().replace(b"hello", b"jello"))
    with pytest.raises(IntegrityError, match="manifest.json"):
        store.open(art.id)


def test_added_and_deleted_files_are_refused(tmp_path):
    store = ArtifactStore(tmp_path)
    art = make_artifact(store, {"a.txt": b"alpha", "b.txt": b"beta"})
    (art.path / "extra.txt").write_text("smuggled")
    with pytest.raises(IntegrityError, match="extra.txt"):
        store.open(art.id)
    os.remove(art.path / "extra.txt")
    os.remove(art.path / "b.txt")
    with pytest.raises(IntegrityError, match="b.txt is missing"):
        store.open(art.id)


def test_resolve_prefixes(tmp_path):
    store = ArtifactStore(tmp_path)
    art = make_artifact(store, {"a.txt": b"alpha"})
    assert store.resolve(art.id[:6]) == art.id
    with pytest.raises(LmloomError, match="no artifact"):
        store.resolve("ffffffff" if not art.id.startswith("ffff") else "00000000")
    with pytest.raises(LmloomError, match="too short"):
        store.resolve("ab")


def test_lineage_walks_inputs(tmp_path):
    store = ArtifactStore(tmp_path)
    corpus = make_artifact(store, {"a.txt": b"alpha"})
    tok = make_artifact(store, {"t.json": b"{}"}, kind="tokenizer", inputs={"corpus": corpus.id})
    shards = make_artifact(
        store, {"s.bin": b"\x01"}, kind="shards", inputs={"corpus": corpus.id, "tokenizer": tok.id}
    )
    walk = [(depth, role, aid) for depth, role, aid, _ in store.lineage(shards.id)]
    assert walk == [
        (0, "", shards.id),
        (1, "corpus", corpus.id),
        (1, "tokenizer", tok.id),
        (2, "corpus", corpus.id),
    ]


def test_stage_key_index(tmp_path):
    store = ArtifactStore(tmp_path)
    writer = store.create(kind="corpus", stage="s", config={}, stage_key="k" * 64)
    (writer.path / "f").write_text("x")
    art = writer.commit()
    assert store.find_by_stage_key("k" * 64) == art.id
    assert store.find_by_stage_key("z" * 64) is None
