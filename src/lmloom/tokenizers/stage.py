"""The tokenizer stages: `tokenizer.train` (corpus -> tokenizer) and `tokenizer.encode` (-> token shards).

`tokenizer.train` learns one of five algorithms (`algorithm`: bpe, wordpiece, unigram,
sentencepiece-bpe, sentencepiece-unigram; see `lmloom.tokenizers.base`), stores it in its native
format and reports, in the artifact's metadata and the stage summary, its vocabulary size, bytes per
token, unknown-token rate and the share of documents that decode back exactly
(`lmloom.tokenizers.report`), measured on the validation split.

Both read a `corpus` artifact: `train.jsonl` and `val.jsonl`, one JSON object per line with at least
a string `text`. Documents keep their order, so document i of a shards split is record i of the
corpus file it came from.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Iterator
from typing import Literal

import numpy as np
from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from lmloom.artifacts.manifest import Manifest
from lmloom.artifacts.store import Artifact
from lmloom.config import StrictConfig
from lmloom.errors import DataError
from lmloom.stages import Stage
from lmloom.tokenizers.base import SPECIAL_TOKENS
from lmloom.tokenizers.bpe import MIN_VOCAB_SIZE, capped_texts
from lmloom.tokenizers.loading import load_tokenizer
from lmloom.tokenizers.report import tokenizer_report
from lmloom.tokenizers.shards import DEFAULT_MAX_TOKENS_PER_SHARD, ShardWriter
from lmloom.tokenizers.training import train_tokenizer

SPLITS = ("train", "val")


Algorithm = Literal["bpe", "wordpiece", "unigram", "sentencepiece-bpe", "sentencepiece-unigram"]


class TrainTokenizerConfig(StrictConfig):
    algorithm: Algorithm = Field("bpe", description="bpe = byte-level BPE; see lmloom.tokenizers.base")
    vocab_size: int = Field(
        8192, ge=MIN_VOCAB_SIZE, le=2**32, description="tokens incl. specials (+ 256 bytes where used)"
    )
    min_frequency: int = Field(
        2, ge=1, description="bpe/wordpiece: a pair is merged only if seen this often (others ignore it)"
    )
    max_train_bytes: int = Field(
        100_000_000, ge=1, description="UTF-8 bytes of train.jsonl text to learn from"
    )
    max_eval_bytes: int = Field(
        4_000_000, ge=0, description="val.jsonl bytes (train.jsonl if val is empty) for the report"
    )

    @model_validator(mode="after")
    def _vocab_fits_algorithm(self) -> TrainTokenizerConfig:
        # Unigram needs two pieces more than the field's floor (<unk> and one learned piece): say so
        # before the run starts, not after the corpus is made
        from lmloom.tokenizers.unigram import MIN_VOCAB_SIZE as UNIGRAM_MIN

        if self.algorithm == "unigram" and self.vocab_size < UNIGRAM_MIN:
            raise ValueError(
                f"vocab_size = {self.vocab_size}: algorithm unigram needs at least {UNIGRAM_MIN}"
            )
        return self

    @model_serializer(mode="wrap")
    def _omit_default_algorithm(self, handler: SerializerFunctionWrapHandler) -> dict:
        # The stage key hashes the dumped config: leaving out the default algorithm keeps the keys
        # (and so the cached artifacts) of recipes written before `algorithm` existed.
        data = handler(self)
        if data.get("algorithm") == "bpe":
            del data["algorithm"]
        return data


class EncodeConfig(StrictConfig):
    max_tokens_per_shard: int = Field(DEFAULT_MAX_TOKENS_PER_SHARD, ge=1)
    batch_size: int = Field(256, ge=1, description="documents per parallel encode_batch call")


# -- reading a corpus --------------------------------------------------------------------------


def corpus_records(corpus: Artifact, name: str) -> Iterator[tuple[str, int]]:
    """(text, size of its line in bytes) for every record of a corpus JSONL file, in order."""
    with corpus.open(name) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"{name} line {number}: not valid JSON ({exc})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{name} line {number}: record has no string field 'text'")
            yield text, len(line)


def _advancing(records: Iterable[tuple[str, int]], bar) -> Iterator[str]:
    for text, size in records:
        bar.advance(size)
        yield text


def _batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


# -- tokenizer.train ---------------------------------------------------------------------------


def run_train(config: TrainTokenizerConfig, inputs, ctx, out) -> None:
    corpus = inputs["corpus"]
    stats = {"bytes": 0, "documents": 0}
    total = min(corpus.size("train.jsonl"), config.max_train_bytes)
    with ctx.progress(total, "reading training text", unit="B") as bar:
        records = corpus_records(corpus, "train.jsonl")
        texts = capped_texts(_advancing(records, bar), config.max_train_bytes, stats)
        tokenizer = train_tokenizer(
            config.algorithm, texts, vocab_size=config.vocab_size, min_frequency=config.min_frequency
        )
        bar.update(completed=total)
    if stats["bytes"] == 0:
        raise DataError(f"corpus {corpus.short_id}: train.jsonl has no text to train a tokenizer on")
    for name, data in tokenizer.files().items():
        out.write_bytes(name, data)
    ctx.log(
        f"{tokenizer.algorithm} vocabulary of {tokenizer.vocab_size:,} tokens learned from "
        f"{stats['bytes']:,} bytes ({stats['documents']:,} documents)"
    )

    report = _evaluate(tokenizer, corpus, config.max_eval_bytes)
    if report["tokens"] == 0:
        ctx.log("no text sampled for the report (empty splits or max_eval_bytes = 0)")
    out.metadata.update(
        algorithm=tokenizer.algorithm,
        vocab_size=tokenizer.vocab_size,
        requested_vocab_size=config.vocab_size,
        special_tokens={token: i for i, token in enumerate(SPECIAL_TOKENS)},
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        unk_id=tokenizer.unk_id,
        train_bytes=stats["bytes"],
        train_documents=stats["documents"],
        bytes_per_token=report.pop("bytes_per_token"),
        unk_rate=report.pop("unk_rate"),
        round_trip_share=report.pop("round_trip_share"),
        bytes_per_token_sample=report,
    )


def _evaluate(tokenizer, corpus: Artifact, max_bytes: int) -> dict:
    """The tokenizer report on val.jsonl, or on train.jsonl when val holds no text."""
    for split in SPLITS[::-1]:  # val first
        texts = capped_texts((text for text, _ in corpus_records(corpus, f"{split}.jsonl")), max_bytes)
        report = tokenizer_report(tokenizer, texts)
        if report["bytes"]:
            break
    return {"split": split, **report}


def summarize_train(manifest: Manifest) -> list[tuple[str, str]]:
    meta = manifest.metadata
    specials = meta.get("special_tokens", {})
    rows = [
        ("algorithm", meta.get("algorithm", "bpe")),  # artifacts from before the field were all bpe
        ("vocabulary", f"{meta.get('vocab_size', 0):,}"),
        ("special tokens", " ".join(f"{tok}={i}" for tok, i in specials.items())),
        ("trained on", f"{meta.get('train_bytes', 0):,} bytes, {meta.get('train_documents', 0):,} documents"),
    ]
    split = meta.get("bytes_per_token_sample", {}).get("split", "val")
    if meta.get("bytes_per_token"):
        rows.append(("bytes per token", f"{meta['bytes_per_token']:.2f}"))
    if meta.get("unk_rate") is not None:
        rows.append((f"unknown tokens ({split})", f"{meta['unk_rate']:.4%}"))
    if meta.get("round_trip_share") is not None:
        rows.append((f"exact round trips ({split})", f"{meta['round_trip_share']:.2%} of documents"))
    return rows


TRAIN = Stage(
    name="tokenizer.train",
    kind="tokenizer",
    config=TrainTokenizerConfig,
    run=run_train,
    inputs={"corpus": "corpus"},
    permissions=("write-corpus",),
    summary=summarize_train,
    description="learn a tokenizer (byte-level BPE by default) from the corpus' training split",
)


# -- tokenizer.encode --------------------------------------------------------------------------


def run_encode(config: EncodeConfig, inputs, ctx, out) -> None:
    corpus, tok_artifact = inputs["corpus"], inputs["tokenizer"]
    tokenizer = load_tokenizer(tok_artifact)
    vocab = tokenizer.vocab_size
    counts = {split: np.zeros(vocab, dtype=np.int64) for split in SPLITS}
    text_bytes = dict.fromkeys(SPLITS, 0)
    writer = ShardWriter(
        out, vocab_size=vocab, eos_id=tokenizer.eos_id, max_tokens_per_shard=config.max_tokens_per_shard
    )
    with writer:
        for split in SPLITS:
            name = f"{split}.jsonl"
            target = writer.split(split)
            with ctx.progress(corpus.size(name), f"encoding {split}", unit="B") as bar:
                for batch in _batched(_advancing(corpus_records(corpus, name), bar), config.batch_size):
                    tokens = target.add_batch(tokenizer.encode_batch(batch))
                    counts[split] += np.bincount(tokens, minlength=vocab)
                    text_bytes[split] += sum(len(text.encode("utf-8")) for text in batch)
            ctx.log(
                f"{split}: {target.n_tokens:,} tokens, {target.n_docs:,} documents, {len(target.shards)} shards"
            )
    header = writer.header()
    if header["splits"]["train"]["tokens"] == 0:
        raise DataError(f"corpus {corpus.short_id}: train.jsonl has no documents to encode")

    splits = {
        name: {
            "tokens": info["tokens"],
            "documents": info["documents"],
            "bytes": text_bytes[name],
            "shards": len(info["shards"]),
        }
        for name, info in header["splits"].items()
    }
    out.metadata.update(
        format=header["format"],
        format_version=header["version"],
        dtype=header["dtype"],
        vocab_size=vocab,
        eos_id=tokenizer.eos_id,
        tokenizer=tok_artifact.id,
        corpus=corpus.id,
        max_tokens_per_shard=config.max_tokens_per_shard,
        splits=splits,
        unigram_val_nats=unigram_val_nats(counts["train"], counts["val"]),
    )


def unigram_val_nats(train_counts: np.ndarray, val_counts: np.ndarray) -> float | None:
    """Cross-entropy (nats/token) on val of the add-one-smoothed unigram model estimated on train.

    EOS tokens count like any other. It is the loss of a model that ignores context entirely: a
    trained model must beat it. None when val is empty.
    """
    val_total = int(val_counts.sum())
    if not val_total:
        return None
    log_p = np.log(train_counts + 1.0) - math.log(float(train_counts.sum()) + len(train_counts))
    return round(float(-(val_counts * log_p).sum() / val_total), 6)


def summarize_encode(manifest: Manifest) -> list[tuple[str, str]]:
    meta = manifest.metadata
    rows = [("vocabulary", f"{meta.get('vocab_size', 0):,}"), ("token dtype", str(meta.get("dtype")))]
    for name, info in meta.get("splits", {}).items():
        rows.append((f"{name} tokens", f"{info['tokens']:,}"))
        rows.append((f"{name} documents", f"{info['documents']:,}"))
    train = meta.get("splits", {}).get("train", {})
    if train.get("tokens", 0) > train.get("documents", 0):
        rows.append(
            ("train bytes per token", f"{train['bytes'] / (train['tokens'] - train['documents']):.2f}")
        )
    if meta.get("unigram_val_nats") is not None:
        rows.append(("unigram val perplexity", f"{math.exp(meta['unigram_val_nats']):,.1f}"))
    return rows


ENCODE = Stage(
    name="tokenizer.encode",
    kind="shards",
    config=EncodeConfig,
    run=run_encode,
    inputs={"corpus": "corpus", "tokenizer": "tokenizer"},
    permissions=("write-corpus",),
    summary=summarize_encode,
    description="encode the corpus' train and val splits into memory-mapped token shards",
)
