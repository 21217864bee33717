"""Fine-tuning data loaders: Alpaca JSON/JSONL, messages JSONL, preference JSONL.

Every loader reads the whole file and never crashes on a bad row: the row is skipped and counted under
its reason in a `LoadReport`, with the first few examples (line number and detail) per reason. Only
when no valid row remains is a `DataError` raised, naming the file and what was wrong.

Formats (one JSON object per line; Alpaca also as one JSON array):

    alpaca       {"instruction": str, "input": str (optional), "output": str, "system": str (optional)}
                 -> user: instruction, plus "\\n\\n" + input when input is not empty; assistant: output
    messages     {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    preference   {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
                 A string prompt is one user turn, a string answer one assistant turn. A messages
                 answer may repeat the prompt's turns first (the "full conversation" style); they are
                 removed. prompt + answer must each form a valid training conversation.

Reasons (besides the template's: missing_role, unknown_role, bad_content, empty_turn, no_assistant_turn,
not_alternating, marker_in_content, too_long): invalid_json, invalid_utf8, not_an_object,
missing_field, bad_field, identical_pair (chosen == rejected).

With a tokenizer, rows are encoded as they load (`input_ids`, `loss_mask`) and rows over `max_len`
tokens are skipped as `too_long`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmloom.errors import DataError
from lmloom.tokenizers.base import TextTokenizer
from lmloom.tune.chat import (
    ASSISTANT,
    SYSTEM,
    USER,
    ChatFormatError,
    Message,
    encode_conversation,
    validate_messages,
)

INVALID_JSON = "invalid_json"
INVALID_UTF8 = "invalid_utf8"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
BAD_FIELD = "bad_field"
IDENTICAL_PAIR = "identical_pair"

FORMATS = ("alpaca", "messages", "preference")
EXAMPLES_PER_REASON = 3


@dataclass
class LoadReport:
    """What a loader read: rows seen and kept, skipped rows per reason, the first examples of each."""

    source: str
    format: str
    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # reason -> [(line, detail)]

    def skip(self, reason: str, line: int, detail: str) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append((line, detail[:200]))

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One paragraph: counts, then each reason with its count and first examples."""
        lines = [f"{self.source} ({self.format}): {self.kept} of {self.rows} rows kept"]
        for reason, count in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0])):
            where = "; ".join(f"line {line}: {detail}" for line, detail in self.examples.get(reason, []))
            lines.append(f"  {reason}: {count} ({where})")
        return "\n".join(lines)

    def require_some(self) -> None:
        if self.kept == 0:
            if self.rows == 0:
                raise DataError(f"{self.source}: no rows to read ({self.format} format)")
            raise DataError(f"{self.source}: none of its {self.rows} rows is valid\n{self.summary()}")


@dataclass
class SFTExample:
    messages: list[Message]
    line: int
    input_ids: list[int] | None = None
    loss_mask: list[int] | None = None


@dataclass
class PreferenceExample:
    prompt: list[Message]  # ends with a user turn
    chosen: list[Message]  # the assistant turn(s) after the prompt
    rejected: list[Message]
    line: int
    chosen_ids: tuple[list[int], list[int]] | None = None  # (input_ids, loss_mask) of prompt + chosen
    rejected_ids: tuple[list[int], list[int]] | None = None


class _RowError(Exception):
    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail


def _rows(path: Path, report: LoadReport) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line; bad lines are counted, not yielded."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                report.rows += 1
                report.skip(INVALID_UTF8, number, str(exc))
                continue
            if not text.strip():
                continue
            report.rows += 1
            try:
                yield number, json.loads(text)
            except (json.JSONDecodeError, RecursionError) as exc:
                report.skip(INVALID_JSON, number, f"{exc}")


def _json_array_rows(path: Path, report: LoadReport) -> Iterator[tuple[int, Any]]:
    """Items of a JSON-array file, numbered by the line each starts on when it can be told (else index)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
        items = json.loads(text)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 ({exc})") from None
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(items, list):
        raise DataError(f"{path}: a JSON file must hold an array of rows, found {type(items).__name__}")
    for index, item in enumerate(items, start=1):
        report.rows += 1
        yield index, item


def _is_json_array(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(4096).decode("utf-8-sig", errors="ignore").lstrip()
    return head.startswith("[")


def _object(row: Any) -> dict:
    if not isinstance(row, dict):
        raise _RowError(NOT_AN_OBJECT, f"a JSON {type(row).__name__}, not an object")
    return row


def _text_field(row: dict, name: str, *, required: bool = True) -> str:
    if name not in row or row[name] is None:
        if required:
            raise _RowError(MISSING_FIELD, f"no {name!r} field")
        return ""
    value = row[name]
    if not isinstance(value, str):
        raise _RowError(BAD_FIELD, f"{name!r} is a {type(value).__name__}, not a string")
    return value


def _load(path: Path | str, fmt: str, parse, rows=None) -> tuple[list, LoadReport]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    report = LoadReport(str(path), fmt)
    kept = []
    for line, row in rows(path, report) if rows else _rows(path, report):
        try:
            kept.append(parse(row, line))
        except _RowError as exc:
            report.skip(exc.reason, line, exc.detail)
        except ChatFormatError as exc:
            report.skip(exc.reason, line, exc.detail)
    report.kept = len(kept)
    report.require_some()
    return kept, report


def _sft(messages: list, line: int, tokenizer: TextTokenizer | None, max_len: int | None) -> SFTExample:
    turns = validate_messages(messages)
    example = SFTExample(turns, line)
    if tokenizer is not None:
        example.input_ids, example.loss_mask = encode_conversation(tokenizer, turns, max_len)
    return example


def alpaca_messages(row: dict) -> list[dict]:
    """The conversation of one Alpaca row (raises `_RowError` for missing or non-string fields)."""
    instruction = _text_field(row, "instruction")
    extra = _text_field(row, "input", required=False).strip()
    output = _text_field(row, "output")
    system = _text_field(row, "system", required=False).strip()
    user = instruction.strip() + (f"\n\n{extra}" if extra else "")
    turns = [{"role": SYSTEM, "content": system}] if system else []
    return [*turns, {"role": USER, "content": user}, {"role": ASSISTANT, "content": output}]


def load_alpaca(
    path: Path | str, tokenizer: TextTokenizer | None = None, max_len: int | None = None
) -> tuple[list[SFTExample], LoadReport]:
    """Alpaca rows from a JSON array file or a JSONL file (told apart by the first character)."""
    path = Path(path)
    rows = _json_array_rows if path.is_file() and _is_json_array(path) else None

    def parse(row: Any, line: int) -> SFTExample:
        return _sft(alpaca_messages(_object(row)), line, tokenizer, max_len)

    return _load(path, "alpaca", parse, rows)


def load_messages(
    path: Path | str, tokenizer: TextTokenizer | None = None, max_len: int | None = None
) -> tuple[list[SFTExample], LoadReport]:
    """Conversations from a messages JSONL file."""

    def parse(row: Any, line: int) -> SFTExample:
        row = _object(row)
        if "messages" not in row:
            raise _RowError(MISSING_FIELD, "no 'messages' field")
        if not isinstance(row["messages"], list):
            raise _RowError(BAD_FIELD, f"'messages' is a {type(row['messages']).__name__}, not a list")
        return _sft(row["messages"], line, tokenizer, max_len)

    return _load(path, "messages", parse)


def _turns(value: Any, name: str, default_role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, list):
        return value
    if value is None:
        raise _RowError(MISSING_FIELD, f"no {name!r} field")
    raise _RowError(BAD_FIELD, f"{name!r} is a {type(value).__name__}, not a string or a list of turns")


def _answer(prompt: list[Message], value: Any, name: str) -> list[Message]:
    """The assistant turn(s) of `chosen` / `rejected`: a string, a continuation, or the whole conversation."""
    raw = _turns(value, name, ASSISTANT)
    if isinstance(value, list) and len(raw) > len(prompt):
        head = [
            Message(t.get("role"), (t.get("content") or "").strip()) if isinstance(t, dict) else t
            for t in raw[: len(prompt)]
        ]
        if head == prompt:
            raw = raw[len(prompt) :]  # "full conversation" style: drop the repeated prompt
    turns = validate_messages([*prompt, *raw])
    return turns[len(prompt) :]


def load_preferences(
    path: Path | str, tokenizer: TextTokenizer | None = None, max_len: int | None = None
) -> tuple[list[PreferenceExample], LoadReport]:
    """Preference pairs from a JSONL file (prompt, chosen, rejected)."""

    def parse(row: Any, line: int) -> PreferenceExample:
        row = _object(row)
        prompt = validate_messages(_turns(row.get("prompt"), "prompt", USER), for_generation=True)
        chosen = _answer(prompt, row.get("chosen"), "chosen")
        rejected = _answer(prompt, row.get("rejected"), "rejected")
        if chosen == rejected:
            raise _RowError(IDENTICAL_PAIR, "chosen and rejected are the same")
        example = PreferenceExample(prompt, chosen, rejected, line)
        if tokenizer is not None:
            example.chosen_ids = encode_conversation(tokenizer, [*prompt, *chosen], max_len)
            example.rejected_ids = encode_conversation(tokenizer, [*prompt, *rejected], max_len)
        return example

    return _load(path, "preference", parse)


def detect_format(path: Path | str) -> str:
    """The format of a file ("alpaca", "messages" or "preference"), from its first JSON object's keys."""
    path = Path(path)
    if not path.is_file():  # as `_load` says it, rather than open()'s traceback
        raise DataError(f"{path}: {'a directory, not a data file' if path.is_dir() else 'no such file'}")
    rows = _json_array_rows if _is_json_array(path) else _rows
    for _, row in rows(path, LoadReport(str(path), "auto")):
        if isinstance(row, dict):
            if "messages" in row:
                return "messages"
            if "chosen" in row or "rejected" in row:
                return "preference"
            if "instruction" in row:
                return "alpaca"
    raise DataError(f"{path}: cannot tell its format (no row with 'messages', 'instruction' or 'chosen')")


def load_sft(
    path: Path | str, fmt: str = "auto", tokenizer: TextTokenizer | None = None, max_len: int | None = None
) -> tuple[list[SFTExample], LoadReport]:
    """Supervised conversations from an Alpaca or messages file (`fmt` "auto" looks at the first row)."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "alpaca":
        return load_alpaca(path, tokenizer, max_len)
    if fmt == "messages":
        return load_messages(path, tokenizer, max_len)
    raise DataError(f"{path}: format {fmt!r} is not a supervised format (expected alpaca or messages)")
