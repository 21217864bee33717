"""`lmloom artifacts ls | show | verify | lineage`."""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from lmloom.cli.common import err, human_size, open_store, out, requires
from lmloom.errors import IntegrityError, LmloomError, SecurityError


class LineageFormat(str, Enum):  # an Enum, not Literal: older typer releases only know Enum choices
    text = "text"
    json = "json"
    dot = "dot"


app = typer.Typer(help="List, inspect and verify artifacts in the store.", no_args_is_help=True)


@app.command("ls")
@requires("read-artifacts")
def artifacts_ls(
    kind: Annotated[
        str | None,
        typer.Option(
            help="Only artifacts of this kind, e.g. corpus, tokenizer, shards, checkpoint, hf-model."
        ),
    ] = None,
) -> None:
    """List artifacts, newest first."""
    store = open_store(create=False)
    rows = []
    for artifact_id in store.ids():
        try:
            manifest = store.read_manifest(artifact_id)
        except IntegrityError as exc:
            # in the last column, which wraps: the message must not squeeze the others
            rows.append(("", artifact_id[:12], "?", "?", "", f"[red]{escape(str(exc))}[/red]"))
            continue
        if kind and manifest.kind != kind:
            continue
        size = sum(f.size for f in manifest.files.values())
        rows.append(
            (
                escape(manifest.created[:16].replace("T", " ")),
                artifact_id[:12],
                escape(manifest.kind),
                escape(manifest.stage),
                human_size(size),
                escape(manifest.principal),
            )
        )
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("created (UTC)", "id", "kind", "stage", "size", "principal"):
        table.add_column(column, no_wrap=column != "principal")
    for row in sorted(rows, reverse=True):
        table.add_row(*row)
    out.print(table)


@app.command("show")
@requires("read-artifacts")
def artifacts_show(artifact: Annotated[str, typer.Argument(help="Artifact id or unique prefix.")]) -> None:
    """Print an artifact's manifest: kind, files and hashes, config, inputs, metadata."""
    manifest = open_store(create=False).read_manifest(artifact)
    out.print_json(json.dumps({"id": manifest.id, **manifest.to_json_dict()}))


@app.command("verify")
@requires("read-artifacts")
def artifacts_verify(
    artifact: Annotated[str | None, typer.Argument(help="Artifact id or prefix [default: all]")] = None,
) -> None:
    """Re-hash every file of one artifact (or all) against its manifest and check its signatures.

    Prints who signed each artifact (or unsigned / untrusted). Exit 3 on any hash mismatch, else 4 on
    a bad signature (or, when signatures are required, an unsigned or untrusted artifact).
    """
    store = open_store(create=False)
    ids = [store.resolve(artifact)] if artifact else store.ids()
    failures: list[LmloomError] = []
    for artifact_id in ids:
        try:
            verified = store.open(artifact_id)  # hashes, then the signature policy (refusals audited)
        except (IntegrityError, SecurityError) as exc:
            failures.append(exc)
            # a key error (e.g. no KEK) does not name the artifact: every FAIL line must
            named = str(exc) if artifact_id[:12] in str(exc) else f"artifact {artifact_id[:12]}: {exc}"
            out.print(f"[red]FAIL[/red] {escape(named)}", highlight=False)
            continue
        signatures = store.security.signing.report(verified).describe()
        out.print(
            f"[green]ok[/green]   {artifact_id[:12]}  {verified.kind}  ({len(verified.manifest.files)} files)"
            f"  {signatures}",
            highlight=False,
        )
    if failures:
        err.print(f"[red]{len(failures)} of {len(ids)} artifacts failed verification[/red]")
        hashes_failed = any(isinstance(exc, IntegrityError) for exc in failures)
        raise typer.Exit(IntegrityError.exit_code if hashes_failed else SecurityError.exit_code)
    out.print(f"{len(ids)} artifacts verified")


@app.command("lineage")
@requires("read-artifacts")
def artifacts_lineage(
    artifact: Annotated[str, typer.Argument(help="Artifact id or unique prefix.")],
    format_: Annotated[
        LineageFormat,
        typer.Option(
            "--format",
            "-f",
            help="text: a tree; json: a graph of artifact, source and file nodes with edges; "
            "dot: Graphviz (`... --format dot | dot -Tsvg > lineage.svg`).",
        ),
    ] = LineageFormat.text,
    files: Annotated[
        bool | None,
        typer.Option(
            "--files/--no-files",
            help="--files: list every source file (text otherwise shows the first few of a large "
            "source); --no-files: sources only, in every format.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Show what an artifact was made from, down to every source file (path and sha256) that fed it.

    Source records are read through the store, so a tampered or undecryptable record is refused.
    """
    import sys

    from lmloom.artifacts.lineage import build_lineage

    lineage = build_lineage(open_store(create=False), artifact)
    if format_ is LineageFormat.json:
        sys.stdout.write(json.dumps(lineage.to_json(files=files is not False), indent=2) + "\n")
    elif format_ is LineageFormat.dot:
        sys.stdout.write(lineage.to_dot(files=files is not False))
    else:
        for line in _lineage_text(lineage, files):
            out.print(line, highlight=False, soft_wrap=True)


_FILES_SHOWN = 5  # a source with more than _FILES_SUMMARISED_OVER files shows this many unless --files
_FILES_SUMMARISED_OVER = 20


def _lineage_text(lineage, files: bool | None) -> list[str]:
    """The lineage as a tree: each artifact's inputs, and under each corpus its sources and files."""
    from rich.markup import escape

    def size(n: int | None) -> str:
        return human_size(n) if n is not None else "?"

    def file_items(group) -> list[tuple[str, list]]:
        uses = sorted(group.files, key=lambda use: use.relpath)
        shown = uses if files or len(uses) <= _FILES_SUMMARISED_OVER else uses[:_FILES_SHOWN]
        items = []
        for use in shown:
            f = use.file
            if f.sha256 is None:
                items.append(
                    (f"[red]unreadable[/red]  {escape(f.path)}  [dim]{escape(use.error or '')}[/dim]", [])
                )
            else:
                items.append((f"{f.sha256}  {escape(f.path)}  [dim]{size(f.size)}[/dim]", []))
        if len(shown) < len(uses):
            more = len(uses) - len(shown)
            items.append((f"[dim]… and {more:,} more files (--files lists them all)[/dim]", []))
        return items

    root: tuple[str, list] | None = None
    stack: list[list] = []
    for depth, role, node, first in lineage.walk():
        named = f"[cyan]{escape(role)}:[/cyan] " if role and role != node.kind else ""
        created = node.created[:16].replace("T", " ")
        label = (
            f"{named}[bold]{escape(node.kind)}[/bold] {node.id[:12]}  "
            f"[dim]{escape(node.stage)}  {created}  {escape(node.principal)}[/dim]"
        )
        children: list = []
        if not first:
            label += "  [dim](shown above)[/dim]"
        elif node.sources is not None:
            for group in node.sources:
                summary = f"{len(group.files):,} files, {size(group.bytes)}, digest {group.digest}"
                grandchildren = file_items(group) if files is not False else []
                children.append(
                    (f"[magenta]source[/magenta] {escape(group.name)}  [dim]{summary}[/dim]", grandchildren)
                )
        elif not node.inputs:
            children.append(("[dim](no source files recorded)[/dim]", []))
        item = (label, children)
        if depth == 0:
            root, stack = item, [children]
        else:
            stack = stack[:depth]
            stack[-1].append(item)
            stack.append(children)
    lines = [root[0], *_branches(root[1], "")] if root else []
    count = len(lineage.source_files())
    artifacts = len(lineage.artifacts)
    lines.append(f"[dim]{artifacts} artifact{'s' if artifacts != 1 else ''}, {count:,} source files[/dim]")
    return lines


def _branches(items: list[tuple[str, list]], prefix: str) -> list[str]:
    lines = []
    for i, (label, children) in enumerate(items):
        last = i == len(items) - 1
        lines.append(f"[dim]{prefix}{'└── ' if last else '├── '}[/dim]{label}")
        lines.extend(_branches(children, prefix + ("    " if last else "│   ")))
    return lines
