"""An httpx transport that calls an in-process ASGI app and streams its response as it is produced.

(httpx's own `ASGITransport` collects the whole body before returning, which would turn a token stream
into one late burst.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

import httpx


class _Body(httpx.AsyncByteStream):
    def __init__(self, queue: asyncio.Queue, task: asyncio.Task, disconnected: asyncio.Event):
        self.queue, self.task, self.disconnected = queue, task, disconnected

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self.queue.get()
            if chunk is None:
                return
            if isinstance(chunk, BaseException):
                raise httpx.ReadError(f"in-process upstream failed: {chunk!r}")
            yield chunk

    async def aclose(self) -> None:
        self.disconnected.set()
        if not self.task.done():
            self.task.cancel()


class StreamingASGITransport(httpx.AsyncBaseTransport):
    def __init__(self, app: Any):
        self.app = app

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "headers": [(k.lower(), v) for k, v in request.headers.raw],
            "scheme": request.url.scheme,
            "path": unquote(request.url.path),
            "raw_path": request.url.raw_path.split(b"?")[0],
            "query_string": request.url.query,
            "server": (request.url.host, request.url.port or 80),
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
                return {"type": "http.request", "body": body, "more_body": False}
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
            raise httpx.ConnectError(f"in-process upstream failed: {exc!r}") from exc
        return httpx.Response(
            status_code=message["status"],
            headers=message.get("headers", []),
            stream=_Body(queue, task, disconnected),
            request=request,
        )
