"""Every step type a `data.prepare` recipe can list under `steps:`, and how the chain is assembled.

A recipe names steps by `type`, in the order it wants them:

    steps:
      - {type: language, keep: [en], kinds: [prose]}
      - {type: gopher_quality, kinds: [prose]}
      - {type: pii}
      - {type: near_dedup, threshold: 0.8}

The stage frames that list with its fixed cleaning (`normalize`, control characters) in front (after
the repairs that need raw text: `fix_text`, `markup`), and
puts `min_chars` and exact dedup after the per-document steps and before the first step that needs
the whole corpus (near dedup, paragraph dedup), where they are cheapest and their reasons clearest.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from lmloom.data.dedup import NearDedupConfig, ParagraphDedupConfig
from lmloom.data.langid import LanguageConfig
from lmloom.data.markup import MarkupConfig
from lmloom.data.pii import PiiConfig
from lmloom.data.quality import C4Config, FineWebConfig, GopherQualityConfig, GopherRepetitionConfig
from lmloom.data.safety import SafetyConfig
from lmloom.data.steps import (
    ExactDedup,
    MinChars,
    NormalForm,
    NormalizeUnicode,
    Step,
    StepConfig,
    StripControlChars,
)
from lmloom.data.text_repair import FixTextConfig, WhitespaceConfig

# Each module owning steps exports its StepConfig subclasses; they are listed here once.
STEP_CONFIGS: tuple[type[StepConfig], ...] = (
    FixTextConfig,
    MarkupConfig,
    WhitespaceConfig,
    LanguageConfig,
    GopherRepetitionConfig,
    GopherQualityConfig,
    C4Config,
    FineWebConfig,
    SafetyConfig,
    PiiConfig,
    NearDedupConfig,
    ParagraphDedupConfig,
)
# Repairs that need the raw text: ftfy reads the C1 control characters that mojibake is made of,
# and HTML must become text before anything judges the text. They run before the fixed cleaning.
REPAIR_TYPES = frozenset({"fix_text", "markup"})


def _step_spec():
    if len(STEP_CONFIGS) == 1:
        return STEP_CONFIGS[0]
    return Annotated[Union[STEP_CONFIGS], Field(discriminator="type")]  # noqa: UP007 (a runtime tuple)


StepSpec = _step_spec() if STEP_CONFIGS else StepConfig


def step_types() -> list[str]:
    return sorted(cls.model_fields["type"].default for cls in STEP_CONFIGS)


def build_chain(
    steps: list[StepConfig], normalize: NormalForm = "NFC", min_chars: int = 0, dedup: bool = True
) -> list[Step]:
    """The whole chain: fixed cleaning, the recipe's per-document steps, min_chars and exact dedup,
    then the recipe's remaining steps from its first global (whole-corpus) one on, in recipe order."""
    repairs = [config.build_step() for config in steps if config.type in REPAIR_TYPES]
    built = [config.build_step() for config in steps if config.type not in REPAIR_TYPES]
    first_global = next((i for i, step in enumerate(built) if not step.per_document), len(built))
    chain: list[Step] = list(repairs)
    if normalize != "none":
        chain.append(NormalizeUnicode(normalize))
    chain.append(StripControlChars())
    chain.extend(built[:first_global])
    if min_chars > 0:
        chain.append(MinChars(min_chars))
    if dedup:
        chain.append(ExactDedup())
    chain.extend(built[first_global:])
    return chain
