"""`lmloom keys init | rotate | list`: the store's envelope-encryption keys. Never prints key material."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from lmloom.cli.common import current_access, err, out, requires, store_root
from lmloom.errors import SecurityError

app = typer.Typer(
    help=(
        "Encryption keys: data keys (DEKs) in STORE/security/keyring.json, wrapped by a key-encryption "
        "key (KEK) that never enters the store: $LMLOOM_KEK (base64 of 32 bytes), $LMLOOM_KEK_FILE "
        "(a file with mode 0600) or $LMLOOM_KEK_PROVIDER (module:Class, e.g. a KMS)."
    ),
    no_args_is_help=True,
)

MANAGE_KEYS = "manage-keys"


def _audit(event: str, **fields) -> None:
    from lmloom.security.context import store_audit_log

    store_audit_log(store_root()).append(event, current_access().principal, **fields)


def _outside_store(path: Path) -> Path:
    path = path.expanduser().absolute()
    root = store_root().expanduser().absolute()
    # resolved as well: `..` and symlinks must not carry the KEK into the store unnoticed
    real, real_root = path.resolve(), root.resolve()
    if path == root or root in path.parents or real == real_root or real_root in real.parents:
        raise SecurityError(
            f"{path} is inside the store {root}: keep the KEK apart from the data it protects "
            "(e.g. ~/.config/lmloom/kek)"
        )
    return path


@app.command("init")
@requires(MANAGE_KEYS)
def keys_init(
    generate_kek_file: Annotated[
        Path | None,
        typer.Option(
            "--generate-kek-file",
            help="Create a new random KEK in this file (mode 0600, outside the store) and use it.",
        ),
    ] = None,
) -> None:
    """Create the store's keyring with a first data key, wrapped by the configured (or a new) KEK."""
    from lmloom.security.keyring import ENV_KEK_FILE, Keyring, require_kek, write_kek_file

    keyring = Keyring.for_store(store_root())
    keyring.check_absent()  # before a key file is created for nothing
    if generate_kek_file is not None:
        kek = write_kek_file(_outside_store(generate_kek_file))
    else:
        kek = require_kek()
    record = keyring.init(kek)
    _audit("keys.init", dek=record.id, kek=record.kek_id)
    out.print(f"keyring created: {keyring.path}")
    out.print(f"data key {record.id} (active), wrapped by KEK {record.kek_id}")
    if generate_kek_file is not None:
        out.print(
            f"new KEK written to {generate_kek_file} (mode 0600). Use it with:\n"
            f"  export {ENV_KEK_FILE}={generate_kek_file.expanduser().absolute()}\n"
            "Back it up somewhere safe: without it nothing encrypted in this store can be read."
        )


@app.command("rotate")
@requires(MANAGE_KEYS)
def keys_rotate(
    new_kek_file: Annotated[
        Path | None,
        typer.Option("--new-kek-file", help="Re-wrap every data key under the KEK in this 0600 file."),
    ] = None,
    generate_kek_file: Annotated[
        Path | None,
        typer.Option(
            "--generate-kek-file", help="Create a new random KEK in this file (0600) and re-wrap under it."
        ),
    ] = None,
    new_dek: Annotated[
        bool,
        typer.Option("--new-dek", help="Also start a new active data key; the old ones stay for reading."),
    ] = False,
) -> None:
    """Re-wrap every data key under a new KEK (no data is re-encrypted), and/or start a new data key.

    The current KEK comes from $LMLOOM_KEK / $LMLOOM_KEK_FILE / $LMLOOM_KEK_PROVIDER; the new one from
    --new-kek-file, --generate-kek-file or $LMLOOM_NEW_KEK / $LMLOOM_NEW_KEK_FILE / $LMLOOM_NEW_KEK_PROVIDER.
    """
    from lmloom.security.keyring import (
        ENV_KEK_FILE,
        NEW_KEK_PREFIX,
        Keyring,
        kek_from_env,
        read_kek_file,
        require_kek,
        write_kek_file,
    )

    if new_kek_file is not None and generate_kek_file is not None:
        raise SecurityError("give either --new-kek-file or --generate-kek-file, not both")
    keyring = Keyring.for_store(store_root())
    keyring.records()  # a missing or damaged keyring is reported before anything is created
    old = require_kek()
    if new_kek_file is not None:
        new = read_kek_file(new_kek_file)
    elif generate_kek_file is not None:
        new = write_kek_file(_outside_store(generate_kek_file))
    else:
        new = kek_from_env(prefix=NEW_KEK_PREFIX)
    if new is None and not new_dek:
        raise SecurityError(
            f"nothing to rotate: give --new-kek-file PATH, --generate-kek-file PATH or set {NEW_KEK_PREFIX} / "
            f"{NEW_KEK_PREFIX}_FILE / {NEW_KEK_PREFIX}_PROVIDER (a new KEK), and/or --new-dek (a new data key)"
        )
    current = old
    if new is not None:
        if new.kek_id == old.kek_id:
            raise SecurityError(f"the new KEK is the current one ({old.kek_id}); give a different key")
        records = keyring.rotate(old, new)
        _audit("keys.rotate", old_kek=old.kek_id, new_kek=new.kek_id, deks=[r.id for r in records])
        out.print(f"re-wrapped {len(records)} data key(s): KEK {old.kek_id} -> {new.kek_id}")
        current = new
    if new_dek:
        record = keyring.new_dek(current)
        _audit("keys.new_dek", dek=record.id, kek=record.kek_id)
        out.print(f"new active data key {record.id}; earlier keys are retired (still used for reading)")
    if new is not None:
        hint = (
            f"export {ENV_KEK_FILE}={(new_kek_file or generate_kek_file).expanduser().absolute()}"
            if (new_kek_file or generate_kek_file)
            else f"move ${NEW_KEK_PREFIX}* to the LMLOOM_KEK* variables"
        )
        out.print(f"from now on use the new KEK ({hint}); the old KEK no longer opens this keyring")


@app.command("list")
@requires(MANAGE_KEYS)
def keys_list() -> None:
    """The data keys: id, status, created, and the id of the KEK wrapping them (never key material)."""
    from lmloom.security.keyring import Keyring, kek_from_env

    keyring = Keyring.for_store(store_root())
    records = keyring.records()
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("id", "status", "created (UTC)", "wrapped by KEK"):
        table.add_column(column, no_wrap=True)
    for record in records:
        table.add_row(record.id, record.status, record.created[:19].replace("T", " "), record.kek_id)
    out.print(table)
    try:
        kek = kek_from_env()
    except SecurityError as exc:
        out.print(f"configured KEK: unusable ({exc})", highlight=False)
        return
    if kek is None:
        out.print("configured KEK: none (set LMLOOM_KEK, LMLOOM_KEK_FILE or LMLOOM_KEK_PROVIDER)")
    else:
        wrapped = {r.kek_id for r in records}
        verdict = "matches the keyring" if wrapped == {kek.kek_id} else "does NOT match the keyring"
        out.print(f"configured KEK: {kek.kek_id} ({verdict})")


# -- gateway API keys ------------------------------------------------------------------------------

api_app = typer.Typer(
    help=(
        "API keys for the serving gateway (`lmloom serve`): shown once at creation, stored only as a "
        "salted HMAC in STORE/gateway/api-keys.json (0600), scoped to models and endpoints, with "
        "per-key rate limits and an expiry."
    ),
    no_args_is_help=True,
)
app.add_typer(api_app, name="api")


def _parse_scopes(scopes: list[str]) -> tuple[list[str] | None, list[str] | None]:
    from lmloom.errors import ConfigError

    found: dict[str, list[str]] = {}
    for scope in scopes:
        kind, sep, values = scope.partition("=")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or kind not in ("models", "endpoints") or not items:
            raise ConfigError(
                f"--scope {scope!r}: expected models=NAME[,NAME] or endpoints=chat,completions,..."
            )
        found.setdefault(kind, []).extend(items)
    return found.get("models"), found.get("endpoints")


@api_app.command("create")
@requires(MANAGE_KEYS, action="keys api create")
def api_create(
    scope: Annotated[
        list[str] | None,
        typer.Option(
            "--scope",
            help="models=NAME[,NAME] (default: every model) or endpoints=chat,completions,models,embeddings,"
            "tokenize,metrics,health,other or * (default: chat,completions,models); repeatable",
        ),
    ] = None,
    name: Annotated[str, typer.Option("--name", help="A label for listings and the audit log.")] = "",
    expires: Annotated[str, typer.Option("--expires", help="Lifetime: 30d, 12h, 90m, 2w or never.")] = "90d",
    rpm: Annotated[
        int | None, typer.Option("--rpm", min=1, help="Requests per minute [gateway default].")
    ] = None,
    tpm: Annotated[
        int | None, typer.Option("--tpm", min=1, help="Tokens per minute [gateway default].")
    ] = None,
    burst: Annotated[int | None, typer.Option("--burst", min=1, help="Request burst [default: rpm].")] = None,
) -> None:
    """Create a gateway API key and print it once (only its salted hash is kept)."""
    from lmloom.serve.gateway.keys import ApiKeyStore, parse_duration

    models, endpoints = _parse_scopes(scope or [])
    record, key = ApiKeyStore.for_store(store_root()).create(
        name=name, models=models, endpoints=endpoints, expires_in=parse_duration(expires), rpm=rpm, tpm=tpm,
        burst=burst,
    )  # fmt: skip
    _audit("gateway.key_created", key_id=record.id, name=name, models=record.models, endpoints=record.endpoints,
           expires=record.expires, rpm=rpm, tpm=tpm)  # fmt: skip
    err.print(
        f"API key {record.id} created (expires {record.expires or 'never'}). It is shown only now: "
        "store it in a secret manager.",
        highlight=False,
    )
    out.print(key, highlight=False, soft_wrap=True)


@api_app.command("revoke")
@requires(MANAGE_KEYS, action="keys api revoke")
def api_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (a unique prefix is enough).")],
) -> None:
    """Revoke a gateway API key; a running gateway refuses it from its next request."""
    from lmloom.serve.gateway.keys import ApiKeyStore

    record = ApiKeyStore.for_store(store_root()).revoke(key_id)
    _audit("gateway.key_revoked", key_id=record.id, name=record.name)
    out.print(f"API key {record.id} revoked at {record.revoked}")


@api_app.command("list")
@requires(MANAGE_KEYS, action="keys api list")
def api_list() -> None:
    """The gateway API keys: id, name, scopes, limits, dates and status (never the keys or hashes)."""
    from lmloom.serve.gateway.keys import ApiKeyStore

    records = ApiKeyStore.for_store(store_root()).records()
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("id", "name", "status", "models", "endpoints", "rpm", "tpm", "created", "expires"):
        table.add_column(column, no_wrap=True)
    for r in records.values():
        limit = lambda v: "default" if v is None else str(v)  # noqa: E731
        cells = (
            r.id, r.name, r.status(), ",".join(r.models), ",".join(r.endpoints), limit(r.rpm), limit(r.tpm),
            r.created[:16].replace("T", " "), (r.expires or "never")[:16].replace("T", " "),
        )  # fmt: skip
        table.add_row(*(escape(cell) for cell in cells))  # names and models are the user's: never markup
    out.print(table if records else "no gateway API keys (create one with `lmloom keys api create`)")
