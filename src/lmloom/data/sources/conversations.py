"""`conversations`: chat transcripts, one JSON object per line with a `messages` list of
{"role", "content"} turns, each rendered into one training text with a chat template.

    template: chatml (default)   <|im_start|>{role}\n{content}<|im_end|>\n  for each turn
    template: "<any string>"     the same per turn with your {role} and {content} placeholders
                                 (no other code runs: it is str.replace, not a template engine)

A record without a messages list, with an empty one, or with a turn lacking a string role/content is
rejected as `invalid-conversation`; a turn whose role is not in `roles` as `unknown-role`. Lines are
read as in `jsonl` (streamed, .gz/.zst, bounded by max_record_bytes).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO, Literal

from pydantic import Field, field_validator

from lmloom.data.documents import (
    INVALID_CONVERSATION,
    INVALID_UNICODE,
    NOT_AN_OBJECT,
    RECORD_TOO_LARGE,
    UNKNOWN_ROLE,
    Document,
    Reject,
    excerpt,
)
from lmloom.data.provenance import FileRecord, SourceLedger
from lmloom.data.sources.jsonl import (
    DEFAULT_MAX_RECORD_BYTES,
    JSONL_SUFFIXES,
    bounded_lines,
    dotted_get,
    encodable,
    json_line,
)
from lmloom.data.sources.reading import Cursor, FileSource, list_files, read_stream

CHATML = "<|im_start|>{role}\n{content}<|im_end|>\n"


class ConversationsSource(FileSource):
    """One prose document per conversation line, rendered with a chat template."""

    type: Literal["conversations"] = "conversations"
    messages_field: str = "messages"
    id_field: str | None = None
    template: str = Field("chatml", description='"chatml", or a per-turn template with {role} and {content}')
    roles: list[str] = Field(default_factory=lambda: ["system", "user", "assistant", "tool"], min_length=1)
    max_record_bytes: int = Field(DEFAULT_MAX_RECORD_BYTES, gt=0)

    def file_patterns(self) -> list[str]:
        return [f"*{suffix}" for suffix in JSONL_SUFFIXES]

    def turn_template(self) -> str:
        return CHATML if self.template == "chatml" else self.template

    @field_validator("template")
    @classmethod
    def _has_content(cls, template: str) -> str:
        # without {content} every conversation would become the template text alone (a misspelt
        # "chatml" included), silently dropping all of the data
        if template != "chatml" and "{content}" not in template:
            raise ValueError('expected "chatml" or a per-turn template with a {content} placeholder')
        return template


def read_conversations(
    cfg: ConversationsSource, notes: dict[str, Any], ledger: SourceLedger
) -> Iterator[Document | Reject]:
    store = cfg.store()
    files = list_files(cfg, store, ledger)
    notes["files"] = len(files)
    for file in files:

        def parse(
            stream: BinaryIO, origin: FileRecord, cursor: Cursor, file: Any = file
        ) -> Iterator[Document | Reject]:
            for lineno, line, size in bounded_lines(stream, cfg.max_record_bytes):
                where = f"{file}:{lineno}"
                cursor.where = f"{file}:{lineno + 1}"
                if line is None:
                    detail = f"{size:,} bytes, over max_record_bytes={cfg.max_record_bytes:,}; skipped unread"
                    yield Reject(cfg.label, where, RECORD_TOO_LARGE, "", detail, origin=origin)
                    continue
                if line.strip():
                    yield conversation(
                        line,
                        where,
                        f"{file.relpath}:{lineno}",
                        {"file": file.relpath, "line": lineno},
                        cfg,
                        origin,
                    )

        yield from read_stream(cfg.label, store, file, ledger, parse)
    ledger.finish()


def conversation(
    raw: bytes, where: str, default_id: str, meta: dict[str, Any], cfg: ConversationsSource, origin: Any
) -> Document | Reject:
    """A rendered conversation, or a reject saying what is wrong with the record."""
    parsed = json_line(raw, where, cfg.label, origin)
    if isinstance(parsed, Reject):
        return parsed
    record, text = parsed
    if not isinstance(record, dict):
        return Reject(
            cfg.label, where, NOT_AN_OBJECT, excerpt(text), f"a JSON {type(record).__name__}", origin=origin
        )
    found, messages = dotted_get(record, cfg.messages_field)
    if not found or not isinstance(messages, list) or not messages:
        detail = f"no non-empty list {cfg.messages_field!r}"
        return Reject(cfg.label, where, INVALID_CONVERSATION, excerpt(text), detail, origin=origin)
    allowed = set(cfg.roles)
    template = cfg.turn_template()
    rendered = []
    for turn_no, turn in enumerate(messages):
        role = turn.get("role") if isinstance(turn, dict) else None
        content = turn.get("content") if isinstance(turn, dict) else None
        if not isinstance(role, str) or not isinstance(content, str):
            detail = f"turn {turn_no} needs a string role and content"
            return Reject(cfg.label, where, INVALID_CONVERSATION, excerpt(text), detail, origin=origin)
        if role not in allowed:
            detail = f"turn {turn_no} has role {role!r}; allowed: {', '.join(cfg.roles)}"
            return Reject(cfg.label, where, UNKNOWN_ROLE, excerpt(text), detail, origin=origin)
        # one pass per placeholder would let a {content} inside the role be expanded: split instead
        rendered.append(_fill(template, role, content))
    body = "".join(rendered)
    if not encodable(body):
        return Reject(
            cfg.label, where, INVALID_UNICODE, excerpt(text), "text holds lone surrogates", origin=origin
        )
    doc_id = dotted_get(record, cfg.id_field)[1] if cfg.id_field else None
    if isinstance(doc_id, bool) or not isinstance(doc_id, str | int) or not encodable(str(doc_id)):
        doc_id = default_id
    return Document(str(doc_id), body, "prose", cfg.label, meta | {"turns": len(messages)}, origin)


def _fill(template: str, role: str, content: str) -> str:
    """The template with {role} and {content} filled in once each, never re-scanning inserted text."""
    out = []
    for piece in template.split("{content}"):
        out.append(piece.replace("{role}", role))
    return content.join(out)
