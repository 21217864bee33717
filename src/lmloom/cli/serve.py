"""`lmloom serve`: the security gateway in front of a checkpoint served in-process, or of any
OpenAI-compatible upstream (vLLM, llama.cpp's server, another lmloom) given by URL."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmloom.cli.common import current_access, err, open_store, requires, store_root
from lmloom.errors import ConfigError, LmloomError


@requires("serve")
def serve(
    artifact: Annotated[
        str | None, typer.Argument(help="Checkpoint artifact id to serve in this process (a unique prefix).")
    ] = None,
    upstream: Annotated[
        str | None,
        typer.Option("--upstream", help="Base URL of an OpenAI-compatible server to front instead."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="Gateway config YAML (GatewayConfig).")
    ] = None,
    host: Annotated[
        str | None, typer.Option("--host", help="Bind address [config, default 127.0.0.1].")
    ] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port [config, default 8000].")] = None,
    model_name: Annotated[
        str | None, typer.Option("--model-name", help="Model name clients use [default: the artifact id].")
    ] = None,
    override_gates: Annotated[
        bool,
        typer.Option(
            "--override-gates",
            help="Serve a checkpoint that has not passed the store's release gates (audited).",
        ),
    ] = False,
) -> None:
    """Serve an OpenAI-compatible API behind the security gateway (API keys, limits, filters, audit).

    Every route but /livez needs a key from `lmloom keys api create`. Binding anything but loopback
    needs TLS (tls.cert / tls.key in the config). The config file (YAML, every key optional):

        host: 127.0.0.1
        port: 8000
        tls: {cert: gw.crt, key: gw.key}
        limits: {rpm: 60, tpm: 100000}
        validation: {max_body_bytes: 1000000, max_tokens_cap: 4096, default_max_tokens: 512, max_n: 4}
        injection: {action: block, patterns: {my_rule: "(?i)open the pod bay doors"}}
        filters: {blocked_categories: [weapons]}
        upstream_api_key_env: VLLM_API_KEY
        log_prompts: false

    A request without max_tokens gets default_max_tokens; a checkpoint served here fits it to the
    context the prompt leaves.
    """
    from lmloom.serve.gateway import ApiKeyStore, create_gateway, load_gateway_config

    if (artifact is None) == (upstream is None):
        raise ConfigError("give either a checkpoint ARTIFACT to serve or --upstream URL, not both or neither")
    if upstream is not None:
        import httpx

        try:
            url = httpx.URL(upstream)
        except httpx.InvalidURL as exc:
            raise ConfigError(f"--upstream {upstream!r}: not a URL ({exc})") from None
        if url.scheme not in ("http", "https") or not url.host or not 0 < (url.port or 80) < 65536:
            raise ConfigError(f"--upstream {upstream!r}: expected an http(s)://host[:port][/prefix] base URL")
    settings = load_gateway_config(config, host=host, port=port)
    root = store_root()
    opened = None
    if artifact is not None:  # the release gates, when the store's gates.yaml requires them
        from lmloom.evaluate.gates import check_release_gates

        principal = current_access().principal
        opened = check_release_gates(open_store(), artifact, override_gates, principal, action="serve")
    target = upstream if upstream is not None else _in_process_app(opened, model_name)
    app = create_gateway(target, settings, root)
    if not ApiKeyStore.for_store(root).records():
        err.print(
            "no gateway API keys yet: every request will be refused; create one with `lmloom keys api create`"
        )
    import uvicorn

    scheme = "https" if settings.tls else "http"
    err.print(f"gateway on {scheme}://{settings.host}:{settings.port} -> {upstream or 'in-process engine'}")
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        ssl_certfile=str(settings.tls.cert) if settings.tls else None,
        ssl_keyfile=str(settings.tls.key) if settings.tls else None,
        log_level="warning",
        server_header=False,
        proxy_headers=False,
    )


def _in_process_app(opened, model_name: str | None):
    try:
        from lmloom.serve.api import create_app
        from lmloom.serve.engine import Engine
    except ImportError as exc:
        raise LmloomError(
            f"the in-process engine is not available ({exc}); run an OpenAI-compatible server and use --upstream URL"
        ) from None
    from lmloom.serve.loading import load_checkpoint_artifact

    model, tokenizer = load_checkpoint_artifact(opened)
    name = model_name or opened.short_id
    engine = Engine(model, tokenizer, model_name=name).start()
    return create_app(engine, name)
