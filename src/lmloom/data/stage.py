"""`data.prepare`: read sources, clean, deduplicate and split them into a corpus artifact.

The corpus artifact holds

    train.jsonl     one {"id", "text", "kind", "source", "meta"} object per line
    val.jsonl       the same, for the validation split (see lmloom.data.split)
    rejects.jsonl   every record a source could not read: {"source", "location", "reason", "excerpt", "detail"}
    removed.jsonl   every document a step dropped: {"id", "source", "step", "reason", "detail", "text"}
                    ("text" only when `record_text` is on and the source is not marked sensitive;
                    redacted like the corpus when the chain has a `pii` step)
    edited.jsonl    every document a step rewrote: {"id", "source", "step", "reason", "detail"} (never
                    the text before the edit: a redaction must not survive in its own audit trail)
    sources.jsonl   every file the sources read, with the sha256 and size of the bytes read and what
                    became of its documents (format: lmloom.artifacts.lineage; see data.provenance)

and its manifest metadata holds the totals, removals and rejects by reason, per-step statistics, and
the number and digest of the source files (no text and no per-file paths: those are in the files).
Documents stream from the sources through the steps into the files one at a time; only the dedup
digests and two held-back documents (see SplitWriter) stay in memory.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from pydantic import Field

from lmloom.artifacts.lineage import SOURCES_FILE, listing_digest
from lmloom.artifacts.manifest import Manifest
from lmloom.artifacts.store import Artifact, ArtifactWriter
from lmloom.config import StrictConfig
from lmloom.context import StageContext
from lmloom.data.documents import Document, JsonlWriter, Reject, utf8_len
from lmloom.data.executor import ExecutorConfig, execute
from lmloom.data.mixture import MixtureConfig
from lmloom.data.pii import PiiRedactor, redact
from lmloom.data.provenance import FileRecord, SourceLedger
from lmloom.data.sources import SourceConfig, read_source, source_fingerprint
from lmloom.data.split import SplitWriter
from lmloom.data.spool import DocumentSpool
from lmloom.data.stdlib_corpus import StdlibSource
from lmloom.data.step_registry import StepSpec, build_chain
from lmloom.data.steps import Drop, Edit, NormalForm, Step
from lmloom.data.whole_corpus import PoisoningConfig, WholeCorpusPass
from lmloom.errors import DataError
from lmloom.stages import Stage

FILES = ("train.jsonl", "val.jsonl", "rejects.jsonl", "removed.jsonl", "edited.jsonl", SOURCES_FILE)
_PROGRESS_EVERY = 64


class PrepareConfig(StrictConfig):
    sources: list[SourceConfig] = Field(default_factory=lambda: [StdlibSource()], min_length=1)
    normalize: NormalForm = "NFC"
    min_chars: int = Field(32, ge=0)  # shorter documents (ignoring surrounding whitespace) are dropped
    dedup: bool = True  # drop exact duplicates of an earlier document's text
    steps: list[StepSpec] = Field(  # type: ignore[valid-type]
        default_factory=list,
        description="filters, redaction, language id, near dedup...: see `lmloom data steps`",
    )
    val_fraction: float = Field(0.02, ge=0.0, le=0.5)
    record_text: bool = Field(
        True, description="keep a removed document's text in removed.jsonl (never for sensitive sources)"
    )
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    poisoning: PoisoningConfig | None = Field(
        None, description="scan the cleaned corpus for backdoor triggers and injected spans: {remove: true}"
    )
    mixture: MixtureConfig | None = Field(
        None,
        description="weighted sampling across sources or kinds, e.g. {by: kind, weights: {prose: 7, code: 3}}",
    )


def run(config: PrepareConfig, inputs: dict[str, Artifact], ctx: StageContext, out: ArtifactWriter) -> None:
    steps = build_chain(config.steps, config.normalize, config.min_chars, config.dedup)
    sensitive = {source.label for source in config.sources if getattr(source, "sensitive", False)}
    # A document dropped before (or by) a later step still holds its PII: when the chain redacts PII,
    # the text kept in removed.jsonl is redacted the same way, so the record cannot leak what the
    # corpus itself hides.
    redactor = next((step for step in steps if isinstance(step, PiiRedactor)), None)
    sources: list[dict[str, Any]] = []
    files: list[FileRecord] = []
    rejected: Counter[str] = Counter()

    with (
        JsonlWriter(out.open("train.jsonl")) as train,
        JsonlWriter(out.open("val.jsonl")) as val,
        JsonlWriter(out.open("rejects.jsonl")) as rejects,
        JsonlWriter(out.open("removed.jsonl")) as removed,
        JsonlWriter(out.open("edited.jsonl")) as edited,
        ctx.progress(None, "reading and cleaning documents") as bar,
    ):
        splitter = SplitWriter(
            {"train": lambda doc: train.write(doc.to_json()), "val": lambda doc: val.write(doc.to_json())},
            config.val_fraction,
        )

        def on_reject(reject: Reject) -> None:
            record = reject.to_json()
            if redactor is not None and record["excerpt"]:  # an excerpt of a bad record is raw input
                record["excerpt"] = redact(
                    record["excerpt"], redactor.find(record["excerpt"]), redactor.placeholders
                )
            rejects.write(record)
            rejected[reject.reason] += 1

        def on_drop(doc: Document, step: str, drop: Drop) -> None:
            record = {"id": doc.id, "source": doc.source, "step": step, "reason": drop.reason}
            if drop.detail:
                record["detail"] = drop.detail
            if config.record_text and doc.source not in sensitive:
                text = doc.text
                if redactor is not None and (redactor.kinds is None or doc.kind in redactor.kinds):
                    text = redact(text, redactor.find(text), redactor.placeholders)
                record["text"] = text
            removed.write(record)
            if doc.origin is not None:
                doc.origin.removed += 1

        def on_edit(doc: Document, step: str, edit: Edit) -> None:
            record = {"id": doc.id, "source": doc.source, "step": step, "reason": edit.reason}
            edited.write(record | ({"detail": edit.detail} if edit.detail else {}))

        def on_read(count: int) -> None:
            if count % _PROGRESS_EVERY == 0:
                bar.update(count, note=f"{splitter.written:,} kept")

        documents = read_documents(config.sources, sources, on_reject, on_read, files)
        survivors = execute(documents, steps, config.executor, on_drop, on_edit)
        whole = None
        if config.mixture is not None or config.poisoning is not None:
            codec = ctx.store.security.write_codec(ctx.encrypt)  # scratch stays encrypted in such a run
            spool = DocumentSpool(ctx.work_dir, codec)
            whole = WholeCorpusPass(spool, config.mixture, config.poisoning, on_drop)
            survivors = whole.run(survivors)
        for doc in survivors:
            splitter.add(doc)
            if doc.origin is not None:
                doc.origin.kept += 1
        splitter.finish()
        bar.update(sum(s["documents"] for s in sources), note=f"{splitter.written:,} kept")

    with JsonlWriter(out.open(SOURCES_FILE)) as listing:
        for record in sorted(files, key=lambda f: (f.source_index, f.relpath)):
            listing.write(record.to_json())

    meta = corpus_metadata(config, sources, steps, splitter, rejected)
    if whole is not None:
        meta["steps"].extend(stats.to_json() for stats in whole.stats)
        for stats in whole.stats:
            meta["documents"]["removed"].update(stats.removed)
        meta.update(whole.metadata)
    meta["source_files"] = source_files_metadata(files)
    out.metadata.update(meta)
    if meta["documents"]["kept"] == 0:
        raise DataError(_nothing_left(config, meta))
    docs = meta["documents"]
    ctx.log(
        f"kept {docs['kept']:,} of {docs['read']:,} documents ({human_bytes(meta['bytes']['kept'])}), "
        f"train {docs['train']:,} / val {docs['val']:,}; removed: {_counts(docs['removed']) or 'none'}; "
        f"rejected: {_counts(meta['rejects']['by_reason']) or 'none'}"
    )


def corpus_metadata(
    config: PrepareConfig,
    sources: list[dict[str, Any]],
    steps: list[Step],
    splitter: SplitWriter,
    rejected: Counter[str],
) -> dict[str, Any]:
    removed: Counter[str] = Counter()
    for step in steps:
        removed.update(step.stats.removed)
    kinds = Counter(splitter.kinds["train"]) + Counter(splitter.kinds["val"])
    return {
        "documents": {
            "read": sum(s["documents"] for s in sources),
            "kept": splitter.written,
            "train": splitter.docs["train"],
            "val": splitter.docs["val"],
            "removed": dict(sorted(removed.items())),
            "kept_by_kind": dict(sorted(kinds.items())),
        },
        "bytes": {
            "read": sum(s["bytes"] for s in sources),
            "kept": splitter.bytes["train"] + splitter.bytes["val"],
            "train": splitter.bytes["train"],
            "val": splitter.bytes["val"],
        },
        "rejects": {"total": sum(rejected.values()), "by_reason": dict(sorted(rejected.items()))},
        "sources": sources,
        "steps": [step.stats.to_json() for step in steps],
        "split": {"val_fraction": config.val_fraction, "rule": "sha256(text)[:8] / 2**64 < val_fraction"},
    }


def read_documents(
    configs: list[SourceConfig],
    stats: list[dict[str, Any]],
    on_reject: Callable[[Reject], None],
    on_read: Callable[[int], None] = lambda count: None,
    files: list[FileRecord] | None = None,
) -> Iterator[Document]:
    """Documents of every source in order; rejects go to `on_reject`, per-source counts into `stats`,
    and a record of every file read (sha256, size, per-file counts) into `files`.

    A source whose pins do not match raises IntegrityError from here, before the stage can publish.
    """
    count = 0
    for index, cfg in enumerate(configs):
        notes: dict[str, Any] = {}
        ledger = SourceLedger.for_config(cfg, index)
        entry = {"type": cfg.type, "name": cfg.label, "documents": 0, "bytes": 0, "rejects": 0}
        stats.append(entry)
        for record in read_source(cfg, notes, ledger):
            if isinstance(record, Reject):
                entry["rejects"] += 1
                if record.origin is not None:
                    record.origin.rejected += 1
                on_reject(record)
                continue
            entry["documents"] += 1
            entry["bytes"] += utf8_len(record.text)
            if record.origin is not None:
                record.origin.documents += 1
            count += 1
            on_read(count)
            yield record
        entry.update(notes)
        # the value a `digest:` pin of this source takes; the files themselves are in sources.jsonl
        entry.update(files=len(ledger.files), digest=ledger.digest)
        if files is not None:
            files.extend(ledger.files)


def source_files_metadata(files: list[FileRecord]) -> dict[str, Any]:
    """How many source files fed the corpus, their bytes, and a digest of their sorted (path, sha256)
    listing (see lmloom.artifacts.lineage.listing_digest), so two corpora can be compared at a glance."""
    return {
        "count": len(files),
        "bytes": sum(f.size or 0 for f in files),
        "unreadable": sum(1 for f in files if f.sha256 is None),
        "digest": listing_digest((f.path, f.sha256) for f in files),
    }


def _nothing_left(config: PrepareConfig, meta: dict[str, Any]) -> str:
    docs, rejects = meta["documents"], meta["rejects"]
    names = ", ".join(s["name"] for s in meta["sources"])
    message = f"no documents left: read {docs['read']:,} documents from {names}"
    if docs["removed"]:
        message += f"; removed {_counts(docs['removed'])}"
        if docs["removed"].get("short"):
            message += f" (min_chars={config.min_chars})"
    if rejects["total"]:
        message += f"; rejected {rejects['total']:,} records ({_counts(rejects['by_reason'])})"
    if docs["read"] == 0 and not rejects["total"]:
        message += "; check the source paths and patterns"
    return message


def fingerprint(config: PrepareConfig) -> list[str]:
    """What the sources hold now (paths, sizes, mtimes), for a stage key that notices edited input."""
    return [source_fingerprint(source) for source in config.sources]


# -- summary --------------------------------------------------------------------------------------


def summary(manifest: Manifest) -> list[tuple[str, str]]:
    meta = manifest.metadata
    docs, size, rejects = meta["documents"], meta["bytes"], meta["rejects"]
    by_kind = ", ".join(f"{kind} {n:,}" for kind, n in docs["kept_by_kind"].items())
    files = meta.get("source_files")  # absent from corpora made before sources.jsonl existed
    source_rows = [("source files", f"{files['count']:,} ({human_bytes(files['bytes'])})")] if files else []
    return [
        ("documents kept", f"{docs['kept']:,} of {docs['read']:,}" + (f" ({by_kind})" if by_kind else "")),
        ("removed", _counts(docs["removed"]) or "none"),
        (
            "rejected records",
            f"{rejects['total']:,} ({_counts(rejects['by_reason'])})" if rejects["total"] else "none",
        ),
        ("train / val docs", f"{docs['train']:,} / {docs['val']:,}"),
        (
            "corpus bytes",
            f"{human_bytes(size['kept'])} (train {human_bytes(size['train'])}, "
            f"val {human_bytes(size['val'])})",
        ),
        *source_rows,
    ]


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} {n:,}" for reason, n in counts.items())


def human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


PREPARE = Stage(
    name="data.prepare",
    kind="corpus",
    config=PrepareConfig,
    run=run,
    inputs={},
    version=3,  # 2: sources.jsonl (files read, with sha256) and source pins; 3: steps, edited.jsonl
    permissions=("read-raw-data", "write-corpus"),
    summary=summary,
    description="Read text sources, normalise, clean, deduplicate and split them into train/val JSONL.",
    fingerprint=fingerprint,
)
