"""The store's security, assembled from what this machine has configured.

`store_security(root)` is what the CLI (and any other front-end) hands to `ArtifactStore`: it decides,
from the environment and the store's own security folder, which keyring, signer, trust store and
access policy apply. Every artifact write and read then passes through these hooks.
"""

from __future__ import annotations

from pathlib import Path

from lmloom.artifacts.store import Artifact, StoreSecurity
from lmloom.errors import IntegrityError, LmloomError
from lmloom.security.audit import AuditLog
from lmloom.security.identity import current_principal


class LmloomSecurity(StoreSecurity):
    """Audits every refused read as a security event of its own kind."""

    def __init__(self, root: Path, principal: str | None = None):
        self.root = Path(root)
        self.principal = principal or current_principal()
        self.audit = AuditLog(self.root / "audit.jsonl")

    def on_refusal(self, ref: str, error: LmloomError) -> None:
        try:
            self.audit.append(
                "security.read_refused",
                self.principal,
                artifact=ref,
                error=type(error).__name__,
                detail=str(error)[:500],
            )
        except IntegrityError as audit_error:  # the refusal itself is still raised by the caller
            error.add_note(f"(and it could not be audited: {audit_error})")

    def on_open(self, artifact: Artifact) -> None:
        return None


def store_security(root: Path, principal: str | None = None) -> LmloomSecurity:
    return LmloomSecurity(root, principal)
