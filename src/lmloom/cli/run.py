"""`lmloom run`, `recipes` and `stages`: run a recipe and explore what recipes can contain."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from lmloom.cli.common import current_access, err, open_store, out, public, requires
from lmloom.errors import ConfigError


@requires()  # identify the principal; each stage checks its own permissions before it runs
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

    _run_recipe(load_recipe(recipe, set_ or []))


@requires()  # the stage checks its own permission (train) before it runs
def train(
    shards: Annotated[str, typer.Argument(help="Token shards artifact id (a unique prefix is enough).")],
    tokenizer: Annotated[
        str | None,
        typer.Option(
            "--tokenizer", help="Tokenizer artifact [default: the one the shards were encoded with]."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="A train.pretrain config value KEY=VALUE (e.g. max_steps=500, parallel.dp_shard=8, "
            "model.n_layers=8). Values are parsed as YAML. Repeatable.",
        ),
    ] = None,
) -> None:
    """Pre-train a decoder on existing token shards (the train.pretrain stage alone).

    Under `torchrun --nproc_per_node N -m lmloom train SHARDS --set parallel.dp_shard=N` every rank
    trains its part (DDP, FSDP2, tensor and pipeline parallelism; see `parallel.*` in `lmloom stages`).
    Cached and resumable like a recipe step: the same command again reuses or resumes it.
    """
    from lmloom.config import Recipe, apply_override, format_validation_error

    store = open_store()
    shards_id = store.resolve(shards)
    manifest = store.read_manifest(shards_id)
    if manifest.kind != "shards":  # said first: "records no tokenizer" would send the user the wrong way
        raise ConfigError(
            f"artifact {shards_id[:12]} is a {manifest.kind}, not token shards; give the id of a "
            "tokenizer.encode artifact (lmloom artifacts ls)"
        )
    if tokenizer is None:
        tokenizer = manifest.inputs.get("tokenizer")
        if tokenizer is None:
            raise ConfigError(f"artifact {shards_id[:12]} records no tokenizer; pass --tokenizer")
    inputs = {"shards": f"artifact:{shards_id}", "tokenizer": f"artifact:{store.resolve(tokenizer)}"}
    raw = {
        "name": f"train-on-{shards_id[:12]}",
        "description": f"train.pretrain on shards {shards_id[:12]}",
        "stages": {"pretrain": {"stage": "train.pretrain", "inputs": inputs, "config": {}}},
    }
    for override in set_ or []:
        top = override.split("=", 1)[0].split(".")[0]
        apply_override(raw, override if top in Recipe.model_fields else f"pretrain.{override}")
    try:
        from pydantic import ValidationError

        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "", Recipe)) from None
    _run_recipe(recipe)


def _run_recipe(loaded) -> None:
    """Plan, run (on every rank under torchrun), print the summary and write the run report."""
    from rich.console import Console

    from lmloom import distributed
    from lmloom.context import RunContext
    from lmloom.pipeline import plan, run_plan

    steps = plan(loaded)  # every config is validated before anything runs
    w = distributed.init()  # under torchrun: join the group; every rank runs this same plan
    # One voice: ranks other than 0 keep quiet (their errors still reach stderr through the CLI).
    console = err if w.is_main else Console(stderr=True, quiet=True)
    ctx = RunContext(open_store(), console=console, access=current_access())
    launch = f" (rank 0 of {w.size} processes)" if w.is_distributed else ""
    console.print(f"[bold]lmloom run[/bold] {loaded.name}: {loaded.description}{launch}", highlight=False)
    try:
        results = run_plan(steps, ctx)
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted[/yellow]: run the same command again to resume where it stopped")
        raise typer.Exit(130) from None
    finally:
        distributed.shutdown()
    if w.is_main:
        _print_run_summary(results, ctx.store.root)
        from lmloom.monitor.report import write_run_report

        try:  # the run is done and its artifacts are safe: a report problem is a warning, not a failure
            report = write_run_report(results, ctx.store, include_audit=ctx.access.allows("read-audit"))
            out.print(f"Report: [bold]{report}[/bold] (open it in a browser; it needs no network)")
        except Exception as exc:  # noqa: BLE001
            err.print(f"[yellow]warning:[/yellow] the run report could not be written: {exc}")


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
        for sample in r.artifact.read_json("samples.json") if r.artifact.kind == "samples" else []:
            out.rule(f"sample ({r.name})", align="left")
            out.print(sample["prompt"], style="bold", end="", highlight=False, markup=False)
            out.print(sample["completion"], highlight=False, markup=False)
    out.print(f"\nArtifacts are in [bold]{store_root}[/bold] (`lmloom artifacts ls`, `lmloom audit verify`).")


@public
def recipes(name: Annotated[str | None, typer.Argument(help="Show this recipe's YAML.")] = None) -> None:
    """List the built-in recipes with what each does, or print one to copy and edit."""
    from rich.table import Table

    from lmloom.config import builtin_recipes, load_recipe, read_recipe_text

    if name:
        out.print(read_recipe_text(name)[0], highlight=False, markup=False)
        return
    table = Table(
        title="Built-in recipes (lmloom run NAME; lmloom recipes NAME prints one)", title_justify="left"
    )
    table.add_column("name", no_wrap=True)
    table.add_column("what it does", overflow="fold")
    for recipe_name in builtin_recipes():
        table.add_row(recipe_name, load_recipe(recipe_name).description)
    out.print(table)


@public
def stages(
    name: Annotated[
        str | None,
        typer.Argument(help="Show this stage's config keys (e.g. train.pretrain): type, default, meaning."),
    ] = None,
) -> None:
    """List the stages a recipe can use, with their inputs and config keys; `lmloom stages NAME` explains
    every key of one stage, nested blocks as dotted keys (what `--set STEP.KEY=VALUE` takes)."""
    from lmloom.stages import get_stage, stage_names

    if name:
        _print_stage_keys(get_stage(name))
        return
    table = Table()
    for column in ("stage", "makes", "inputs", "config keys", "needs permission", "what it does"):
        table.add_column(column)
    for name in stage_names():
        stage = get_stage(name)
        inputs = ", ".join(f"{role}: {kind}" for role, kind in stage.inputs.items()) or "-"
        if stage.optional_inputs:
            inputs += ", optional " + ", ".join(
                f"{role}: {kind}" for role, kind in stage.optional_inputs.items()
            )
        keys = ", ".join(stage.config.model_fields)
        table.add_row(name, stage.kind, inputs, keys, ", ".join(stage.permissions), stage.description)
    out.print(table)


def _print_stage_keys(stage) -> None:
    table = Table(title=f"{stage.name}: {stage.description}", title_justify="left")
    for column in ("key", "type", "default", "meaning"):
        table.add_column(column, overflow="fold")
    for row in _config_keys(stage.config, stage.config()):
        table.add_row(*(escape(cell) for cell in row))  # defaults like ['*.txt'] are text, not markup
    out.print(table)


def _config_keys(model, instance, prefix: str = ""):
    """(dotted key, type, default, description) of every field, a nested block's fields after it."""
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        value = getattr(instance, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):  # a block: its own keys, with the defaults this stage gives them
            yield key, "block", "", field.description or ""
            yield from _config_keys(type(value), value, f"{key}.")
            continue
        yield key, _type_name(field.annotation), _shown(value), field.description or ""


def _shown(value) -> str:
    """A default as a user would write it in YAML/JSON (`["*.txt"]`, not a Python repr of objects)."""
    import json

    from pydantic_core import to_jsonable_python

    try:
        return json.dumps(to_jsonable_python(value))
    except (TypeError, ValueError):
        return repr(value)


def _type_name(annotation) -> str:
    from typing import Literal, get_args, get_origin

    if get_origin(annotation) is Literal:  # the choices are what a user needs to see
        return " | ".join(str(choice) for choice in get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
