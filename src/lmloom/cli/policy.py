"""`lmloom policy whoami | show | init | token`: the access policy (see lmloom.security.policy)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from lmloom.cli.common import current_access, err, out, requires, store_root
from lmloom.errors import ConfigError

app = typer.Typer(
    help="Who may do what: roles, principals and API tokens (no policy file = single-user mode).",
    no_args_is_help=True,
)


@app.command("whoami")
@requires()
def policy_whoami() -> None:
    """Print the acting principal, how it was identified, its roles and permissions."""
    access = current_access()
    principal = escape(access.principal)  # a name, never markup
    if access.single_user:
        out.print(f"{principal}  [dim](single-user mode: no access policy, every action allowed)[/dim]")
        return
    out.print(f"{principal}  [dim](identified by {access.via}; policy {access.policy.path})[/dim]")
    out.print(f"roles: {', '.join(access.roles) or 'none'}")
    out.print(f"permissions: {', '.join(sorted(access.permissions)) or 'none'}")


@app.command("show")
@requires("read-audit")
def policy_show() -> None:
    """Print the roles with their permissions and the principals that hold them."""
    from lmloom.security.policy import BUILTIN_ROLES, PERMISSIONS

    access = current_access()
    policy = access.policy
    roles = policy.roles if policy else BUILTIN_ROLES
    holders: dict[str, list[str]] = {role: [] for role in roles}
    for name, spec in (policy.principals if policy else {}).items():
        for role in spec.roles:
            holders.setdefault(role, []).append(name)
    if policy:
        out.print(f"access policy [bold]{policy.path}[/bold]")
    else:
        out.print("[dim]no access policy: single-user mode; these are the built-in roles[/dim]")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("role", "permissions", "principals"):
        table.add_column(column, overflow="fold")
    for role, permissions in roles.items():
        granted = "all" if "*" in permissions else ", ".join(p for p in PERMISSIONS if p in permissions)
        table.add_row(escape(role), granted, escape(", ".join(holders.get(role, []))))
    out.print(table)
    if policy and policy.principals:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("principal", "identified by", "roles"):
            table.add_column(column, overflow="fold")
        for name, spec in policy.principals.items():
            tokens = ", ".join(t[7:19] for t in spec.tokens)
            how = f"token ({tokens})" if spec.tokens else "OS user" + ("" if "@" in name else " (any host)")
            table.add_row(escape(name), how, escape(", ".join(spec.roles)))
        out.print(table)


@app.command("init")
@requires("manage-policy")
def policy_init(
    admin: Annotated[
        str | None, typer.Option(help="The principal that becomes admin [default: your OS user, any host].")
    ] = None,
    file: Annotated[
        Path | None, typer.Option(help="Where to write it [default: STORE/security/policy.yaml].")
    ] = None,
) -> None:
    """Write a starter policy that makes one principal admin; single-user mode ends with it."""
    from lmloom.security.identity import os_user
    from lmloom.security.policy import POLICY_FILE, write_starter_policy

    access = current_access()
    path = file or (access.policy.path if access.policy else store_root() / POLICY_FILE)
    if path.exists():
        raise ConfigError(f"{path} already exists; edit it (or `lmloom policy token` to add a token)")
    admin = admin or os_user()
    try:
        write_starter_policy(path, admin)
    except OSError as exc:  # e.g. --file under a regular file, or in a folder not ours
        raise ConfigError(
            f"cannot write the policy to {path} ({exc.strerror or exc}: {exc.filename})"
        ) from None
    if access.audit:
        access.audit.append("security.policy_created", access.principal, path=str(path), admin=admin)
    out.print(f"wrote {path}: {admin} is admin; every other principal holds nothing until you add it")
    if file and file.resolve() != (store_root() / POLICY_FILE).resolve():
        out.print(f"[yellow]set LMLOOM_POLICY={path}[/yellow] so lmloom finds it")


@app.command("token")
@requires("manage-policy")
def policy_token(
    principal: Annotated[str, typer.Argument(help="The principal the token identifies, e.g. ci-bot.")],
    role: Annotated[
        list[str] | None, typer.Option("--role", "-r", help="Its role(s) when it is new. Repeatable.")
    ] = None,
    print_only: Annotated[
        bool, typer.Option("--print-only", help="Do not edit the policy; print the line to add instead.")
    ] = False,
) -> None:
    """Mint an API token for a principal: the secret is printed once (stdout), only its hash is kept.

    The policy file is rewritten with the hash added (YAML comments in it are not kept; use
    --print-only and edit it by hand to keep them). Use it as LMLOOM_TOKEN=<secret>.
    """
    from lmloom.security.policy import BUILTIN_ROLES, add_token, hash_token, mint_token, token_id

    access = current_access()
    if print_only and role:  # the line printed must load once pasted: its roles must exist
        known = access.policy.roles if access.policy else BUILTIN_ROLES
        unknown = [r for r in role if r not in known]
        if unknown:
            raise ConfigError(f"--role {', '.join(unknown)}: unknown role; roles: {', '.join(known)}")
    token = mint_token()
    if print_only:
        roles = ", ".join(role or ["ROLE"])
        err.print("add to the policy's principals (the secret below is shown only once):", highlight=False)
        # markup=False: rich would take `[trainer]` for a style tag and drop it from the line
        line = f"  {json.dumps(principal)}: {{roles: [{roles}], tokens: ['{hash_token(token)}']}}"
        err.print(line, highlight=False, markup=False)
    else:
        if access.policy is None:
            raise ConfigError("no access policy to add the token to: run `lmloom policy init` first")
        add_token(access.policy.path, principal, list(role or []), token)
        err.print(
            f"token {token_id(token)} for {principal} added to {access.policy.path}; "
            "the secret below is shown only once:",
            highlight=False,
        )
    if access.audit:
        access.audit.append(
            "security.token_minted",
            access.principal,
            for_principal=principal,
            token_id=token_id(token),
            written=not print_only,
        )
    print(token)  # plain stdout, so `TOKEN=$(lmloom policy token ci-bot -r trainer)` works
