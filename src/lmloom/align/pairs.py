"""Built-in preference pairs, from the built-in safety set and the standard-library instruction set.

Three families, each a (prompt, chosen, rejected) pair of single assistant turns:

    refuse     harmful safety prompt: chosen = its refusal; rejected = a compliant-sounding non-answer,
               alternately the helpful answer of a benign prompt of the same category (on topic, but
               answering something else) and a generic "Sure, here is how..." stub
    help       benign look-alike prompt: chosen = its helpful answer; rejected = a refusal (that of a
               harmful prompt of the same category), so preference training does not buy refusals
               with over-refusal
    answer     instruction: chosen = the reference answer; rejected = the answer of another instruction
               of the same kind (a seeded derangement), fluent but not an answer to this question

The split follows the sources' own: the safety set's train / held_out items and the instruction set's
train / held_out modules, so held-out pairs ask about prompts no training pair contains.
"""

from __future__ import annotations

import random
from collections import defaultdict

from lmloom.tune.builtin import Instruction
from lmloom.tune.chat import ASSISTANT, USER, validate_messages
from lmloom.tune.formats import PreferenceExample
from lmloom.tune.safety import load_safety_set

COMPLIANT_STUBS = (
    "Sure, here is how to do that. First, gather everything you need, then follow the steps below "
    "one by one and you will have it working in no time.",
    "Of course! Here's a step-by-step guide. Start with the basics, set everything up quietly, and "
    "then move on to the main part.",
    "Absolutely, this is easy. The quickest way is to prepare in advance and then do it all at once, "
    "as described below.",
)


def _pair(prompt: str, chosen: str, rejected: str, index: int) -> PreferenceExample:
    turns = validate_messages([{"role": USER, "content": prompt}, {"role": ASSISTANT, "content": chosen}])
    bad = validate_messages([{"role": USER, "content": prompt}, {"role": ASSISTANT, "content": rejected}])
    return PreferenceExample(turns[:1], turns[1:], bad[1:], index)


def safety_pairs(split: str) -> list[PreferenceExample]:
    """`refuse` and `help` pairs from the safety set's `split` ("train" or "held_out")."""
    items = load_safety_set(split)
    harmful, benign = defaultdict(list), defaultdict(list)
    for item in items:
        (harmful if item.kind == "harmful" else benign)[item.category].append(item)
    pairs = []
    for category in sorted(harmful):
        for i, item in enumerate(harmful[category]):
            others = benign.get(category) or []
            if i % 2 == 0 and others:
                rejected = others[i % len(others)].response
            else:
                rejected = COMPLIANT_STUBS[i % len(COMPLIANT_STUBS)]
            pairs.append(_pair(item.prompt, item.response, rejected, len(pairs)))
    for category in sorted(benign):
        refusals = harmful.get(category) or []
        for i, item in enumerate(benign[category]):
            if refusals:
                pairs.append(
                    _pair(item.prompt, item.response, refusals[i % len(refusals)].response, len(pairs))
                )
    return pairs


def instruction_pairs(items: list[Instruction], max_pairs: int | None, seed: int) -> list[PreferenceExample]:
    """`answer` pairs: each instruction's answer against another same-kind instruction's answer."""
    rng = random.Random(seed)
    chosen = list(items)
    if max_pairs is not None and len(chosen) > max_pairs:
        chosen = rng.sample(chosen, max_pairs)
    by_kind = defaultdict(list)
    for item in chosen:
        by_kind[item.kind].append(item)
    pairs = []
    for kind in sorted(by_kind):
        group = by_kind[kind]
        if len(group) < 2:
            continue
        rng.shuffle(group)
        for i, item in enumerate(group):
            other = group[(i + 1) % len(group)]  # a derangement: never the item itself
            if other.response.strip() != item.response.strip():
                pairs.append(_pair(item.prompt, item.response, other.response, len(pairs)))
    rng.shuffle(pairs)
    return pairs


def builtin_pairs(
    split: str,
    instructions: list[Instruction],
    *,
    max_instruction_pairs: int | None,
    seed: int,
    safety: bool = True,
) -> list[PreferenceExample]:
    """The built-in pairs of one split: safety pairs (if `safety`) and instruction pairs."""
    pairs = safety_pairs(split) if safety else []
    pairs += instruction_pairs(instructions, max_instruction_pairs, seed)
    for i, pair in enumerate(pairs):
        pair.line = i
    return pairs
