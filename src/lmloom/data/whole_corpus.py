"""The pass over the whole cleaned corpus that some decisions need before any document is written:
the poisoning scan (which documents share a rare trigger) and mixture sampling (which rates give the
target shares). The survivors of the step chain are spooled to scratch (encrypted like the run's
artifacts), scanned, then streamed out once more with poisoned documents removed and each group
sampled to its rate. Every removal is reported through `on_drop` like any step's.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

from pydantic import Field

from lmloom.config import StrictConfig
from lmloom.data.documents import Document, utf8_len
from lmloom.data.mixture import MixtureConfig, MixturePlan, mixture_report
from lmloom.data.poisoning import PoisonScanConfig
from lmloom.data.spool import DocumentSpool
from lmloom.data.steps import Drop, OnDrop, StepStats


class PoisoningConfig(StrictConfig):
    """The poisoning scan over the cleaned corpus: report always, remove the flagged documents on request."""

    remove: bool = Field(False, description="drop the flagged documents (reason poisoning.<kind>)")
    scan: PoisonScanConfig = Field(default_factory=PoisonScanConfig)


class WholeCorpusPass:
    def __init__(self, spool: DocumentSpool, mixture: MixtureConfig | None, poisoning: Any, on_drop: OnDrop):
        self.spool = spool
        self.mixture = mixture
        self.poisoning = poisoning  # PoisoningConfig or None
        self.on_drop = on_drop
        self.stats: list[StepStats] = []
        self.metadata: dict[str, Any] = {}

    def run(self, survivors: Iterable[Document]) -> Iterator[Document]:
        sizes: Counter[str] = Counter()
        for doc in survivors:
            self.spool.write(doc)
            if self.mixture:
                sizes[self.mixture.group_of(doc)] += utf8_len(doc.text)
        self.spool.close_writing()
        try:
            flagged = self._scan() if self.poisoning else {}
            plan = MixturePlan.from_sizes(self.mixture, dict(sizes)) if self.mixture else None
            yield from self._emit(flagged, plan, sizes)
        finally:
            self.spool.delete()

    def _scan(self) -> dict[str, str]:
        """Poisoning findings into the metadata; the ids to remove (-> reason) when removal is on."""
        from lmloom.data.poisoning import scan_poisoning

        started = time.perf_counter()
        report = scan_poisoning(self.spool.read, self.poisoning.scan)
        stats = StepStats("poisoning_scan", seconds=time.perf_counter() - started)
        self.stats.append(stats)
        self.metadata["poisoning"] = report.to_json()
        if not self.poisoning.remove:
            return {}
        return {doc_id: f"poisoning.{finding.kind}" for doc_id, finding in report.finding_by_id().items()}

    def _emit(
        self, flagged: dict[str, str], plan: MixturePlan | None, before: Counter[str]
    ) -> Iterator[Document]:
        poison = StepStats("poisoning") if self.poisoning else None
        mixing = StepStats("mixture") if plan else None
        self.stats.extend(s for s in (poison, mixing) if s is not None)
        after: Counter[str] = Counter()
        docs_after: Counter[str] = Counter()
        for doc in self.spool.read():
            size = utf8_len(doc.text)
            if poison is not None:
                _count_in(poison, size)
                reason = flagged.get(doc.id)
                if reason:
                    poison.removed[reason] += 1
                    self.on_drop(doc, "poisoning", Drop(reason, "flagged by the poisoning scan"))
                    continue
                _count_out(poison, size)
            copies = 1
            if plan is not None and mixing is not None:
                _count_in(mixing, size)
                copies = plan.copies(doc)
                if copies == 0:
                    group = plan.config.group_of(doc)
                    reason = "mixture.sampled_out" if group in plan.rates else "mixture.unweighted_group"
                    mixing.removed[reason] += 1
                    self.on_drop(doc, "mixture", Drop(reason, f"group {group}"))
                    continue
                group = plan.config.group_of(doc)
                after[group] += size * copies
                docs_after[group] += copies
                mixing.docs_out += copies
                mixing.bytes_out += size * copies
            for k in range(copies):
                yield doc if k == 0 else replace(doc, id=f"{doc.id}#copy{k}")
        if plan is not None:
            self.metadata["mixture"] = mixture_report(plan, dict(before), dict(after), dict(docs_after))


def _count_in(stats: StepStats, size: int) -> None:
    stats.docs_in += 1
    stats.bytes_in += size


def _count_out(stats: StepStats, size: int) -> None:
    stats.docs_out += 1
    stats.bytes_out += size
