"""Token shards and training windows: the binary format, reads across shards, exact-resume batches, the stage."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from lmloom.artifacts.store import ArtifactStore
from lmloom.config import Recipe
from lmloom.context import RunContext
from lmloom.errors import DataError, IntegrityError, LmloomError
from lmloom.pipeline import run_recipe
from lmloom.tokenizers.bpe import load_tokenizer
from lmloom.tokenizers.loader import WindowLoader, count_windows, validation_batches
from lmloom.tokenizers.shards import ShardWriter, TokenShards, read_header, token_dtype

EOS = 1


def write_shards(directory: Path, splits: dict[str, list[list[int]]], vocab_size=100, per_shard=7) -> dict:
    with ShardWriter(directory, vocab_size=vocab_size, eos_id=EOS, max_tokens_per_shard=per_shard) as writer:
        for split, docs in splits.items():
            writer.split(split)
            for doc in docs:
                writer.add(split, doc)
    return read_header(directory)


def stream_of(docs: list[list[int]]) -> np.ndarray:
    return np.array([t for doc in docs for t in [*doc, EOS]], dtype=np.int64)


DOCS = [[5, 6, 7], [], [10] * 20, [2, 3], [99, 98, 97, 96, 95, 94], [4]]  # one longer than a shard, one empty


# -- format --------------------------------------------------------------------------------------


def test_dtype_is_uint16_up_to_65536_ids_then_uint32():
    assert token_dtype(8192) == token_dtype(65_536) == "uint16"
    assert token_dtype(65_537) == token_dtype(200_000) == "uint32"


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    docs = [[0, 65_535, 65_536, 199_999], [70_000]]
    header = write_shards(tmp_path, {"train": docs}, vocab_size=200_000, per_shard=100)
    assert header["dtype"] == "uint32"
    shard = tmp_path / header["splits"]["train"]["shards"][0]["file"]
    assert shard.stat().st_size == 4 * 7
    shards = TokenShards(tmp_path, "train")
    assert shards.document(0).tolist() == docs[0] and shards.document(1).tolist() == docs[1]


def test_small_vocabulary_is_stored_as_uint16_little_endian(tmp_path):
    header = write_shards(tmp_path, {"train": [[258, 3]]}, vocab_size=300)
    raw = (tmp_path / header["splits"]["train"]["shards"][0]["file"]).read_bytes()
    assert header["dtype"] == "uint16" and header["byte_order"] == "little"
    assert raw == bytes([2, 1, 3, 0, EOS, 0])


def test_header_records_shards_and_counts(tmp_path):
    header = write_shards(tmp_path, {"train": DOCS, "val": []})
    assert header["format"] == "lmloom.token-shards" and header["version"] == 1
    assert (header["vocab_size"], header["eos_id"], header["max_tokens_per_shard"]) == (100, EOS, 7)
    train = header["splits"]["train"]
    total = sum(len(d) + 1 for d in DOCS)
    assert (train["tokens"], train["documents"]) == (total, len(DOCS))
    assert [s["tokens"] for s in train["shards"]] == [7] * (total // 7) + ([total % 7] if total % 7 else [])
    assert [s["file"] for s in train["shards"]][:2] == ["train-00000.bin", "train-00001.bin"]
    assert header["splits"]["val"] == {"tokens": 0, "documents": 0, "index": "val.idx", "shards": []}
    index = np.fromfile(tmp_path / train["index"], dtype="<u8")
    assert index.tolist() == [0, *np.cumsum([len(d) + 1 for d in DOCS]).tolist()]


def test_reads_across_shard_boundaries_match_the_stream(tmp_path):
    write_shards(tmp_path, {"train": DOCS})
    shards = TokenShards(tmp_path, "train")
    expected = stream_of(DOCS)
    assert shards.n_tokens == len(shards) == len(expected) and shards.n_shards == math.ceil(len(expected) / 7)
    for start in range(len(expected) + 1):
        for stop in range(start, len(expected) + 1):
            assert shards.tokens(start, stop).tolist() == expected[start:stop].tolist()
    with pytest.raises(IndexError):
        shards.tokens(0, len(expected) + 1)


def test_documents_come_back_in_order_without_their_eos(tmp_path):
    write_shards(tmp_path, {"train": DOCS, "val": [[1 + 1, 3]]})
    shards = TokenShards(tmp_path, "train")
    assert shards.n_docs == len(DOCS)
    assert [d.tolist() for d in shards.documents()] == DOCS
    assert shards.document(2, with_eos=True).tolist() == [10] * 20 + [EOS]
    assert shards.document(-1).tolist() == DOCS[-1]
    assert TokenShards(tmp_path, "val").document(0).tolist() == [2, 3]
    with pytest.raises(IndexError):
        shards.document(len(DOCS))


def test_add_batch_equals_one_by_one(tmp_path):
    with ShardWriter(tmp_path / "a", vocab_size=100, eos_id=EOS, max_tokens_per_shard=5) as writer:
        written = writer.add_batch("train", [np.array(d) for d in DOCS[:3]])
        writer.add_batch("train", DOCS[3:])
    assert written.tolist() == stream_of(DOCS[:3]).tolist() and written.dtype == np.uint16
    write_shards(tmp_path / "b", {"train": DOCS}, per_shard=5)
    a, b = TokenShards(tmp_path / "a", "train"), TokenShards(tmp_path / "b", "train")
    assert a.tokens(0, a.n_tokens).tolist() == b.tokens(0, b.n_tokens).tolist()
    assert a.offsets.tolist() == b.offsets.tolist()


def test_ids_outside_the_vocabulary_are_refused(tmp_path):
    with ShardWriter(tmp_path, vocab_size=100, eos_id=EOS) as writer:
        with pytest.raises(LmloomError, match="token id 100 is outside"):
            writer.add("train", [5, 100])
        with pytest.raises(LmloomError, match="token id -1 is outside"):
            writer.add("train", [-1])


def test_no_header_is_written_when_the_writer_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, vocab_size=100, eos_id=EOS) as writer:
            writer.add("train", [5])
            raise RuntimeError("stage crashed")
    with pytest.raises(LmloomError, match="no shards.json"):
        TokenShards(tmp_path, "train")


def test_reader_names_a_missing_split_and_damaged_files(tmp_path):
    header = write_shards(tmp_path, {"train": DOCS})
    with pytest.raises(LmloomError, match="no split 'test'; splits: train"):
        TokenShards(tmp_path, "test")
    shard = tmp_path / header["splits"]["train"]["shards"][-1]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(IntegrityError, match=f"{shard.name}: .* the header says"):
        TokenShards(tmp_path, "train")
    shard.unlink()
    with pytest.raises(IntegrityError, match="is missing"):
        TokenShards(tmp_path, "train")
    (tmp_path / "shards.json").write_text(json.dumps({**header, "version": 99}))
    with pytest.raises(LmloomError, match="format version 99"):
        TokenShards(tmp_path, "train")


# -- training windows ------------------------------------------------------------------------------


@pytest.fixture()
def stream_shards(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 500, size=n).tolist() for n in rng.integers(0, 60, size=40)]
    write_shards(tmp_path, {"train": docs, "val": docs[:5]}, vocab_size=500, per_shard=97)
    return TokenShards(tmp_path, "train"), stream_of(docs)


def test_windows_overlap_by_one_token_and_targets_shift_inputs(stream_shards):
    shards, stream = stream_shards
    seq_len = 16
    windows = WindowLoader(shards, seq_len=seq_len, seed=0)
    assert windows.n_windows == (len(stream) - 1) // seq_len == count_windows(len(stream), seq_len)
    x, y = windows.batch(0, 8)
    assert x.shape == y.shape == (8, seq_len) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row, w in enumerate(windows.windows(0, 8)):
        start = int(w) * seq_len
        assert x[row].tolist() == stream[start : start + seq_len].tolist()
        assert y[row].tolist() == stream[start + 1 : start + seq_len + 1].tolist()


def test_same_seed_same_batches_and_different_seeds_differ(stream_shards):
    shards, _ = stream_shards
    a, b, c = (WindowLoader(shards, 16, seed=s) for s in (7, 7, 8))
    assert all(torch.equal(p, q) for p, q in zip(a.batch(3, 5), b.batch(3, 5), strict=True))
    assert not torch.equal(a.batch(0, 16)[0], c.batch(0, 16)[0])


def test_restart_at_any_sample_reproduces_the_uninterrupted_run(stream_shards):
    shards, _ = stream_shards
    batch_size = 6
    run = WindowLoader(shards, 16, seed=3)
    uninterrupted = [run.batch(step * batch_size, batch_size) for step in range(40)]  # several epochs
    for restart_step in (0, 1, 13, 27):
        resumed = WindowLoader(shards, 16, seed=3)  # fresh object: the state is only the sample index
        for step in range(restart_step, 40):
            x, y = resumed.batch(step * batch_size, batch_size)
            assert torch.equal(x, uninterrupted[step][0]) and torch.equal(y, uninterrupted[step][1])


def test_every_window_once_per_epoch_and_epochs_reshuffle(stream_shards):
    shards, _ = stream_shards
    windows = WindowLoader(shards, 16, seed=1)
    n = windows.n_windows
    first, second = windows.windows(0, n), windows.windows(n, n)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(n))
    assert first.tolist() != second.tolist()
    assert windows.epoch_of(n - 1) == 0 and windows.epoch_of(n) == 1
    crossing = windows.windows(n - 2, 5)  # a batch that spans the epoch boundary
    assert crossing.tolist() == [*first[-2:].tolist(), *second[:3].tolist()]
    far = windows.windows(1000 * n + 4, 3)  # epochs continue forever
    expected = np.random.Generator(np.random.PCG64([1, 1000])).permutation(n)[4:7]
    assert far.tolist() == expected.tolist()


def test_eval_batches_are_sequential_and_capped(stream_shards):
    shards, stream = stream_shards
    seq_len = 16
    batches = list(validation_batches(shards, seq_len, batch_size=4))
    n = count_windows(len(stream), seq_len)
    assert [len(x) for x, _ in batches] == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    inputs = torch.cat([x for x, _ in batches]).reshape(-1)
    assert inputs.tolist() == stream[: n * seq_len].tolist()
    capped = list(validation_batches(shards, seq_len, batch_size=4, max_windows=6))
    assert [len(x) for x, _ in capped] == [4, 2]


def test_too_few_tokens_for_one_window_is_a_clear_error(tmp_path):
    write_shards(tmp_path, {"train": [[5, 6, 7]], "val": []})  # 4 tokens with EOS
    shards = TokenShards(tmp_path, "train")
    assert WindowLoader(shards, 3, seed=0).n_windows == 1
    with pytest.raises(DataError, match="'train' has 4 tokens; a window of seq_len=4 needs 5"):
        WindowLoader(shards, 4, seed=0)
    with pytest.raises(DataError, match="'val' has 0 tokens"):
        next(validation_batches(TokenShards(tmp_path, "val"), 4, 2))


# -- the tokenizer.encode stage, through a recipe ------------------------------------------------------

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def make_corpus(store: ArtifactStore, train: list[str], val: list[str]):
    writer = store.create(kind="corpus", stage="data.prepare", config={})
    for split, texts in (("train", train), ("val", val)):
        with open(writer.path / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for i, text in enumerate(texts):
                record = {"id": f"{split}-{i}", "text": text, "kind": "code", "source": "test", "meta": {}}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return writer.commit()


def tokenizer_recipe(corpus_id: str, **encode_config) -> Recipe:
    corpus = f"artifact:{corpus_id}"
    return Recipe.model_validate(
        {
            "name": "tokenize",
            "stages": {
                "tokenizer": {
                    "stage": "tokenizer.train",
                    "inputs": {"corpus": corpus},
                    "config": {"vocab_size": 400},
                },
                "shards": {
                    "stage": "tokenizer.encode",
                    "inputs": {"corpus": corpus, "tokenizer": "tokenizer"},
                    "config": encode_config,
                },
            },
        }
    )


def test_encode_stage_writes_shards_that_decode_back_to_the_corpus(tmp_path):
    train = [
        (STDLIB / name).read_text(encoding="utf-8") for name in ("textwrap.py", "bisect.py", "string.py")
    ]
    train += ["", "prose with ünïcödé 🎉 and a literal <|eos|> inside", "\t\n  "]
    val = ["def g():\n    return 42\n", "more prose, more text."]
    store = ArtifactStore(tmp_path / "store")
    corpus = make_corpus(store, train, val)
    ctx = RunContext(store=store)
    results = run_recipe(tokenizer_recipe(corpus.id, max_tokens_per_shard=1000, batch_size=2), ctx)
    tok_artifact, shards_artifact = (r.artifact for r in results)
    assert shards_artifact.kind == "shards" and shards_artifact.manifest.inputs == {
        "corpus": corpus.id,
        "tokenizer": tok_artifact.id,
    }
    tok = load_tokenizer(tok_artifact.path)

    for split, texts in (("train", train), ("val", val)):
        shards = TokenShards(shards_artifact.path, split)
        assert shards.n_docs == len(texts) and shards.vocab_size == tok.vocab_size
        assert [tok.decode(d) for d in shards.documents()] == texts
        stream = shards.tokens(0, shards.n_tokens)
        assert stream.tolist() == [t for text in texts for t in [*tok.encode(text), tok.eos_id]]
    assert TokenShards(shards_artifact.path, "train").n_shards > 1

    meta = shards_artifact.manifest.metadata
    assert (meta["dtype"], meta["vocab_size"], meta["eos_id"]) == ("uint16", tok.vocab_size, 1)
    assert meta["tokenizer"] == tok_artifact.id
    train_meta = meta["splits"]["train"]
    assert train_meta["documents"] == len(train)
    assert train_meta["tokens"] == TokenShards(shards_artifact.path, "train").n_tokens
    assert train_meta["bytes"] == sum(len(t.encode()) for t in train)

    # The unigram baseline, recomputed the slow way.
    train_ids = TokenShards(shards_artifact.path, "train").tokens(0, train_meta["tokens"]).tolist()
    val_ids = TokenShards(shards_artifact.path, "val").tokens(0, meta["splits"]["val"]["tokens"]).tolist()
    counts = {i: train_ids.count(i) for i in set(train_ids)}
    nats = -sum(math.log((counts.get(i, 0) + 1) / (len(train_ids) + tok.vocab_size)) for i in val_ids) / len(
        val_ids
    )
    assert meta["unigram_val_nats"] == pytest.approx(nats, abs=1e-5)

    rows = dict(results[1].stage.summarize(shards_artifact.manifest))
    assert rows["train tokens"] == f"{train_meta['tokens']:,}"
    assert rows["vocabulary"] == f"{tok.vocab_size:,}" and rows["token dtype"] == "uint16"
    assert float(rows["train bytes per token"]) > 1.0
    assert rows["unigram val perplexity"] == f"{math.exp(meta['unigram_val_nats']):,.1f}"

    again = run_recipe(tokenizer_recipe(corpus.id, max_tokens_per_shard=1000, batch_size=2), ctx)
    assert [r.reused for r in again] == [True, True]
    assert again[1].artifact.id == shards_artifact.id


def test_encode_stage_feeds_the_training_loader(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    corpus = make_corpus(store, [(STDLIB / "textwrap.py").read_text(encoding="utf-8")], ["x = 1\n" * 50])
    results = run_recipe(tokenizer_recipe(corpus.id), RunContext(store=store))
    shards_dir = results[1].artifact.path
    x, y = WindowLoader(TokenShards(shards_dir, "train"), seq_len=32, seed=0).batch(0, 4)
    assert x.shape == (4, 32) and int(x.max()) < results[0].artifact.manifest.metadata["vocab_size"]
    val = list(validation_batches(TokenShards(shards_dir, "val"), seq_len=8, batch_size=64))
    assert len(val) == 1


def test_quickstart_head_runs_from_the_data_stage_to_training_windows(tmp_path):
    recipe = Recipe.model_validate(
        {
            "name": "quickstart-head",
            "stages": {
                "corpus": {
                    "stage": "data.prepare",
                    "config": {
                        "sources": [{"type": "python-stdlib", "max_bytes": 400_000}],
                        "val_fraction": 0.2,
                    },
                },
                "tokenizer": {
                    "stage": "tokenizer.train",
                    "inputs": {"corpus": "corpus"},
                    "config": {"vocab_size": 512},
                },
                "shards": {
                    "stage": "tokenizer.encode",
                    "inputs": {"corpus": "corpus", "tokenizer": "tokenizer"},
                },
            },
        }
    )
    results = {
        r.name: r.artifact for r in run_recipe(recipe, RunContext(store=ArtifactStore(tmp_path / "store")))
    }
    meta = results["shards"].manifest.metadata
    corpus_docs = results["corpus"].manifest.metadata["documents"]
    assert meta["splits"]["train"]["documents"] == corpus_docs["train"]
    assert meta["splits"]["val"]["documents"] == corpus_docs["val"]
    train = TokenShards(results["shards"].path, "train")
    tok = load_tokenizer(results["tokenizer"].path)
    first = json.loads((results["corpus"].path / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert tok.decode(train.document(0)) == first["text"]
    x, _ = WindowLoader(train, seq_len=64, seed=0).batch(0, 2)
    assert x.shape == (2, 64)


def test_unigram_baseline_is_none_without_val_tokens():
    from lmloom.tokenizers.stage import unigram_val_nats

    train = np.array([3, 1, 0, 0])
    assert unigram_val_nats(train, np.zeros(4, dtype=np.int64)) is None
    assert unigram_val_nats(train, np.array([1, 0, 0, 0])) == pytest.approx(-math.log(4 / 8), abs=1e-6)


def test_shards_read_through_a_codec_without_memory_map_give_the_same_tokens(tmp_path):
    """Encrypted artifacts cannot be memory-mapped; their shards are read range by range instead."""
    from lmloom.artifacts.files import PlainCodec
    from lmloom.artifacts.store import ArtifactStore, StoreSecurity

    class NoMapCodec(PlainCodec):
        def plain_path(self, path):
            return None

    class NoMapSecurity(StoreSecurity):
        def read_codec(self, manifest, where):
            return NoMapCodec()

    store = ArtifactStore(tmp_path, security=NoMapSecurity())
    out = store.create(kind="shards", stage="tokenizer.encode", config={})
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 300, size=int(n)).tolist() for n in rng.integers(1, 40, size=50)]
    with ShardWriter(out, vocab_size=300, eos_id=1, max_tokens_per_shard=97) as writer:
        writer.add_batch("train", docs)
    artifact = store.open(out.commit().id)
    mapped, ranged = TokenShards(artifact.path, "train"), TokenShards(artifact, "train")
    assert ranged.n_shards == mapped.n_shards > 1
    for start, stop in [(0, 5), (90, 110), (0, mapped.n_tokens), (mapped.n_tokens - 3, mapped.n_tokens)]:
        np.testing.assert_array_equal(ranged.tokens(start, stop), mapped.tokens(start, stop))
    assert [d.tolist() for d in ranged.documents()] == docs
