"""`lmloom signing init | show | require`, `lmloom trust add | list | remove`, `lmloom artifacts sign`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from lmloom.cli.common import open_store, out, requires
from lmloom.errors import SecurityError

signing_app = typer.Typer(
    help=(
        "The store's signing key and signature policy. With a key, every new artifact is signed "
        "(OpenSSF model signing v1.0 format); with signatures required, unsigned or untrusted "
        "artifacts are refused on read."
    ),
    no_args_is_help=True,
)
trust_app = typer.Typer(
    help="The trust store: public keys of the signers whose artifacts are accepted.", no_args_is_help=True
)


class Algorithm(str, Enum):
    ecdsa_p256 = "ecdsa-p256"
    ed25519 = "ed25519"
    hybrid = "hybrid"


def _security():
    store = open_store()
    return store, store.security


@signing_app.command("init")
@requires("manage-keys")
def signing_init(
    algorithm: Annotated[
        Algorithm,
        typer.Option(
            help="ecdsa-p256 (default; verifies with `model_signing verify key`), ed25519, or hybrid "
            "(ECDSA P-256 + ML-DSA-65: both must verify)."
        ),
    ] = Algorithm.ecdsa_p256,
    trust_as: Annotated[
        str, typer.Option(help="Name under which the new public key is added to the trust store.")
    ] = "local",
    no_trust: Annotated[
        bool, typer.Option("--no-trust", help="Do not add the new key to the trust store.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing signing key.")] = False,
) -> None:
    """Create the store's signing key (owner-only file) and print its public key."""
    from lmloom.security.signing import SigningKey
    from lmloom.security.trust import check_signer_name

    if not no_trust:
        check_signer_name(trust_as)  # before the key exists: a refused init creates nothing
    store, security = _security()
    signing = security.signing
    if signing.key_path.exists() and not force:
        raise SecurityError(f"a signing key exists at {signing.key_path}; pass --force to replace it")
    taken = None if no_trust else signing.trust.get(trust_as)
    if taken is not None:  # checked first, so a refused init leaves the existing key in place
        raise SecurityError(
            f"a trusted signer named {trust_as!r} exists (key {taken.keys.key_id}); keep it trusted so "
            "artifacts it signed stay valid, and name the new key with --trust-as NAME (or --no-trust)"
        )
    key = SigningKey.generate(algorithm.value)
    public_path = key.save(signing.key_path, force=force)
    security.audit.append(
        "signing.key_created",
        security.principal,
        key_id=key.public.key_id,
        algorithm=key.public.algorithm,
        public_key=str(public_path),
    )
    out.print(
        f"signing key created: {key.public.algorithm_name}, key id [bold]{key.public.key_id}[/bold]\n"
        f"  private key: {signing.key_path} (mode 600; keep it secret, back it up)\n"
        f"  public key:  {public_path}",
        highlight=False,
    )
    if not no_trust:
        target = signing.trust.add(trust_as, key.public)
        security.audit.append("trust.added", security.principal, signer=trust_as, key_id=key.public.key_id)
        out.print(f"  trusted as:  {trust_as} ({target})", highlight=False)
    out.print("every new artifact in this store is now signed; the public key:", highlight=False)
    out.print(key.public.to_pem().decode("ascii"), highlight=False, end="")


@signing_app.command("show")
@requires("read-artifacts")
def signing_show() -> None:
    """Print the signing key's id and public key, the trust store and whether signatures are required."""
    _, security = _security()
    signing = security.signing
    key = signing.key()
    required = "yes" if signing.required else "no"
    out.print(f"signatures required: {required}", highlight=False)
    out.print(f"trust store: {signing.trust.path} ({len(signing.trust.signers())} signers)", highlight=False)
    if key is None:
        out.print(f"signing key: none (run `lmloom signing init`; looked at {signing.key_path})")
        return
    out.print(
        f"signing key: {key.public.algorithm_name}, key id {key.public.key_id} ({signing.key_path})",
        highlight=False,
    )
    out.print(key.public.to_pem().decode("ascii"), highlight=False, end="")


class Switch(str, Enum):
    on = "on"
    off = "off"


@signing_app.command("require")
@requires("manage-keys")
def signing_require(state: Annotated[Switch, typer.Argument(help="on or off")]) -> None:
    """Require a trusted signature on every artifact read from this store (a flag file in the store)."""
    from lmloom.security.signing import set_required

    store, security = _security()
    flag = set_required(store.root, state is Switch.on)
    security.audit.append("signing.require", security.principal, state=state.value)
    out.print(f"signatures required: {state.value} ({flag})", highlight=False)


@trust_app.command("add")
@requires("manage-keys")
def trust_add(
    name: Annotated[str, typer.Argument(help="A name for the signer (letters, digits, . _ -).")],
    public_key: Annotated[
        Path, typer.Argument(help="PEM public key file (a hybrid signer's file holds both keys).")
    ],
) -> None:
    """Trust a signer's public key."""
    from lmloom.security.trust import SignerKeys

    if not public_key.is_file():
        raise SecurityError(f"no such public key file: {public_key}")
    keys = SignerKeys.from_pem(public_key.read_bytes(), str(public_key))
    _, security = _security()
    target = security.signing.trust.add(name, keys)
    security.audit.append("trust.added", security.principal, signer=name, key_id=keys.key_id)
    out.print(f"trusted {name}: {keys.algorithm_name}, key id {keys.key_id} ({target})", highlight=False)


@trust_app.command("list")
@requires("read-artifacts")
def trust_list() -> None:
    """List trusted signers."""
    _, security = _security()
    trust = security.signing.trust
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title=str(trust.path))
    for column in ("name", "algorithm", "key id", "key hint (sha256 of public key PEM)"):
        table.add_column(column)
    for signer in trust.signers():
        table.add_row(signer.name, signer.keys.algorithm_name, signer.keys.key_id, signer.keys.hint)
    out.print(table)
    if not trust.signers():
        out.print("no trusted signers (add one with `lmloom trust add NAME PUBKEY.pem`)")


@trust_app.command("remove")
@requires("manage-keys")
def trust_remove(name: Annotated[str, typer.Argument(help="The signer's name.")]) -> None:
    """Stop trusting a signer (artifacts signed only by it become untrusted)."""
    _, security = _security()
    signer = security.signing.trust.remove(name)
    security.audit.append("trust.removed", security.principal, signer=name, key_id=signer.keys.key_id)
    out.print(f"removed {name} (key id {signer.keys.key_id})", highlight=False)


@requires("sign")
def artifacts_sign(
    artifact: Annotated[str, typer.Argument(help="Artifact id or unique prefix.")],
) -> None:
    """Sign an existing artifact with the store's signing key (after re-hashing its files)."""
    store = open_store()
    security = store.security
    signing = security.signing
    key = signing.key()
    if key is None:
        raise SecurityError(
            f"no signing key at {signing.key_path}; run `lmloom signing init` or set LMLOOM_SIGNING_KEY"
        )
    signing.enforcing = False  # the files are verified; the signature policy is what we are fixing
    try:
        verified = store.open(artifact)
    finally:
        signing.enforcing = True
    signed = signing.sign(verified, key)
    assert signed is not None
    security.audit.append(
        "artifact.signed",
        security.principal,
        artifact=verified.id,
        key_id=signed.key_id,
        algorithm=signed.algorithm,
    )
    by = signed.signer or f"key {signed.key_id} (not in the trust store)"
    out.print(
        f"signed {verified.short_id} ({verified.kind}) by {by}, {signed.algorithm}: "
        f"{verified.path / signed.sidecar}",
        highlight=False,
    )
