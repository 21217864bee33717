"""`data.score`: a model-based quality score, CCNet-style: the perplexity of each document under a
small reference language model trained by lmloom itself (a `checkpoint` artifact).

Text that reads like the reference data (say, a model pre-trained on a curated corpus) scores low;
boilerplate, spam and garbled text score high. The stage writes a new corpus whose documents carry
`meta.perplexity`, and can

- filter: keep documents at or below `max_perplexity`, and/or the lowest `keep_fraction` of them
  (CCNet's head/middle/tail buckets are `keep_fraction` 1/3 and 2/3);
- order for a curriculum: `order: ascending` writes the easiest (lowest-perplexity) documents first,
  `descending` the hardest first; `input` keeps the input order.

Each document's score is the mean next-token loss over its first `max_tokens` tokens (after an
<|eos|> that stands for "start of document", as in training), as perplexity = exp(loss). Two passes:
score everything, then write; documents are re-read by byte offset, so ordering a corpus larger
than memory needs only 24 bytes per document.
"""

from __future__ import annotations

import json
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from lmloom.artifacts.manifest import Manifest
from lmloom.artifacts.store import Artifact, ArtifactWriter
from lmloom.config import StrictConfig
from lmloom.context import StageContext
from lmloom.data.documents import JsonlWriter
from lmloom.data.stage import human_bytes
from lmloom.errors import DataError
from lmloom.models.decoder import Decoder
from lmloom.models.io import model_from_files
from lmloom.stages import Stage
from lmloom.tokenizers.loading import load_tokenizer

SPLITS = ("train", "val")


class ScoreConfig(StrictConfig):
    max_tokens: int = Field(256, ge=2, description="tokens scored per document (its beginning)")
    batch_size: int = Field(16, ge=1, description="documents per forward pass")
    max_perplexity: float | None = Field(None, gt=1, description="drop documents scoring above this")
    keep_fraction: float | None = Field(
        None, gt=0, le=1, description="keep this lowest-perplexity fraction of the documents"
    )
    order: Literal["input", "ascending", "descending"] = Field(
        "input", description="ascending: easiest first (a curriculum); descending: hardest first"
    )
    precision: Literal["bf16", "fp32"] = "bf16"
    record_text: bool = Field(True, description="keep a removed document's text in removed.jsonl")


@torch.no_grad()
def score_texts(
    model: Decoder, token_lists: list[list[int]], pad_id: int, precision: str = "fp32"
) -> list[float]:
    """Perplexity of each token list (its first id is the context, not scored)."""
    lengths = [len(ids) for ids in token_lists]
    width = max(lengths)
    batch = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    for row, ids in enumerate(token_lists):
        batch[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(batch[:, :-1])
    losses = F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="none")  # [B, T-1]
    positions = torch.arange(width - 1)[None, :]
    mask = positions < (torch.tensor(lengths)[:, None] - 1)
    mean = (losses * mask).sum(1) / mask.sum(1).clamp(min=1)
    return [math.exp(min(value, 50.0)) for value in mean.tolist()]


def run(config: ScoreConfig, inputs: dict[str, Artifact], ctx: StageContext, out: ArtifactWriter) -> None:
    corpus, checkpoint = inputs["corpus"], inputs["checkpoint"]
    model = model_from_files(checkpoint.read_bytes).eval()
    tokenizer = load_tokenizer(checkpoint)
    limit = min(config.max_tokens, model.config.seq_len + 1)
    total = sum(corpus.manifest.metadata.get("documents", {}).get(split, 0) for split in SPLITS) or None

    # pass 1: a score for every document, with where it starts in its file
    with ctx.progress(total, "scoring documents", unit="doc") as bar:
        scores = {
            split: _score_file(corpus, f"{split}.jsonl", model, tokenizer, config, limit, bar.advance)
            for split in SPLITS
        }

    every = np.concatenate([values for _, values in scores.values()]) if scores else np.zeros(0)
    if every.size == 0:
        raise DataError(f"corpus {corpus.short_id} holds no documents to score")
    threshold = config.max_perplexity if config.max_perplexity is not None else math.inf
    if config.keep_fraction is not None and config.keep_fraction < 1:
        threshold = min(threshold, float(np.quantile(every, config.keep_fraction, method="lower")))

    # pass 2: write the kept documents with their score, in the chosen order
    kept = {split: 0 for split in SPLITS}
    kept_bytes = {split: 0 for split in SPLITS}
    removed_count = 0
    with JsonlWriter(out.open("removed.jsonl")) as removed:
        for split in SPLITS:
            offsets, values = scores[split]
            order = np.arange(len(values))
            if config.order != "input":
                order = np.argsort(values if config.order == "ascending" else -values, kind="stable")
            with corpus.open(f"{split}.jsonl") as source, JsonlWriter(out.open(f"{split}.jsonl")) as sink:
                for index in order:
                    source.seek(int(offsets[index]))
                    record = json.loads(source.readline())
                    perplexity = round(float(values[index]), 3)
                    if perplexity > threshold:
                        removed_count += 1
                        entry = {
                            "id": record["id"],
                            "source": record["source"],
                            "step": "lm_score",
                            "reason": "lm_score.perplexity",
                            "detail": f"perplexity {perplexity:g} > {threshold:g}",
                        }
                        removed.write(entry | ({"text": record["text"]} if config.record_text else {}))
                        continue
                    record["meta"] = {**record.get("meta", {}), "perplexity": perplexity}
                    sink.write(record)
                    kept[split] += 1
                    kept_bytes[split] += len(record["text"].encode("utf-8"))

    quantiles = np.quantile(every, [0.1, 0.5, 0.9]).tolist()
    out.metadata.update(
        documents={
            "read": int(every.size),
            "kept": sum(kept.values()),
            "train": kept["train"],
            "val": kept["val"],
            "removed": {"lm_score.perplexity": removed_count} if removed_count else {},
        },
        bytes={"kept": sum(kept_bytes.values()), "train": kept_bytes["train"], "val": kept_bytes["val"]},
        rejects={"total": 0, "by_reason": {}},
        steps=[],
        perplexity={
            "p10": round(quantiles[0], 3),
            "median": round(quantiles[1], 3),
            "p90": round(quantiles[2], 3),
            "threshold": None if math.isinf(threshold) else round(threshold, 3),
        },
        order=config.order,
        reference_model=checkpoint.id,
    )
    if sum(kept.values()) == 0:
        raise DataError(f"no documents left: every score is above the threshold {threshold:g}")


def _score_file(
    corpus: Artifact, name: str, model: Decoder, tokenizer, config: ScoreConfig, limit: int, advance
) -> tuple[np.ndarray, np.ndarray]:
    """(byte offsets, perplexities) of the documents of one JSONL file, scored in batches."""
    offsets: list[int] = []
    values: list[float] = []
    pending: list[list[int]] = []
    for offset, record in _records(corpus, name):
        offsets.append(offset)
        pending.append(([tokenizer.eos_id] + tokenizer.encode(record["text"]))[:limit])
        if len(pending) == config.batch_size:
            values.extend(score_texts(model, pending, tokenizer.pad_id, config.precision))
            advance(len(pending))
            pending = []
    if pending:
        values.extend(score_texts(model, pending, tokenizer.pad_id, config.precision))
        advance(len(pending))
    return np.asarray(offsets, dtype=np.int64), np.asarray(values, dtype=np.float64)


def _records(artifact: Artifact, name: str):
    """(byte offset, record) of each line of a JSONL artifact file."""
    with artifact.open(name) as handle:
        while True:
            offset = handle.tell()
            line = handle.readline()
            if not line:
                return
            if line.strip():
                yield offset, json.loads(line)


def summary(manifest: Manifest) -> list[tuple[str, str]]:
    meta = manifest.metadata
    docs, ppl = meta["documents"], meta["perplexity"]
    return [
        (
            "documents kept",
            f"{docs['kept']:,} of {docs['read']:,} (train {docs['train']:,} / val {docs['val']:,})",
        ),
        ("perplexity p10 / median / p90", f"{ppl['p10']:,.1f} / {ppl['median']:,.1f} / {ppl['p90']:,.1f}"),
        (
            "threshold, order",
            f"{ppl['threshold'] if ppl['threshold'] is not None else 'none'}, {meta['order']}",
        ),
        ("corpus bytes", human_bytes(meta["bytes"]["kept"])),
    ]


SCORE = Stage(
    name="data.score",
    kind="corpus",
    config=ScoreConfig,
    run=run,
    inputs={"corpus": "corpus", "checkpoint": "checkpoint"},
    permissions=("write-corpus",),
    summary=summary,
    description="score documents by perplexity under a reference model (CCNet); filter and/or order them",
)
