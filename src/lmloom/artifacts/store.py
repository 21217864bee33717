"""A local, content-addressed artifact store that refuses anything it cannot verify.

Layout under the store root:

    artifacts/<id>/manifest.json + files   immutable, published by one atomic rename
    staging/<random>/                       artifacts being written (never read as artifacts)
    index/stage-keys/<key>                  stage key -> artifact id, so re-runs reuse finished stages
    work/<key>/                             resumable scratch state of an unfinished stage
    audit.jsonl                             the hash-chained audit log (see lmloom.security.audit)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmloom import __version__
from lmloom.artifacts.atomic import fsync_dir, fsync_tree, write_text_atomic
from lmloom.artifacts.hashing import sha256_file
from lmloom.artifacts.manifest import MANIFEST_NAME, FileEntry, Manifest
from lmloom.errors import IntegrityError, LmloomError

ENV_HOME = "LMLOOM_HOME"
SHORT_ID = 12


def default_store_root() -> Path:
    return Path(os.environ.get(ENV_HOME) or Path.home() / ".lmloom").expanduser()


@dataclass(frozen=True)
class Artifact:
    """A verified artifact: every file matched its recorded hash when this object was made."""

    id: str
    path: Path
    manifest: Manifest

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def short_id(self) -> str:
        return self.id[:SHORT_ID]

    def file(self, name: str) -> Path:
        if name not in self.manifest.files:
            raise LmloomError(f"artifact {self.short_id} ({self.kind}) has no file {name!r}")
        return self.path / name


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
            tool={"name": "lmloom", "version": __version__},
            principal=self.principal,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        (self.path / MANIFEST_NAME).write_bytes(manifest.canonical_bytes())
        fsync_tree(self.path)
        final = self.store.artifact_dir(manifest.id)
        os.rename(self.path, final)  # atomic publish: readers see all of it or nothing
        fsync_dir(final.parent)
        if self.stage_key:
            write_text_atomic(self.store.root / "index" / "stage-keys" / self.stage_key, manifest.id)
        return Artifact(manifest.id, final, manifest)

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
        files[rel] = FileEntry(sha256=sha256_file(path), size=path.stat().st_size)
    return files


class ArtifactStore:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).expanduser() if root else default_store_root()
        for sub in ("artifacts", "staging", "index/stage-keys", "work"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

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
    ) -> ArtifactWriter:
        staging = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=self.root / "staging"))
        return ArtifactWriter(
            self, staging, kind, stage, config, dict(inputs or {}), stage_key, principal=principal
        )

    # -- lookup ------------------------------------------------------------------------------
    def artifact_dir(self, artifact_id: str) -> Path:
        return self.root / "artifacts" / artifact_id

    def ids(self) -> list[str]:
        return sorted(p.name for p in (self.root / "artifacts").iterdir() if p.is_dir())

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
        return artifact_id if self.artifact_dir(artifact_id).is_dir() else None

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
            raise IntegrityError(f"{where}: {MANIFEST_NAME} does not match the artifact id (it was altered)")
        return manifest

    def open(self, ref: str) -> Artifact:
        """Verify every file of an artifact and return it; raise IntegrityError naming the first bad file."""
        manifest = self.read_manifest(ref)
        artifact = Artifact(manifest.id, self.artifact_dir(manifest.id), manifest)
        self._verify_files(artifact)
        return artifact

    def verify(self, ref: str) -> Artifact:
        return self.open(ref)

    def _verify_files(self, artifact: Artifact) -> None:
        where = f"artifact {artifact.short_id} ({artifact.kind})"
        expected = artifact.manifest.files
        present = {
            p.relative_to(artifact.path).as_posix()
            for p in artifact.path.rglob("*")
            if not p.is_dir() and p.name != MANIFEST_NAME
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
