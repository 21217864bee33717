"""Build the task files from `heldout_source.txt`: `python -m lmloom.evaluate.tasks.build` rewrites them.

Deterministic (one seeded `random.Random`, documents in file order), so the committed JSONL is exactly
what this makes; `tests/test_harness.py` checks that.

- `stdlib_ppl.jsonl`: one row per source document, `{"id", "kind", "text"}`.
- `stdlib_mc.jsonl`: from each code document, `ITEMS_PER_DOC` lines to predict. `context` is the lines
  before the target (at most `MAX_CONTEXT_LINES`, ending with a newline), `choices` the target line and
  three distractors, `label` the index of the target. One distractor comes from the same function (it
  fits the topic, so only knowing the code's order picks the right one), two from other functions;
  every distractor is re-indented to the target's indentation, so indentation gives nothing away.
  Targets are code lines of at least `MIN_TARGET_CHARS` characters outside docstrings, never the first
  line of a document.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from lmloom.evaluate.tasks import MC_FILE, PPL_FILE, SOURCE_FILE

SEED = 20250
ITEMS_PER_DOC = 2
MAX_CONTEXT_LINES = 16
MIN_TARGET_CHARS = 12
_HEADER = re.compile(r"^=== (code|prose): (.+) ===$")


@dataclass(frozen=True)
class SourceDoc:
    kind: str  # "code" or "prose"
    name: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.name}"


def read_source(path: Path = SOURCE_FILE) -> list[SourceDoc]:
    """The documents of the source file: each starts with a `=== kind: name ===` line."""
    docs: list[SourceDoc] = []
    header: tuple[str, str] | None = None
    body: list[str] = []

    def close() -> None:
        if header is not None:
            docs.append(SourceDoc(header[0], header[1], "\n".join(body).strip("\n") + "\n"))

    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = _HEADER.match(line)
        if match:
            close()
            header, body = (match[1], match[2]), []
        elif header is None:
            raise ValueError(f"{path}:{number}: text before the first `=== kind: name ===` header")
        else:
            body.append(line)
    close()
    return docs


def target_lines(lines: list[str]) -> list[int]:
    """Indices of the lines that may be predicted: code (not docstring) lines long enough to carry
    information, never the first."""
    candidates, in_docstring = [], False
    for i, line in enumerate(lines):
        quotes = line.count('"""')
        if in_docstring or quotes:
            if quotes % 2:
                in_docstring = not in_docstring
            continue
        if i and len(line.strip()) >= MIN_TARGET_CHARS:
            candidates.append(i)
    return candidates


def _reindent(line: str, like: str) -> str:
    return like[: len(like) - len(like.lstrip())] + line.lstrip()


def _pick(rng: random.Random, pool: list[str], n: int, taken: set[str], like: str) -> list[str]:
    """Up to `n` lines of `pool` whose text is not in `taken` (updated), indented as `like`."""
    chosen = []
    for line in rng.sample(pool, len(pool)):
        if len(chosen) == n:
            break
        if line.strip() not in taken:
            taken.add(line.strip())
            chosen.append(_reindent(line, like))
    return chosen


def mc_items(docs: list[SourceDoc], seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    code = [(doc, doc.text.splitlines()) for doc in docs if doc.kind == "code"]
    pools = {doc.name: [lines[i] for i in target_lines(lines)] for doc, lines in code}
    items = []
    for doc, lines in code:
        own = target_lines(lines)
        others = [line for name, pool in pools.items() if name != doc.name for line in pool]
        for i in sorted(rng.sample(own, min(ITEMS_PER_DOC, len(own)))):
            answer = lines[i]
            taken = {answer.strip()}
            same = _pick(rng, [lines[j] for j in own if j != i], 1, taken, answer)
            choices = [answer, *same, *_pick(rng, others, 3 - len(same), taken, answer)]
            rng.shuffle(choices)
            context = "\n".join(lines[max(0, i - MAX_CONTEXT_LINES) : i]) + "\n"
            label = choices.index(answer)
            items.append({"id": f"{doc.name}/{i}", "context": context, "choices": choices, "label": label})
    return items


def ppl_rows(docs: list[SourceDoc]) -> list[dict]:
    return [{"id": doc.id, "kind": doc.kind, "text": doc.text} for doc in docs]


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def build() -> dict[Path, str]:
    """Each task file and the text it should hold."""
    docs = read_source()
    return {PPL_FILE: jsonl(ppl_rows(docs)), MC_FILE: jsonl(mc_items(docs))}


def main() -> None:
    for path, text in build().items():
        path.write_text(text, encoding="utf-8")
        print(f"{path.name}: {text.count(chr(10))} rows")


if __name__ == "__main__":
    main()
