"""`lmloom sweep`: hyperparameter search over a recipe with Optuna; every trial is a normal run."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from lmloom.cli.common import current_access, err, open_store, out, requires


@requires()  # each trial's stages check their own permissions, as in `lmloom run`
def sweep(
    recipe: Annotated[
        str, typer.Argument(help="A recipe YAML file or a built-in recipe name (see `lmloom recipes`).")
    ] = "quickstart",
    space: Annotated[
        str,
        typer.Option(
            "--space",
            help="The search-space YAML file (format below), or a built-in one: quickstart-pretrain.",
        ),
    ] = ...,  # type: ignore[assignment]
    trials: Annotated[
        int | None,
        typer.Option("--trials", min=1, help="Finished trials the study should have [default: the space's]."),
    ] = None,
    study: Annotated[
        str | None,
        typer.Option(
            "--study",
            help="Study name [default: RECIPE-SPACE, or SPACE if it starts with RECIPE]; files in STORE/sweeps/NAME/.",
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", min=1, help="Start no new trial after this many seconds."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue the study of this name (an interrupted trial runs again)."),
    ] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", "-s", help="Override a recipe value for every trial, as in `lmloom run`. Repeatable."
        ),
    ] = None,
) -> None:
    """Search hyperparameters of a recipe with Optuna, pruning unpromising trials early.

    Each trial is the recipe with the values Optuna picks, run as a normal run in the store: the
    objective's step and the steps it needs (nothing after it). Data and tokenizer steps are reused
    from the cache; every trial's model is a verified artifact with lineage and audit entries. A
    pruned trial stops at a validation pass and leaves no artifact. Ends with a table of the trials
    (best marked) and writes `sweep.json` and `sweep.html` (plots, no network) to
    `<store>/sweeps/STUDY/`. Example:

        lmloom sweep quickstart --space quickstart-pretrain --trials 8

    The space file (YAML); keys are dotted recipe paths as `--set` takes them
    (`pretrain.optim.lr` = `stages.pretrain.config.optim.lr`):

        objective: {step: pretrain, metric: val_loss, direction: minimize}
        trials: 8
        set: {pretrain.max_steps: 120, pretrain.eval_every: 20}   # fixed for every trial
        params:
          pretrain.optim.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
          pretrain.optim.warmup_steps: {type: int, low: 0, high: 40, step: 10}
          pretrain.model.d_model: {type: categorical, choices: [128, 256]}
        enqueue: [{pretrain.optim.lr: 1.0e-3}]   # optional: trials to run first
        pruner: {type: median, n_startup_trials: 2, n_warmup_steps: 20}   # or percentile, none
        sampler: {type: tpe, seed: 0}   # or random
        timeout_s: 1800                 # optional

    `objective.step` defaults to the recipe's first train.* step and `metric` to val_loss (the
    step's final validation loss; its periodic validation passes are what pruning sees, every
    `eval_every` steps). Interrupted? The same command with `--resume` continues the study.
    """
    from lmloom.config import load_recipe
    from lmloom.context import RunContext
    from lmloom.sweep import check_space, load_space, run_sweep, short_key

    loaded = load_recipe(recipe, set_ or [])
    space_model, where = load_space(space)
    plan = check_space(loaded, space_model, where)  # every key and value is checked before anything runs
    stem = _stem(space)
    name = study or (stem if stem.startswith(loaded.name) else f"{loaded.name}-{stem}")
    ctx = RunContext(open_store(), console=err, access=current_access())
    total = trials or space_model.trials
    err.print(
        f"[bold]lmloom sweep[/bold] {name}: {total} trials of recipe {loaded.name}, "
        f"{space_model.objective.direction} {space_model.objective.metric} of step {plan.target} "
        f"(runs {', '.join(plan.steps)}; pruner {space_model.pruner.type})",
        highlight=False,
    )
    try:
        result = run_sweep(plan, ctx, study=name, trials=trials, timeout_s=timeout, resume=resume)
    except KeyboardInterrupt:
        sets = " (with the same --set options)" if set_ else ""
        err.print(
            f"\n[yellow]interrupted[/yellow]: `lmloom sweep {recipe} --space {space} --study {name} --resume`"
            f"{sets} continues it (the interrupted trial runs again from its last checkpoint)",
            highlight=False,
        )
        raise typer.Exit(130) from None
    out.print(summary_table(result))
    best = next((t for t in result.trials if t.number == result.best), None)
    if best is not None:
        shown = ", ".join(f"{short_key(k)}={_fmt(v)}" for k, v in best.params.items())
        out.print(
            f"Best: trial {best.number}, {result.objective['metric']} {best.value:.4f} ({shown}); "
            f"artifact [bold]{best.artifact}[/bold]",
            highlight=False,
        )
        values = " ".join(f"--set {k}={v}" for k, v in best.params.items())
        out.print(f"Its values at the recipe's own length: lmloom run {recipe} {values}", highlight=False)
    out.print(f"Summary: {result.json_path}\nPlots: [bold]{result.html_path}[/bold] (needs no network)")
    if best is None:
        raise typer.Exit(1)


def _stem(space: str) -> str:
    from pathlib import Path

    return Path(space).stem if space.endswith((".yaml", ".yml")) else space


def summary_table(result) -> Table:
    """The trials: state, values, objective, steps, seconds and artifact; the best one highlighted."""
    from lmloom.sweep import short_key

    metric = result.objective["metric"]
    keys = list(dict.fromkeys(k for t in result.trials for k in t.params))
    table = Table(
        title=f"Sweep {result.study}: {result.objective['direction']} {metric} of step "
        f"{result.objective['step']}",
        title_justify="left",
    )
    table.add_column("trial", justify="right")
    table.add_column("state")
    for key in keys:
        table.add_column(short_key(key), justify="right")
    for column in (metric, "steps", "seconds"):
        table.add_column(column, justify="right")
    table.add_column("artifact")
    notes = any(t.error for t in result.trials)
    if notes:
        table.add_column("note", overflow="fold", max_width=48)
    colours = {"complete": "green", "pruned": "yellow", "failed": "red"}
    for t in result.trials:
        best = t.number == result.best
        state = f"[{colours.get(t.state, 'dim')}]{t.state}[/]"
        steps = f"{t.steps}/{t.max_steps}" if t.steps is not None and t.max_steps else str(t.steps or "")
        table.add_row(
            f"★ {t.number}" if best else str(t.number),
            state,
            *(_fmt(t.params.get(k)) for k in keys),
            f"{t.value:.4f}" if t.value is not None else "",
            steps,
            f"{t.seconds:.0f}" if t.seconds is not None else "",
            (t.artifact or "")[:12] + (" (reused)" if t.reused else ""),
            *([t.error or ""] if notes else []),
            style="bold" if best else None,
        )
    return table


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)
