"""Lineage: an artifact, everything it was made from, and the source files at the bottom of it all.

`build_lineage(store, ref)` walks an artifact's inputs (its manifest's `inputs`, recursively) and, for
every artifact that records the outside files it was made from, reads that record:

    sources.jsonl   one JSON object per file a source read, written by the artifact's stage:
                    {"source_index", "source", "type", "path", "relpath", "size", "sha256",
                     "documents", "kept", "removed", "rejected"[, "error"]}
                    `path` is absolute, as read; `relpath` is relative to the source's root (what pins
                    name); `sha256`/`size` are of the bytes read (null when the file could not be read).

Manifests are read with `store.read_manifest` (the id vouches for them); `sources.jsonl` only through
`store.open`, which verifies every file of the artifact (and decrypts it) first, so a tampered or
undecryptable record is refused, never shown. The result is a small immutable graph that renders as
JSON (`to_json`) or Graphviz DOT (`to_dot`); the CLI draws the text tree.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmloom.errors import IntegrityError

if TYPE_CHECKING:
    from lmloom.artifacts.store import ArtifactStore

SOURCES_FILE = "sources.jsonl"
UNREADABLE = "-"  # stands for the sha256 of a file that could not be read, in listing digests


def listing_digest(entries: Iterable[tuple[str, str | None]]) -> str:
    """sha256 of a `sha256sum`-style listing of (name, sha256) pairs, sorted by name.

    The listing is one line per file, `<sha256>  <name>\\n` (two spaces), which is what `sha256sum`
    prints, so for a directory the digest is what this prints for the same (relative) file names:
    `cd DIR && printf '%s\\n' FILE... | LC_ALL=C sort | xargs -d '\\n' sha256sum | sha256sum`.
    It changes when any file is added, removed, renamed or edited.
    """
    lines = sorted((name, sha256 or UNREADABLE) for name, sha256 in entries)
    text = "".join(f"{sha256}  {name}\n" for name, sha256 in lines)
    return hashlib.sha256(text.encode("utf-8", errors="surrogateescape")).hexdigest()


@dataclass(frozen=True)
class SourceFile:
    """An outside file by content: the same path with other bytes is another file."""

    path: str
    sha256: str | None
    size: int | None

    @property
    def node_id(self) -> str:
        return f"file:{self.sha256 or 'unreadable'}:{self.path}"


@dataclass(frozen=True)
class SourceUse:
    """One file as one source of one artifact read it, with what became of its documents."""

    file: SourceFile
    relpath: str
    documents: int = 0
    kept: int = 0
    rejected: int = 0
    error: str | None = None


@dataclass(frozen=True)
class SourceGroup:
    """One configured source of an artifact (e.g. a text-dir) and the files it read."""

    artifact: str
    index: int
    name: str
    type: str
    files: tuple[SourceUse, ...]

    @property
    def node_id(self) -> str:
        return f"source:{self.artifact}:{self.index}"

    @property
    def bytes(self) -> int:
        return sum(use.file.size or 0 for use in self.files)

    @property
    def digest(self) -> str:
        """The value a `digest:` pin of this source must hold to accept exactly these files."""
        return listing_digest((use.relpath, use.file.sha256) for use in self.files)


@dataclass(frozen=True)
class ArtifactNode:
    id: str
    kind: str
    stage: str
    created: str
    principal: str
    inputs: dict[str, str]  # role -> artifact id
    sources: tuple[SourceGroup, ...] | None  # None: the artifact records no source files

    @property
    def node_id(self) -> str:
        return f"artifact:{self.id}"


@dataclass(frozen=True)
class Lineage:
    root: str
    artifacts: dict[str, ArtifactNode]  # depth-first order from the root, each artifact once

    def walk(self) -> Iterator[tuple[int, str, ArtifactNode, bool]]:
        """(depth, role, node, first): the tree of inputs; a node met again is not descended into."""
        seen: set[str] = set()

        def visit(artifact_id: str, role: str, depth: int) -> Iterator[tuple[int, str, ArtifactNode, bool]]:
            node = self.artifacts[artifact_id]
            first = artifact_id not in seen
            seen.add(artifact_id)
            yield depth, role, node, first
            if first:
                for child_role, child_id in sorted(node.inputs.items()):
                    yield from visit(child_id, child_role, depth + 1)

        yield from visit(self.root, "", 0)

    def groups(self) -> list[SourceGroup]:
        return [group for node in self.artifacts.values() for group in node.sources or ()]

    def source_files(self) -> list[SourceFile]:
        """Every distinct outside file (by path and content) that fed the root artifact, by path."""
        files = {use.file for group in self.groups() for use in group.files}
        return sorted(files, key=lambda f: (f.path, f.sha256 or ""))

    # -- renderings ------------------------------------------------------------------------------
    def to_json(self, files: bool = True) -> dict[str, Any]:
        """A graph: artifact, source and file nodes; edges point the way data flowed, with a role."""
        nodes: list[dict[str, Any]] = []
        edges: list[dict[str, Any]] = []
        for node in self.artifacts.values():
            nodes.append(
                {
                    "id": node.node_id,
                    "type": "artifact",
                    "artifact": node.id,
                    "kind": node.kind,
                    "stage": node.stage,
                    "created": node.created,
                    "principal": node.principal,
                    "sources_recorded": node.sources is not None,
                }
            )
            for role, input_id in sorted(node.inputs.items()):
                edges.append({"from": f"artifact:{input_id}", "to": node.node_id, "role": role})
        file_nodes: dict[str, dict[str, Any]] = {}
        for group in self.groups():
            nodes.append(
                {
                    "id": group.node_id,
                    "type": "source",
                    "name": group.name,
                    "source_type": group.type,
                    "files": len(group.files),
                    "bytes": group.bytes,
                    "digest": group.digest,
                }
            )
            edges.append({"from": group.node_id, "to": f"artifact:{group.artifact}", "role": "source"})
            if not files:
                continue
            for use in group.files:
                f = use.file
                file_nodes.setdefault(
                    f.node_id,
                    {"id": f.node_id, "type": "file", "path": f.path, "sha256": f.sha256, "size": f.size},
                )
                edge = {
                    "from": f.node_id,
                    "to": group.node_id,
                    "role": "file",
                    "relpath": use.relpath,
                    "documents": use.documents,
                    "kept": use.kept,
                    "rejected": use.rejected,
                }
                if use.error:
                    edge["error"] = use.error
                edges.append(edge)
        nodes.extend(file_nodes[key] for key in sorted(file_nodes))
        return {
            "root": self.root,
            "summary": {"artifacts": len(self.artifacts), "source_files": len(self.source_files())},
            "nodes": nodes,
            "edges": edges,
        }

    def to_dot(self, files: bool = True) -> str:
        """Graphviz DOT (`dot -Tsvg`): every id and label is a quoted, escaped string."""
        lines = [
            "digraph lineage {",
            '  graph [rankdir="LR", fontname="Helvetica"];',
            '  node [fontname="Helvetica", fontsize="10"];',
            '  edge [fontname="Helvetica", fontsize="9"];',
        ]
        edges: list[str] = []
        for node in self.artifacts.values():
            label = [f"{node.kind} {node.id[:12]}", node.stage, node.created[:16].replace("T", " ")]
            style = "rounded,bold" if node.id == self.root else "rounded"
            lines.append(f"  {_q(node.node_id)} [shape=box, style={_q(style)}, label={_label(label)}];")
            for role, input_id in sorted(node.inputs.items()):
                edges.append(f"  {_q('artifact:' + input_id)} -> {_q(node.node_id)} [label={_q(role)}];")
        declared: set[str] = set()
        for group in self.groups():
            label = [
                group.name,
                f"{len(group.files):,} files, {group.bytes:,} bytes",
                f"digest {group.digest[:16]}",
            ]
            lines.append(f"  {_q(group.node_id)} [shape=folder, label={_label(label)}];")
            edges.append(f'  {_q(group.node_id)} -> {_q("artifact:" + group.artifact)} [label="source"];')
            if not files:
                continue
            for use in group.files:
                f = use.file
                if f.node_id not in declared:
                    declared.add(f.node_id)
                    digest = f"sha256 {f.sha256[:16]}" if f.sha256 else "unreadable"
                    tooltip = f"{f.path}\nsha256 {f.sha256 or 'unreadable'}"
                    lines.append(
                        f"  {_q(f.node_id)} [shape=note, label={_label([use.relpath, digest])}, "
                        f"tooltip={_label(tooltip.split(chr(10)))}];"
                    )
                edges.append(f"  {_q(f.node_id)} -> {_q(group.node_id)};")
        return "\n".join([*lines, *edges, "}"]) + "\n"


def _q(text: str) -> str:
    """A DOT double-quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ").replace("\r", " ") + '"'


def _label(parts: list[str]) -> str:
    """A DOT label of several centred lines (`\\n` is Graphviz's line break inside a quoted label)."""
    return '"' + "\\n".join(_q(part)[1:-1] for part in parts) + '"'


# -- building ------------------------------------------------------------------------------------


def build_lineage(store: ArtifactStore, ref: str) -> Lineage:
    """The lineage graph of an artifact; raises IntegrityError for a tampered manifest or record."""
    root = store.resolve(ref)
    artifacts: dict[str, ArtifactNode] = {}
    present = set(store.ids())

    def visit(artifact_id: str) -> None:
        if artifact_id in artifacts:
            return
        manifest = store.read_manifest(artifact_id)
        sources = read_sources(store, artifact_id) if SOURCES_FILE in manifest.files else None
        artifacts[artifact_id] = ArtifactNode(
            id=artifact_id,
            kind=manifest.kind,
            stage=manifest.stage,
            created=manifest.created,
            principal=manifest.principal,
            inputs=dict(manifest.inputs),
            sources=sources,
        )
        for role, child in sorted(manifest.inputs.items()):
            if child not in present:  # deleted (or never copied): the lineage would end here unseen
                raise IntegrityError(
                    f"artifact {artifact_id[:12]} ({manifest.kind}) was made from {role} {child[:12]}, "
                    f"which is not in the store {store.root} (deleted?); its lineage cannot be traced"
                )
            visit(child)

    visit(root)
    return Lineage(root, artifacts)


def read_sources(store: ArtifactStore, artifact_id: str) -> tuple[SourceGroup, ...]:
    """An artifact's `sources.jsonl`, verified (and decrypted) by `store.open`, grouped by source."""
    artifact = store.open(artifact_id)
    groups: dict[tuple[int, str], tuple[str, list[SourceUse]]] = {}
    for lineno, line in enumerate(artifact.lines(SOURCES_FILE), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = (int(record.get("source_index", 0)), str(record["source"]))
            file = SourceFile(str(record["path"]), record.get("sha256"), record.get("size"))
            use = SourceUse(
                file,
                str(record.get("relpath", record["path"])),
                int(record.get("documents", 0)),
                int(record.get("kept", 0)),
                int(record.get("rejected", 0)),
                record.get("error"),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(
                f"artifact {artifact.short_id} ({artifact.kind}): {SOURCES_FILE} line {lineno} is not a "
                f"source record ({type(exc).__name__}: {exc})"
            ) from None
        groups.setdefault(key, (str(record.get("type", "")), []))[1].append(use)
    return tuple(
        SourceGroup(artifact_id, index, name, source_type, tuple(uses))
        for (index, name), (source_type, uses) in sorted(groups.items())
    )
