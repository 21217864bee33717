"""Encryption at rest: the chunked AES-256-GCM codec, its tamper resistance, the store and checkpoints."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import struct

import numpy as np
import pytest
import torch

from lmloom.artifacts.store import ArtifactStore
from lmloom.errors import IntegrityError, LmloomError, SecurityError
from lmloom.security.context import LmloomSecurity
from lmloom.security.encryption import (
    CHUNK_OVERHEAD,
    HEADER_SIZE,
    SCHEME,
    ChunkedAesGcmCodec,
    stored_size,
)
from lmloom.security.keyring import Keyring, LocalKek, generate_kek

CHUNK = 64
DEK = bytes(range(32))


def writer_codec(chunk=CHUNK) -> ChunkedAesGcmCodec:
    return ChunkedAesGcmCodec.for_writing("dek-test", DEK, chunk_size=chunk)


def reader_of(codec: ChunkedAesGcmCodec, where="artifact abc123 (shards)", dek=DEK) -> ChunkedAesGcmCodec:
    return ChunkedAesGcmCodec.from_header(codec.header(), lambda _id: dek, where)


def seal(codec, path, name, data: bytes, piece: int | None = None) -> None:
    with codec.open_write(path, name) as handle:
        if piece is None:
            handle.write(data)
        else:
            for i in range(0, len(data), piece):
                handle.write(data[i : i + piece])


def read(codec, path, name) -> bytes:
    with codec.open_read(path, name) as handle:
        return handle.read()


# -- round trips and random access ---------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 5 * CHUNK, 5 * CHUNK + 7])
@pytest.mark.parametrize("piece", [None, 1, 7, CHUNK, 3 * CHUNK + 5])
def test_round_trip_of_any_size_written_in_any_pieces(tmp_path, size, piece):
    data = os.urandom(size)
    codec = writer_codec()
    seal(codec, tmp_path / "f.bin", "f.bin", data, piece)
    reader = reader_of(codec)
    assert (tmp_path / "f.bin").stat().st_size == stored_size(size, CHUNK)
    assert stored_size(size, CHUNK) == HEADER_SIZE + CHUNK_OVERHEAD * max(1, -(-size // CHUNK)) + size
    assert reader.plaintext_size(tmp_path / "f.bin", "f.bin") == size
    assert read(reader, tmp_path / "f.bin", "f.bin") == data


def test_random_sizes_and_random_access_reads_equal_plaintext_slices(tmp_path):
    rng = random.Random(7)
    codec = writer_codec()
    reader = reader_of(codec)
    for trial in range(12):
        size = rng.randrange(0, 20 * CHUNK)
        data = rng.randbytes(size)
        name = f"dir/file-{trial}.bin"
        seal(codec, tmp_path / name, name, data, rng.choice([None, 3, 50, 200]))
        with reader.open_read(tmp_path / name, name) as handle:
            assert handle.seekable()
            for _ in range(40):
                start = rng.randrange(0, size + 5)
                length = rng.randrange(0, 3 * CHUNK)
                handle.seek(start)
                assert handle.read(length) == data[start : start + length]
                if start <= size:
                    assert handle.tell() == min(start + length, size)
            handle.seek(-3, io.SEEK_END)
            assert handle.read() == data[max(0, size - 3) :]
            buf = bytearray(10)
            handle.seek(1)
            n = handle.readinto(buf)
            assert bytes(buf[:n]) == data[1:11]


def test_lines_and_text_reading_cross_chunk_boundaries(tmp_path):
    text = "".join(f"line {i} " + "x" * (i % 90) + "\n" for i in range(200))
    codec = writer_codec()
    wrapper = io.TextIOWrapper(codec.open_write(tmp_path / "t.jsonl", "t.jsonl"), encoding="utf-8")
    wrapper.write(text)
    wrapper.close()
    reader = reader_of(codec)
    with reader.open_read(tmp_path / "t.jsonl", "t.jsonl") as handle:
        assert [line.decode() for line in handle] == text.splitlines(keepends=True)
    with io.TextIOWrapper(reader.open_read(tmp_path / "t.jsonl", "t.jsonl"), encoding="utf-8") as handle:
        assert handle.read() == text


def test_the_header_names_what_a_reader_needs_and_no_key(tmp_path):
    codec = writer_codec()
    header = codec.header()
    assert header == {
        "scheme": SCHEME,
        "dek": "dek-test",
        "chunk_size": CHUNK,
        "binding": codec.binding.hex(),
    }
    assert DEK.hex() not in repr(codec) and DEK.hex() not in json.dumps(header)
    assert codec.plain_path(tmp_path / "x") is None
    assert writer_codec().binding != codec.binding  # a fresh binding per writer


# -- tampering: every change is refused, naming the file, before any byte is returned -------------


def make_pair(tmp_path, sizes=(5 * CHUNK + 9, 5 * CHUNK + 9)):
    """Two files of one artifact, plus the same name in a second artifact."""
    codec, other_artifact = writer_codec(), writer_codec()
    datas = [os.urandom(s) for s in sizes]
    seal(codec, tmp_path / "a.bin", "a.bin", datas[0])
    seal(codec, tmp_path / "b.bin", "b.bin", datas[1])
    (tmp_path / "other").mkdir()
    seal(other_artifact, tmp_path / "other" / "a.bin", "a.bin", datas[0])
    return codec, datas


def chunk_span(i: int, size: int, chunk=CHUNK) -> tuple[int, int]:
    n = max(1, -(-size // chunk))
    start = HEADER_SIZE + i * (chunk + CHUNK_OVERHEAD)
    length = (size - (n - 1) * chunk if i == n - 1 else chunk) + CHUNK_OVERHEAD
    return start, start + length


def expect_refused(reader, path, name="a.bin", error=IntegrityError):
    with pytest.raises(error) as info:
        with reader.open_read(path, name) as handle:
            handle.read()
    message = str(info.value)
    assert "artifact abc123 (shards): file " + name in message, message
    assert "InvalidTag" not in message and info.value.__cause__ is None
    return message


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_anywhere_is_refused(tmp_path):
    codec, (data, _) = make_pair(tmp_path)
    reader = reader_of(codec)
    original = (tmp_path / "a.bin").read_bytes()
    offsets = list(range(HEADER_SIZE))  # magic, chunk size, length
    for i in range(6):
        start, stop = chunk_span(i, len(data))
        offsets += [
            start,
            start + 11,
            start + 12,
            (start + stop) // 2,
            stop - 17,
            stop - 1,
        ]  # nonce, body, tag
    for offset in offsets:
        (tmp_path / "a.bin").write_bytes(original)
        flip(tmp_path / "a.bin", offset)
        expect_refused(reader, tmp_path / "a.bin")


def test_a_flip_is_caught_by_a_random_access_read_of_that_chunk(tmp_path):
    codec, (data, _) = make_pair(tmp_path)
    start, stop = chunk_span(2, len(data))
    flip(tmp_path / "a.bin", start + 20)
    with reader_of(codec).open_read(tmp_path / "a.bin", "a.bin") as handle:
        handle.seek(0)
        assert handle.read(CHUNK) == data[:CHUNK]  # untouched chunks still read
        handle.seek(2 * CHUNK + 3)
        with pytest.raises(IntegrityError, match=r"file a\.bin: encrypted chunk 2 failed authentication"):
            handle.read(4)


def test_truncation_and_extension_are_refused_at_open(tmp_path):
    codec, (data, _) = make_pair(tmp_path)
    reader = reader_of(codec)
    path = tmp_path / "a.bin"
    original = path.read_bytes()
    last_start, _ = chunk_span(5, len(data))
    cases = {
        "one byte short": original[:-1],
        "header only": original[:HEADER_SIZE],
        "empty": b"",
        "last chunk dropped": original[:last_start],
        "one byte more": original + b"\0",
        "a chunk appended": original + original[HEADER_SIZE : HEADER_SIZE + CHUNK + CHUNK_OVERHEAD],
    }
    for stored in cases.values():
        path.write_bytes(stored)
        expect_refused(reader, path)
        with pytest.raises(IntegrityError, match=r"file a\.bin"):
            reader.plaintext_size(path, "a.bin")


def with_length(stored: bytes, size: int) -> bytes:
    return stored[:12] + struct.pack("<Q", size) + stored[HEADER_SIZE:]


def test_a_dropped_chunk_is_refused_even_with_a_consistent_header(tmp_path):
    codec, (data, _) = make_pair(tmp_path)
    original = (tmp_path / "a.bin").read_bytes()
    s1, e1 = chunk_span(1, len(data))
    dropped = with_length(original[:s1] + original[e1:], len(data) - CHUNK)
    (tmp_path / "a.bin").write_bytes(dropped)
    expect_refused(reader_of(codec), tmp_path / "a.bin")
    # Cutting the file at a chunk boundary and fixing the length: the new last chunk is not marked last.
    s5, _ = chunk_span(5, len(data))
    (tmp_path / "a.bin").write_bytes(with_length(original[:s5], 5 * CHUNK))
    expect_refused(reader_of(codec), tmp_path / "a.bin")


def test_swapped_or_reordered_chunks_are_refused(tmp_path):
    codec, (data, _) = make_pair(tmp_path)
    original = (tmp_path / "a.bin").read_bytes()
    spans = [chunk_span(i, len(data)) for i in range(6)]
    chunks = [original[s:e] for s, e in spans]
    for order in ([1, 0, 2, 3, 4], [0, 1, 3, 2, 4], [4, 3, 2, 1, 0]):
        body = b"".join(chunks[i] for i in order) + chunks[5]
        (tmp_path / "a.bin").write_bytes(original[:HEADER_SIZE] + body)
        expect_refused(reader_of(codec), tmp_path / "a.bin")


def test_chunks_replayed_from_another_file_or_another_artifact_are_refused(tmp_path):
    codec, (data, _) = make_pair(tmp_path)
    a, b = (tmp_path / "a.bin").read_bytes(), (tmp_path / "b.bin").read_bytes()
    other = (tmp_path / "other" / "a.bin").read_bytes()
    s, e = chunk_span(1, len(data))
    for source in (b, other):  # same position, same length: only the binding and name differ
        (tmp_path / "a.bin").write_bytes(a[:s] + source[s:e] + a[e:])
        expect_refused(reader_of(codec), tmp_path / "a.bin")
    for source in (b, other):  # the whole file
        (tmp_path / "a.bin").write_bytes(source)
        expect_refused(reader_of(codec), tmp_path / "a.bin")
    # and a file renamed inside the artifact
    (tmp_path / "a.bin").write_bytes(a)
    with pytest.raises(IntegrityError, match="file b.bin"):
        read(reader_of(codec), tmp_path / "a.bin", "b.bin")


def test_a_changed_encryption_header_is_refused(tmp_path):
    codec, _ = make_pair(tmp_path)
    header = codec.header()
    where = "artifact abc123 (shards)"
    for field, value in (("binding", writer_codec().binding.hex()), ("chunk_size", CHUNK * 2)):
        changed = ChunkedAesGcmCodec.from_header({**header, field: value}, lambda _id: DEK, where)
        expect_refused(changed, tmp_path / "a.bin")
    wrong_key = ChunkedAesGcmCodec.from_header(header, lambda _id: bytes(32), where)
    expect_refused(wrong_key, tmp_path / "a.bin")
    for bad in ({**header, "scheme": "rot13"}, {**header, "binding": "zz"}, {**header, "chunk_size": 0}):
        with pytest.raises(LmloomError, match="artifact abc123"):
            ChunkedAesGcmCodec.from_header(bad, lambda _id: DEK, where)


def test_an_unfinished_file_is_refused(tmp_path):
    codec = writer_codec()
    handle = codec.open_write(tmp_path / "a.bin", "a.bin")
    handle.write(b"x" * 200)
    handle._raw.close()  # the process died before closing the writer  # noqa: SLF001
    with pytest.raises(IntegrityError, match="never finished|bytes on disk"):
        read(reader_of(codec), tmp_path / "a.bin", "a.bin")


# -- the store: keyring, encrypted artifacts, token shards --------------------------------------


@pytest.fixture
def kek(monkeypatch):
    key = generate_kek()
    monkeypatch.setenv("LMLOOM_KEK", base64.b64encode(key).decode())
    for name in ("LMLOOM_KEK_FILE", "LMLOOM_KEK_PROVIDER", "LMLOOM_ENCRYPTION_CHUNK_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return key


@pytest.fixture
def store(tmp_path, kek):
    Keyring.for_store(tmp_path).init(LocalKek(kek, "test"))
    return ArtifactStore(tmp_path, security=LmloomSecurity(tmp_path, "tester"))


def test_encrypted_artifacts_round_trip_and_hold_no_plaintext(store, tmp_path):
    text = "secret corpus text that must never be on disk in the clear\n" * 100
    out = store.create(kind="corpus", stage="test", config={}, encrypt=True)
    out.write_text("train.jsonl", text)
    out.write_json("meta.json", {"secret": "value-1234567890"})
    artifact = out.commit()
    assert artifact.manifest.encryption["scheme"] == SCHEME
    assert set(artifact.manifest.encryption) == {"scheme", "dek", "chunk_size", "binding"}
    for path in artifact.path.iterdir():
        raw = path.read_bytes()
        assert b"secret" not in raw and b"value-1234567890" not in raw
    opened = store.open(artifact.id)
    assert opened.read_text("train.jsonl") == text
    assert opened.size("train.jsonl") == len(text.encode())
    assert opened.read_json("meta.json") == {"secret": "value-1234567890"}
    assert "".join(opened.lines("train.jsonl")) == text
    assert opened.plain_path("train.jsonl") is None


def test_encrypted_token_shards_read_the_same_tokens_as_plain_ones(store, monkeypatch):
    from lmloom.tokenizers.shards import ShardWriter, TokenShards

    monkeypatch.setenv("LMLOOM_ENCRYPTION_CHUNK_SIZE", "256")  # many chunks per shard
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 300, size=int(n)).tolist() for n in rng.integers(1, 60, size=80)]
    made = {}
    for encrypt in (False, True):
        out = store.create(kind="shards", stage="tokenizer.encode", config={}, encrypt=encrypt)
        with ShardWriter(out, vocab_size=300, eos_id=1, max_tokens_per_shard=500) as writer:
            writer.add_batch("train", docs)
        made[encrypt] = TokenShards(store.open(out.commit().id), "train")
    plain, secret = made[False], made[True]
    assert secret.files.manifest.encryption["chunk_size"] == 256 and secret.n_shards == plain.n_shards > 2
    for start in rng.integers(0, plain.n_tokens - 40, size=200):
        np.testing.assert_array_equal(secret.tokens(start, start + 40), plain.tokens(start, start + 40))
    assert [d.tolist() for d in secret.documents()] == docs


def test_encrypt_without_keys_tells_the_user_what_to_set(tmp_path, monkeypatch):
    for name in ("LMLOOM_KEK", "LMLOOM_KEK_FILE", "LMLOOM_KEK_PROVIDER"):
        monkeypatch.delenv(name, raising=False)
    bare = ArtifactStore(tmp_path, security=LmloomSecurity(tmp_path, "tester"))
    with pytest.raises(SecurityError, match="run `lmloom keys init`"):
        bare.create(kind="corpus", stage="test", config={}, encrypt=True)
    Keyring.for_store(tmp_path).init(LocalKek(generate_kek(), "test"))
    bare = ArtifactStore(tmp_path, security=LmloomSecurity(tmp_path, "tester"))
    with pytest.raises(SecurityError, match="LMLOOM_KEK .*LMLOOM_KEK_FILE.*LMLOOM_KEK_PROVIDER"):
        bare.create(kind="corpus", stage="test", config={}, encrypt=True)
    assert bare.create(kind="corpus", stage="test", config={}).codec.header() is None  # plain still works


def test_reading_without_or_with_a_wrong_kek_is_refused_and_audited(store, tmp_path, monkeypatch, kek):
    out = store.create(kind="corpus", stage="test", config={}, encrypt=True)
    out.write_text("a.txt", "hello")
    artifact_id = out.commit().id
    monkeypatch.delenv("LMLOOM_KEK")
    with pytest.raises(SecurityError, match=r"no key-encryption key \(KEK\) is configured"):
        ArtifactStore(tmp_path, security=LmloomSecurity(tmp_path, "x")).open(artifact_id)
    monkeypatch.setenv("LMLOOM_KEK", base64.b64encode(generate_kek()).decode())
    with pytest.raises(
        SecurityError, match=r"wrapped by KEK kek-[0-9a-f]{16}, but the configured KEK is kek-"
    ):
        ArtifactStore(tmp_path, security=LmloomSecurity(tmp_path, "x")).open(artifact_id)
    log = (tmp_path / "audit.jsonl").read_text()
    assert log.count('"security.read_refused"') == 2
    assert kek.hex() not in log and base64.b64encode(kek).decode() not in log


def test_an_artifact_whose_key_is_not_in_the_keyring_is_refused(store, tmp_path, kek):
    out = store.create(kind="corpus", stage="test", config={}, encrypt=True)
    out.write_text("a.txt", "hello")
    artifact = out.commit()
    header = {**artifact.manifest.encryption, "dek": "dek-0000000000000000"}
    with pytest.raises(SecurityError, match="key dek-0000000000000000 is not in this store's keyring"):
        ChunkedAesGcmCodec.from_header(header, store.security.keys.dek, "artifact x")


# -- scratch checkpoints of an encrypted run -----------------------------------------------------


def test_encrypted_checkpoints_hold_no_plaintext_and_resume_exactly(store, tmp_path):
    from lmloom.models.decoder import Decoder, DecoderConfig
    from lmloom.train.checkpoint import (
        CheckpointCodecs,
        TrainState,
        latest_checkpoint,
        load_checkpoint,
        save_checkpoint,
    )
    from lmloom.train.optim import OptimConfig, build_optimizer

    tiny = DecoderConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=2)
    codecs = CheckpointCodecs.from_store_security(store.security)

    def step(model, optimizer, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 64, (2, 16), generator=g)
        loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return float(loss.detach())

    torch.manual_seed(0)
    model = Decoder(tiny)
    optimizer = build_optimizer(model, OptimConfig())
    for s in range(3):
        step(model, optimizer, s)
    folder = tmp_path / "work" / "checkpoints"
    path = save_checkpoint(folder, model, optimizer, TrainState(step=3, sample=6, tokens=96), codecs=codecs)
    expected = [step(model, optimizer, s) for s in range(3, 6)]

    names = sorted(p.name for p in path.iterdir())
    assert names == [
        "checksums.json",
        "encryption.json",
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]
    weight = next(iter(model.state_dict().values())).detach().numpy().tobytes()[:64]
    for file in path.iterdir():
        raw = file.read_bytes()
        for marker in (b"dtype", b"data_offsets", b"param_groups", b"rng_torch", weight):
            assert marker not in raw, (file.name, marker[:20])
    header = json.loads((path / "encryption.json").read_text())
    assert header["scheme"] == SCHEME and "key" not in json.dumps(header).replace("dek", "")

    torch.manual_seed(123)
    fresh = Decoder(tiny)
    fresh_opt = build_optimizer(fresh, OptimConfig())
    state = load_checkpoint(latest_checkpoint(folder), fresh, fresh_opt, codecs)
    assert (state.step, state.sample, state.tokens) == (3, 6, 96)
    assert [step(fresh, fresh_opt, s) for s in range(3, 6)] == expected

    with pytest.raises(SecurityError, match="is encrypted"):
        load_checkpoint(path, fresh, fresh_opt)
    second = save_checkpoint(folder, model, optimizer, TrainState(step=4), codecs=codecs)
    assert json.loads((second / "encryption.json").read_text())["binding"] != header["binding"]
    plain = save_checkpoint(tmp_path / "plain", model, optimizer, TrainState(step=4))
    with pytest.raises(IntegrityError, match="not encrypted"):
        load_checkpoint(plain, fresh, fresh_opt, codecs)
    # Swapping encrypted files between two checkpoints and fixing checksums.json: refused by the cipher.
    (path / "model.safetensors").write_bytes((second / "model.safetensors").read_bytes())
    sums = json.loads((path / "checksums.json").read_text())
    sums["model.safetensors"] = json.loads((second / "checksums.json").read_text())["model.safetensors"]
    (path / "checksums.json").write_text(json.dumps(sums))
    with pytest.raises(IntegrityError, match="model.safetensors: encrypted chunk"):
        load_checkpoint(path, fresh, fresh_opt, codecs)


def test_a_file_altered_after_the_artifact_verified_is_refused_and_audited(store, tmp_path):
    out = store.create(kind="corpus", stage="test", config={}, encrypt=True)
    out.write_text("a.txt", "x" * 5000)
    artifact = store.open(out.commit().id)  # hashes verified here...
    flip(artifact.path / "a.txt", HEADER_SIZE + 30)  # ...then the file changes under the reader
    with pytest.raises(
        IntegrityError, match=rf"artifact {artifact.short_id} \(corpus\): file a.txt: encrypted chunk 0"
    ):
        artifact.read_text("a.txt")
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert entries[-1]["event"] == "security.decrypt_failed" and "file a.txt" in entries[-1]["detail"]
