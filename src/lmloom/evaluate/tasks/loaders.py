"""`custom_dataset` functions for the task YAMLs beside this file (`!function loaders.stdlib_ppl`).

lm_eval imports this file by its path, so it reads the JSONL next to itself and builds the dataset in
memory (`Dataset.from_list`): no hub lookup, no builder cache under ~/.cache, no network at all.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _split(name: str):
    import datasets

    with open(HERE / name, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def stdlib_ppl(**_metadata):
    """The perplexity documents; lm_eval passes the task's metadata as keywords, unused here."""
    return _split("stdlib_ppl.jsonl")


def stdlib_mc(**_metadata):
    """The next-line multiple-choice items."""
    return _split("stdlib_mc.jsonl")
