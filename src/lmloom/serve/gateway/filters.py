"""Output filtering: PII and secrets redacted (the `pii` step's detectors), blocked safety categories
stopped (the `safety` step's word lists), in whole responses and in SSE streams alike.

Whole responses: every choice's text (`message.content`, tool-call arguments, `text`) is redacted with
typed placeholders (`<EMAIL>`, `<SECRET>`, ...). A choice that mentions a blocked category is replaced
by `blocked_message` with `finish_reason: "content_filter"`. A choice that was redacted loses its
`logprobs`, whose tokens would spell out what was removed.

Streams: a secret can arrive split over several chunks ("gh", "p_Ab3", ...), and a prefix already
sent cannot be recalled. So each choice's text passes through a `StreamRedactor` that holds text back
and releases it only when it is safe:

- the last `holdback_chars` characters are always held (a span of PII is at most that long, context
  included, so it is whole by the time any of it could leave);
- the release point moves back to a whitespace boundary, so an unbroken run (a token, a key, a JWT
  still growing) is held whole however long it gets, up to `max_holdback_chars`, after which it is
  released redacted as far as the detectors can tell;
- it never falls inside a detected span, and a `-----BEGIN ... PRIVATE KEY` without its END yet is
  held from its first dash;
- detection runs over the held text plus the last 64 characters already released, so a value whose
  key word (`password=`) went out earlier is still recognised.

The finished choice (its `finish_reason` chunk, `[DONE]`, or the end of the stream) flushes the rest.
The cost is latency, not correctness: text reaches the client about `holdback_chars` characters
(~40 tokens) behind the model. Streamed `logprobs` are dropped (they would carry held-back tokens).
A blocked category found anywhere in the held text ends the stream with `finish_reason:
"content_filter"` before that text is sent.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

from lmloom.data.pii import DEFAULT_PLACEHOLDERS, PiiSpan, find_pii, redact
from lmloom.data.safety import WordListMatcher, builtin_categories, builtin_terms
from lmloom.errors import ConfigError
from lmloom.serve.gateway.config import FiltersConfig

CONTEXT_CHARS = 64
_OPEN_KEY_BLOCK = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY")


class OutputFilter:
    def __init__(self, config: FiltersConfig):
        self.config = config
        self.types = frozenset(config.pii_types)
        self.placeholders = {**DEFAULT_PLACEHOLDERS, **config.placeholders}
        unknown = sorted(set(config.blocked_categories) - set(builtin_categories()))
        if unknown:
            raise ConfigError(
                f"filters.blocked_categories: unknown {unknown}; categories: {', '.join(builtin_categories())}"
            )
        self.matcher = (
            WordListMatcher({c: builtin_terms(c) for c in config.blocked_categories})
            if config.blocked_categories
            else None
        )

    def find(self, text: str) -> list[PiiSpan]:
        if not self.types:
            return []
        return find_pii(text, self.types, self.config.keep_non_global_ips, self.config.keep_example_domains)

    def redact(self, text: str) -> tuple[str, Counter[str]]:
        spans = self.find(text)
        if not spans:
            return text, Counter()
        return redact(text, spans, self.placeholders), Counter(s.type for s in spans)

    def blocked_category(self, text: str) -> str | None:
        if self.matcher is None:
            return None
        counts = self.matcher.count(text)
        over = [c for c, n in counts.items() if n >= self.config.block_min_count]
        return max(over, key=lambda c: (counts[c], c)) if over else None

    # -- whole responses -----------------------------------------------------------------------

    def filter_response(self, body: dict[str, Any]) -> tuple[Counter[str], str | None]:
        """Redact a chat or completion response in place; returns (counts by type, blocked category)."""
        counts: Counter[str] = Counter()
        blocked = None
        for choice in body.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            found: Counter[str] = Counter()
            message = choice.get("message")
            texts: list[tuple[dict[str, Any], str]] = []
            if isinstance(message, dict):
                texts.append((message, "content"))
                for call in message.get("tool_calls") or []:
                    if isinstance(call, dict) and isinstance(call.get("function"), dict):
                        texts.append((call["function"], "arguments"))
            if "text" in choice:
                texts.append((choice, "text"))
            for holder, key in texts:
                value = holder.get(key)
                if isinstance(value, str) and value:
                    category = self.blocked_category(value)
                    if category:
                        blocked = category
                        holder[key] = self.config.blocked_message
                        choice["finish_reason"] = "content_filter"
                        continue
                    holder[key], hits = self.redact(value)
                    found += hits
            if found or choice.get("finish_reason") == "content_filter":
                choice["logprobs"] = None
            counts += found
        return counts, blocked

    # -- streams ---------------------------------------------------------------------------------

    def stream_redactor(self) -> StreamRedactor:
        return StreamRedactor(self)


class StreamRedactor:
    """One choice's text stream: `feed(delta)` returns what may be sent now, `flush()` the rest."""

    def __init__(self, output_filter: OutputFilter):
        self.filter = output_filter
        self.hold = output_filter.config.holdback_chars
        self.max_hold = output_filter.config.max_holdback_chars
        self.context = ""  # raw text already released (for detectors that look behind)
        self.pending = ""
        self.counts: Counter[str] = Counter()
        self.blocked: str | None = None

    def feed(self, delta: str) -> str:
        self.pending += delta
        return self._release(final=False)

    def flush(self) -> str:
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self.pending:
            return ""
        text = self.context + self.pending
        base = len(self.context)
        self.blocked = self.blocked or self.filter.blocked_category(text)
        if self.blocked:
            return ""
        spans = self.filter.find(text)
        cut = len(text) if final else self._safe_cut(text, base, spans)
        if cut <= base:
            return ""
        released, pieces, cursor = text[base:cut], [], base
        for span in spans:
            if span.end <= base or span.start >= cut:
                continue
            start, end = max(span.start, base), min(span.end, cut)
            pieces.append(text[cursor:start])
            pieces.append(self.filter.placeholders[span.type])
            self.counts[span.type] += 1
            cursor = end
        pieces.append(text[cursor:cut])
        released = "".join(pieces)
        self.context = text[:cut][-CONTEXT_CHARS:]
        self.pending = text[cut:]
        return released

    def _safe_cut(self, text: str, base: int, spans: list[PiiSpan]) -> int:
        forced = len(text) - base > self.max_hold
        cut = len(text) - self.hold
        if cut <= base:
            return base
        boundary = cut
        while boundary > base and not text[boundary - 1].isspace():
            boundary -= 1
        if boundary > base:
            cut = boundary
        elif not forced:
            return base  # one unbroken run: hold it whole
        for span in spans:
            if span.start < cut < span.end:
                cut = span.end if forced else span.start
        if not forced:
            for match in _OPEN_KEY_BLOCK.finditer(text, base):
                if "-----END" not in text[match.end() :]:
                    cut = min(cut, match.start())
                    break
        return cut


def _choice_text_key(choice: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return delta, "content"
    if "text" in choice:
        return choice, "text"
    return None


class SseFilter:
    """Rewrites an OpenAI SSE stream (`data: {...}` events, then `data: [DONE]`) through the filter.

    `on_event(chunk)` sees every parsed chunk (usage accounting). Events that are not chunks with
    choices (usage-only chunks, errors, comments) pass unchanged.
    """

    def __init__(self, output_filter: OutputFilter, on_chunk: Callable[[dict[str, Any]], None] | None = None):
        self.filter = output_filter
        self.on_chunk = on_chunk
        self.redactors: dict[int, StreamRedactor] = {}
        self.template: dict[str, Any] | None = None
        self.finished: set[int] = set()
        self.blocked: str | None = None
        self.completion_text_chars = 0

    @property
    def counts(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for redactor in self.redactors.values():
            total += redactor.counts
        return total

    def _redactor(self, index: int) -> StreamRedactor:
        if index not in self.redactors:
            self.redactors[index] = self.filter.stream_redactor()
        return self.redactors[index]

    async def run(self, upstream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        buffer = b""
        async for data in upstream:
            buffer += data.replace(b"\r\n", b"\n")
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                for out in self._event(event):
                    yield out
                if self.blocked:
                    return
        if buffer.strip():
            for out in self._event(buffer):
                yield out
            if self.blocked:
                return
        tail = self._flush_all()
        if tail:
            yield tail

    def _event(self, event: bytes) -> list[bytes]:
        lines = event.decode("utf-8", errors="replace").split("\n")
        data_lines = [line[5:].lstrip(" ") if line.startswith("data:") else None for line in lines]
        payload = "\n".join(d for d in data_lines if d is not None)
        if not any(d is not None for d in data_lines):
            return [event + b"\n\n"]
        if payload.strip() == "[DONE]":
            tail = self._flush_all()
            return ([tail] if tail else []) + [b"data: [DONE]\n\n"]
        try:
            chunk = json.loads(payload)
        except ValueError:
            return [event + b"\n\n"]
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
            return [event + b"\n\n"]
        if self.on_chunk:
            self.on_chunk(chunk)
        self.template = {k: v for k, v in chunk.items() if k not in ("choices", "usage")}
        for choice in chunk["choices"]:
            if not isinstance(choice, dict):
                continue
            index = int(choice.get("index") or 0)
            choice.pop("logprobs", None)
            where = _choice_text_key(choice)
            redactor = self._redactor(index)
            text = where[0].get(where[1]) if where else None
            released = redactor.feed(text) if isinstance(text, str) else ""
            if isinstance(text, str):
                self.completion_text_chars += len(text)
            if choice.get("finish_reason"):
                released += redactor.flush()
                self.finished.add(index)
            if redactor.blocked:
                self.blocked = redactor.blocked
                return [self._blocked_chunk()]
            if where:
                where[0][where[1]] = released
            elif released:
                choice["delta" if self._is_chat() else "text"] = (
                    {"content": released} if self._is_chat() else released
                )
        return [_sse(chunk)]

    def _is_chat(self) -> bool:
        return bool(self.template) and str(self.template.get("object", "")).startswith("chat")

    def _choice(self, index: int, text: str, finish: str | None) -> dict[str, Any]:
        if self._is_chat():
            return {"index": index, "delta": {"content": text}, "finish_reason": finish}
        return {"index": index, "text": text, "finish_reason": finish}

    def _flush_all(self) -> bytes:
        choices = []
        for index, redactor in sorted(self.redactors.items()):
            rest = redactor.flush()
            if redactor.blocked:
                self.blocked = redactor.blocked
                return self._blocked_chunk()
            if rest:
                choices.append(self._choice(index, rest, None))
        if not choices:
            return b""
        return _sse({**(self.template or {}), "choices": choices})

    def _blocked_chunk(self) -> bytes:
        indexes = sorted(set(self.redactors) - self.finished) or [0]
        choices = [self._choice(i, "", "content_filter") for i in indexes]
        return _sse({**(self.template or {}), "choices": choices}) + b"data: [DONE]\n\n"


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, ensure_ascii=False).encode("utf-8") + b"\n\n"
