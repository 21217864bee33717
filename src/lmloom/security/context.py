"""The store's security, assembled from what this machine has configured.

`store_security(root)` is what the CLI (and any other front-end) hands to `ArtifactStore`: it decides,
from the environment and the store's own security folder, which keyring, signer, trust store and
access policy apply. Every artifact write and read then passes through these hooks.
"""

from __future__ import annotations

import base64
import binascii
from functools import cached_property
from pathlib import Path

from lmloom.artifacts.files import PLAIN, Codec
from lmloom.artifacts.manifest import Manifest
from lmloom.artifacts.store import Artifact, StoreSecurity
from lmloom.errors import IntegrityError, LmloomError, SecurityError
from lmloom.security.audit import AuditLog
from lmloom.security.encryption import ChunkedAesGcmCodec, chunk_size_from_env
from lmloom.security.identity import current_principal
from lmloom.security.keyring import StoreKeys
from lmloom.security.signing import ArtifactSigning, verify_classical


class HeadSignature:
    """Signs audit head checkpoints with the store's artifact-signing key; checks them against the
    trust store. (Classical part only: the head is re-signed at every append, so a future break of
    ECDSA would need a fresh forgery per checkpoint; artifacts carry the hybrid signatures.)"""

    def __init__(self, signing: ArtifactSigning):
        self.signing = signing

    @property
    def required(self) -> bool:
        # A store with a signing key signs every append, so a missing checkpoint means it was removed.
        return self.signing.required or self.signing.key_path.exists()

    def sign_head(self, payload: bytes) -> dict | None:
        try:
            key = self.signing.key()
        except SecurityError:  # e.g. the key file is not readable by this user
            return None
        if key is None:
            return None
        signature = base64.b64encode(key.sign_classical(payload)).decode("ascii")
        return {"key": key.public.hint, "algorithm": key.public.algorithm_name, "signature": signature}

    def check_head(self, payload: bytes, record: dict) -> str | None:
        hint = str(record.get("key", ""))
        signer = self.signing.trust.by_hint(hint)
        if signer is None:
            return f"signed by key {hint[:16] or '?'}, which is not in the trust store"
        try:
            signature = base64.b64decode(str(record.get("signature", "")), validate=True)
        except binascii.Error:
            return "the signature is not valid base64 (altered)"
        if not verify_classical(signer.keys, signature, payload):
            return f"the signature by {signer.name!r} does not verify (the checkpoint was altered)"
        return None


def store_audit_log(root: Path) -> AuditLog:
    """The store's audit log, signing head checkpoints when the store has a signing key."""
    head = HeadSignature(ArtifactSigning.for_store(root))
    return AuditLog(Path(root) / "audit.jsonl", signer=head, verifier=head)


class LmloomSecurity(StoreSecurity):
    """Audits every refused read as a security event of its own kind."""

    def __init__(self, root: Path, principal: str | None = None):
        self.root = Path(root)
        self.principal = principal or current_principal()
        self.audit = store_audit_log(self.root)

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

    # -- signatures: new artifacts signed with the configured key, reads checked against the trust store
    @cached_property
    def signing(self) -> ArtifactSigning:
        return ArtifactSigning.for_store(self.root)

    def on_commit(self, artifact: Artifact) -> None:
        signed = self.signing.sign(artifact)
        if signed is not None:
            self.audit.append(
                "artifact.signed",
                self.principal,
                artifact=artifact.id,
                key_id=signed.key_id,
                algorithm=signed.algorithm,
            )

    def on_open(self, artifact: Artifact) -> None:
        self.signing.enforce(artifact)  # SecurityError: bad signature, or unsigned/untrusted when required

    # -- encryption at rest: DEKs from the store's keyring, unwrapped by the configured KEK --------
    @cached_property
    def keys(self) -> StoreKeys:
        return StoreKeys(self.root)

    def write_codec(self, encrypt: bool) -> Codec:
        if not encrypt:
            return PLAIN
        dek_id, dek = self.keys.active()
        return ChunkedAesGcmCodec.for_writing(dek_id, dek, chunk_size_from_env())

    def read_codec(self, manifest: Manifest, where: str) -> Codec:
        if manifest.encryption is None:
            return PLAIN

        def audit_failure(error: LmloomError) -> None:  # a chunk refused while reading, after open
            try:
                self.audit.append(
                    "security.decrypt_failed", self.principal, artifact=where, detail=str(error)[:500]
                )
            except IntegrityError as audit_error:
                error.add_note(f"(and it could not be audited: {audit_error})")

        return ChunkedAesGcmCodec.from_header(
            manifest.encryption, self.keys.dek, where, on_failure=audit_failure
        )


def store_security(root: Path, principal: str | None = None) -> LmloomSecurity:
    return LmloomSecurity(root, principal)
