"""What every command group shares: the consoles, the store chosen by --store / $LMLOOM_HOME, and
`requires`, the access check every command that touches the store starts with."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.markup import escape

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable)


class State:
    store_path: Path | None = None
    access = None  # this invocation's lmloom.security.policy.Access, resolved on first use


def store_root() -> Path:
    from lmloom.artifacts.store import default_store_root

    return State.store_path or default_store_root()


def open_store(create: bool = True):
    """The store at --store / $LMLOOM_HOME. `create=False` (commands that only read): a missing store
    is an error rather than a new empty one, so a mistyped path is reported, not silently made."""
    from lmloom.artifacts.store import ArtifactStore
    from lmloom.errors import LmloomError
    from lmloom.security.context import store_security

    root = store_root()
    if not create and not root.expanduser().exists():
        raise LmloomError(
            f"no artifact store at {root} (from --store or $LMLOOM_HOME); check the path, "
            "or run `lmloom run` to create one"
        )
    return ArtifactStore(root, security=store_security(root, current_access().principal))


def current_access():
    """Who is acting under which policy (an unknown LMLOOM_TOKEN is refused here, and audited)."""
    if State.access is None:
        from lmloom.distributed import world
        from lmloom.security.policy import resolve_access

        def notice(message: str) -> None:
            if world().is_main:  # under torchrun, once rather than once per rank
                err.print(f"[dim]{escape(message)}[/dim]", highlight=False)  # it names the principal

        State.access = resolve_access(store_root(), notice=notice)
    return State.access


def requires(*permissions: str, action: str | None = None) -> Callable[[F], F]:
    """Decorate a command: it runs only when the acting principal holds every one of `permissions`.

    `@requires()` (none of its own) still identifies the principal first; `lmloom run` uses it and
    leaves the checks to each stage. A denial is audited and exits 5. Names: `Permission` in
    `lmloom.security.policy` (e.g. `@requires(Permission.SIGN)` or `@requires("sign")`). The action
    named in the message and the audit entry is `action`, else the function's name with spaces
    (`artifacts_ls` -> "artifacts ls").
    """

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def checked(*args, **kwargs):
            access = current_access()
            if permissions:
                access.require(*permissions, action=f"`{action or command.__name__.replace('_', ' ')}`")
            return command(*args, **kwargs)

        checked.permissions = permissions  # type: ignore[attr-defined]  # read by the policy tests
        return checked  # type: ignore[return-value]

    return decorate


def public(command: F) -> F:
    """Mark a command that touches no store (`recipes`, `stages`): no identity, no permission."""
    command.permissions = None  # type: ignore[attr-defined]
    return command


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
