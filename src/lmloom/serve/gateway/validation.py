"""Input validation: size, encoding, the OpenAI request subset, and caps, before anything is forwarded.

Order and status codes: a body over `max_body_bytes` is 413 (counted while it streams in, so a lying
or missing Content-Length does not help); bytes that are not UTF-8, or text that is not a JSON object,
are 400; a request that breaks the schema (unknown field, wrong type, bad role) or a cap (max_tokens,
n, message count or length) is 422 naming the field. Unknown fields are refused unless listed in
`validation.extra_fields`: the gateway forwards only what it understands.

A request without max_tokens gets `default_max_tokens`, so the upstream is bounded by what the rate
limiter charged.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmloom.artifacts.hashing import canonical_json, sha256_bytes
from lmloom.serve.gateway.config import ValidationConfig
from lmloom.serve.gateway.errors import GatewayError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = Field(None, max_length=256)
    refusal: str | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras are checked against the config's list

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: dict[Literal["include_usage", "continuous_usage_stats"], bool] | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, max_length=256)
    seed: int | None = None
    # vLLM's sampling extras (lmloom's own API accepts them too)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    ignore_eos: bool | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] = Field(min_length=1)
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


SCHEMAS: dict[str, type[_Common]] = {"chat": ChatRequest, "completions": CompletionRequest}


@dataclass
class ValidatedRequest:
    body: dict[str, Any]  # what is forwarded (max_tokens set when it was missing)
    model: str | None
    stream: bool = False
    max_tokens: int = 0
    n: int = 1
    texts: list[tuple[str, str]] = field(default_factory=list)  # (role, text) to scan for injection
    prompt_sha256: str | None = None
    prompt_tokens_estimate: int = 0
    include_usage: bool = False
    modified: bool = False  # the body must be re-serialised (a default max_tokens was set)
    default_max_tokens: bool = False  # max_tokens is the gateway's default, not the client's

    @property
    def token_cost(self) -> int:
        return self.prompt_tokens_estimate + self.max_tokens * self.n


async def read_body(chunks: AsyncIterator[bytes], content_length: str | None, cap: int) -> bytes:
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise GatewayError(400, "Content-Length is not a number", code="invalid_body") from None
        if declared > cap:
            raise _too_large(cap)
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > cap:
            raise _too_large(cap)
    return bytes(body)


def _too_large(cap: int) -> GatewayError:
    return GatewayError(413, f"request body exceeds {cap} bytes", code="body_too_large")


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GatewayError(
            400, f"request body is not valid UTF-8 (byte {exc.start})", code="invalid_encoding"
        ) from None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise GatewayError(400, f"request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(value, dict):
        raise GatewayError(400, "request body must be a JSON object", code="invalid_json")
    if _SURROGATE_ESCAPE.search(text):  # json.loads lets a lone "\ud800" through; it is no text
        _check_unicode(value, "")
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_unicode(value: Any, where: str) -> None:
    """Refuse strings with a lone UTF-16 surrogate (which no tokenizer, log or hash can encode)."""
    bad = lone_surrogate_at(value, where)
    if bad is not None:
        raise GatewayError(
            400,
            f"{bad}: text holds a lone UTF-16 surrogate escape (such as \\ud800), which is not Unicode",
            code="invalid_encoding",
            param=bad,
        )


def lone_surrogate_at(value: Any, where: str = "") -> str | None:
    """The path (`messages.0.content`) of the first string in `value` holding a lone UTF-16 surrogate,
    which JSON's "\\ud800" lets through and no UTF-8 encoder takes; None when there is none."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
        return None
    else:
        return None
    for key, item in items:
        found = lone_surrogate_at(key, where or "body") or lone_surrogate_at(
            item, f"{where}.{key}" if where else str(key)
        )
        if found is not None:
            return found
    return None


def field_path(loc: Any) -> str:
    """A pydantic error location as the request field it names: the tags pydantic adds for the members
    of a union (`str`, `list[str]`) are not fields (`stop.str` is `stop`, `prompt.list[str].1` is `prompt.1`)."""
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p)))


_TYPE_TAGS = {"str", "int", "float", "bool"}


def validate_request(
    endpoint: str, raw: dict[str, Any], config: ValidationConfig, bytes_per_token: float
) -> ValidatedRequest:
    """Check a parsed body for `endpoint`; bodies of endpoints without a schema only need a model."""
    schema = SCHEMAS.get(endpoint)
    if schema is None:
        model = raw.get("model")
        if model is not None and not isinstance(model, str):
            raise GatewayError(422, "'model' must be a string", code="invalid_type", param="model")
        texts = [("user", json.dumps(raw.get("input", ""), ensure_ascii=False))] if "input" in raw else []
        return ValidatedRequest(raw, model, texts=texts, prompt_sha256=_hash(raw.get("input")))
    try:
        request = schema.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = field_path(first["loc"])
        raise GatewayError(422, f"{where}: {first['msg']}", code="invalid_request", param=where) from None
    extra = sorted(set(request.model_extra or ()) - set(config.extra_fields))
    if extra:
        raise GatewayError(
            422,
            f"unknown field {extra[0]!r} (not in the accepted OpenAI subset)",
            code="unknown_field",
            param=extra[0],
        )
    body = dict(raw)
    max_tokens = _cap_max_tokens(request, body, config)
    n = request.n or 1
    if n > config.max_n or (getattr(request, "best_of", None) or 0) > config.max_n:
        raise GatewayError(422, f"n is capped at {config.max_n}", code="cap_exceeded", param="n")
    stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
    if len(stops) > config.max_stop:
        raise GatewayError(
            422, f"at most {config.max_stop} stop sequences", code="cap_exceeded", param="stop"
        )
    texts = _texts(request, config)
    total = sum(len(t) for _, t in texts)
    if total > config.max_prompt_chars:
        raise GatewayError(
            422,
            f"the prompt has {total} characters; the cap is {config.max_prompt_chars}",
            code="cap_exceeded",
        )
    prompt = raw["messages"] if endpoint == "chat" else raw["prompt"]
    prompt_bytes = sum(len(t.encode("utf-8")) for _, t in texts)
    per_message = 4 * len(texts) if endpoint == "chat" else 0
    return ValidatedRequest(
        body=body,
        model=request.model,
        stream=bool(request.stream),
        max_tokens=max_tokens,
        n=n,
        texts=texts,
        prompt_sha256=_hash(prompt),
        prompt_tokens_estimate=math.ceil(prompt_bytes / bytes_per_token) + per_message,
        include_usage=bool((request.stream_options or {}).get("include_usage")),
        modified=body != raw,
        default_max_tokens=body.get("max_tokens") != raw.get("max_tokens"),
    )


def _hash(prompt: Any) -> str | None:
    """sha256 of the prompt's canonical JSON (sorted keys, no spaces): the messages list or the prompt."""
    return None if prompt is None else sha256_bytes(canonical_json(prompt))


def _cap_max_tokens(request: _Common, body: dict[str, Any], config: ValidationConfig) -> int:
    asked = [
        v for v in (request.max_tokens, getattr(request, "max_completion_tokens", None)) if v is not None
    ]
    if asked and max(asked) > config.max_tokens_cap:
        param = (
            "max_tokens"
            if request.max_tokens in asked and request.max_tokens > config.max_tokens_cap
            else "max_completion_tokens"
        )
        raise GatewayError(
            422, f"{param} is capped at {config.max_tokens_cap}", code="cap_exceeded", param=param
        )
    if not asked:
        body["max_tokens"] = config.default_max_tokens
        return config.default_max_tokens
    return min(asked)


def _texts(request: _Common, config: ValidationConfig) -> list[tuple[str, str]]:
    if isinstance(request, CompletionRequest):
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if len(prompts) > config.max_messages:
            raise GatewayError(
                422, f"at most {config.max_messages} prompts", code="cap_exceeded", param="prompt"
            )
        texts = [("user", p) for p in prompts]
        if request.suffix:
            texts.append(("user", request.suffix))
    else:
        assert isinstance(request, ChatRequest)
        if len(request.messages) > config.max_messages:
            raise GatewayError(
                422, f"at most {config.max_messages} messages", code="cap_exceeded", param="messages"
            )
        texts = []
        for message in request.messages:
            content = message.content
            text = content if isinstance(content, str) else "".join(p.text for p in content or [])
            texts.append((message.role, text))
    for i, (_, text) in enumerate(texts):
        if len(text) > config.max_message_chars:
            raise GatewayError(
                422,
                f"message {i} has {len(text)} characters; the cap is {config.max_message_chars}",
                code="cap_exceeded",
                param=f"messages.{i}.content",
            )
    return texts
