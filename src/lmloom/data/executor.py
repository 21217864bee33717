"""Running a chain of steps over a document stream: in this process, in worker processes, or on Ray.

Every executor gives the same output in the same order as running the steps one after the other
here (`run_steps`), whatever the number of workers:

- The chain is cut at its first `per_document = False` step. The head (pure per-document steps)
  runs in workers on ordered batches of documents; workers also compute `prepare(doc)` for each
  later global step on the document as the head left it. The tail (dedup and anything after it)
  runs here, in input order; a global step uses the worker's `prepare` result only if the text it
  was computed on is still the text it sees (an earlier tail step may have edited it).
- Drops and edits made in workers travel back as events and are replayed here in document order,
  so `removed.jsonl` and the statistics do not depend on scheduling.
- At most `2 × workers` batches are in flight, so memory stays bounded however large the stream.

Documents cross process boundaries by pickling; that is IPC between our own processes, never a
file format. A document's `origin` (its source file record, which counts kept documents) stays here.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import Field

from lmloom.config import StrictConfig
from lmloom.data.documents import Document, utf8_len
from lmloom.data.steps import Drop, Edit, OnDrop, OnEdit, Step, StepStats, run_steps

BATCH_DOCS = 64


class ExecutorConfig(StrictConfig):
    """How `data.prepare` spreads its per-document steps over CPU cores (output is identical)."""

    type: Literal["local", "ray"] = Field(
        "local", description="local: worker processes on this machine; ray: tasks on a Ray cluster"
    )
    workers: int = Field(
        0, ge=0, description="worker processes (local) or concurrent tasks (ray); 0 = one per CPU core"
    )
    batch_docs: int = Field(BATCH_DOCS, ge=1, description="documents per task")
    ray_address: str | None = Field(
        None, description="address of a running Ray cluster (ray: only); default: start a local one"
    )

    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1


# -- what a worker does with one batch -------------------------------------------------------------


@dataclass
class _Event:
    """A drop or an edit that happened in a worker, replayed in order by the main process."""

    step: int
    outcome: Drop | Edit


@dataclass
class _Outcome:
    """One document's fate in the head: kept (with its final text) or dropped, and what happened."""

    doc: Document | None
    events: list[_Event]
    prepared: dict[int, tuple[str, Any]]  # global step index -> (text it was computed on, result)


def process_batch(
    head: list[Step], tail: list[Step], docs: list[Document]
) -> tuple[list[_Outcome], list[StepStats]]:
    """Run the head steps over a batch and prepare the tail's global steps; return fresh statistics."""
    for step in head:
        step.stats = StepStats(step.name)
    outcomes: list[_Outcome] = []
    for doc in docs:
        events: list[_Event] = []
        current: Document | None = doc
        for index, step in enumerate(head):
            one = list(step.run([current], _record_drop(events, index), _record_edit(events, index)))
            current = one[0] if one else None
            if current is None:
                break
        prepared: dict[int, tuple[str, Any]] = {}
        if current is not None:
            for index, step in enumerate(tail):
                if not step.per_document:
                    value = step.prepare(current)
                    if value is not None:
                        prepared[index] = (current.text, value)
        outcomes.append(_Outcome(current, events, prepared))
    return outcomes, [step.stats for step in head]


def _record_drop(events: list[_Event], index: int) -> OnDrop:
    return lambda doc, name, drop: events.append(_Event(index, drop))


def _record_edit(events: list[_Event], index: int) -> OnEdit:
    return lambda doc, name, edit: events.append(_Event(index, edit))


# Worker-process state: the steps, unpickled once per worker by the pool initializer.
_WORKER_STEPS: tuple[list[Step], list[Step]] | None = None


def _init_worker(head: list[Step], tail: list[Step]) -> None:
    global _WORKER_STEPS
    _WORKER_STEPS = (head, tail)


def _worker_batch(docs: list[Document]) -> tuple[list[_Outcome], list[StepStats]]:
    assert _WORKER_STEPS is not None, "worker used before its initializer ran"
    return process_batch(*_WORKER_STEPS, docs)


# -- the executors --------------------------------------------------------------------------------


def split_chain(steps: list[Step]) -> tuple[list[Step], list[Step]]:
    """(head, tail): the head is the longest prefix of per-document steps."""
    for index, step in enumerate(steps):
        if not step.per_document:
            return steps[:index], steps[index:]
    return list(steps), []


def execute(
    docs: Iterable[Document],
    steps: list[Step],
    config: ExecutorConfig | None = None,
    on_drop: OnDrop | None = None,
    on_edit: OnEdit | None = None,
) -> Iterator[Document]:
    """The documents that survive `steps`, in input order, with drops/edits reported as they happen."""
    config = config or ExecutorConfig(workers=1)
    workers = config.worker_count()
    head, tail = split_chain(steps)
    if (workers <= 1 and config.type == "local") or not head and not any(not s.per_document for s in tail):
        yield from run_steps(docs, steps, on_drop, on_edit)
        return
    if config.type == "ray":
        submit, results = _ray_runner(config, head, tail, workers)
    else:
        submit, results = _process_runner(head, tail, workers)
    try:
        outcomes = _ordered(docs, config.batch_docs, 2 * workers, submit, results)
        survivors = _replay(outcomes, head, tail, on_drop, on_edit)
        yield from _run_tail(survivors, tail, on_drop, on_edit)
    finally:
        results.close()


Submit = Callable[[list[Document]], Any]


class _Results:
    """Turns a submitted handle into its batch result; `close` releases the workers."""

    def __init__(self, get: Callable[[Any], Any], close: Callable[[], None]):
        self.get = get
        self.close = close


def _process_runner(head: list[Step], tail: list[Step], workers: int) -> tuple[Submit, _Results]:
    # forkserver: workers start from a clean interpreter (no inherited threads, locks or open
    # artifact files), and are forked from a small server, which is cheaper than spawn per worker.
    context = multiprocessing.get_context("forkserver")
    pool = context.Pool(workers, initializer=_init_worker, initargs=(head, tail))

    def close() -> None:
        pool.terminate()
        pool.join()

    return (lambda batch: pool.apply_async(_worker_batch, (batch,))), _Results(lambda h: h.get(), close)


def _ray_runner(
    config: ExecutorConfig, head: list[Step], tail: list[Step], workers: int
) -> tuple[Submit, _Results]:
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the install
        from lmloom.errors import ConfigError

        raise ConfigError("executor.type: ray needs Ray: pip install 'lmloom[ray]'") from exc
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=config.ray_address,
            num_cpus=None if config.ray_address else workers,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    steps_ref = ray.put((head, tail))
    remote = ray.remote(_ray_batch)

    def close() -> None:
        if started_here:
            ray.shutdown()

    return (lambda batch: remote.remote(steps_ref, batch)), _Results(ray.get, close)


def _ray_batch(steps: tuple[list[Step], list[Step]], docs: list[Document]):
    return process_batch(*steps, docs)


def _ordered(
    docs: Iterable[Document], batch_docs: int, in_flight: int, submit: Submit, results: _Results
) -> Iterator[tuple[Document, _Outcome, list[StepStats] | None]]:
    """(original document, outcome, batch stats on the batch's first document) in input order."""
    pending: deque[tuple[list[Document], Any]] = deque()

    def drain_one() -> Iterator[tuple[Document, _Outcome, list[StepStats] | None]]:
        originals, handle = pending.popleft()
        outcomes, stats = results.get(handle)
        for i, (original, outcome) in enumerate(zip(originals, outcomes, strict=True)):
            yield original, outcome, stats if i == 0 else None

    batch: list[Document] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == batch_docs:
            pending.append((batch, submit([replace(d, origin=None) for d in batch])))
            batch = []
            if len(pending) >= in_flight:
                yield from drain_one()
    if batch:
        pending.append((batch, submit([replace(d, origin=None) for d in batch])))
    while pending:
        yield from drain_one()


def _replay(
    outcomes: Iterable[tuple[Document, _Outcome, list[StepStats] | None]],
    head: list[Step],
    tail: list[Step],
    on_drop: OnDrop | None,
    on_edit: OnEdit | None,
) -> Iterator[tuple[Document, dict[int, tuple[str, Any]]]]:
    """Merge worker statistics into the head steps, report events in order, re-attach origins."""
    for original, outcome, stats in outcomes:
        if stats is not None:
            for step, delta in zip(head, stats, strict=True):
                _merge(step.stats, delta)
        current = original
        for event in outcome.events:
            name = head[event.step].name
            if isinstance(event.outcome, Drop):
                if on_drop:
                    on_drop(current, name, event.outcome)
            else:
                current = replace(event.outcome.document, origin=original.origin)
                if on_edit:
                    on_edit(current, name, event.outcome)
        if outcome.doc is not None:
            yield replace(outcome.doc, origin=original.origin), outcome.prepared


def _run_tail(
    items: Iterable[tuple[Document, dict[int, tuple[str, Any]]]],
    tail: list[Step],
    on_drop: OnDrop | None,
    on_edit: OnEdit | None,
) -> Iterator[Document]:
    """The tail steps here, in order, using the workers' `prepare` results where still valid."""
    for doc, prepared in items:
        current: Document | None = doc
        for index, step in enumerate(tail):
            known = prepared.get(index)
            if known is not None and known[0] == current.text:
                one = list(step.run_prepared([current], known[1], on_drop, on_edit))
            else:
                one = list(step.run([current], on_drop, on_edit))
            current = one[0] if one else None
            if current is None:
                break
        if current is not None:
            yield current


def _merge(total: StepStats, delta: StepStats) -> None:
    total.docs_in += delta.docs_in
    total.docs_out += delta.docs_out
    total.modified += delta.modified
    total.bytes_in += delta.bytes_in
    total.bytes_out += delta.bytes_out
    total.seconds += delta.seconds
    total.removed.update(delta.removed)


__all__ = ["ExecutorConfig", "execute", "process_batch", "split_chain", "utf8_len"]
