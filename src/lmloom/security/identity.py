"""Who is acting: the principal recorded in manifests and audit entries."""

from __future__ import annotations

import os
import pwd
import socket

ENV_PRINCIPAL = "LMLOOM_PRINCIPAL"


def current_principal() -> str:
    """`LMLOOM_PRINCIPAL` when set (CI, services), else user@host of the running process.

    Only a label: under an access policy `lmloom.security.policy.resolve_access` decides who acts.
    """
    explicit = os.environ.get(ENV_PRINCIPAL)
    if explicit:
        return explicit
    return f"{os_user()}@{os_host()}"


def os_user() -> str:
    """The account of the process's real uid (not $USER or $LOGNAME, which anyone can set)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # no passwd entry, e.g. in some containers
        return f"uid{os.getuid()}"


def os_host() -> str:
    return socket.gethostname()
