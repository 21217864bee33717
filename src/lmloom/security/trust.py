"""Signer public keys and the trust store: which keys may vouch for an artifact.

A signer is one classical key (ECDSA P-256 or Ed25519), or for a hybrid signer that key plus an
ML-DSA-65 key. Its public key file is PEM with one `PUBLIC KEY` block per key (classical first).
A signer is named by its *hint*: the sha256 of its classical key's SubjectPublicKeyInfo PEM, as the
OpenSSF model signing format records it in `verificationMaterial.publicKey.hint`; the key id shown to
people is the hint's first 16 hex digits.

The trust store is a folder of `<name>.pem` public key files: `<store>/security/trust/`, or
`$LMLOOM_TRUST_DIR`. It is only as trustworthy as that folder: whoever can write it can add a signer,
so point LMLOOM_TRUST_DIR at a folder the store's writers cannot change when that matters.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa

from lmloom.artifacts.atomic import write_bytes_atomic
from lmloom.errors import SecurityError

ENV_TRUST_DIR = "LMLOOM_TRUST_DIR"
KEY_ID_CHARS = 16
ALGORITHMS = ("ecdsa-p256", "ed25519", "hybrid")
HYBRID_NAME = "hybrid (ecdsa-p256 + ml-dsa-65)"

ClassicalPublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_signer_name(name: str) -> None:
    """Refuse a name that cannot be a trust store file name (checked before anything is created)."""
    if not _NAME.match(name):
        raise SecurityError(
            f"invalid signer name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)"
        )


def pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    """(label, block) for each PEM block in `data`, in order."""
    return [(m.group(1).decode("ascii"), m.group(0)) for m in _PEM_BLOCK.finditer(data)]


def spki_pem(key: ClassicalPublicKey | mldsa.MLDSA65PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_hint(key: ClassicalPublicKey | mldsa.MLDSA65PublicKey) -> str:
    """The model-signing key hint: sha256 (hex) of the key's SubjectPublicKeyInfo PEM."""
    return hashlib.sha256(spki_pem(key)).hexdigest()


def classical_algorithm(key: object) -> str | None:
    """'ecdsa-p256' / 'ed25519' for a supported classical (public or private) key, else None."""
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return "ecdsa-p256" if isinstance(key.curve, ec.SECP256R1) else None
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "ed25519"
    return None


@dataclass(frozen=True)
class SignerKeys:
    """A signer's public key(s): the classical key, plus the ML-DSA-65 key of a hybrid signer."""

    classical: ClassicalPublicKey
    pq: mldsa.MLDSA65PublicKey | None = None

    @property
    def algorithm(self) -> str:
        return "hybrid" if self.pq is not None else str(classical_algorithm(self.classical))

    @property
    def algorithm_name(self) -> str:
        return HYBRID_NAME if self.pq is not None else self.algorithm

    @property
    def hint(self) -> str:
        return key_hint(self.classical)

    @property
    def key_id(self) -> str:
        return self.hint[:KEY_ID_CHARS]

    @property
    def pq_hint(self) -> str | None:
        return key_hint(self.pq) if self.pq is not None else None

    def to_pem(self) -> bytes:
        return spki_pem(self.classical) + (spki_pem(self.pq) if self.pq is not None else b"")

    def classical_pem(self) -> bytes:
        """The classical key alone: what `model_signing verify key --public_key` takes."""
        return spki_pem(self.classical)

    @classmethod
    def from_pem(cls, data: bytes, where: str) -> SignerKeys:
        """Parse a signer's public key file; errors name `where`, never echo the file's content."""
        blocks = pem_blocks(data)
        if any("PRIVATE" in label for label, _ in blocks):
            raise SecurityError(
                f"{where} holds a PRIVATE key; give the public key instead "
                "(`lmloom signing show` prints it; it is also saved beside the key as *.pub.pem)"
            )
        keys = []
        for label, block in blocks:
            if label != "PUBLIC KEY":
                raise SecurityError(f"{where}: unexpected PEM block {label!r}; expected PUBLIC KEY")
            try:
                keys.append(serialization.load_pem_public_key(block))
            except (ValueError, TypeError):
                raise SecurityError(f"{where}: a PUBLIC KEY block could not be parsed") from None
        return cls._from_keys(keys, where)

    @classmethod
    def _from_keys(cls, keys: list[object], where: str) -> SignerKeys:
        if not keys:
            raise SecurityError(f"{where}: no PEM public key found")
        classical, rest = keys[0], keys[1:]
        if classical_algorithm(classical) is None:
            raise SecurityError(
                f"{where}: the first key must be ECDSA P-256 or Ed25519 (got {type(classical).__name__})"
            )
        if not rest:
            return cls(classical)  # type: ignore[arg-type]
        if len(rest) == 1 and isinstance(rest[0], mldsa.MLDSA65PublicKey):
            return cls(classical, rest[0])  # type: ignore[arg-type]
        raise SecurityError(
            f"{where}: expected one classical key, optionally followed by one ML-DSA-65 key (hybrid)"
        )


@dataclass(frozen=True)
class TrustedSigner:
    name: str
    keys: SignerKeys


def default_trust_dir(store_root: Path) -> Path:
    explicit = os.environ.get(ENV_TRUST_DIR)
    return Path(explicit).expanduser() if explicit else Path(store_root) / "security" / "trust"


class TrustStore:
    """A folder of `<name>.pem` signer public keys allowed to vouch for artifacts."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._signers: list[TrustedSigner] | None = None

    def signers(self) -> list[TrustedSigner]:
        if self._signers is None:
            found = []
            if self.path.is_dir():
                for pem in sorted(self.path.glob("*.pem")):
                    keys = SignerKeys.from_pem(pem.read_bytes(), f"trusted key {pem}")
                    found.append(TrustedSigner(pem.stem, keys))
            self._signers = found
        return self._signers

    def by_hint(self, hint: str) -> TrustedSigner | None:
        return next((s for s in self.signers() if s.keys.hint == hint), None)

    def get(self, name: str) -> TrustedSigner | None:
        return next((s for s in self.signers() if s.name == name), None)

    def add(self, name: str, keys: SignerKeys) -> Path:
        check_signer_name(name)
        if self.get(name) is not None:
            raise SecurityError(f"a trusted signer named {name!r} exists; remove it first")
        same = self.by_hint(keys.hint)
        if same is not None:
            raise SecurityError(f"key {keys.key_id} is already trusted as {same.name!r}")
        self.path.mkdir(parents=True, exist_ok=True)
        target = self.path / f"{name}.pem"
        write_bytes_atomic(target, keys.to_pem())
        os.chmod(target, 0o644)
        self._signers = None
        return target

    def remove(self, name: str) -> TrustedSigner:
        signer = self.get(name) if _NAME.match(name) else None
        if signer is None:
            raise SecurityError(f"no trusted signer named {name!r} in {self.path}")
        (self.path / f"{name}.pem").unlink()
        self._signers = None
        return signer
