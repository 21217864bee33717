"""The `lmloom` command: parses, loads config, calls one stage or the pipeline. Nothing else lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from lmloom import __version__
from lmloom.errors import IntegrityError, LmloomError

app = typer.Typer(
    help=(
        "lmloom: from raw data to dialogue, with security built into every step.\n\n"
        "Start with `lmloom run`: it trains a small model on your Python installation's own sources "
        "and docs (no download) and prints what it made. Every result is a verified artifact in the "
        "store (--store, or $LMLOOM_HOME, default ~/.lmloom); every stage run is in the audit log."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)
artifacts_app = typer.Typer(help="List, inspect and verify artifacts in the store.", no_args_is_help=True)
audit_app = typer.Typer(help="Read and verify the tamper-evident audit log.", no_args_is_help=True)
app.add_typer(artifacts_app, name="artifacts")
app.add_typer(audit_app, name="audit")

out = Console()
err = Console(stderr=True)


class State:
    store_path: Path | None = None


def _store():
    from lmloom.artifacts.store import ArtifactStore

    return ArtifactStore(State.store_path)


def _version(value: bool) -> None:
    if value:
        out.print(f"lmloom {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    store: Annotated[
        Path | None,
        typer.Option("--store", envvar="LMLOOM_HOME", help="Artifact store directory [default: ~/.lmloom]"),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    State.store_path = store


# -- run ----------------------------------------------------------------------------------------


@app.command()
def run(
    recipe: Annotated[
        str, typer.Argument(help="A recipe YAML file or a built-in recipe name (see `lmloom recipes`).")
    ] = "quickstart",
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="Override a recipe value: STAGE.KEY=VALUE (e.g. pretrain.max_steps=50), or a full "
            "path such as stages.pretrain.config.optim.lr=1e-3. Values are parsed as YAML. Repeatable.",
        ),
    ] = None,
) -> None:
    """Run a recipe: every stage in order, reusing finished ones and resuming an interrupted one.

    With no argument it runs the built-in `quickstart` recipe: Python's standard library ->
    cleaned corpus -> BPE tokenizer -> token shards -> pre-trained decoder -> samples.
    """
    from lmloom.config import load_recipe
    from lmloom.context import RunContext
    from lmloom.pipeline import plan, run_plan

    loaded = load_recipe(recipe, set_ or [])
    steps = plan(loaded)  # every config is validated before anything runs
    ctx = RunContext(_store(), console=err)
    err.print(f"[bold]lmloom run[/bold] {loaded.name}: {loaded.description}", highlight=False)
    try:
        results = run_plan(steps, ctx)
    except KeyboardInterrupt:
        err.print("\n[yellow]interrupted[/yellow]: run the same command again to resume where it stopped")
        raise typer.Exit(130) from None
    _print_run_summary(results, ctx.store.root)


def _print_run_summary(results, store_root: Path) -> None:
    steps = Table(title="Stages", title_justify="left")
    for column in ("step", "stage", "artifact", "status", "seconds"):
        steps.add_column(column)
    for r in results:
        status = "[dim]reused[/dim]" if r.reused else "[green]made[/green]"
        steps.add_row(r.name, r.stage.name, r.artifact.short_id, status, f"{r.seconds:.1f}")
    out.print(steps)

    figures = Table(title="Results", title_justify="left", show_header=False)
    figures.add_column("what", style="bold")
    figures.add_column("value")
    for r in results:
        for label, value in r.stage.summarize(r.artifact.manifest):
            figures.add_row(f"{r.name}: {label}", value)
    out.print(figures)

    for r in results:
        for sample in r.artifact.manifest.metadata.get("samples", []) if r.artifact.kind == "samples" else []:
            out.rule(f"sample ({r.name})", align="left")
            out.print(sample["prompt"], style="bold", end="", highlight=False, markup=False)
            out.print(sample["completion"], highlight=False, markup=False)
    out.print(f"\nArtifacts are in [bold]{store_root}[/bold] (`lmloom artifacts ls`, `lmloom audit verify`).")


@app.command()
def recipes(name: Annotated[str | None, typer.Argument(help="Show this recipe's YAML.")] = None) -> None:
    """List the built-in recipes, or print one to copy and edit."""
    from lmloom.config import builtin_recipes, read_recipe_text

    if name:
        out.print(read_recipe_text(name)[0], highlight=False, markup=False)
        return
    for recipe_name in builtin_recipes():
        out.print(recipe_name)


@app.command()
def stages() -> None:
    """List the stages a recipe can use, with their inputs and config keys."""
    from lmloom.stages import get_stage, stage_names

    table = Table()
    for column in ("stage", "makes", "inputs", "config keys", "what it does"):
        table.add_column(column)
    for name in stage_names():
        stage = get_stage(name)
        inputs = ", ".join(f"{role}: {kind}" for role, kind in stage.inputs.items()) or "-"
        table.add_row(name, stage.kind, inputs, ", ".join(stage.config.model_fields), stage.description)
    out.print(table)


# -- generate -----------------------------------------------------------------------------------


@app.command()
def generate(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint artifact id (a unique prefix is enough).")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")] = "",
    max_tokens: Annotated[int, typer.Option(min=1, help="Maximum new tokens.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy decoding.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(min=1, help="Keep the k most likely tokens.")] = 50,
    top_p: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = 0.95,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
) -> None:
    """Continue a prompt with a trained checkpoint (KV-cached decoding), streaming the text."""
    from lmloom.serve.generate import generate_stream
    from lmloom.serve.loading import load_checkpoint_artifact

    artifact = _store().open(checkpoint)
    model, tokenizer = load_checkpoint_artifact(artifact)
    # Training joins documents with <|eos|>, so an empty prompt starts from it: "a new document".
    prompt_ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    try:
        tokens = generate_stream(
            model,
            prompt_ids,
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            eos_id=tokenizer.eos_id,
        )
    except ValueError as exc:  # e.g. prompt + max tokens longer than the model's context
        raise LmloomError(str(exc)) from None
    out.print(prompt, style="bold", end="", highlight=False, markup=False)
    ids: list[int] = []
    shown = ""
    for token in tokens:
        if token == tokenizer.eos_id:
            break
        ids.append(token)
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.print(text[len(shown) :], end="", highlight=False, markup=False)
            shown = text
    out.print()


# -- artifacts ----------------------------------------------------------------------------------


@artifacts_app.command("ls")
def artifacts_ls(kind: Annotated[str | None, typer.Option(help="Only this kind.")] = None) -> None:
    """List artifacts, newest first."""
    store = _store()
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
                _size(size),
                manifest.principal,
            )
        )
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("created (UTC)", "id", "kind", "stage", "size", "principal"):
        table.add_column(column, no_wrap=column != "principal")
    for row in sorted(rows, reverse=True):
        table.add_row(*row)
    out.print(table)


@artifacts_app.command("show")
def artifacts_show(artifact: Annotated[str, typer.Argument(help="Artifact id or unique prefix.")]) -> None:
    """Print an artifact's manifest: kind, files and hashes, config, inputs, metadata."""
    manifest = _store().read_manifest(artifact)
    out.print_json(json.dumps({"id": manifest.id, **manifest.to_json_dict()}))


@artifacts_app.command("verify")
def artifacts_verify(
    artifact: Annotated[str | None, typer.Argument(help="Artifact id or prefix [default: all]")] = None,
) -> None:
    """Re-hash every file of one artifact (or all) against its manifest; exit 3 on any mismatch."""
    store = _store()
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


@artifacts_app.command("lineage")
def artifacts_lineage(artifact: Annotated[str, typer.Argument(help="Artifact id or unique prefix.")]) -> None:
    """Show what an artifact was made from, down to the raw sources."""
    store = _store()
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


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# -- audit --------------------------------------------------------------------------------------


def _audit():
    from lmloom.security.audit import AuditLog

    return AuditLog(_store().root / "audit.jsonl")


@audit_app.command("verify")
def audit_verify() -> None:
    """Check the hash chain of the whole audit log; exit 3 naming the first bad entry."""
    log = _audit()
    report = log.verify()
    if not report.ok:
        err.print(f"[red]audit log FAILED[/red] {log.path}: {report.problem}", highlight=False)
        raise typer.Exit(IntegrityError.exit_code)
    out.print(f"[green]audit log ok[/green]: {report.entries} entries, chain and head intact ({log.path})")


@audit_app.command("show")
def audit_show(
    last: Annotated[int, typer.Option(help="Show only the last N entries (0 = all).")] = 50,
) -> None:
    """Print the audit log as a table (newest last); `audit verify` checks it."""
    entries = list(_audit().entries())
    shown = entries[-last:] if last else entries
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("seq", "time (UTC)", "principal", "event", "step", "details"):
        table.add_column(column, no_wrap=column != "details", overflow="fold")
    for e in shown:
        table.add_row(
            str(e.get("seq")),
            str(e.get("time", ""))[:19].replace("T", " "),
            str(e.get("principal", "")),
            str(e.get("event", "")),
            str(e.get("step", "")),
            _audit_details(e),
        )
    out.print(table)
    if len(shown) < len(entries):
        out.print(f"[dim]{len(entries) - len(shown)} earlier entries not shown (--last 0 shows all)[/dim]")


def _audit_details(e: dict) -> str:
    details = []
    if "outcome" in e:
        details.append(e["outcome"] + (f" ({e['error']})" if e.get("error") else ""))
    if e.get("inputs"):
        details.append("in " + ",".join(i[:8] for i in e["inputs"]))
    if e.get("outputs"):
        details.append("out " + ",".join(i[:8] for i in e["outputs"]))
    if "seconds" in e:
        details.append(f"{e['seconds']:.1f}s")
    return " ".join(details)


def main() -> None:
    """Entry point: user errors become one red line and an exit code, never a traceback."""
    try:
        app()  # typer reports usage errors itself
    except LmloomError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
