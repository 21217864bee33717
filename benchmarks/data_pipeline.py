"""The heuristic quality filter chain: ours against datatrove's, on the same JSONL corpus.

    python benchmarks/data_pipeline.py                     # >= 20,000 documents, 1 and 2 workers
    python benchmarks/data_pipeline.py --limit 3000 --workers 1 --skip-minhash

The corpus is `bench_corpus.build_corpus()` (the local Python installation cut into documents of about
1,200 characters: mostly code, some prose), written as JSONL shards to a temporary folder. Both sides
then read the shards, apply the same rules in the same order and write the kept documents as JSONL:

- datatrove: `JsonlReader` -> `GopherRepetitionFilter` -> `GopherQualityFilter` -> `C4QualityFilter`
  -> `JsonlWriter` (uncompressed), run by `LocalPipelineExecutor` with one task per shard;
- ours: `gopher_repetition` -> `gopher_quality` -> `c4` (lmloom.data.quality, default configs: the same
  published thresholds as datatrove's defaults), over the same shards; with 2 workers the JSONL lines
  go to a `multiprocessing.Pool` in ordered chunks (`imap`), so the output order is deterministic.
  It runs twice: in datatrove's order ("reference", the like-for-like comparison) and with
  `gopher_quality` first ("cheap-first"), which keeps exactly the same documents but spends the costly
  n-gram statistics only on what the cheap rules let through.

Each is timed end to end (reading, filtering, writing; not building the corpus) and reported in
documents/s, with the kept count and the speed ratios. Then the keep/drop decisions are compared
document by document, and every disagreement is attributed to the rule that decided it on each side
(datatrove's filters are rerun in-process on those documents only, to learn their reasons).

Why decisions can differ: datatrove splits words with spaCy's English tokenizer, ours with
`lmloom.data.words`, which follows spaCy's rules without spaCy. The two agree exactly on ordinary prose
and differ on rare forms (URLs inside quotes, some contractions and emoticons, regular expressions in
code), which moves the word counts, and so the n-gram statistics, of a document by a few tokens:
enough to tip a document that sits right at a repetition threshold. Ours also counts duplicated n-grams
as tuples of words, where datatrove joins the words without a separator (so "ab c" and "a bc" collide
there). C4 output texts differ by design: ours keeps a blank line between kept paragraphs.

At the end, if `benchmarks/minhash_bench.py` is there, its `compare_minhash` runs on the same texts
(unless `--skip-minhash`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_corpus import build_corpus  # noqa: E402

from lmloom.data.documents import Document  # noqa: E402
from lmloom.data.quality import C4Config, GopherQualityConfig, GopherRepetitionConfig  # noqa: E402
from lmloom.data.steps import Drop, Edit, Step  # noqa: E402
from lmloom.data.words import clear_caches  # noqa: E402

CHUNK_DOCS = 256  # documents per chunk sent to a worker


# ------------------------------------------------------------------------------------------- ours


# The same three steps in two orders. The chain keeps the same documents either way (each step is a
# pure test, and c4, the only one that edits, stays last); only the cost differs, because whatever an
# earlier step drops the later ones never see. "reference" is datatrove's order; "cheap-first" runs the
# cheaper and, on this corpus, far more selective gopher_quality first.
ORDERS = {
    "reference": (GopherRepetitionConfig, GopherQualityConfig, C4Config),
    "cheap-first": (GopherQualityConfig, GopherRepetitionConfig, C4Config),
}


def our_steps(order: str = "reference") -> list[Step]:
    return [config().build() for config in ORDERS[order]]


def filter_lines(lines: list[str], steps: list[Step]) -> tuple[list[str], list[tuple[str, str]]]:
    """JSONL lines in, (kept JSONL lines, [(id, reason) of each dropped document]) out."""
    kept, dropped = [], []
    for line in lines:
        record = json.loads(line)
        document = Document(
            id=record["id"], text=record["text"], kind=record.get("kind", "prose"), source="bench"
        )
        for step in steps:
            result = step.apply(document)
            if isinstance(result, Drop):
                dropped.append((document.id, result.reason))
                break
            document = result.document if isinstance(result, Edit) else result
        else:
            kept.append(
                json.dumps(
                    {"id": document.id, "text": document.text, "kind": document.kind}, ensure_ascii=False
                )
            )
    return kept, dropped


_WORKER_STEPS: list[Step] = []


def _start_worker(order: str) -> None:
    _WORKER_STEPS[:] = our_steps(order)


def _filter_chunk(lines: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    return filter_lines(lines, _WORKER_STEPS)


def _chunks(shards: list[Path]) -> Iterator[list[str]]:
    for shard in shards:
        with shard.open(encoding="utf-8") as handle:
            while chunk := list(islice(handle, CHUNK_DOCS)):
                yield chunk


def run_ours(shards: list[Path], out_dir: Path, workers: int, order: str) -> tuple[float, dict[str, str]]:
    """Seconds taken, and the reason each dropped document was dropped (id -> reason)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dropped: dict[str, str] = {}
    started = time.perf_counter()
    with (out_dir / "kept.jsonl").open("w", encoding="utf-8") as out:
        if workers == 1:
            _start_worker(order)
            results = map(_filter_chunk, _chunks(shards))
            pool = None
        else:
            # spawn, not fork: each worker starts with cold caches, as a fresh process does
            pool = multiprocessing.get_context("spawn").Pool(workers, _start_worker, (order,))
            results = pool.imap(_filter_chunk, _chunks(shards))
        for kept, removed in results:
            if kept:
                out.write("\n".join(kept) + "\n")
            dropped.update(removed)
        if pool is not None:
            pool.close()
            pool.join()
    return time.perf_counter() - started, dropped


# ------------------------------------------------------------------------------------------ datatrove


def datatrove_filters(order: str = "reference") -> list:
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter

    # Defaults are the published thresholds, the same as ours; C4 splits on lines (split_paragraph),
    # as the paper and ours do. The same two orders as ours, so each ratio compares like with like.
    repetition, quality = GopherRepetitionFilter(), GopherQualityFilter()
    first = [repetition, quality] if order == "reference" else [quality, repetition]
    return [*first, C4QualityFilter(split_paragraph=True)]


def run_datatrove(
    input_dir: Path, out_dir: Path, log_dir: Path, tasks: int, workers: int, order: str = "reference"
) -> float:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    executor = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(str(input_dir), compression=None),
            *datatrove_filters(order),
            JsonlWriter(str(out_dir), compression=None),
        ],
        tasks=tasks,
        workers=workers,
        logging_dir=str(log_dir),
        skip_completed=False,
    )
    started = time.perf_counter()
    with _stderr_to(log_dir / "console.log"):  # datatrove logs every task's stats to stderr
        executor.run()
    return time.perf_counter() - started


@contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Send file descriptor 2 (and so the worker processes' stderr) to `path` for a while."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("w") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def datatrove_kept_ids(out_dir: Path) -> set[str]:
    kept = set()
    for path in sorted(out_dir.glob("*.jsonl")):
        with path.open(encoding="utf-8") as handle:
            kept.update(json.loads(line)["id"] for line in handle)
    return kept


def datatrove_reason(text: str) -> str:
    """The first of datatrove's filters that drops `text`, as "filter.reason", or "kept"."""
    from datatrove.data import Document as DatatroveDocument

    document = DatatroveDocument(text=text, id="x")
    for name, step in zip(("gopher_repetition", "gopher_quality", "c4"), datatrove_filters(), strict=True):
        result = step.filter(document)
        if result is not True:
            return f"{name}.{result[1] if isinstance(result, tuple) else 'dropped'}"
    return "kept"


def compare_steps(texts: list[str]) -> None:
    """Each of our steps against datatrove's filter for the same rules, alone, on the same texts: a
    stricter test than the chain, where an earlier step may hide a difference in a later one."""
    from datatrove.data import Document as DatatroveDocument

    print(f"\neach step alone on {len(texts):,} evenly spaced documents:")
    for ours, theirs in zip(our_steps(), datatrove_filters(), strict=True):
        agree, differences = 0, Counter()
        for text in texts:
            result = ours.apply(Document(id="x", text=text, kind="code", source="bench"))
            verdict = theirs.filter(DatatroveDocument(text=text, id="x"))
            theirs_reason = (
                "kept" if verdict is True else str(verdict[1] if isinstance(verdict, tuple) else "dropped")
            )
            ours_reason = result.reason if isinstance(result, Drop) else "kept"
            if (theirs_reason == "kept") == (ours_reason == "kept"):
                agree += 1
            else:
                differences[theirs_reason, ours_reason] += 1
        print(f"  {ours.name:<18} agreement {agree / len(texts):.2%}")
        for (theirs_reason, ours_reason), count in differences.most_common(6):
            print(f"      {count:>4}  datatrove {theirs_reason:<28} ours {ours_reason}")


# ------------------------------------------------------------------------------------------- report


def write_shards(corpus: list[dict], folder: Path, shards: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = -(-len(corpus) // shards)
    paths = []
    for index in range(shards):
        path = folder / f"shard_{index:03d}.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for record in corpus[index * per_shard : (index + 1) * per_shard]:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Time our heuristic quality chain (gopher_repetition + gopher_quality + c4) against "
        "datatrove's (GopherRepetitionFilter + GopherQualityFilter + C4QualityFilter) on the bench corpus, "
        "JSONL in and out, and compare their keep/drop decisions document by document.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="use only the first N documents of the corpus"
    )
    parser.add_argument(
        "--workers", default="1,2", help="comma-separated worker counts to time each side with, e.g. 1 or 1,2"
    )
    parser.add_argument("--shards", type=int, default=4, help="JSONL input shards (datatrove: one task each)")
    parser.add_argument(
        "--per-step-sample",
        type=int,
        default=2000,
        help="also compare each step alone with its datatrove filter on this many documents (0: skip)",
    )
    parser.add_argument("--skip-minhash", action="store_true", help="do not run benchmarks/minhash_bench.py")
    args = parser.parse_args()
    worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]

    corpus = build_corpus()
    if args.limit:
        corpus = corpus[: args.limit]
    texts = {record["id"]: record["text"] for record in corpus}
    kinds = Counter(record["kind"] for record in corpus)
    print(
        f"corpus: {len(corpus):,} documents ({kinds['code']:,} code, {kinds['prose']:,} prose), "
        f"{sum(map(len, texts.values())):,} characters; {os.cpu_count()} CPUs"
    )

    with tempfile.TemporaryDirectory(prefix="lmloom-bench-") as tmp:
        root = Path(tmp)
        shards = write_shards(corpus, root / "input", args.shards)
        timings: dict[tuple[str, int], float] = {}
        kept_counts: dict[tuple[str, int], int] = {}
        ours_dropped: dict[str, str] = {}
        theirs_kept: set[str] = set()
        for order in ORDERS:
            for workers in worker_counts:
                out = root / f"datatrove-{order}-{workers}"
                timings[f"datatrove, {order}", workers] = run_datatrove(
                    root / "input", out, root / f"logs-{order}-{workers}", args.shards, workers, order
                )
                kept = datatrove_kept_ids(out)
                if order == "reference":
                    theirs_kept = kept
                kept_counts[f"datatrove, {order}", workers] = len(kept)
        for order in ORDERS:
            for workers in worker_counts:
                clear_caches()  # a 1-worker run goes in this process: start each cold
                seconds, dropped = run_ours(shards, root / f"ours-{order}-{workers}", workers, order)
                if order == "reference":
                    ours_dropped = dropped
                timings[f"ours, {order}", workers] = seconds
                kept_counts[f"ours, {order}", workers] = len(corpus) - len(dropped)

    print()
    print(f"{'pipeline':<30}{'workers':>8}{'seconds':>10}{'docs/s':>10}{'kept':>8}")
    for (side, workers), seconds in timings.items():
        print(
            f"{side:<30}{workers:>8}{seconds:>10.2f}{len(corpus) / seconds:>10,.0f}{kept_counts[side, workers]:>8,}"
        )
    for order in ORDERS:
        for workers in worker_counts:
            ratio = timings[f"datatrove, {order}", workers] / timings[f"ours, {order}", workers]
            print(f"speed ratio ours / datatrove, both in {order} order, {workers} worker(s): {ratio:.1f}x")
    if len(worker_counts) > 1:
        first, last = worker_counts[0], worker_counts[-1]
        sides = dict.fromkeys(side for side, _ in timings)
        scaling = ", ".join(f"{side} {timings[side, first] / timings[side, last]:.2f}x" for side in sides)
        print(f"scaling {first} -> {last} workers: {scaling}")

    # Decisions, document by document (ours in the reference order, so that reasons line up).
    disagreements: Counter[tuple[str, str]] = Counter()
    agree = 0
    for doc_id, text in texts.items():
        ours_keep = doc_id not in ours_dropped
        theirs_keep = doc_id in theirs_kept
        if ours_keep == theirs_keep:
            agree += 1
        else:
            disagreements[datatrove_reason(text), ours_dropped.get(doc_id, "kept")] += 1
    print(f"\nkeep/drop agreement with datatrove: {agree:,} of {len(texts):,} = {agree / len(texts):.2%}")
    if disagreements:
        print(f"disagreements ({sum(disagreements.values())}), datatrove's deciding rule -> ours:")
        for (theirs, ours), count in disagreements.most_common():
            print(f"  {count:>5}  {theirs:<45} -> {ours}")
    if args.per_step_sample:
        compare_steps(
            list(texts.values())[:: max(1, len(texts) // args.per_step_sample)][: args.per_step_sample]
        )
    print("our drops by rule (reference order):")
    for rule, count in Counter(ours_dropped.values()).most_common():
        print(f"  {count:>6}  {rule}")

    if not args.skip_minhash and (HERE / "minhash_bench.py").exists():
        from minhash_bench import compare_minhash

        print("\nMinHash near-dedup on the same texts:")
        compare_minhash(list(texts.values()))


if __name__ == "__main__":
    main()
