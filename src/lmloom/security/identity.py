"""Who is acting: the principal recorded in manifests and audit entries."""

from __future__ import annotations

import getpass
import os
import socket

ENV_PRINCIPAL = "LMLOOM_PRINCIPAL"


def current_principal() -> str:
    """`LMLOOM_PRINCIPAL` when set (CI, services), else user@host of the running process."""
    explicit = os.environ.get(ENV_PRINCIPAL)
    if explicit:
        return explicit
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, e.g. in some containers
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"
