"""Mixtures: weighted sampling across sources or document kinds (e.g. prose 70%, code 30% by bytes).

The weights say what share of the corpus's bytes each group should hold. Once the cleaned corpus is
known (the stage spools it), `MixturePlan.from_sizes` turns the weights into a rate per group:

- `downsample` (default): the group with the least data for its weight is kept whole and the others
  are sampled down to match; nothing is repeated.
- `upsample`: the group with the most data for its weight is kept whole and the others are repeated
  (rate > 1) up to their share; `max_repeat` caps the repetition, so a tiny group cannot be
  repeated a thousand times (the report then shows the share it really got).

Each document's number of copies is floor(rate) plus one more with probability frac(rate), drawn
from a hash of (seed, document id), so the same corpus and weights always give the same mixture.
The effective proportions (by bytes and documents) are reported beside the targets.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from lmloom.config import StrictConfig
from lmloom.data.documents import Document


class MixtureConfig(StrictConfig):
    weights: dict[str, float] = Field(
        ..., min_length=1, description="group -> weight (normalised to shares), e.g. {prose: 7, code: 3}"
    )
    by: Literal["source", "kind"] = Field(
        "source", description="group documents by source name or by kind (code, prose)"
    )
    mode: Literal["downsample", "upsample"] = "downsample"
    max_repeat: float = Field(4.0, ge=1.0, description="upsample: most copies of any document")
    seed: int = 0

    @model_validator(mode="after")
    def _positive(self) -> MixtureConfig:
        bad = [f"{group}={weight}" for group, weight in self.weights.items() if not weight > 0]
        if bad:
            raise ValueError(f"weights must be positive: {', '.join(bad)}")
        return self

    def group_of(self, doc: Document) -> str:
        return doc.kind if self.by == "kind" else doc.source


@dataclass
class MixturePlan:
    config: MixtureConfig
    rates: dict[str, float]  # group -> expected copies per document

    @classmethod
    def from_sizes(cls, config: MixtureConfig, sizes: dict[str, int]) -> MixturePlan:
        """Rates from the bytes each group holds after cleaning. Groups without a weight get rate 0
        (they are not part of the mixture); a weighted group with no data is an error."""
        from lmloom.errors import DataError

        empty = [group for group in config.weights if not sizes.get(group)]
        if empty:
            known = ", ".join(sorted(g for g, n in sizes.items() if n)) or "none"
            raise DataError(
                f"mixture: no documents left in {', '.join(empty)} (mixture.by={config.by}); groups "
                f"with documents: {known}"
            )
        total_weight = sum(config.weights.values())
        share = {group: weight / total_weight for group, weight in config.weights.items()}
        # corpus size T for which group g needs share_g * T bytes; rate_g = share_g * T / size_g
        per_share = {group: sizes[group] / share[group] for group in share}
        total = min(per_share.values()) if config.mode == "downsample" else max(per_share.values())
        rates = {group: min(share[group] * total / sizes[group], config.max_repeat) for group in share}
        return cls(config, rates)

    def copies(self, doc: Document) -> int:
        rate = self.rates.get(self.config.group_of(doc), 0.0)
        whole = math.floor(rate)
        fraction = rate - whole
        if fraction <= 0:
            return whole
        digest = hashlib.sha256(f"{self.config.seed}\0{doc.source}\0{doc.id}".encode()).digest()
        return whole + (int.from_bytes(digest[:8], "big") / 2**64 < fraction)


def mixture_report(
    plan: MixturePlan, before: dict[str, int], after: dict[str, int], docs_after: dict[str, int]
) -> dict[str, Any]:
    """Targets against what the corpus really holds, by bytes (the shares the weights are about)."""
    total_weight = sum(plan.config.weights.values())
    total_after = sum(after.values()) or 1
    return {
        "by": plan.config.by,
        "mode": plan.config.mode,
        "groups": {
            group: {
                "target_share": round(weight / total_weight, 4),
                "effective_share": round(after.get(group, 0) / total_after, 4),
                "rate": round(plan.rates[group], 4),
                "bytes_before": before.get(group, 0),
                "bytes_after": after.get(group, 0),
                "documents_after": docs_after.get(group, 0),
            }
            for group, weight in plan.config.weights.items()
        },
        "unweighted_groups_dropped": sorted(set(before) - set(plan.config.weights)),
    }
