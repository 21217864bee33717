"""An OpenAI-compatible HTTP API over the continuous-batching `Engine` (no authentication: the gateway
in front of it owns that).

    GET  /v1/models                 the one served model
    POST /v1/completions            text (or token-id) prompts; `stream: true` = server-sent events
    POST /v1/chat/completions       conversations through lmloom's chat template (`tune/chat.py`)
    GET  /health                    200 while the engine loop runs, else 503
    GET  /metrics                   Prometheus text: vLLM's series names + lmloom:rejections_total{reason}

Requests are pydantic models with OpenAI's field names; unknown fields are ignored, as OpenAI does. A bad
value, an unsupported option, a prompt that does not fit the context with its `max_tokens`, or a
conversation the chat template refuses is answered 400 with OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`; an unknown model 404; a full queue 503. vLLM's extra
sampling fields `top_k`, `repetition_penalty`, `stop_token_ids` and `ignore_eos` are accepted too.

Chat replies stop at the template's end marker (never part of the reply); the non-streamed reply is
stripped of surrounding whitespace as `reply_text` does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmloom.serve.engine import (
    ContextLengthExceeded,
    Engine,
    EngineOverloaded,
    EngineStopped,
    InvalidRequest,
    RequestOutput,
    SamplingParams,
)
from lmloom.serve.gateway.validation import field_path, lone_surrogate_at
from lmloom.serve.metrics import CONTENT_TYPE
from lmloom.tune.chat import END_MARKER, TURN_FOOTER, ChatFormatError, encode_prompt

MAX_CHOICES = 16  # prompts x n per request
MAX_STOP = 16
INT64 = 2**63

# ---- request models ------------------------------------------------------------------------------------


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingRequest(_Lenient):
    model: str
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1, description="vLLM extension; -1 or 0 = no top-k filter")
    repetition_penalty: float | None = Field(None, gt=0, le=10, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[int], Field(max_length=MAX_STOP)] | None = None
    ignore_eos: bool = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool | None = False
    logprobs: int | None = Field(None, description="not supported: must be null")
    suffix: str | None = Field(None, description="not supported: must be null")
    best_of: int | None = Field(None, ge=1, description="must equal n when given")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ResponseFormat(_Lenient):
    type: str = "text"


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description="not supported: must be false or null")
    top_logprobs: int | None = Field(None, description="not supported: must be null")
    tools: list[dict[str, Any]] | None = Field(None, description="not supported: must be empty or null")
    response_format: ResponseFormat | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---- errors ---------------------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        reason: str = "invalid_request",
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.reason = (
            status,
            message,
            type,
            param,
            code,
            reason,
        )

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _engine_error(exc: Exception) -> APIError:
    if isinstance(exc, ContextLengthExceeded):
        return APIError(400, str(exc), param=exc.param, code=exc.code, reason="context_length")
    if isinstance(exc, InvalidRequest):
        return APIError(400, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, EngineOverloaded):
        return APIError(503, str(exc), type="server_error", code="engine_overloaded", reason="overloaded")
    if isinstance(exc, EngineStopped):
        return APIError(
            503, str(exc), type="server_error", code="engine_unavailable", reason="engine_stopped"
        )
    raise exc


def _unsupported(param: str, what: str) -> APIError:
    return APIError(400, f"{what} is not supported by this server", param=param, code="unsupported_parameter")


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    503: {"model": ErrorResponse, "description": "Overloaded or not running"},
}


# ---- app ------------------------------------------------------------------------------------------------


def create_app(engine: Engine, model_name: str) -> FastAPI:
    """The API over `engine` (started here if it is not running yet), serving it as `model_name`."""
    app = FastAPI(title="lmloom OpenAI-compatible API", version="1")
    app.state.engine = engine
    metrics = engine.metrics
    metrics.model_name = model_name
    tokenizer = engine.tokenizer
    created = int(time.time())
    engine.start()

    def reject(err: APIError) -> JSONResponse:
        metrics.rejected(err.reason)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return reject(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":  # its location is a character offset, not a field
            detail = (first.get("ctx") or {}).get("error", "")
            message = "request body is not valid JSON" + (f" ({detail})" if detail else "")
            return reject(APIError(400, message, code="invalid_json"))
        if tuple(first.get("loc", ())) == ("body",) and first.get("type") == "model_attributes_type":
            message = "request body must be a JSON object, sent with Content-Type: application/json"
            return reject(APIError(400, message, code="invalid_json"))
        param = field_path(p for p in first.get("loc", ()) if p != "body") or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more error(s))"
        return reject(APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request"
        err = APIError(exc.status_code, str(exc.detail), code=kind, reason=kind)
        return JSONResponse(err.body(), status_code=exc.status_code)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server serves `{model_name}`.",
                param="model",
                code="model_not_found",
                reason="model_not_found",
            )

    def model_card() -> dict[str, Any]:
        return {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "lmloom",
            "max_model_len": engine.max_len,
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.is_running
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}", responses=_ERROR_RESPONSES)
    async def get_model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return model_card()

    @app.post("/v1/completions", responses=_ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        _check_unicode(body)
        check_model(body.model)
        if body.logprobs is not None:
            raise _unsupported("logprobs", "logprobs")
        if body.suffix is not None:
            raise _unsupported("suffix", "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise _unsupported("best_of", "best_of other than n")
        prompts = _completion_prompts(body.prompt, engine)
        if len(prompts) * body.n > MAX_CHOICES:
            raise APIError(400, f"at most {MAX_CHOICES} choices (prompts x n) per request", param="n")
        max_tokens = body.max_tokens or 16
        if _gateway_default(request):
            max_tokens = _fit(max_tokens, engine.max_len - max(len(ids) for ids in prompts))
        params = _sampling_params(body, max_tokens, extra_stop=())
        echoes = [_decode(engine, ids) if body.echo else "" for ids in prompts]
        requests = [(ids, _choice_params(params, j)) for ids in prompts for j in range(body.n)]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        prompt_tokens = sum(len(ids) for ids in prompts)
        if body.stream:
            return _sse(
                _completion_chunks(
                    engine, _submit(engine, requests), echoes, body, request_id, model_name, prompt_tokens
                )
            )
        outs = await _collect(engine, requests)
        choices = [
            {
                "index": i,
                "text": echoes[i // body.n] + (out.text or ""),
                "logprobs": None,
                "finish_reason": out.finish_reason,
            }
            for i, out in enumerate(outs)
        ]
        return {
            "id": request_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": _usage(prompt_tokens, outs),
        }

    @app.post("/v1/chat/completions", responses=_ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        _check_unicode(body)
        check_model(body.model)
        if body.logprobs:
            raise _unsupported("logprobs", "logprobs")
        if body.top_logprobs is not None:
            raise _unsupported("top_logprobs", "top_logprobs")
        if body.tools:
            raise _unsupported("tools", "tool calling")
        if body.response_format is not None and body.response_format.type != "text":
            raise _unsupported("response_format", f"response_format {body.response_format.type!r}")
        if tokenizer is None:
            raise APIError(400, "this server has no tokenizer, so no chat template", param="messages")
        if body.n > MAX_CHOICES:
            raise APIError(400, f"at most {MAX_CHOICES} choices per request", param="n")
        ids = _chat_prompt(tokenizer, body.messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = engine.max_len - len(ids)
            if max_tokens < 1:
                raise APIError(
                    400,
                    f"This model's maximum context length is {engine.max_len} tokens; the messages take "
                    f"{len(ids)} tokens, which leaves no room for a reply.",
                    param="messages",
                    code="context_length_exceeded",
                    reason="context_length",
                )
        elif _gateway_default(request):
            max_tokens = _fit(max_tokens, engine.max_len - len(ids))
        params = _sampling_params(body, max_tokens, extra_stop=(TURN_FOOTER, END_MARKER))
        requests = [(ids, _choice_params(params, j)) for j in range(body.n)]
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return _sse(
                _chat_chunks(engine, _submit(engine, requests), body, request_id, model_name, len(ids))
            )
        outs = await _collect(engine, requests)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": (out.text or "").strip()},
                "logprobs": None,
                "finish_reason": out.finish_reason,
            }
            for i, out in enumerate(outs)
        ]
        return {
            "id": request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": _usage(len(ids), outs),
        }

    def openapi() -> dict[str, Any]:
        """The schema, with `model` pinned to the served name (clients and fuzzers see what is valid)."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for name in ("CompletionRequest", "ChatCompletionRequest"):
                props = schema.get("components", {}).get("schemas", {}).get(name, {}).get("properties", {})
                if "model" in props:
                    props["model"]["enum"] = [model_name]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


# ---- helpers --------------------------------------------------------------------------------------------


def _sampling_params(body: _SamplingRequest, max_tokens: int, extra_stop: Sequence[str]) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    stop = [s for s in stop if s] + list(extra_stop)
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        try:
            bias[int(key)] = value
        except ValueError:
            raise APIError(
                400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
            ) from None
    temperature = 1.0 if body.temperature is None else body.temperature
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=body.top_k if body.top_k and body.top_k > 0 else None,
            top_p=body.top_p,
            repetition_penalty=body.repetition_penalty or 1.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=bias or None,
            stop=tuple(stop),
            stop_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            seed=body.seed,
        )
    except (TypeError, ValueError) as exc:
        raise APIError(400, str(exc)) from None


def _check_unicode(body: BaseModel) -> None:
    """Refuse a string with a lone UTF-16 surrogate (JSON's "\\ud800"), which is no text: no tokenizer
    encodes it and no response can carry it back. `param` names the field."""
    bad = lone_surrogate_at(body.model_dump(exclude_defaults=True))
    if bad is not None:
        raise APIError(
            400,
            f"{bad}: text holds a lone UTF-16 surrogate, which is not Unicode",
            param=bad,
            code="invalid_value",
        )


def _gateway_default(request: Request) -> bool:
    """Is max_tokens the default lmloom's gateway set (the client gave none)? Then it is a bound, not a
    demand: fitted to the context the prompt leaves, as a request without max_tokens is here."""
    return request.headers.get("x-lmloom-max-tokens-default") == "1"


def _fit(max_tokens: int, room: int) -> int:
    return min(max_tokens, room) if room >= 1 else max_tokens  # no room: the context error says so


def _choice_params(params: SamplingParams, choice: int) -> SamplingParams:
    """Choice j of n samples with seed + j: the n choices differ, and the request stays reproducible."""
    if params.seed is None or choice == 0:
        return params
    return dataclasses.replace(params, seed=params.seed + choice)


def _completion_prompts(prompt: Any, engine: Engine) -> list[list[int]]:
    """The prompt(s) as token ids; an empty text prompt becomes the BOS token (a start from nothing)."""
    if isinstance(prompt, str):
        texts: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        texts = [prompt]
    else:
        texts = list(prompt)
    if not texts:
        raise APIError(400, "prompt is an empty list", param="prompt")
    out = []
    for item in texts:
        if isinstance(item, str):
            if engine.tokenizer is None:
                raise APIError(400, "this server has no tokenizer: send token ids", param="prompt")
            ids = engine.tokenizer.encode(item) or [engine.tokenizer.bos_id]
        else:
            ids = list(item)
            if any(not 0 <= t < engine.vocab_size for t in ids):  # before echo decodes them
                raise APIError(400, f"prompt token ids must lie in [0, {engine.vocab_size})", param="prompt")
        if len(ids) > engine.max_len:
            raise APIError(
                400,
                f"This model's maximum context length is {engine.max_len} tokens; the prompt has {len(ids)}.",
                param="prompt",
                code="context_length_exceeded",
                reason="context_length",
            )
        out.append(ids)
    return out


def _chat_prompt(tokenizer, messages: list[ChatMessage]) -> list[int]:
    turns = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        role = "system" if message.role == "developer" else message.role
        turns.append({"role": role, "content": content})
    try:
        return encode_prompt(tokenizer, turns)
    except ChatFormatError as exc:
        raise APIError(400, str(exc), param="messages", code=exc.reason, reason="bad_messages") from None


def _decode(engine: Engine, ids: list[int]) -> str:
    if engine.tokenizer is None:
        return ""
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


def _usage(prompt_tokens: int, outs: Sequence[RequestOutput]) -> dict[str, int]:
    completion = sum(out.completion_tokens for out in outs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def _submit(engine: Engine, requests) -> tuple[list[str], asyncio.Queue]:
    """Queue all requests (or none: a refusal raises `APIError` before any response is started)."""
    queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()
    try:
        return engine.submit_async(requests, queue), queue
    except Exception as exc:
        raise _engine_error(exc) from None


async def _outputs(engine: Engine, submitted) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index, output) pairs as they come; unfinished requests are aborted on exit (a client that
    disconnects mid-stream frees its batch slots at once)."""
    ids, queue = submitted
    open_ = set(range(len(ids)))
    try:
        while open_:
            index, out = await queue.get()
            if out.error is not None:
                raise APIError(
                    503,
                    f"generation failed: {out.error}",
                    type="server_error",
                    code="engine_error",
                    reason="engine_error",
                )
            if out.finished:
                open_.discard(index)
            yield index, out
    finally:
        for index in open_:
            engine.abort(ids[index])


async def _collect(engine: Engine, requests) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * len(requests)
    async for index, out in _outputs(engine, _submit(engine, requests)):
        if out.finished:
            finals[index] = out
    return finals  # type: ignore[return-value]


def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(jsonable_encoder(chunk), ensure_ascii=False)}\n\n"
        except APIError as err:  # headers are sent: report the error as an event, as vLLM does
            yield f"data: {json.dumps(err.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _chunk_maker(kind: str, request_id: str, model_name: str):
    """The streamed chunks of one response: its id, object kind, creation time and model on every one."""
    created = int(time.time())

    def chunk(choices, usage=None):
        out = {"id": request_id, "object": kind, "created": created, "model": model_name, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    return chunk


async def _completion_chunks(engine, submitted, echoes, body, request_id, model_name, prompt_tokens):
    chunk = _chunk_maker("text_completion", request_id, model_name)
    finals: list[RequestOutput] = []

    echoed = set()
    async for index, out in _outputs(engine, submitted):
        text = out.delta
        if index not in echoed:
            echoed.add(index)
            text = echoes[index // body.n] + text
        if text or out.finished:
            yield chunk(
                [{"index": index, "text": text, "logprobs": None, "finish_reason": out.finish_reason}]
            )
        if out.finished:
            finals.append(out)
    if body.stream_options and body.stream_options.include_usage:
        yield chunk([], _usage(prompt_tokens, finals))


async def _chat_chunks(engine, submitted, body, request_id, model_name, prompt_tokens):
    chunk = _chunk_maker("chat.completion.chunk", request_id, model_name)
    finals: list[RequestOutput] = []

    for i in range(len(submitted[0])):  # the role first, for every choice
        delta = {"role": "assistant", "content": ""}
        yield chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}])
    async for index, out in _outputs(engine, submitted):
        if out.delta:
            delta = {"content": out.delta}
            yield chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])
        if out.finished:
            finals.append(out)
            yield chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": out.finish_reason}])
    if body.stream_options and body.stream_options.include_usage:
        yield chunk([], _usage(prompt_tokens, finals))
