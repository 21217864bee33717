"""A small, real OpenAI-compatible upstream for the gateway tests and benchmark, plus a loopback
uvicorn runner.

Chat and completions echo the last user message (or prompt) back, so a test decides what the "model"
says. The text is streamed in chunks of `chunk` characters (a request field this upstream alone
understands is not possible through the gateway, so the chunk size comes from the prompt: a prompt
starting `[chunk=3]` streams 3-character pieces).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

MODELS = ["echo-1", "echo-2"]
_CHUNK = re.compile(r"^\[chunk=(\d+)\]")


def _answer(text: str) -> tuple[str, int]:
    match = _CHUNK.match(text)
    if match:
        return text[match.end() :], int(match.group(1))
    return text, 4


def create_upstream() -> FastAPI:
    app = FastAPI()
    app.state.seen = []  # (path, headers, body) of every request, for tests to inspect

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "test"} for m in MODELS]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse("upstream_secret_metric 1\n")

    async def _record(request: Request) -> dict:
        body = await request.json()
        app.state.seen.append((request.url.path, dict(request.headers), body))
        return body

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _record(request)
        last = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
        text, chunk = _answer(last if isinstance(last, str) else "".join(p["text"] for p in last))
        return _respond(body, text, chunk, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _record(request)
        prompt = body["prompt"] if isinstance(body["prompt"], str) else body["prompt"][0]
        text, chunk = _answer(prompt)
        return _respond(body, text, chunk, chat=False)

    return app


def _respond(body: dict, text: str, chunk: int, chat: bool):
    model = body["model"]
    usage = {"prompt_tokens": len(text) // 4 + 1, "completion_tokens": len(text) // 4 + 1}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    base = {"id": "cmpl-test", "created": int(time.time()), "model": model}
    if not body.get("stream"):
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            return JSONResponse({**base, "object": "chat.completion", "choices": [choice], "usage": usage})
        choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
        return JSONResponse({**base, "object": "text_completion", "choices": [choice], "usage": usage})

    async def events():
        obj = "chat.completion.chunk" if chat else "text_completion"
        if chat:
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            yield f"data: {json.dumps({**base, 'object': obj, 'choices': [first]})}\n\n"
        for i in range(0, len(text), chunk):
            piece = text[i : i + chunk]
            choice = (
                {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                if chat
                else {"index": 0, "text": piece, "finish_reason": None}
            )
            yield f"data: {json.dumps({**base, 'object': obj, 'choices': [choice]})}\n\n"
            await asyncio.sleep(0)
        last = (
            {"index": 0, "delta": {}, "finish_reason": "stop"}
            if chat
            else {"index": 0, "text": "", "finish_reason": "stop"}
        )
        yield f"data: {json.dumps({**base, 'object': obj, 'choices': [last]})}\n\n"
        if (body.get("stream_options") or {}).get("include_usage"):
            yield f"data: {json.dumps({**base, 'object': obj, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


class LoopbackServer:
    """Runs an ASGI app with uvicorn on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, app, **config):
        self.config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="on",
            http="h11",
            loop="asyncio",
            **config,
        )
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        scheme = "https" if self.config.ssl_certfile else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def loopback_certificate(folder, stem: str):
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key, as PEM files in `folder`."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path
