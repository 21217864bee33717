"""lmloom's own lm-evaluation-harness tasks, with their data inside the package (no download).

    lmloom_stdlib_ppl   loglikelihood_rolling over held-out Python-stdlib-style code and reference prose:
                        word_perplexity, byte_perplexity, bits_per_byte
    lmloom_stdlib_mc    multiple choice: the real next line of a Python function among three
                        distractors (one from the same function, two from others): acc, acc_norm
    lmloom_stdlib       the group of both

"Held out" because the default corpus (the local Python's standard library and docs) cannot contain
it: `heldout_source.txt` is original code and prose written for lmloom in the standard library's style,
not copied from CPython. `python -m lmloom.evaluate.tasks.build` turns it into the committed JSONL files,
deterministically (a test checks that the files are what the builder makes).

`lm_eval` finds the tasks through `TaskManager(include_path=TASKS_DIR)` (or `--include_path` on its own
command line). Each YAML loads its rows through `loaders.py` (`custom_dataset`), not `dataset_path: json`
with `data_files`: lm_eval 0.4 hands `data_files` to `datasets.load_dataset` unchanged, so a relative path
is resolved against the working directory, not the YAML's folder.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
SOURCE_FILE = TASKS_DIR / "heldout_source.txt"
PPL_FILE = TASKS_DIR / "stdlib_ppl.jsonl"
MC_FILE = TASKS_DIR / "stdlib_mc.jsonl"
TASK_NAMES = ("lmloom_stdlib_ppl", "lmloom_stdlib_mc")
GROUP_NAME = "lmloom_stdlib"
