"""A built-in instruction set made from the default corpus (the running Python's standard library).

So the quickstart can go on from a pre-trained model to a chat model with no download, the standard
library is turned into question/answer pairs. Files are found exactly as the corpus finds them
(`lmloom.data.stdlib_corpus.list_stdlib_files`: no tests, no site-packages) and parsed with `ast`,
never imported. Five kinds of example:

    write_function    "Write a Python function `name(args)` that: <docstring's first paragraph>"
                      -> the function's source (public top-level functions of 3-40 lines)
    explain_function  "What does `module.name` do?" -> the docstring's first paragraph
    explain_method    "What does the `Class.name` method in `module` do?" -> likewise
    explain_class     "What is the `module.Class` class for?" -> the class docstring's first paragraph
    explain_module    "What is the `module` module for?" -> the module docstring's first paragraph
    explain_topic     "Explain <pydoc topic title> in Python." -> the topic's opening paragraphs
                      (`pydoc_data.topics`, the pages `help()` shows)

Deterministic: the same standard library and `seed` give the same examples in the same order (the
phrasing of each prompt is drawn from a generator seeded by the seed and the example's id, not by its
position). Deduplicated on normalised prompt and on normalised answer (the first in id order stays),
so the many `__init__` docstrings, or a function that `ntpath` and `posixpath` share, appear once.
Private modules and names (leading underscore) are left out. The split into train and held-out is by
*group* (the module, or the topic), by a seeded hash: every example about one module lands on the same
side, so held-out questions are about modules the tuned model has not seen answered.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmloom.data.stdlib_corpus import (
    TOPICS_FILE,
    default_stdlib_root,
    list_stdlib_files,
    module_name,
    read_topics,
)
from lmloom.tune.chat import ASSISTANT, MARKERS, USER

KINDS = (
    "write_function",
    "explain_function",
    "explain_method",
    "explain_class",
    "explain_module",
    "explain_topic",
)
MAX_SOURCE_BYTES = 300_000  # generated tables (e.g. big encodings) hold no documented functions
MIN_PARAGRAPH_CHARS = 24
MAX_PARAGRAPH_CHARS = 500
WRITE_LINES = (3, 40)

_WRITE = (
    "Write a Python function `{sig}` that: {doc}",
    "Implement `{sig}` in Python. It should do the following: {doc}",
    "Write `{sig}`. Specification: {doc}",
)
_EXPLAIN_FUNCTION = (
    "What does `{qual}` do?",
    "Explain what the function `{qual}` does.",
    "In the Python standard library, what is `{qual}` for?",
)
_EXPLAIN_METHOD = (
    "What does the `{qual}` method in `{module}` do?",
    "Explain the method `{qual}` of the `{module}` module.",
)
_EXPLAIN_CLASS = (
    "What is the `{qual}` class for?",
    "Explain the class `{qual}` from the standard library.",
)
_EXPLAIN_MODULE = (
    "What is the `{module}` module for?",
    "What does the Python module `{module}` provide?",
)
_EXPLAIN_TOPIC = (
    "Explain {title} in Python.",
    "How does Python define {title}?",
)


@dataclass(frozen=True)
class Instruction:
    id: str  # "<kind>:<qualified name>", unique
    kind: str
    group: str  # the unit of the train/held-out split: the module, or "topic:<name>"
    prompt: str
    response: str

    def messages(self) -> list[dict[str, str]]:
        return [{"role": USER, "content": self.prompt}, {"role": ASSISTANT, "content": self.response}]


@dataclass
class InstructionSet:
    train: list[Instruction]
    held_out: list[Instruction]
    stats: dict = field(default_factory=dict)

    def write_jsonl(self, directory: Path | str) -> dict[str, Path]:
        """`train.jsonl` and `held_out.jsonl` in the messages format `load_messages` reads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {}
        for split, items in (("train", self.train), ("held_out", self.held_out)):
            path = paths[split] = directory / f"{split}.jsonl"
            with open(path, "w", encoding="utf-8") as handle:
                for item in items:
                    row = {"id": item.id, "kind": item.kind, "messages": item.messages()}
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        return paths


def _unit(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _paragraph(doc: str | None) -> str | None:
    """The first paragraph of a cleaned docstring on one line, or None when unusable."""
    if not doc:
        return None
    first = " ".join(doc.strip().split("\n\n", 1)[0].split())
    if not MIN_PARAGRAPH_CHARS <= len(first) <= MAX_PARAGRAPH_CHARS or ">>>" in first:
        return None
    return first


def _public(name: str) -> bool:
    return not name.startswith("_")


def _file_items(rel: str, text: str) -> Iterator[tuple[str, str, dict]]:
    """(kind, id, fields) for the documented public objects of one source file."""
    module = module_name(rel)
    if not all(_public(part) for part in module.split(".")):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError, RecursionError):
            return
    lines = text.splitlines(keepends=True)
    if doc := _paragraph(ast.get_docstring(tree)):
        yield "explain_module", module, {"module": module, "doc": doc}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public(node.name):
            doc = _paragraph(ast.get_docstring(node))
            if not doc or doc.startswith(f"{node.name}("):  # a C-style signature line, not prose
                continue
            qual = f"{module}.{node.name}"
            yield "explain_function", qual, {"qual": qual, "doc": doc}
            first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            n_lines = node.end_lineno - first + 1
            if WRITE_LINES[0] <= n_lines <= WRITE_LINES[1] and node.col_offset == 0:
                # Whole lines (ast.get_source_segment re-splits the file on every call: quadratic).
                source = "".join(lines[first - 1 : node.end_lineno]).rstrip()
                sig = f"{node.name}({ast.unparse(node.args)})"
                yield "write_function", qual, {"sig": sig, "doc": doc, "source": source}
        elif isinstance(node, ast.ClassDef) and _public(node.name):
            qual = f"{module}.{node.name}"
            if doc := _paragraph(ast.get_docstring(node)):
                yield "explain_class", qual, {"qual": qual, "doc": doc}
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public(item.name):
                    doc = _paragraph(ast.get_docstring(item))
                    if doc and not doc.startswith(f"{item.name}("):
                        method = f"{node.name}.{item.name}"
                        yield (
                            "explain_method",
                            f"{module}.{method}",
                            {"qual": method, "module": module, "doc": doc},
                        )


def _topic_item(name: str, text: str, max_chars: int) -> tuple[str, str] | None:
    """(title, answer) of a pydoc topic: its heading and the opening paragraphs up to `max_chars`."""
    lines = text.strip("\n").split("\n")
    if len(lines) < 3 or set(lines[1].strip()) not in ({"*"}, {"="}, {"-"}):
        return None
    title = lines[0].strip()
    paragraphs = [p.strip("\n") for p in "\n".join(lines[2:]).strip("\n").split("\n\n") if p.strip()]
    answer = ""
    for paragraph in paragraphs:
        if set(paragraph.strip()) <= set("*=-"):  # a sub-heading underline: stop at the next section
            break
        candidate = f"{answer}\n\n{paragraph}" if answer else paragraph
        if len(candidate) > max_chars:
            break
        answer = candidate
    if len(answer) < MIN_PARAGRAPH_CHARS:
        return None
    title = title[0].lower() + title[1:] if title[:1].isupper() and not title[1:2].isupper() else title
    return title, answer


def _prompt(templates: tuple[str, ...], seed: int, key: str, **fields) -> str:
    return random.Random(f"{seed}:{key}").choice(templates).format(**fields)


def _examples(root: Path, seed: int, max_topic_chars: int) -> Iterator[Instruction]:
    for rel, size in list_stdlib_files(root):
        if rel == TOPICS_FILE or size > MAX_SOURCE_BYTES:
            continue
        try:
            text = (root / rel).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError):
            continue
        module = module_name(rel)
        for kind, qual, f in _file_items(rel, text):
            key = f"{kind}:{qual}"
            if kind == "write_function":
                prompt, response = _prompt(_WRITE, seed, key, sig=f["sig"], doc=f["doc"]), f["source"]
            elif kind == "explain_function":
                prompt, response = _prompt(_EXPLAIN_FUNCTION, seed, key, qual=qual), f["doc"]
            elif kind == "explain_method":
                prompt = _prompt(_EXPLAIN_METHOD, seed, key, qual=f["qual"], module=module)
                response = f["doc"]
            elif kind == "explain_class":
                prompt, response = _prompt(_EXPLAIN_CLASS, seed, key, qual=qual), f["doc"]
            else:
                prompt, response = _prompt(_EXPLAIN_MODULE, seed, key, module=module), f["doc"]
            yield Instruction(key, kind, module, prompt, response)
    topics, _, _ = read_topics(root)
    for name in sorted(topics):
        item = _topic_item(name, topics[name], max_topic_chars)
        if item:
            key = f"explain_topic:{name}"
            prompt = _prompt(_EXPLAIN_TOPIC, seed, key, title=item[0])
            yield Instruction(key, "explain_topic", f"topic:{name}", prompt, item[1])


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def build_instruction_set(
    root: Path | str | None = None,
    *,
    seed: int = 0,
    held_out_fraction: float = 0.05,
    max_chars: int = 2000,
    max_examples: int | None = None,
    max_topic_chars: int = 800,
) -> InstructionSet:
    """The instruction set of the standard library at `root` (default: the running Python's).

    `max_chars` caps prompt + response (longer examples are dropped, never cut); `max_examples` keeps
    a seeded sample of that many. Examples are sorted by id in each split. `stats` holds counts per
    kind and split, the reasons examples were dropped, and the seconds it took.
    """
    started = time.perf_counter()
    root = Path(root) if root is not None else default_stdlib_root()
    seen_prompts: set[str] = set()
    seen_responses: set[str] = set()
    dropped: Counter = Counter()
    kept: list[Instruction] = []
    candidates = sorted(_examples(root, seed, max_topic_chars), key=lambda item: item.id)
    for item in candidates:
        if len(item.prompt) + len(item.response) > max_chars:
            dropped["too_long"] += 1
        elif any(marker in item.prompt + item.response for marker in MARKERS):
            dropped["marker_in_content"] += 1
        elif _norm(item.prompt) in seen_prompts:
            dropped["duplicate_prompt"] += 1
        elif _norm(item.response) in seen_responses:
            dropped["duplicate_response"] += 1
        else:
            seen_prompts.add(_norm(item.prompt))
            seen_responses.add(_norm(item.response))
            kept.append(item)
    if max_examples is not None and len(kept) > max_examples:
        dropped["over_max_examples"] += len(kept) - max_examples
        kept = sorted(sorted(kept, key=lambda item: _unit(seed, item.id))[:max_examples], key=lambda i: i.id)
    train = [item for item in kept if _unit(seed, item.group) >= held_out_fraction]
    held_out = [item for item in kept if _unit(seed, item.group) < held_out_fraction]
    stats = {
        "root": str(root),
        "seed": seed,
        "candidates": len(candidates),
        "train": len(train),
        "held_out": len(held_out),
        "train_by_kind": dict(sorted(Counter(item.kind for item in train).items())),
        "held_out_by_kind": dict(sorted(Counter(item.kind for item in held_out).items())),
        "held_out_groups": len({item.group for item in held_out}),
        "dropped": dict(sorted(dropped.items())),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return InstructionSet(train, held_out, stats)
