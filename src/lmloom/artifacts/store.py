"""A local, content-addressed artifact store that refuses anything it cannot verify.

Layout under the store root:

    artifacts/<id>/manifest.json + files   immutable, published by one atomic rename
    staging/<random>/                       artifacts being written (never read as artifacts)
    index/stage-keys/<key>                  stage key -> artifact id, so re-runs reuse finished stages
    work/<key>/                             resumable scratch state of an unfinished stage
    audit.jsonl                             the hash-chained audit log (see lmloom.security.audit)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from lmloom import __version__
from lmloom.artifacts.atomic import fsync_dir, fsync_tree, write_text_atomic
from lmloom.artifacts.files import PLAIN, Codec, check_name, read_all, text_reader
from lmloom.artifacts.hashing import sha256_file
from lmloom.artifacts.manifest import MANIFEST_NAME, FileEntry, Manifest
from lmloom.errors import IntegrityError, LmloomError, SecurityError

ENV_HOME = "LMLOOM_HOME"
SHORT_ID = 12
# Reserved folder inside an artifact for signature sidecars (lmloom.security.signing): they are added
# after publishing, so they are not in the manifest; the signature verifier checks what lies there.
SIGNATURES_DIR = "signatures"
_ID = re.compile(r"^[0-9a-f]{64}$")  # an artifact folder's name: the sha256 of its manifest


def default_store_root() -> Path:
    return Path(os.environ.get(ENV_HOME) or Path.home() / ".lmloom").expanduser()


class StoreSecurity:
    """The store's security hooks. This base is the plain store: no encryption, no signatures.

    `lmloom.security` supplies the real one (keyring, signer, trust store); the store calls these at
    the points where every artifact write and read passes, so no stage can bypass them.
    """

    def write_codec(self, encrypt: bool) -> Codec:
        if encrypt:
            raise SecurityError(
                "this recipe asks for encryption (security.encrypt: true) but no key is configured; "
                "run `lmloom keys init` and set LMLOOM_KEK or LMLOOM_KEK_FILE"
            )
        return PLAIN

    def read_codec(self, manifest: Manifest, where: str) -> Codec:
        if manifest.encryption is not None:
            raise SecurityError(f"{where} is encrypted; set LMLOOM_KEK or LMLOOM_KEK_FILE to read it")
        return PLAIN

    def on_commit(self, artifact: Artifact) -> None:
        """Called once a new artifact is published (e.g. to sign it)."""

    def on_open(self, artifact: Artifact) -> None:
        """Called after an artifact's files verified, before anyone reads it (e.g. signature policy)."""

    def on_refusal(self, ref: str, error: LmloomError) -> None:
        """Called when a read is refused (verification, signature or key failure), e.g. to audit it."""


@dataclass(frozen=True)
class Artifact:
    """A verified artifact: every file matched its recorded hash when this object was made.

    Read its files with `open` / `read_bytes` / `read_text` / `read_json`: they return plaintext
    whatever the artifact's codec stores on disk.
    """

    id: str
    path: Path
    manifest: Manifest
    codec: Codec = PLAIN

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def short_id(self) -> str:
        return self.id[:SHORT_ID]

    @property
    def encrypted(self) -> bool:
        return self.manifest.encryption is not None

    def file(self, name: str) -> Path:
        """Where a file's stored bytes lie (ciphertext for an encrypted artifact)."""
        if name not in self.manifest.files:
            raise LmloomError(f"artifact {self.short_id} ({self.kind}) has no file {name!r}")
        return self.path / name

    def has(self, name: str) -> bool:
        return name in self.manifest.files

    def open(self, name: str) -> BinaryIO:
        """A seekable binary reader of the file's plaintext."""
        return self.codec.open_read(self.file(name), name)

    def read_bytes(self, name: str) -> bytes:
        return read_all(self.open(name))

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def lines(self, name: str) -> Iterator[str]:
        """The file's text, line by line (newlines kept), streamed."""
        with text_reader(self.open(name)) as handle:
            yield from handle

    def size(self, name: str) -> int:
        """Plaintext size in bytes."""
        return self.codec.plaintext_size(self.file(name), name)

    def plain_path(self, name: str) -> Path | None:
        """The path when the file is stored as plaintext (so it may be memory-mapped), else None."""
        return self.codec.plain_path(self.file(name))


@dataclass
class ArtifactWriter:
    """Collects files in a private staging directory; `commit` publishes them as one artifact."""

    store: ArtifactStore
    path: Path
    kind: str
    stage: str
    config: dict[str, Any]
    inputs: dict[str, str]
    stage_key: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    principal: str = "unknown"
    codec: Codec = PLAIN

    # -- writing files (through the codec: stages never write plaintext into the store directly) --
    def open(self, name: str) -> BinaryIO:
        """A binary writer for a new file of this artifact; closing it finishes the file."""
        return self.codec.open_write(self.path / check_name(name), name)

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.open(name) as handle:
            handle.write(data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, value: Any, indent: int | None = 2) -> None:
        self.write_text(name, json.dumps(value, indent=indent, ensure_ascii=False))

    def copy_from(self, source: Artifact, name: str, as_name: str | None = None) -> None:
        """Copy a file's plaintext from another artifact (re-encoded with this artifact's codec)."""
        with source.open(name) as reader, self.open(as_name or name) as writer:
            shutil.copyfileobj(reader, writer, 1 << 20)

    def commit(self) -> Artifact:
        files = _hash_tree(self.path)
        manifest = Manifest(
            kind=self.kind,
            stage=self.stage,
            stage_key=self.stage_key,
            config=self.config,
            inputs=self.inputs,
            files=files,
            metadata=self.metadata,
            encryption=self.codec.header(),
            tool={"name": "lmloom", "version": __version__},
            principal=self.principal,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        (self.path / MANIFEST_NAME).write_bytes(manifest.canonical_bytes())
        fsync_tree(self.path)
        final = self.store.artifact_dir(manifest.id)
        os.rename(self.path, final)  # atomic publish: readers see all of it or nothing
        fsync_dir(final.parent)
        artifact = Artifact(manifest.id, final, manifest, self.codec)
        self.store.security.on_commit(artifact)
        if self.stage_key:
            write_text_atomic(self.store.root / "index" / "stage-keys" / self.stage_key, manifest.id)
        return artifact

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _hash_tree(root: Path) -> dict[str, FileEntry]:
    files: dict[str, FileEntry] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise LmloomError(f"artifact file {rel} is a symlink; artifacts hold plain files only")
        if rel == MANIFEST_NAME:
            raise LmloomError(f"a stage may not write its own {MANIFEST_NAME}")
        if rel.split("/", 1)[0] == SIGNATURES_DIR:
            raise LmloomError(f"artifact file {rel}: {SIGNATURES_DIR}/ is reserved for signatures")
        files[rel] = FileEntry(sha256=sha256_file(path), size=path.stat().st_size)
    return files


class ArtifactStore:
    def __init__(self, root: Path | str | None = None, security: StoreSecurity | None = None):
        self.root = Path(root).expanduser() if root else default_store_root()
        self.security = security or StoreSecurity()
        try:
            for sub in ("artifacts", "staging", "index/stage-keys", "work"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # e.g. the store path, or a folder in it, is a file
            raise LmloomError(
                f"cannot use {self.root} as an artifact store ({exc.strerror or exc}: {exc.filename}); "
                "give a directory with --store or $LMLOOM_HOME"
            ) from None

    # -- writing -----------------------------------------------------------------------------
    def create(
        self,
        *,
        kind: str,
        stage: str,
        config: dict[str, Any],
        inputs: dict[str, str] | None = None,
        stage_key: str | None = None,
        principal: str = "unknown",
        encrypt: bool = False,
    ) -> ArtifactWriter:
        codec = self.security.write_codec(encrypt)
        staging = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=self.root / "staging"))
        return ArtifactWriter(
            self,
            staging,
            kind,
            stage,
            config,
            dict(inputs or {}),
            stage_key,
            principal=principal,
            codec=codec,
        )

    # -- lookup ------------------------------------------------------------------------------
    def artifact_dir(self, artifact_id: str) -> Path:
        return self.root / "artifacts" / artifact_id

    def ids(self) -> list[str]:
        # Only folders named by an id: anything else (a stray copy, a backup tool's folder) is no artifact.
        return sorted(p.name for p in (self.root / "artifacts").iterdir() if p.is_dir() and _ID.match(p.name))

    def resolve(self, ref: str) -> str:
        """Full id from a full id or a unique prefix of at least 4 hex digits."""
        ref = ref.strip().lower()
        if len(ref) < 4:
            raise LmloomError(
                f"artifact reference {ref!r} is too short; give at least 4 characters of the id"
            )
        matches = [i for i in self.ids() if i.startswith(ref)]
        if not matches:
            raise LmloomError(f"no artifact with id {ref!r} in store {self.root}")
        if len(matches) > 1:
            shown = ", ".join(m[:SHORT_ID] for m in matches[:5])
            raise LmloomError(f"artifact reference {ref!r} is ambiguous: {shown}")
        return matches[0]

    def find_by_stage_key(self, stage_key: str) -> str | None:
        entry = self.root / "index" / "stage-keys" / stage_key
        if not entry.exists():
            return None
        artifact_id = entry.read_text().strip()
        return artifact_id if _ID.match(artifact_id) and self.artifact_dir(artifact_id).is_dir() else None

    def work_dir(self, stage_key: str) -> Path:
        path = self.root / "work" / stage_key
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- reading (always verified) -------------------------------------------------------------
    def read_manifest(self, ref: str) -> Manifest:
        """The manifest, checked against the id it is stored under (files are not hashed)."""
        artifact_id = self.resolve(ref)
        where = f"artifact {artifact_id[:SHORT_ID]}"
        path = self.artifact_dir(artifact_id) / MANIFEST_NAME
        if not path.is_file():
            raise IntegrityError(f"{where}: {MANIFEST_NAME} is missing")
        manifest = Manifest.parse(path.read_bytes(), where)
        if manifest.id != artifact_id:
            raise IntegrityError(
                f"{where} ({manifest.kind}, as it claims): {MANIFEST_NAME} does not match the artifact id "
                "(it was altered)"
            )
        return manifest

    def open(self, ref: str) -> Artifact:
        """Verify every file of an artifact and return it; raise IntegrityError naming the first bad file.

        Every refusal (bad hash, signature, key) is reported to the security hooks before it is raised.
        """
        try:
            manifest = self.read_manifest(ref)
            artifact = Artifact(manifest.id, self.artifact_dir(manifest.id), manifest)
            self._verify_files(artifact)
            where = f"artifact {artifact.short_id} ({artifact.kind})"
            artifact = Artifact(
                artifact.id, artifact.path, manifest, self.security.read_codec(manifest, where)
            )
            self.security.on_open(artifact)
        except (IntegrityError, SecurityError) as exc:
            self.security.on_refusal(ref, exc)
            raise
        return artifact

    def verify(self, ref: str) -> Artifact:
        return self.open(ref)

    def _verify_files(self, artifact: Artifact) -> None:
        where = f"artifact {artifact.short_id} ({artifact.kind})"
        expected = artifact.manifest.files
        present = {
            p.relative_to(artifact.path).as_posix()
            for p in artifact.path.rglob("*")
            if not p.is_dir()
            and p.name != MANIFEST_NAME
            and p.relative_to(artifact.path).parts[0] != SIGNATURES_DIR  # checked by the signature verifier
        }
        for name in sorted(present - expected.keys()):
            raise IntegrityError(f"{where}: unexpected file {name} (not in the manifest)")
        for name, entry in sorted(expected.items()):
            path = artifact.path / name
            if not path.is_file():
                raise IntegrityError(f"{where}: file {name} is missing")
            if path.stat().st_size != entry.size:
                raise IntegrityError(
                    f"{where}: file {name} has size {path.stat().st_size}, manifest says {entry.size}"
                )
            if sha256_file(path) != entry.sha256:
                raise IntegrityError(f"{where}: file {name} does not match its sha256 (it was altered)")

    def lineage(self, ref: str) -> Iterator[tuple[int, str, str, Manifest]]:
        """Depth-first walk of an artifact and everything it was made from: (depth, role, id, manifest)."""

        def walk(artifact_id: str, role: str, depth: int) -> Iterator[tuple[int, str, str, Manifest]]:
            manifest = self.read_manifest(artifact_id)
            yield depth, role, artifact_id, manifest
            for child_role, child_id in sorted(manifest.inputs.items()):
                yield from walk(child_id, child_role, depth + 1)

        yield from walk(self.resolve(ref), "", 0)
