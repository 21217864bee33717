"""The security gateway: an ASGI app in front of any OpenAI-compatible upstream.

    request ─▶ classify route ─▶ API key (401) ─▶ endpoint scope (403) ─▶ body cap, UTF-8, JSON,
    schema, caps (413/400/422) ─▶ model scope (403) ─▶ injection heuristics (403 or flag) ─▶
    rate limits (429 + Retry-After) ─▶ upstream (pooled keep-alive, streaming kept) ─▶ output filter ─▶ client

Deny by default: every path but `/livez` needs a valid key whose scope holds the route's endpoint
(`chat`, `completions`, `embeddings`, `models`, `tokenize`, `metrics`, `health`, or `other` for
anything the gateway does not name); there are no docs or OpenAPI routes. `/metrics` serves the
gateway's own metrics (a separate Prometheus registry), not the upstream's. `/v1/models` lists only
the models the key may use. The client's key never reaches the upstream; the gateway presents its own
(`upstream_api_key_env`) if one is configured.

Every request is audited (off the event loop, by one writer thread; if the writer falls
`audit_queue` entries behind, requests get 503 rather than go unaudited): `gateway.request` with the
key id, route, status, latency, token usage, redaction counts and the sha256 of the prompt (the text
itself only with `log_prompts`, and then PII-redacted); refusals of keys as `security.auth_failed`,
scope refusals as `security.denied`, injection findings as `security.prompt_injection`, withheld
output as `security.output_blocked`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import queue
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from starlette.datastructures import State
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from lmloom.errors import ConfigError, IntegrityError
from lmloom.security.audit import AuditLog
from lmloom.serve.gateway.config import GatewayConfig
from lmloom.serve.gateway.errors import GatewayError
from lmloom.serve.gateway.filters import OutputFilter, SseFilter
from lmloom.serve.gateway.injection import InjectionScanner
from lmloom.serve.gateway.keys import ApiKeyRecord, ApiKeyStore, AuthResult, KeyState
from lmloom.serve.gateway.limits import RateLimiter
from lmloom.serve.gateway.transport import AsgiUpstream, HttpUpstream, UpstreamError, UpstreamResponse
from lmloom.serve.gateway.validation import (
    SCHEMAS,
    ValidatedRequest,
    parse_json_object,
    read_body,
    validate_request,
)

LIVEZ = "/livez"
_ROUTES = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/models": "models",
    "/metrics": "metrics",
    "/health": "health",
    "/tokenize": "tokenize",
    "/detokenize": "tokenize",
    "/v1/tokenize": "tokenize",
    "/v1/detokenize": "tokenize",
}
_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD")
_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
        b"transfer-encoding", b"upgrade"}  # fmt: skip
_REQUEST_DROP = _HOP | {
    b"authorization",
    b"host",
    b"content-length",
    b"cookie",
    b"x-api-key",
    b"accept-encoding",
    b"x-lmloom-max-tokens-default",  # only the gateway says that (below)
}
# content-encoding: the gateway asks for identity and refuses anything else, so the body is never encoded
_RESPONSE_DROP = _HOP | {b"content-length", b"content-encoding", b"server", b"date", b"set-cookie",
                         b"cache-control", b"x-content-type-options"}  # fmt: skip
_SECURITY_HEADERS = [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff")]
_PATH_SAFE = "/:@!$&'()*+,;=-._~"  # what stays unescaped in the path forwarded upstream
_AUTH_MESSAGES = {
    KeyState.MISSING: "missing API key: send it as 'Authorization: Bearer llm-<id>-<secret>'",
    KeyState.MALFORMED: "malformed API key: expected 'Authorization: Bearer llm-<id>-<secret>'",
    KeyState.UNKNOWN: "invalid API key",
    KeyState.REVOKED: "this API key has been revoked",
    KeyState.EXPIRED: "this API key has expired",
}


def classify(path: str) -> str:
    path = path.rstrip("/") or "/"
    if path.startswith("/v1/models/"):
        return "models"
    return _ROUTES.get(path, "other")


class AuditWriter:
    """Appends audit entries from a queue on one thread, so the event loop never waits for fsync."""

    def __init__(self, log: AuditLog, capacity: int):
        self.log = log
        self.queue: queue.Queue = queue.Queue(maxsize=capacity)
        self.failed: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="gateway-audit", daemon=True)
        self._thread.start()

    def submit(self, event: str, principal: str, **fields: Any) -> None:
        if self.failed is not None:
            raise GatewayError(503, "the audit log cannot be written; refusing to serve", type="server_error",
                               code="audit_unavailable")  # fmt: skip
        try:
            self.queue.put_nowait((event, principal, fields))
        except queue.Full:
            raise GatewayError(503, "audit backlog is full; retry shortly", type="server_error",
                               code="audit_backlog", headers={"Retry-After": "1"}) from None  # fmt: skip

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                event, principal, fields = item
                self.log.append(event, principal, **fields)
            except (IntegrityError, OSError) as exc:  # fail closed from now on
                self.failed = exc
            finally:
                self.queue.task_done()

    def drain(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self) -> None:
        self.drain()
        self.queue.put(None)
        self._thread.join(timeout=5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = PromCounter(
            "gateway_requests", "Requests by key, route and status", ["key", "route", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.rejections = PromCounter("gateway_rejections", "Refused requests by reason", ["reason"],
                                      registry=self.registry)  # fmt: skip
        self.tokens = PromCounter(
            "gateway_tokens", "Tokens by key and kind", ["key", "kind"], registry=self.registry
        )
        self.redactions = PromCounter(
            "gateway_redactions", "Redacted spans by type", ["type"], registry=self.registry
        )
        self.added_latency = Histogram(
            "gateway_added_latency_seconds",
            "Time spent in the gateway itself (total minus upstream)",
            ["mode"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )


class Gateway:
    def __init__(self, upstream: str | Any, config: GatewayConfig, store_root: Path):
        self.upstream = upstream
        self.config = config
        self.store_root = Path(store_root)
        self.keys = ApiKeyStore.for_store(self.store_root)
        self.limiter = RateLimiter()
        self.scanner = InjectionScanner(config.injection)
        self.filter = OutputFilter(config.filters)
        self.metrics = Metrics()
        self.usage: dict[str, Counter[str]] = defaultdict(Counter)
        self.audit: AuditWriter | None = None
        self.client: HttpUpstream | AsgiUpstream | None = None
        self.upstream_auth: bytes | None = None
        if config.upstream_api_key_env:
            upstream_key = os.environ.get(config.upstream_api_key_env)
            if not upstream_key:
                raise ConfigError(f"upstream_api_key_env: ${config.upstream_api_key_env} is not set")
            try:
                self.upstream_auth = f"Bearer {upstream_key}".encode("ascii")
            except UnicodeEncodeError:
                raise ConfigError(
                    f"upstream_api_key_env: ${config.upstream_api_key_env} is not ASCII"
                ) from None

    # -- lifecycle -------------------------------------------------------------------------------

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        from lmloom.security.context import store_audit_log

        self.audit = AuditWriter(store_audit_log(self.store_root), self.config.audit_queue)
        async with AsyncExitStack() as stack:
            if isinstance(self.upstream, str):
                self.client = HttpUpstream(self.upstream, timeout_s=self.config.upstream_timeout_s)
            else:
                router = getattr(self.upstream, "router", None)
                if router is not None and hasattr(router, "lifespan_context"):
                    await stack.enter_async_context(router.lifespan_context(self.upstream))
                self.client = AsgiUpstream(self.upstream)
            stack.push_async_callback(self.client.aclose)
            try:
                yield
            finally:
                await stack.aclose()
                self.audit.close()

    # -- the request path --------------------------------------------------------------------------

    async def handle(self, scope: Scope, receive: Receive) -> ASGIApp:
        """Check one HTTP request and answer it; returns the response to send (an ASGI app)."""
        t0 = time.perf_counter()
        path: str = scope["path"]
        method: str = scope["method"]
        route = classify(path)
        log: dict[str, Any] = {"route": route, "method": method, "path": path[:200]}
        record: ApiKeyRecord | None = None
        authorization = content_length = None
        forward: dict[bytes, bytes] = {}  # request headers for the upstream (the last of repeated names)
        for name, value in scope["headers"]:
            name = name.lower()
            if name == b"authorization":
                if authorization is None:
                    authorization = value.decode("latin-1")
            elif name == b"content-length":
                if content_length is None:
                    content_length = value.decode("latin-1")
            if name not in _REQUEST_DROP:
                forward[name] = value
        try:
            auth = self.keys.verify(_bearer(authorization))
            if not auth.ok:
                raise self._auth_error(auth, scope, log)
            record = auth.record
            assert record is not None
            if not record.allows_endpoint(route):
                raise self._denied(
                    record,
                    log,
                    f"this API key may not call the {route!r} endpoint",
                    "endpoint_not_allowed",
                    endpoint=route,
                )
            # /v1/models lists only the key's models; /v1/models/ID must not show the others either
            model_id = path.rstrip("/")[len("/v1/models/") :] if route == "models" else ""
            if model_id and not record.allows_model(model_id):
                log["model"] = model_id[:256]
                raise self._denied(record, log, f"this API key may not use the model {model_id[:256]!r}",
                                   "model_not_allowed", model=model_id[:256])  # fmt: skip
            if route == "metrics":
                response = Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)
                self._done(record, log, 200, t0)
                return response
            validated, content = await self._check_body(method, receive, content_length, route, record, log)
            self._rate_limit(record, validated)
            return await self._forward(scope, forward, route, record, validated, content, log, t0)
        except GatewayError as error:
            self.metrics.rejections.labels(error.reason).inc()
            if record is not None:
                log["rejected"] = error.reason
                try:
                    self._done(record, log, error.status, t0)
                except GatewayError as audit_error:
                    return audit_error.response()
            return error.response()

    def _auth_error(self, auth: AuthResult, scope: Scope, log: dict[str, Any]) -> GatewayError:
        client = scope.get("client")
        fields = {**log, "reason": auth.state.value, "client": client[0] if client else None}
        if auth.key_id:
            fields["key"] = auth.key_id
        self.metrics.requests.labels("-", log["route"], "401").inc()
        self._audit("security.auth_failed", "unauthenticated", status=401, **fields)
        code = "invalid_api_key" if auth.state is not KeyState.MISSING else "missing_api_key"
        return GatewayError(401, _AUTH_MESSAGES[auth.state], code=code, reason=f"auth_{auth.state.value}",
                            headers={"WWW-Authenticate": 'Bearer realm="lmloom"'})  # fmt: skip

    def _denied(
        self, record: ApiKeyRecord, log: dict[str, Any], message: str, code: str, **fields: Any
    ) -> GatewayError:
        self._audit("security.denied", _principal(record), key=record.id, action=f"gateway {log['route']}",
                    reason=code, status=403, **fields)  # fmt: skip
        return GatewayError(403, message, type="permission_error", code=code)

    async def _check_body(
        self, method: str, receive: Receive, content_length: str | None, route: str, record: ApiKeyRecord,
        log: dict[str, Any],
    ) -> tuple[ValidatedRequest | None, bytes]:  # fmt: skip
        if method not in ("POST", "PUT", "PATCH"):
            return None, b""
        cap = self.config.validation.max_body_bytes
        body = await read_body(_request_chunks(receive), content_length, cap)
        if not body and route not in SCHEMAS:
            return None, body
        validated = validate_request(
            route, parse_json_object(body), self.config.validation, self.config.limits.bytes_per_token
        )
        log["prompt_sha256"] = validated.prompt_sha256
        if self.config.log_prompts and validated.texts:
            log["prompt"] = [{"role": r, "text": self.filter.redact(t)[0]} for r, t in validated.texts]
        if validated.model is not None:
            log["model"] = validated.model
            if not record.allows_model(validated.model):
                raise self._denied(record, log, f"this API key may not use the model {validated.model!r}",
                                   "model_not_allowed", model=validated.model)  # fmt: skip
        findings = self.scanner.scan(validated.texts)
        if findings:
            action = self.config.injection.action
            rules = sorted({f.label() for f in findings})
            self._audit("security.prompt_injection", _principal(record), key=record.id, route=route, action=action,
                        rules=rules, roles=sorted({f.role for f in findings}),
                        prompt_sha256=validated.prompt_sha256)  # fmt: skip
            log["injection"] = rules
            if action == "block":
                raise GatewayError(403, f"request refused: possible prompt injection ({', '.join(rules)})",
                                   type="permission_error", code="prompt_injection_detected",
                                   reason="prompt_injection")  # fmt: skip
        content = json.dumps(validated.body).encode("utf-8") if validated.modified else body
        return validated, content

    def _rate_limit(self, record: ApiKeyRecord, validated: ValidatedRequest | None) -> None:
        limits = self.config.limits
        rpm, tpm = record.rpm or limits.rpm, record.tpm or limits.tpm
        cost = validated.token_cost if validated else 0
        decision = self.limiter.acquire(record.id, rpm=rpm, tpm=tpm, burst=record.burst, tokens=cost)
        if decision.allowed:
            return
        if decision.reason == "too_large":
            raise GatewayError(
                429, f"this request needs up to {cost} tokens, more than the key's limit of {tpm} tokens/min; "
                "lower max_tokens or the prompt", code="request_too_large", reason="request_too_large",
            )  # fmt: skip
        unit = "requests" if decision.reason == "requests" else "tokens"
        raise GatewayError(
            429,
            f"rate limit reached: {decision.limit} {unit}/min for this key; retry after {decision.retry_after}s",
            type=unit,
            code="rate_limit_exceeded",
            reason=f"rate_limit_{unit}",
            headers={"Retry-After": str(decision.retry_after)},
        )

    async def _forward(
        self, scope: Scope, forward: dict[bytes, bytes], route: str, record: ApiKeyRecord,
        validated: ValidatedRequest | None, content: bytes, log: dict[str, Any], t0: float,
    ) -> ASGIApp:  # fmt: skip
        assert self.client is not None
        if validated is not None:  # the body was read as a JSON object: say so, whatever the client sent
            forward = {**forward, b"content-type": b"application/json"}
            if validated.default_max_tokens:  # lmloom's API fits it to the context left (not a demand)
                forward[b"x-lmloom-max-tokens-default"] = b"1"
        headers = [*forward.items(), (b"accept-encoding", b"identity")]
        if self.upstream_auth:
            headers.append((b"authorization", self.upstream_auth))
        path = scope["path"]
        if route != "other":  # the path classified (no trailing /): an upstream redirect names its own host
            path = path.rstrip("/") or "/"
        target = _quote_path(path)
        query = scope.get("query_string")
        if query:
            target += b"?" + query
        t_send = time.perf_counter()
        try:
            upstream = await self.client.send(scope["method"], path, target, headers, content)
        except UpstreamError as exc:
            raise _upstream_error(exc) from None
        encoding = upstream.header(b"content-encoding")
        if encoding and encoding.lower() != "identity":  # identity was asked for; unreadable is not passed
            await upstream.aclose()
            raise GatewayError(502, f"the upstream sent an encoded body ({encoding[:40]}), which cannot be filtered",
                               type="server_error", code="upstream_encoding")  # fmt: skip
        out_headers = [(k, v) for k, v in upstream.headers if k not in _RESPONSE_DROP]
        out_headers += _SECURITY_HEADERS
        content_type = upstream.header(b"content-type")
        if content_type.startswith("text/event-stream"):
            return self._stream(upstream, out_headers, route, record, validated, log, t0, t_send)
        try:
            body = await _read_capped(upstream, self.config.max_response_bytes)
        except UpstreamError as exc:
            raise _upstream_error(exc) from None
        finally:
            await upstream.aclose()
        t_upstream = time.perf_counter() - t_send
        usage, counts, blocked = {}, Counter(), None
        if upstream.status_code < 400 and "json" in content_type:
            try:
                data = json.loads(body)
            except ValueError:
                data = None
            if isinstance(data, dict):
                if route in SCHEMAS:
                    counts, blocked = self.filter.filter_response(data)
                    usage = data.get("usage") or {}
                elif route == "models" and isinstance(data.get("data"), list):
                    data["data"] = [
                        m
                        for m in data["data"]
                        if isinstance(m, dict) and record.allows_model(str(m.get("id")))
                    ]
                body = json.dumps(data, ensure_ascii=False).encode("utf-8")
        self._account(record, validated, usage, None, counts, blocked, log)
        self._done(record, log, upstream.status_code, t0, upstream_s=t_upstream, mode="plain")
        return _Reply(upstream.status_code, out_headers, body)

    def _stream(
        self, upstream: UpstreamResponse, headers: list[tuple[bytes, bytes]], route: str, record: ApiKeyRecord,
        validated: ValidatedRequest | None, log: dict[str, Any], t0: float, t_send: float,
    ) -> ASGIApp:  # fmt: skip
        usage: dict[str, Any] = {}

        def on_chunk(chunk: dict[str, Any]) -> None:
            if isinstance(chunk.get("usage"), dict):
                usage.update(chunk["usage"])

        sse = SseFilter(self.filter, on_chunk)
        pre = t_send - t0
        finished = False

        async def finish(status: int, error: str | None = None) -> None:  # once, however the stream ends
            nonlocal finished
            if finished:
                return
            finished = True
            if error:
                log.setdefault("error", error)
            await upstream.aclose()
            self._account(record, validated, usage, sse, sse.counts, sse.blocked, log)
            try:
                self._done(record, log, status, t0, added_s=pre, mode="stream")
            except GatewayError:
                pass  # the stream has been sent; the writer's failure refuses the next request

        async def body() -> AsyncIterator[bytes]:
            status = upstream.status_code
            try:
                async for piece in sse.run(upstream.aiter_bytes()):
                    yield piece
            except UpstreamError:
                status = 502
                log["error"] = "upstream stream broke"
            except asyncio.CancelledError:
                log["error"] = "client disconnected"
                raise
            finally:
                await finish(status)

        return _StreamReply(body(), upstream.status_code, headers, finish)

    # -- accounting and audit ----------------------------------------------------------------------

    def _account(
        self, record: ApiKeyRecord, validated: ValidatedRequest | None, usage: dict[str, Any],
        sse: SseFilter | None, counts: Counter[str], blocked: str | None, log: dict[str, Any],
    ) -> None:  # fmt: skip
        bpt = self.config.limits.bytes_per_token
        prompt = _int(usage.get("prompt_tokens"))
        completion = _int(usage.get("completion_tokens"))
        if validated is not None:
            if prompt is None:
                prompt = validated.prompt_tokens_estimate
                log["usage_estimated"] = True
            if completion is None:
                completion = math.ceil((sse.completion_text_chars if sse else 0) / bpt)
                log["usage_estimated"] = True
            if self.config.limits.settle_usage:
                self.limiter.settle(record.id, validated.token_cost, prompt + completion)
        prompt, completion = prompt or 0, completion or 0
        tally = self.usage[record.id]
        tally.update(requests=1, prompt_tokens=prompt, completion_tokens=completion)
        self.metrics.tokens.labels(record.id, "prompt").inc(prompt)
        self.metrics.tokens.labels(record.id, "completion").inc(completion)
        log.update(prompt_tokens=prompt, completion_tokens=completion)
        if counts:
            log["redacted"] = dict(counts)
            for kind, n in counts.items():
                self.metrics.redactions.labels(kind).inc(n)
        if blocked:
            log["blocked_category"] = blocked
            self.metrics.rejections.labels("output_blocked").inc()
            self._audit("security.output_blocked", _principal(record), key=record.id, route=log["route"],
                        category=blocked, prompt_sha256=log.get("prompt_sha256"))  # fmt: skip

    def _done(
        self, record: ApiKeyRecord, log: dict[str, Any], status: int, t0: float, *,
        upstream_s: float | None = None, added_s: float | None = None, mode: str = "local",
    ) -> None:  # fmt: skip
        total = time.perf_counter() - t0
        if upstream_s is not None:
            added_s = total - upstream_s
            log["upstream_ms"] = round(upstream_s * 1000, 3)
        if added_s is not None:
            self.metrics.added_latency.labels(mode).observe(added_s)
        self.metrics.requests.labels(record.id, log["route"], str(status)).inc()
        self._audit("gateway.request", _principal(record), key=record.id, status=status,
                    latency_ms=round(total * 1000, 3), **log)  # fmt: skip

    def _audit(self, event: str, principal: str, **fields: Any) -> None:
        assert self.audit is not None
        self.audit.submit(event, principal, **{k: v for k, v in fields.items() if v is not None})


def _principal(record: ApiKeyRecord) -> str:
    return f"api-key:{record.id}" + (f" ({record.name})" if record.name else "")


def _bearer(header: str | None) -> str | None:
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else "\x00malformed"


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and value >= 0 else None


def _quote_path(path: str) -> bytes:
    """The (decoded) path the route was classified by, encoded so the upstream decodes the same path."""
    return quote(path, safe=_PATH_SAFE).encode("ascii")


def _upstream_error(exc: UpstreamError) -> GatewayError:
    if exc.timeout:
        return GatewayError(504, "the upstream timed out", type="server_error", code="upstream_timeout")
    return GatewayError(502, f"the upstream is unreachable ({exc.kind})", type="server_error",
                        code="upstream_unreachable")  # fmt: skip


async def _request_chunks(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.request":
            yield message.get("body", b"")
            if not message.get("more_body", False):
                return
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()


class _Reply:
    """A whole response with ready raw headers (content-length added), sent as one start and one body."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes):
        if status < 200 or status in (204, 304):
            body = b""
        else:
            headers = [*headers, (b"content-length", str(len(body)).encode("ascii"))]
        self.status, self.headers, self.body = status, headers, body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


class _StreamReply(StreamingResponse):
    """A streamed answer (the upstream's raw headers) that closes the upstream response and accounts
    for the request however it ends, even when the client leaves before the first byte is sent (then
    the body generator never runs)."""

    def __init__(
        self, content: AsyncIterator[bytes], status: int, headers: list[tuple[bytes, bytes]],
        finish: Callable[[int, str], Awaitable[None]],
    ):  # fmt: skip
        super().__init__(content, status_code=status)
        self.raw_headers = headers  # the upstream's content-type (text/event-stream) included
        self._finish = finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._finish(self.status_code, "client disconnected")  # no-op if the body finished it


async def _read_capped(response: UpstreamResponse, cap: int) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > cap:
            raise GatewayError(502, "the upstream's response is larger than allowed", type="server_error",
                               code="upstream_response_too_large")  # fmt: skip
    return bytes(body)


class GatewayApp:
    """The gateway as a plain ASGI app: no framework routing or middleware on the request path.

    `GET /livez` answers without a key; any other path and method in `_METHODS` goes through
    `Gateway.handle`; other methods get 405, websockets are closed. `state.gateway` is the `Gateway`.
    """

    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.state = State()
        self.state.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            method = scope["method"]
            if scope["path"] == LIVEZ and method in ("GET", "HEAD"):
                response: ASGIApp = JSONResponse({"status": "ok"}, headers={"Cache-Control": "no-store"})
            elif method not in _METHODS:
                response = JSONResponse(
                    {"detail": "Method Not Allowed"}, 405, headers={"Allow": ", ".join(_METHODS)}
                )
            else:
                try:
                    response = await self.gateway.handle(scope, receive)
                except ClientDisconnect:
                    return
            await response(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1000})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        started = False
        await receive()  # lifespan.startup
        try:
            async with self.gateway.lifespan(self):
                await send({"type": "lifespan.startup.complete"})
                started = True
                await receive()  # lifespan.shutdown
        except BaseException:
            message = traceback.format_exc()
            await send(
                {"type": f"lifespan.{'shutdown' if started else 'startup'}.failed", "message": message}
            )
            raise
        await send({"type": "lifespan.shutdown.complete"})


def create_gateway(
    upstream: str | Any, config: GatewayConfig | None = None, store_root: Path | str = "."
) -> GatewayApp:
    """The gateway app. `upstream`: a base URL (`http://127.0.0.1:8001`) or an ASGI app in this process."""
    return GatewayApp(Gateway(upstream, config or GatewayConfig(), Path(store_root)))
