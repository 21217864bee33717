"""How the gateway reaches its upstream: one small interface, two implementations.

- `HttpUpstream`: an OpenAI-compatible server by URL, over a small pool of keep-alive HTTP/1.1
  connections. Framing (Content-Length, chunked, read-to-close, 1xx, keep-alive) is h11's, the same
  protocol engine httpx and uvicorn use; each request is written with one `write` (head and body
  together). httpx's client layers and httpcore's pool on top of h11 (URL merging and re-parsing,
  default headers, auth, redirects, cookies, anyio locks and timeouts) cost more CPU per request than
  all the gateway's checks together, so they are left out. TLS upstreams are verified with httpx's
  default context (certifi, or `SSL_CERT_FILE` / `SSL_CERT_DIR`); proxy variables (`HTTP_PROXY`...)
  are not used for this hop.
- `AsgiUpstream`: an ASGI app in this process, called directly, its response streamed as it is
  produced (httpx's own `ASGITransport` collects the whole body first, which would turn a token stream
  into one late burst).

Both answer `send(...)` with an `UpstreamResponse` and report a failure to connect, a timeout, a
protocol violation or a broken stream as `UpstreamError`. The gateway asks for
`Accept-Encoding: identity` (it must read every byte it filters) and refuses an encoded body.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import h11
import httpx

T = TypeVar("T")
_READ = 65536
_NETWORK_ERRORS = (OSError, EOFError, h11.ProtocolError)

if sys.version_info >= (3, 11):

    async def _within(awaitable: Awaitable[T], seconds: float) -> T:
        async with asyncio.timeout(seconds):
            return await awaitable

else:  # pragma: no cover (3.10)

    async def _within(awaitable: Awaitable[T], seconds: float) -> T:
        try:
            return await asyncio.wait_for(awaitable, seconds)
        except asyncio.TimeoutError:  # not yet the built-in TimeoutError
            raise TimeoutError from None


class UpstreamError(Exception):
    """The upstream could not be reached, timed out, or broke off its response."""

    def __init__(self, kind: str, timeout: bool = False):
        super().__init__(kind)
        self.kind = kind  # an exception class name, e.g. ConnectError, ReadTimeout
        self.timeout = timeout


class UpstreamResponse:
    """Status, raw headers (names lower-cased) and a body that is read once, as it arrives."""

    __slots__ = ("status_code", "headers", "_chunks", "_close")

    def __init__(
        self,
        status_code: int,
        headers: list[tuple[bytes, bytes]],
        chunks: AsyncIterator[bytes],
        close: Callable[[], Awaitable[None]],
    ):
        self.status_code = status_code
        self.headers = headers
        self._chunks = chunks
        self._close = close

    def header(self, name: bytes) -> str:
        """The first value of header `name` (lower case), or ''."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return ""

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body as it arrives (read once)."""
        return self._chunks

    async def aclose(self) -> None:
        await self._close()


class _Connection:
    __slots__ = ("reader", "writer", "h11", "idle_since")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0

    def usable(self, now: float, expiry: float) -> bool:
        return (
            now - self.idle_since < expiry
            and not self.reader.at_eof()  # the server closed it while idle
            and not self.writer.is_closing()
            and self.h11.our_state is h11.IDLE
        )

    def close(self) -> None:
        self.writer.close()


class HttpUpstream:
    """An upstream by base URL (`http://127.0.0.1:8001`, or `https://...[/prefix]`), kept alive.

    At most `max_connections` requests are in flight (more wait, up to the timeout, for a slot); up
    to `max_idle` connections are kept for reuse, each for at most `keepalive_expiry` seconds. A
    connection goes back to the pool only after a response was read to its end; one given up midway
    (client gone, body too large, error) is closed.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float,
        connect_timeout_s: float = 10.0,
        max_connections: int = 256,
        max_idle: int = 64,
        keepalive_expiry: float = 5.0,
    ):
        url = httpx.URL(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"upstream URL {base_url!r}: expected http(s)://host[:port][/prefix]")
        self.host = url.host
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.host_header = url.netloc
        self.prefix = url.raw_path.split(b"?")[0].rstrip(b"/")
        self.ssl = httpx.create_ssl_context() if url.scheme == "https" else None
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_idle = max_idle
        self.keepalive_expiry = keepalive_expiry
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)

    async def _connect(self) -> _Connection:
        reader, writer = await _within(
            asyncio.open_connection(
                self.host,
                self.port,
                ssl=self.ssl,
                server_hostname=self.host if self.ssl else None,
                limit=_READ,
            ),
            self.connect_timeout_s,
        )
        return _Connection(reader, writer)

    def _checkout(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()  # the most recently used: the least likely to have expired
            if connection.usable(now, self.keepalive_expiry):
                return connection
            connection.close()
        return None

    def _checkin(self, connection: _Connection) -> None:
        machine = connection.h11
        if (
            machine.our_state is h11.DONE
            and machine.their_state is h11.DONE
            and len(self._idle) < self.max_idle
        ):
            machine.start_next_cycle()  # both sides DONE: the connection may carry the next request
            connection.idle_since = time.monotonic()
            if connection.usable(connection.idle_since, self.keepalive_expiry):
                self._idle.append(connection)
                return
        connection.close()

    async def send(
        self, method: str, path: str, target: bytes, headers: list[tuple[bytes, bytes]], content: bytes
    ) -> UpstreamResponse:
        """`target`: the percent-encoded path and query; `path` (decoded) is for in-process apps only."""
        headers = [(b"host", self.host_header), *headers]
        if content or method in ("POST", "PUT", "PATCH"):
            headers.append((b"content-length", str(len(content)).encode("ascii")))
        try:
            if self._slots.locked():
                await _within(self._slots.acquire(), self.timeout_s)
            else:
                await self._slots.acquire()
        except TimeoutError:
            raise UpstreamError("PoolTimeout", timeout=True) from None
        connection: _Connection | None = None
        try:
            connection = self._checkout()
            if connection is None:
                try:
                    connection = await self._connect()
                except TimeoutError:
                    raise UpstreamError("ConnectTimeout", timeout=True) from None
                except OSError as exc:
                    raise UpstreamError("ConnectError") from exc
            machine = connection.h11
            try:
                data = machine.send(h11.Request(method=method, target=self.prefix + target, headers=headers))
                if content:
                    data += machine.send(h11.Data(data=content))
                data += machine.send(h11.EndOfMessage())
                connection.writer.write(data)  # head and body in one write
                if connection.writer.transport.get_write_buffer_size():  # the kernel did not take it all
                    await _within(connection.writer.drain(), self.timeout_s)
                event = await self._next_event(connection)
                while isinstance(event, h11.InformationalResponse):  # 100 Continue and the like
                    event = await self._next_event(connection)
                if not isinstance(event, h11.Response):  # pragma: no cover (h11 raises first)
                    raise h11.RemoteProtocolError(f"{type(event).__name__} instead of a response")
            except TimeoutError:
                raise UpstreamError("ReadTimeout", timeout=True) from None
            except _NETWORK_ERRORS as exc:
                raise UpstreamError(_error_kind(exc)) from exc
        except BaseException:
            if connection is not None:
                connection.close()
            self._slots.release()
            raise
        return _HttpResponse(self, connection, event)

    async def _next_event(self, connection: _Connection) -> Any:
        machine = connection.h11
        while True:
            event = machine.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await _within(connection.reader.read(_READ), self.timeout_s)
            machine.receive_data(data)  # b"" at EOF: h11 ends a read-to-close body, or raises

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, h11.RemoteProtocolError):
        return "RemoteProtocolError"
    if isinstance(exc, h11.LocalProtocolError):
        return "LocalProtocolError"
    if isinstance(exc, ConnectionError | EOFError):
        return "ReadError"
    return type(exc).__name__


class _HttpResponse(UpstreamResponse):
    __slots__ = ("_upstream", "_connection", "_released")

    def __init__(self, upstream: HttpUpstream, connection: _Connection, head: h11.Response):
        super().__init__(head.status_code, list(head.headers), self._read(), self._release)
        self._upstream, self._connection, self._released = upstream, connection, False

    async def _read(self) -> AsyncIterator[bytes]:
        while True:
            try:
                event = await self._upstream._next_event(self._connection)
            except TimeoutError:
                raise UpstreamError("ReadTimeout", timeout=True) from None
            except _NETWORK_ERRORS as exc:
                raise UpstreamError(_error_kind(exc)) from exc
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return

    async def _release(self) -> None:
        if self._released:
            return
        self._released = True
        self._upstream._checkin(self._connection)  # back to the pool only when read to the end
        self._upstream._slots.release()


class AsgiUpstream:
    """An ASGI app in this process. Its lifespan is the caller's business (the gateway enters it)."""

    def __init__(self, app: Any):
        self.app = app

    async def send(
        self, method: str, path: str, target: bytes, headers: list[tuple[bytes, bytes]], content: bytes
    ) -> UpstreamResponse:
        raw_path, _, query = target.partition(b"?")
        headers = [(b"host", b"upstream"), *headers]
        if content or method in ("POST", "PUT", "PATCH"):
            headers.append((b"content-length", str(len(content)).encode("ascii")))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "headers": [(k.lower(), v) for k, v in headers],
            "scheme": "http",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "server": ("upstream", 80),
            "client": ("127.0.0.1", 0),
            "root_path": "",
        }
        started: asyncio.Future = asyncio.get_running_loop().create_future()
        queue: asyncio.Queue = asyncio.Queue()
        disconnected = asyncio.Event()
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": content, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and not started.done():
                started.set_result(message)
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    await queue.put(message["body"])
                if not message.get("more_body", False):
                    await queue.put(None)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the app crashed: an error response, or a broken stream
                if not started.done():
                    started.set_exception(exc)
                else:
                    await queue.put(exc)
            finally:
                if not started.done():
                    started.set_exception(RuntimeError("the in-process upstream sent no response"))
                await queue.put(None)

        task = asyncio.create_task(run())
        try:
            message = await started
        except Exception as exc:
            raise UpstreamError("ConnectError") from exc

        async def chunks() -> AsyncIterator[bytes]:
            while True:
                chunk = await queue.get()
                if chunk is None:
                    return
                if isinstance(chunk, BaseException):
                    raise UpstreamError("ReadError") from chunk
                yield chunk

        async def close() -> None:
            disconnected.set()
            if not task.done():
                task.cancel()

        raw = [(bytes(k).lower(), bytes(v)) for k, v in message.get("headers", [])]
        return UpstreamResponse(message["status"], raw, chunks(), close)

    async def aclose(self) -> None:
        pass
