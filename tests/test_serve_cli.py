"""`lmloom serve CHECKPOINT` end to end: a real process serves a checkpoint artifact through the engine
and the gateway on loopback; the official openai client chats with a scoped key, and a request without
one is refused."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from test_gates import make_checkpoint
from typer.testing import CliRunner

from lmloom.artifacts.store import ArtifactStore
from lmloom.cli import app
from lmloom.security.context import store_security

openai = pytest.importorskip("openai")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_a_checkpoint_behind_the_gateway(tmp_path):
    root = tmp_path / "store"
    store = ArtifactStore(root, security=store_security(root))
    artifact, _model, _tokenizer = make_checkpoint(store)
    env = {**os.environ, "LMLOOM_HOME": str(root), "COLUMNS": "200"}
    for name in ("LMLOOM_TOKEN", "LMLOOM_POLICY", "LMLOOM_PRINCIPAL"):
        env.pop(name, None)
    created = CliRunner().invoke(
        app,
        ["keys", "api", "create", "--name", "t", "--scope", f"models={artifact.short_id}",
         "--scope", "endpoints=chat,completions,models"],
        env={k: env.get(k) for k in ("LMLOOM_HOME", "COLUMNS")},
    )  # fmt: skip
    assert created.exit_code == 0, created.output
    key = created.output.strip().splitlines()[-1]

    port = free_port()
    cmd = [sys.executable, "-m", "lmloom", "serve", artifact.short_id, "--port", str(port)]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/livez", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
            assert server.poll() is None, server.stdout.read()
        else:
            pytest.fail("lmloom serve did not come up")

        assert httpx.get(f"{base}/v1/models", timeout=5).status_code == 401
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key)
        assert [m.id for m in client.models.list().data] == [artifact.short_id]
        reply = client.chat.completions.create(
            model=artifact.short_id,
            messages=[{"role": "user", "content": "What does textwrap do?"}],
            max_tokens=8,
            temperature=0,
        )
        assert reply.usage.completion_tokens >= 1
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        server.terminate()
        server.wait(timeout=30)
