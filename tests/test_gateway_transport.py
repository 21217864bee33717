"""The gateway's upstream transport and its plain-ASGI front: HTTP/1.1 framing and keep-alive against
hand-written servers, timeouts and failures, and what the gateway forwards (path, headers, encodings)."""

from __future__ import annotations

import asyncio
import gzip
import json

import httpx
import pytest
from gateway_upstream import LoopbackServer, loopback_certificate

from lmloom.serve.gateway import ApiKeyStore, GatewayConfig, create_gateway
from lmloom.serve.gateway.transport import HttpUpstream, UpstreamError

JSON_OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n{"ok": true}'


class RawServer:
    """An asyncio server answering every request on a connection with `respond(request_bytes)`."""

    def __init__(self, respond, close_after: int | None = None):
        self.respond = respond
        self.close_after = close_after  # close a connection after this many responses
        self.connections = 0
        self.requests: list[bytes] = []

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
                    0,
                )  # fmt: skip
                request = head + (await reader.readexactly(length) if length else b"")
                self.requests.append(request)
                reply = self.respond(request)
                if asyncio.iscoroutine(reply):
                    reply = await reply
                writer.write(reply)
                await writer.drain()
                served += 1
                if self.close_after is not None and served >= self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _fetch(upstream: HttpUpstream, path: bytes = b"/v1/x", content: bytes = b"{}") -> tuple[int, bytes]:
    response = await upstream.send(
        "POST", path.decode(), path, [(b"content-type", b"application/json")], content
    )
    try:
        body = b"".join([chunk async for chunk in response.aiter_bytes()])
    finally:
        await response.aclose()
    return response.status_code, body


def test_keep_alive_reuses_one_connection_and_writes_each_request_whole():
    async def main():
        async with RawServer(lambda request: JSON_OK) as server:
            upstream = HttpUpstream(server.url + "/prefix/", timeout_s=5)
            for _ in range(3):
                assert await _fetch(upstream) == (200, b'{"ok": true}')
            await upstream.aclose()
        assert server.connections == 1
        first = server.requests[0]
        assert first.startswith(b"POST /prefix/v1/x HTTP/1.1\r\n")
        assert b"host: 127.0.0.1:" in first.lower() and b"content-length: 2" in first.lower()
        assert first.endswith(b"\r\n\r\n{}")

    asyncio.run(main())


def test_a_connection_the_server_closed_while_idle_is_not_reused():
    async def main():
        async with RawServer(lambda request: JSON_OK, close_after=1) as server:
            upstream = HttpUpstream(server.url, timeout_s=5)
            assert await _fetch(upstream) == (200, b'{"ok": true}')
            await asyncio.sleep(0.05)  # the server's FIN arrives
            assert await _fetch(upstream) == (200, b'{"ok": true}')
            await upstream.aclose()
        assert server.connections == 2

    asyncio.run(main())


def test_chunked_read_to_close_and_informational_responses_are_framed_by_h11():
    chunked = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    to_close = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nread until the end"

    async def main():
        async with RawServer(lambda request: chunked) as server:
            upstream = HttpUpstream(server.url, timeout_s=5)
            assert await _fetch(upstream) == (200, b"hello world")
            assert await _fetch(upstream) == (200, b"hello world")
            assert server.connections == 1
            await upstream.aclose()
        async with RawServer(lambda request: to_close, close_after=1) as server:
            upstream = HttpUpstream(server.url, timeout_s=5)
            assert await _fetch(upstream) == (200, b"read until the end")
            assert await _fetch(upstream) == (200, b"read until the end")
            assert server.connections == 2  # a read-to-close body ends its connection
            await upstream.aclose()

    asyncio.run(main())


def test_a_response_given_up_midway_closes_its_connection_and_frees_its_slot():
    async def main():
        body = b"x" * 200_000
        reply = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body
        async with RawServer(lambda request: reply) as server:
            upstream = HttpUpstream(server.url, timeout_s=5, max_connections=1)
            for _ in range(3):  # one slot: a leaked slot would hang the second request
                response = await upstream.send("GET", "/", b"/", [], b"")
                async for _chunk in response.aiter_bytes():
                    break
                await response.aclose()
            assert server.connections == 3 and not upstream._idle
            await upstream.aclose()

    asyncio.run(main())


def test_failures_are_upstream_errors_timeouts_marked():
    async def main():
        async with RawServer(lambda request: b"") as server:
            port = server.port
        with pytest.raises(UpstreamError) as refused:
            await _fetch(HttpUpstream(f"http://127.0.0.1:{port}", timeout_s=5))
        assert refused.value.kind == "ConnectError" and not refused.value.timeout

        async def slow(request: bytes) -> bytes:
            await asyncio.sleep(5)
            return JSON_OK

        async with RawServer(slow) as server:
            with pytest.raises(UpstreamError) as late:
                await _fetch(HttpUpstream(server.url, timeout_s=0.2))
            assert late.value.timeout
        async with RawServer(lambda request: b"NOT HTTP AT ALL\r\n\r\n") as server:
            with pytest.raises(UpstreamError) as garbled:
                await _fetch(HttpUpstream(server.url, timeout_s=5))
            assert garbled.value.kind == "RemoteProtocolError"
        half = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part"
        async with RawServer(lambda request: half, close_after=1) as server:
            with pytest.raises(UpstreamError) as broken:
                await _fetch(HttpUpstream(server.url, timeout_s=5))
            assert not broken.value.timeout

    asyncio.run(main())


# -- the gateway in front of a recording in-process upstream -----------------------------------------


def recording_upstream(seen: list, reply_headers: list[tuple[bytes, bytes]], body: bytes):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        seen.append({"path": scope["path"], "raw_path": scope["raw_path"], "query": scope["query_string"],
                     "headers": dict(scope["headers"]), "method": scope["method"]})  # fmt: skip
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": reply_headers})
        await send({"type": "http.response.body", "body": body})

    return app


@pytest.fixture
def gateway_for(tmp_path):
    store = tmp_path / "store"
    _, key = ApiKeyStore.for_store(store).create(endpoints=["*"])
    servers = []

    def start(upstream_app):
        server = LoopbackServer(create_gateway(upstream_app, GatewayConfig(), store)).__enter__()
        servers.append(server)
        return server.url, {"Authorization": f"Bearer {key}"}

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def test_forwarded_path_query_and_headers(gateway_for):
    seen: list = []
    headers = [(b"content-type", b"application/json"), (b"cache-control", b"public"), (b"server", b"up/1")]
    url, auth = gateway_for(recording_upstream(seen, headers, b'{"data": []}'))
    sent = {**auth, "X-Trace": "t1", "Cookie": "session=1", "Accept-Encoding": "gzip"}
    response = httpx.get(url + "/v1/some%3Fthing/a%2Fb?x=1&y=%20", headers=sent, timeout=10)
    assert response.status_code == 200
    [request] = seen
    # the decoded path the route was classified by is the path the upstream decodes; nothing moves to the query
    assert request["path"] == "/v1/some?thing/a/b" and request["query"] == b"x=1&y=%20"
    assert request["raw_path"] == b"/v1/some%3Fthing/a/b"
    forwarded = request["headers"]
    assert forwarded[b"x-trace"] == b"t1" and forwarded[b"accept-encoding"] == b"identity"
    assert b"authorization" not in forwarded and b"cookie" not in forwarded
    assert response.headers.get_list("cache-control") == ["no-store"]
    assert response.headers["x-content-type-options"] == "nosniff" and "up/1" not in response.headers.get(
        "server", ""
    )


def test_an_encoded_upstream_body_is_refused_not_passed_unfiltered(gateway_for):
    secret = "ghp_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A7"
    body = gzip.compress(json.dumps({"choices": [{"index": 0, "text": secret}]}).encode())
    headers = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]
    url, auth = gateway_for(recording_upstream([], headers, body))
    response = httpx.post(
        url + "/v1/completions", json={"model": "m", "prompt": "hi"}, headers=auth, timeout=10
    )
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_encoding"
    assert secret not in response.text


def test_livez_is_open_to_get_and_head_only_and_other_methods_get_405(gateway_for):
    url, auth = gateway_for(recording_upstream([], [], b""))
    assert httpx.head(url + "/livez", timeout=10).status_code == 200
    assert httpx.post(url + "/livez", timeout=10).status_code == 401  # only GET/HEAD /livez is open
    response = httpx.request("TRACE", url + "/v1/models", headers=auth, timeout=10)
    assert response.status_code == 405 and "GET" in response.headers["allow"]


def test_the_gateway_presents_its_own_upstream_key_never_the_clients(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLOOM_TEST_UPSTREAM_KEY", "up-secret-1")
    store = tmp_path / "store"
    _, key = ApiKeyStore.for_store(store).create()
    seen: list = []
    upstream = recording_upstream(
        seen, [(b"content-type", b"application/json")], b'{"object": "list", "data": []}'
    )
    config = GatewayConfig(upstream_api_key_env="LMLOOM_TEST_UPSTREAM_KEY")
    with LoopbackServer(create_gateway(upstream, config, store)) as gateway:
        response = httpx.get(
            gateway.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10
        )
    assert response.status_code == 200
    assert seen[0]["headers"][b"authorization"] == b"Bearer up-secret-1"
    assert key.encode() not in b"".join(v for v in seen[0]["headers"].values())


def test_an_https_upstream_is_verified(tmp_path, monkeypatch):
    from gateway_upstream import create_upstream

    cert_path, key_path = loopback_certificate(tmp_path, "up")
    store = tmp_path / "store"
    _, api_key = ApiKeyStore.for_store(store).create()
    body = {"model": "echo-1", "messages": [{"role": "user", "content": "over tls upstream"}]}
    headers = {"Authorization": f"Bearer {api_key}"}
    with LoopbackServer(
        create_upstream(), ssl_certfile=str(cert_path), ssl_keyfile=str(key_path)
    ) as upstream:
        assert upstream.url.startswith("https://")
        with LoopbackServer(create_gateway(upstream.url, GatewayConfig(), store)) as gateway:  # not trusted
            response = httpx.post(
                gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=10
            )
            assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_unreachable"
        monkeypatch.setenv("SSL_CERT_FILE", str(cert_path))
        with LoopbackServer(create_gateway(upstream.url, GatewayConfig(), store)) as gateway:
            response = httpx.post(
                gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=10
            )
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"] == "over tls upstream"


def test_a_stream_whose_client_left_before_the_first_byte_is_closed_and_audited(tmp_path):
    from lmloom.security.audit import AuditLog

    store = tmp_path / "store"
    _, key = ApiKeyStore.for_store(store).create()
    upstream_closed = asyncio.Event()

    async def streaming_upstream(scope, receive, send):
        await receive()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        try:
            for i in range(1000):
                chunk = {
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": f"t{i} "}}],
                }
                await send(
                    {
                        "type": "http.response.body",
                        "body": f"data: {json.dumps(chunk)}\n\n".encode(),
                        "more_body": True,
                    }
                )
                await asyncio.sleep(0.01)
        finally:
            upstream_closed.set()

    app = create_gateway(streaming_upstream, GatewayConfig(), store)
    body = json.dumps(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
             "headers": [(b"authorization", f"Bearer {key}".encode()), (b"content-length", str(len(body)).encode())]}  # fmt: skip

    async def main():
        received = False

        async def receive():
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()

        async def gone(message):
            raise OSError("the client went away")

        gateway = app.state.gateway
        async with gateway.lifespan(app):
            with pytest.raises(Exception):  # noqa: B017 (Starlette's ClientDisconnect or the OSError)
                await app(scope, receive, gone)
            await asyncio.wait_for(upstream_closed.wait(), 5)
            gateway.audit.drain()
            [entry] = [
                e for e in AuditLog(store / "audit.jsonl").entries() if e["event"] == "gateway.request"
            ]
            assert entry["status"] == 200 and entry["error"] == "client disconnected"

    asyncio.run(main())
