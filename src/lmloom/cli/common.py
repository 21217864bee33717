"""What every command group shares: the consoles and the store chosen by --store / $LMLOOM_HOME."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

out = Console()
err = Console(stderr=True)


class State:
    store_path: Path | None = None


def open_store():
    from lmloom.artifacts.store import ArtifactStore, default_store_root
    from lmloom.security.context import store_security

    root = State.store_path or default_store_root()
    return ArtifactStore(root, security=store_security(root))


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
