"""Artifact signatures in the OpenSSF model signing v1.0 format, with an optional post-quantum part.

What is signed: an in-toto Statement v1 (predicateType `https://model_signing/signature/v1.0`) whose
predicate lists every file of the artifact with its sha256 (taken from the verified manifest) plus
`manifest.json` itself, so kind, stage, config and lineage are covered too. The statement is the
payload of a DSSE envelope (`application/vnd.in-toto+json`) inside a Sigstore bundle v0.3, key-based:
`verificationMaterial.publicKey.hint` is the sha256 of the signer's public key PEM. These are the bytes
the `model-signing` package (sigstore/model-transparency) writes for `model_signing sign key`, so an
ECDSA P-256 signature verifies with `model_signing verify key` as well.

Sidecars, inside the artifact, not in its manifest (the artifact itself stays immutable):

    <artifact>/signatures/<key id>.sig            the Sigstore bundle (one per signer)
    <artifact>/signatures/<key id>.mldsa65.json   hybrid signers only: the ML-DSA-65 part

`<key id>` is the first 16 hex digits of the classical key's hint. The statement's
`serialization.ignore_paths` is `["signatures"]`, so other signers' sidecars never disturb a signature.

Hybrid signatures: the ML-DSA-65 part (FIPS 204, empty context) signs exactly the bytes the classical
part signs (the DSSE pre-authentication encoding of the same payload) and lives in its own companion
file, so the bundle stays single-signature as Sigstore requires and `model-signing` verifies the
classical part unchanged. A signer trusted with a hybrid key is accepted only if both parts verify.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa

from lmloom.artifacts.atomic import write_bytes_atomic
from lmloom.artifacts.hashing import sha256_file
from lmloom.artifacts.manifest import MANIFEST_NAME
from lmloom.artifacts.store import SIGNATURES_DIR, Artifact
from lmloom.errors import SecurityError
from lmloom.security.trust import (
    ALGORITHMS,
    KEY_ID_CHARS,
    SignerKeys,
    TrustedSigner,
    TrustStore,
    classical_algorithm,
    default_trust_dir,
    key_hint,
    pem_blocks,
)

ENV_SIGNING_KEY = "LMLOOM_SIGNING_KEY"
ENV_REQUIRE = "LMLOOM_REQUIRE_SIGNATURES"
REQUIRE_FLAG = "require-signatures"  # <store>/security/require-signatures turns the requirement on

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
PQ_MEDIA_TYPE = "application/vnd.lmloom.ml-dsa-65-signature.v1+json"
PQ_ALGORITHM = "ML-DSA-65"
BUNDLE_SUFFIX = ".sig"
PQ_SUFFIX = ".mldsa65.json"

ClassicalPrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


# -- the statement ---------------------------------------------------------------------------------
def signed_files(artifact: Artifact) -> dict[str, str]:
    """name -> sha256 of everything a signature covers: the manifest's files and manifest.json."""
    files = {name: entry.sha256 for name, entry in artifact.manifest.files.items()}
    files[MANIFEST_NAME] = sha256_file(artifact.path / MANIFEST_NAME)
    return files


def _path_order(name: str) -> list[str]:
    return name.split("/")  # model-signing orders resources as paths, component by component


def statement(artifact: Artifact) -> dict[str, Any]:
    """The in-toto statement model-signing v1.0 builds for this artifact's directory."""
    files = signed_files(artifact)
    names = sorted(files, key=_path_order)
    root = hashlib.sha256(b"".join(bytes.fromhex(files[n]) for n in names)).hexdigest()
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": artifact.id, "digest": {"sha256": root}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {
                "method": "files",
                "hash_type": "sha256",
                "allow_symlinks": False,
                "ignore_paths": [SIGNATURES_DIR],
            },
            "resources": [{"name": n, "algorithm": "sha256", "digest": files[n]} for n in names],
        },
    }


def pae(payload: bytes, payload_type: str = PAYLOAD_TYPE) -> bytes:
    """DSSE v1 pre-authentication encoding: the bytes every signature part signs."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


# -- the private key -------------------------------------------------------------------------------
class SigningKey:
    """A signer's private key(s). Its repr and every error about it name the file, never the bytes."""

    def __init__(self, classical: ClassicalPrivateKey, pq: mldsa.MLDSA65PrivateKey | None = None):
        self.classical = classical
        self.pq = pq
        self.public = SignerKeys(classical.public_key(), pq.public_key() if pq else None)

    def __repr__(self) -> str:
        return f"SigningKey({self.public.algorithm}, key id {self.public.key_id})"

    @classmethod
    def generate(cls, algorithm: str = "ecdsa-p256") -> SigningKey:
        if algorithm == "ed25519":
            return cls(ed25519.Ed25519PrivateKey.generate())
        if algorithm in ("ecdsa-p256", "hybrid"):
            pq = mldsa.MLDSA65PrivateKey.generate() if algorithm == "hybrid" else None
            return cls(ec.generate_private_key(ec.SECP256R1()), pq)
        raise SecurityError(f"unknown signing algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")

    def sign_classical(self, data: bytes) -> bytes:
        if isinstance(self.classical, ed25519.Ed25519PrivateKey):
            return self.classical.sign(data)
        return self.classical.sign(data, ec.ECDSA(hashes.SHA256()))

    def private_pem(self) -> bytes:
        def one(key: Any) -> bytes:
            return key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )

        return one(self.classical) + (one(self.pq) if self.pq is not None else b"")

    def save(self, path: Path, force: bool = False) -> Path:
        """Write the key (0600, folder 0700) and its public key beside it; returns the public key path."""
        path = Path(path)
        if path.exists() and not force:
            raise SecurityError(f"a signing key exists at {path}; pass --force to replace it")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_bytes_atomic(path, self.private_pem())  # mkstemp: created 0600, never wider
        os.chmod(path, 0o600)
        public = public_key_path(path)
        write_bytes_atomic(public, self.public.to_pem())
        os.chmod(public, 0o644)
        return public

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        path = Path(path)
        if not path.is_file():  # e.g. LMLOOM_SIGNING_KEY names a folder: say so, not its mode
            raise SecurityError(f"signing key {path} is not a file; give the private key file (PEM)")
        mode = path.stat().st_mode
        if mode & 0o077:
            raise SecurityError(
                f"signing key {path} is readable by others (mode {mode & 0o777:o}); run `chmod 600 {path}`"
            )
        keys = []
        for label, block in pem_blocks(path.read_bytes()):
            if label == "ENCRYPTED PRIVATE KEY":
                raise SecurityError(
                    f"signing key {path} is password-protected; lmloom signs unattended and needs an "
                    "unencrypted key file with owner-only (0600) permissions"
                )
            if label not in ("PRIVATE KEY", "EC PRIVATE KEY"):
                raise SecurityError(f"signing key {path}: unexpected PEM block {label!r}")
            try:
                keys.append(serialization.load_pem_private_key(block, password=None))
            except (ValueError, TypeError, UnsupportedAlgorithm):
                raise SecurityError(f"signing key {path}: a PRIVATE KEY block could not be read") from None
        if not keys or classical_algorithm(keys[0]) is None:
            raise SecurityError(f"signing key {path}: expected an ECDSA P-256 or Ed25519 private key first")
        if len(keys) == 1:
            return cls(keys[0])  # type: ignore[arg-type]
        if len(keys) == 2 and isinstance(keys[1], mldsa.MLDSA65PrivateKey):
            return cls(keys[0], keys[1])  # type: ignore[arg-type]
        raise SecurityError(f"signing key {path}: expected a classical key, optionally then an ML-DSA-65 key")


def public_key_path(key_path: Path) -> Path:
    name = key_path.name[: -len(".pem")] if key_path.name.endswith(".pem") else key_path.name
    return key_path.with_name(f"{name}.pub.pem")


# -- signing ----------------------------------------------------------------------------------------
def sidecar_paths(artifact: Artifact, keys: SignerKeys) -> tuple[Path, Path]:
    folder = artifact.path / SIGNATURES_DIR
    return folder / f"{keys.key_id}{BUNDLE_SUFFIX}", folder / f"{keys.key_id}{PQ_SUFFIX}"


def sign_artifact(artifact: Artifact, key: SigningKey) -> Path:
    """Write `key`'s signature sidecar(s) into the (already verified) artifact; returns the bundle path."""
    payload = json.dumps(statement(artifact), indent=2).encode("utf-8")
    signed = pae(payload)
    keys = key.public
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": keys.hint}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": _b64(payload),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": _b64(key.sign_classical(signed)), "keyid": ""}],
        },
    }
    bundle_path, pq_path = sidecar_paths(artifact, keys)
    folder = bundle_path.parent
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise SecurityError(f"artifact {artifact.short_id}: {SIGNATURES_DIR} is not a plain folder")
    # The ML-DSA part first: until the bundle lands beside it, a reader sees an orphan part (ignored).
    if key.pq is not None:
        companion = {
            "mediaType": PQ_MEDIA_TYPE,
            "algorithm": PQ_ALGORITHM,
            "signs": "the DSSE PAE of the dsseEnvelope payload in " + bundle_path.name,
            "bundleKeyHint": keys.hint,
            "publicKeyHint": keys.pq_hint,
            "payloadSha256": hashlib.sha256(payload).hexdigest(),
            "sig": _b64(key.pq.sign(signed)),
        }
        write_bytes_atomic(pq_path, json.dumps(companion, indent=2).encode("utf-8"))
    else:
        pq_path.unlink(missing_ok=True)  # a stale part of an earlier hybrid key with this key id
    write_bytes_atomic(bundle_path, json.dumps(bundle, separators=(",", ":")).encode("utf-8"))
    return bundle_path


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# -- verification -----------------------------------------------------------------------------------
VALID, UNTRUSTED, BAD = "valid", "untrusted", "bad"


@dataclass(frozen=True)
class SignatureCheck:
    sidecar: str  # path inside the artifact, e.g. signatures/3e82114e62411e4e.sig
    key_id: str
    status: str  # valid | untrusted | bad
    signer: str | None = None  # trust-store name
    algorithm: str | None = None
    reason: str = ""

    def describe(self) -> str:
        if self.status == VALID:
            return f"signed by {self.signer} ({self.algorithm}, key {self.key_id})"
        if self.status == UNTRUSTED:
            return f"signed by untrusted key {self.key_id}"
        return f"bad signature {self.sidecar}: {self.reason}"


@dataclass(frozen=True)
class SignatureReport:
    checks: tuple[SignatureCheck, ...]

    @property
    def status(self) -> str:
        """unsigned | bad (any sidecar fails) | trusted (a trusted signer vouches) | untrusted."""
        if not self.checks:
            return "unsigned"
        if any(c.status == BAD for c in self.checks):
            return "bad"
        return "trusted" if any(c.status == VALID for c in self.checks) else "untrusted"

    @property
    def bad(self) -> list[SignatureCheck]:
        return [c for c in self.checks if c.status == BAD]

    def describe(self) -> str:
        return "; ".join(c.describe() for c in self.checks) if self.checks else "unsigned"


class _Bad(Exception):
    """A sidecar that cannot vouch for the artifact; the message says why."""


def verify_signatures(artifact: Artifact, trust: TrustStore) -> SignatureReport:
    """Check every signature sidecar of an artifact whose files already matched its manifest."""
    folder = artifact.path / SIGNATURES_DIR
    if not folder.exists() and not folder.is_symlink():
        return SignatureReport(())
    if folder.is_symlink() or not folder.is_dir():
        return SignatureReport((SignatureCheck(SIGNATURES_DIR, "?", BAD, reason="not a plain folder"),))
    checks: list[SignatureCheck] = []
    entries = sorted(folder.iterdir())
    expected: dict[str, str] | None = None
    for path in entries:
        rel = f"{SIGNATURES_DIR}/{path.name}"
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            continue  # a sidecar being written (or a crashed write): not a signature, never read
        if path.is_symlink() or not path.is_file():
            checks.append(SignatureCheck(rel, "?", BAD, reason="not a plain file"))
        elif path.name.endswith(BUNDLE_SUFFIX):
            expected = expected if expected is not None else signed_files(artifact)
            checks.append(_check_bundle(path, rel, trust, expected))
        elif path.name.endswith(PQ_SUFFIX):
            continue  # read with its bundle; alone (a signature being written) it vouches for nothing
        else:
            checks.append(SignatureCheck(rel, "?", BAD, reason="unexpected file (not a signature)"))
    return SignatureReport(tuple(checks))


def _check_bundle(path: Path, rel: str, trust: TrustStore, expected: dict[str, str]) -> SignatureCheck:
    key_id = "?"
    try:
        hint, payload, sig = _read_bundle(path)
        key_id = hint[:KEY_ID_CHARS] if hint else "?"
        signer = _signer_for(trust, hint, payload, sig)
        if signer is None:
            return SignatureCheck(rel, key_id, UNTRUSTED, reason="key not in the trust store")
        key_id = signer.keys.key_id
        if not verify_classical(signer.keys, sig, pae(payload)):
            raise _Bad(f"does not verify with {signer.name}'s {signer.keys.algorithm} key")
        _check_statement(payload, expected)
        if signer.keys.pq is not None:
            _check_pq_part(path, signer, payload)
    except _Bad as exc:
        return SignatureCheck(rel, key_id, BAD, reason=str(exc))
    return SignatureCheck(rel, key_id, VALID, signer.name, signer.keys.algorithm_name)


def _read_bundle(path: Path) -> tuple[str | None, bytes, bytes]:
    try:
        bundle = json.loads(path.read_bytes())
        if bundle.get("mediaType") != BUNDLE_MEDIA_TYPE:
            raise _Bad(f"not a Sigstore bundle of media type {BUNDLE_MEDIA_TYPE}")
        hint = ((bundle.get("verificationMaterial") or {}).get("publicKey") or {}).get("hint")
        envelope = bundle["dsseEnvelope"]
        if envelope.get("payloadType") != PAYLOAD_TYPE:
            raise _Bad(f"the DSSE payload type is not {PAYLOAD_TYPE}")
        if len(envelope["signatures"]) != 1:
            raise _Bad("the DSSE envelope must hold exactly one signature")
        payload = base64.b64decode(envelope["payload"], validate=True)
        sig = base64.b64decode(envelope["signatures"][0]["sig"], validate=True)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
        raise _Bad("not a readable Sigstore bundle") from None
    return (hint if isinstance(hint, str) else None), payload, sig


def _signer_for(trust: TrustStore, hint: str | None, payload: bytes, sig: bytes) -> TrustedSigner | None:
    if hint:
        return trust.by_hint(hint)
    # A bundle without a key hint (older model-signing): whichever trusted key verifies it.
    return next((s for s in trust.signers() if verify_classical(s.keys, sig, pae(payload))), None)


def verify_classical(keys: SignerKeys, sig: bytes, data: bytes) -> bool:
    try:
        if isinstance(keys.classical, ed25519.Ed25519PublicKey):
            keys.classical.verify(sig, data)
        else:
            keys.classical.verify(sig, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _check_statement(payload: bytes, expected: dict[str, str]) -> None:
    """The signed statement must list exactly the artifact's files with their current digests."""
    try:
        stmt = json.loads(payload)
        if stmt["_type"] != STATEMENT_TYPE or stmt["predicateType"] != PREDICATE_TYPE:
            raise _Bad(f"the statement is not an in-toto {PREDICATE_TYPE} statement")
        (subject,) = stmt["subject"]
        serialization_ = stmt["predicate"]["serialization"]
        if serialization_.get("method") != "files" or serialization_.get("hash_type") != "sha256":
            raise _Bad("only per-file sha256 serialization is supported")
        signed: dict[str, str] = {}
        root = hashlib.sha256()
        for resource in stmt["predicate"]["resources"]:
            if resource["algorithm"] != "sha256" or resource["name"] in signed:
                raise _Bad("a resource is repeated or not sha256")
            signed[resource["name"]] = resource["digest"]
            root.update(bytes.fromhex(resource["digest"]))
        if root.hexdigest() != subject["digest"]["sha256"]:
            raise _Bad("the statement's subject digest does not match its resources")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise _Bad("the signed statement is malformed") from None
    for name in sorted(expected.keys() | signed.keys()):
        if name not in signed:
            raise _Bad(f"file {name} is not covered by the signature")
        if name not in expected:
            raise _Bad(f"the signature covers a file {name} the artifact does not have")
        if signed[name] != expected[name]:
            raise _Bad(f"file {name} differs from what was signed (it was altered)")


def _check_pq_part(bundle_path: Path, signer: TrustedSigner, payload: bytes) -> None:
    pq_key = signer.keys.pq
    assert pq_key is not None
    path = bundle_path.with_name(bundle_path.name[: -len(BUNDLE_SUFFIX)] + PQ_SUFFIX)
    if not path.is_file():
        raise _Bad(f"{signer.name} is a hybrid signer but the ML-DSA-65 part {path.name} is missing")
    try:
        part = json.loads(path.read_bytes())
        ok_shape = part["mediaType"] == PQ_MEDIA_TYPE and part["algorithm"] == PQ_ALGORITHM
        bound = part["bundleKeyHint"] == signer.keys.hint and part["publicKeyHint"] == key_hint(pq_key)
        same_payload = part["payloadSha256"] == hashlib.sha256(payload).hexdigest()
        sig = base64.b64decode(part["sig"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise _Bad(f"the ML-DSA-65 part {path.name} is malformed") from None
    if not (ok_shape and bound and same_payload):
        raise _Bad(f"the ML-DSA-65 part {path.name} belongs to another key or statement")
    try:
        pq_key.verify(sig, pae(payload))
    except InvalidSignature:
        raise _Bad(f"the ML-DSA-65 part {path.name} does not verify with {signer.name}'s key") from None


# -- the store's policy -----------------------------------------------------------------------------
def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


class ArtifactSigning:
    """A store's signature policy: who signs new artifacts, who is trusted, whether signing is required.

    From the environment and `<store>/security/`: the signing key is `$LMLOOM_SIGNING_KEY` or
    `<store>/security/signing/signing-key.pem` (when present); trusted signers are in
    `$LMLOOM_TRUST_DIR` or `<store>/security/trust/`; signatures are required when
    `$LMLOOM_REQUIRE_SIGNATURES` is 1/true/yes/on or the flag file `<store>/security/require-signatures`
    exists (the environment can add the requirement, not lift the store's flag).
    """

    def __init__(self, key_path: Path, trust: TrustStore, required: bool, key_explicit: bool = False):
        self.key_path = Path(key_path)
        self.key_explicit = key_explicit
        self.trust = trust
        self.required = required
        self.enforcing = True  # off only while `lmloom artifacts sign` reads what it is about to sign
        self._key: SigningKey | None = None

    @classmethod
    def for_store(cls, root: Path) -> ArtifactSigning:
        root = Path(root)
        explicit = os.environ.get(ENV_SIGNING_KEY)
        key_path = Path(explicit).expanduser() if explicit else default_key_path(root)
        required = _truthy(os.environ.get(ENV_REQUIRE)) or require_flag_path(root).exists()
        return cls(key_path, TrustStore(default_trust_dir(root)), required, key_explicit=bool(explicit))

    def key(self) -> SigningKey | None:
        """The configured signing key, or None when there is none (a broken one is an error)."""
        if self._key is None:
            if not self.key_path.exists():
                if self.key_explicit:
                    raise SecurityError(
                        f"{ENV_SIGNING_KEY} points to {self.key_path}, which does not exist; "
                        "run `lmloom signing init`"
                    )
                return None
            self._key = SigningKey.load(self.key_path)
        return self._key

    def sign(self, artifact: Artifact, key: SigningKey | None = None) -> SignatureCheck | None:
        """Sign with `key` (default: the configured key); None when there is no key to sign with."""
        key = key or self.key()
        if key is None:
            return None
        sidecar = sign_artifact(artifact, key)
        trusted = self.trust.by_hint(key.public.hint)
        return SignatureCheck(
            f"{SIGNATURES_DIR}/{sidecar.name}",
            key.public.key_id,
            VALID if trusted else UNTRUSTED,
            trusted.name if trusted else None,
            key.public.algorithm_name,
        )

    def report(self, artifact: Artifact) -> SignatureReport:
        return verify_signatures(artifact, self.trust)

    def enforce(self, artifact: Artifact) -> SignatureReport:
        """Refuse (SecurityError naming the artifact) a bad signature always, and under the requirement
        an artifact no trusted signer vouches for."""
        report = self.report(artifact)
        where = f"artifact {artifact.short_id} ({artifact.kind})"
        if not self.enforcing:
            return report
        if report.bad:
            first = report.bad[0]
            raise SecurityError(f"{where}: signature {first.sidecar} is bad: {first.reason}")
        if self.required and report.status == "unsigned":
            raise SecurityError(
                f"{where} is unsigned and signatures are required; "
                f"sign it with `lmloom artifacts sign {artifact.short_id}`"
            )
        if self.required and report.status == "untrusted":
            ids = ", ".join(c.key_id for c in report.checks)
            raise SecurityError(
                f"{where} is signed only by keys not in the trust store ({ids}) and signatures are "
                "required; trust the signer with `lmloom trust add NAME PUBKEY.pem`"
            )
        return report


def default_key_path(root: Path) -> Path:
    return Path(root) / "security" / "signing" / "signing-key.pem"


def require_flag_path(root: Path) -> Path:
    return Path(root) / "security" / REQUIRE_FLAG


def set_required(root: Path, required: bool) -> Path:
    """Turn the store's own signature requirement on or off (the flag file); returns its path."""
    flag = require_flag_path(root)
    if required:
        flag.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(flag, b"signatures are required on every artifact read from this store\n")
    else:
        flag.unlink(missing_ok=True)
    return flag
