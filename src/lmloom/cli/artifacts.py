"""`lmloom artifacts ls | show | verify | lineage`."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich import box
from rich.table import Table
from rich.tree import Tree

from lmloom.cli.common import err, human_size, open_store, out
from lmloom.errors import IntegrityError

app = typer.Typer(help="List, inspect and verify artifacts in the store.", no_args_is_help=True)


@app.command("ls")
def artifacts_ls(kind: Annotated[str | None, typer.Option(help="Only this kind.")] = None) -> None:
    """List artifacts, newest first."""
    store = open_store()
    rows = []
    for artifact_id in store.ids():
        try:
            manifest = store.read_manifest(artifact_id)
        except IntegrityError as exc:
            rows.append(("", artifact_id[:12], "?", "?", f"[red]{exc}[/red]", ""))
            continue
        if kind and manifest.kind != kind:
            continue
        size = sum(f.size for f in manifest.files.values())
        rows.append(
            (
                manifest.created[:16].replace("T", " "),
                artifact_id[:12],
                manifest.kind,
                manifest.stage,
                human_size(size),
                manifest.principal,
            )
        )
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("created (UTC)", "id", "kind", "stage", "size", "principal"):
        table.add_column(column, no_wrap=column != "principal")
    for row in sorted(rows, reverse=True):
        table.add_row(*row)
    out.print(table)


@app.command("show")
def artifacts_show(artifact: Annotated[str, typer.Argument(help="Artifact id or unique prefix.")]) -> None:
    """Print an artifact's manifest: kind, files and hashes, config, inputs, metadata."""
    manifest = open_store().read_manifest(artifact)
    out.print_json(json.dumps({"id": manifest.id, **manifest.to_json_dict()}))


@app.command("verify")
def artifacts_verify(
    artifact: Annotated[str | None, typer.Argument(help="Artifact id or prefix [default: all]")] = None,
) -> None:
    """Re-hash every file of one artifact (or all) against its manifest; exit 3 on any mismatch."""
    store = open_store()
    ids = [store.resolve(artifact)] if artifact else store.ids()
    failures = 0
    for artifact_id in ids:
        try:
            verified = store.open(artifact_id)
            out.print(
                f"[green]ok[/green]   {artifact_id[:12]}  {verified.kind}  ({len(verified.manifest.files)} files)"
            )
        except IntegrityError as exc:
            failures += 1
            out.print(f"[red]FAIL[/red] {exc}", highlight=False)
    if failures:
        err.print(f"[red]{failures} of {len(ids)} artifacts failed verification[/red]")
        raise typer.Exit(IntegrityError.exit_code)
    out.print(f"{len(ids)} artifacts verified")


@app.command("lineage")
def artifacts_lineage(artifact: Annotated[str, typer.Argument(help="Artifact id or unique prefix.")]) -> None:
    """Show what an artifact was made from, down to the raw sources."""
    store = open_store()
    nodes: list[Tree] = []
    root: Tree | None = None
    for depth, role, artifact_id, manifest in store.lineage(artifact):
        named = f"[cyan]{role}:[/cyan] " if role and role != manifest.kind else ""
        created = manifest.created[:16].replace("T", " ")
        label = (
            f"{named}[bold]{manifest.kind}[/bold] {artifact_id[:12]}  [dim]{manifest.stage}  {created}[/dim]"
        )
        if depth == 0:
            root = Tree(label)
            nodes = [root]
        else:
            nodes = nodes[:depth]
            nodes.append(nodes[-1].add(label))
    out.print(root)
