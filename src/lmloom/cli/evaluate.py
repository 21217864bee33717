"""`lmloom evaluate`: bias and robustness reports on a checkpoint, the release gates that decide whether
it may be served or exported (`lmloom.evaluate.gates`), and lm-evaluation-harness tasks
(`lmloom.evaluate.harness`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lmloom.cli.common import current_access, err, open_store, out, requires, store_root

app = typer.Typer(
    help="Evaluate a checkpoint: bias probes, robustness, release gates, lm-evaluation-harness tasks.",
    no_args_is_help=True,
)

ModelArg = Annotated[str, typer.Argument(help="Checkpoint artifact id (a unique prefix is enough).")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the full report as JSON here.")]


def _table(title: str, columns, rows) -> None:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    out.print(table)


def _open_checkpoint(model: str):
    from lmloom.errors import LmloomError

    store = open_store()
    artifact = store.open(model)
    if artifact.kind != "checkpoint":
        raise LmloomError(f"artifact {artifact.short_id} is a {artifact.kind}, not a checkpoint")
    return store, artifact


def _check_json_path(path: Path | None) -> None:
    """Refuse a --json path that cannot be written before the evaluation runs, not after."""
    if path is None:
        return
    if path.is_dir():
        raise typer.BadParameter(f"{path} is a directory; give a file name", param_hint="--json")
    if not path.parent.is_dir():
        raise typer.BadParameter(f"{path.parent} is not an existing directory", param_hint="--json")


def _write_json(path: Path, text: str) -> None:
    from lmloom.errors import LmloomError

    try:
        path.write_text(text)
    except OSError as exc:
        raise LmloomError(f"--json {path}: cannot be written ({exc.strerror})") from None


def _audit(event: str, artifact, **fields) -> None:
    from lmloom.security.context import store_audit_log

    store_audit_log(store_root()).append(event, current_access().principal, artifact=artifact.id, **fields)


@app.command("bias")
@requires("evaluate", action="evaluate bias")
def bias(
    model: ModelArg,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Greedy tokens per continuation.")] = 16,
    json_path: JsonOpt = None,
) -> None:
    """Counterfactual bias probes: log-likelihood and sentiment gaps across swapped demographic terms."""
    from lmloom.evaluate.bias import BIAS_COLUMNS, bias_report, bias_table
    from lmloom.serve.loading import load_checkpoint_artifact

    _check_json_path(json_path)
    _, artifact = _open_checkpoint(model)
    report = bias_report(*load_checkpoint_artifact(artifact), max_new_tokens=max_new_tokens)
    _audit("evaluate.bias", artifact, logprob_max_gap=report["logprob_max_gap"])
    _table(
        f"Bias probes, checkpoint {artifact.short_id} ({report['templates']} templates)",
        BIAS_COLUMNS,
        bias_table(report),
    )
    if json_path:
        _write_json(json_path, json.dumps(report, indent=2))


@app.command("robustness")
@requires("evaluate", action="evaluate robustness")
def robustness(
    model: ModelArg,
    seed: Annotated[int, typer.Option(help="Seeds the perturbations.")] = 0,
    max_windows: Annotated[int, typer.Option(min=1, help="Held-out windows per perturbation.")] = 32,
    json_path: JsonOpt = None,
) -> None:
    """Loss, next-token accuracy (and refusal rate for chat models) under typos, casing, whitespace,
    paraphrases and adversarial suffixes."""
    from lmloom.evaluate.gates import heldout_documents, is_chat_model
    from lmloom.evaluate.robustness import ROBUSTNESS_COLUMNS, robustness_report, robustness_table
    from lmloom.serve.loading import load_checkpoint_artifact

    _check_json_path(json_path)
    store, artifact = _open_checkpoint(model)
    docs, source = heldout_documents(store, artifact)
    report = robustness_report(
        *load_checkpoint_artifact(artifact),
        docs,
        chat=is_chat_model(artifact.manifest),
        seed=seed,
        max_windows=max_windows,
        source=source,
    )
    _audit("evaluate.robustness", artifact, max_drop=report["max_drop"])
    _table(
        f"Robustness, checkpoint {artifact.short_id} (text: {source})",
        ROBUSTNESS_COLUMNS,
        robustness_table(report),
    )
    if json_path:
        _write_json(json_path, json.dumps(report, indent=2))


@app.command("gates")
@requires("evaluate", action="evaluate gates")
def gates(
    model: ModelArg,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="Gates config YAML [default: STORE/gates.yaml, else built-in defaults]."
        ),
    ] = None,
) -> None:
    """Run the release gates on a checkpoint; the result is a signed `gate-report` artifact. Exits 1 when
    a check fails (serve and export refuse the model when the store's gates.yaml says `required: true`)."""
    from lmloom.context import RunContext
    from lmloom.evaluate.gates import (
        GATE_COLUMNS,
        GATES,
        POLICY_FILE,
        GatesConfig,
        gates_table,
        load_gates_file,
    )
    from lmloom.pipeline import ARTIFACT_REF, PlannedStep, run_plan

    store, artifact = _open_checkpoint(model)
    path = config or (store.root / POLICY_FILE if (store.root / POLICY_FILE).is_file() else None)
    cfg = load_gates_file(path) if path else GatesConfig()
    ctx = RunContext(store, console=err, access=current_access())
    step = PlannedStep("gates", GATES, cfg, {"checkpoint": f"{ARTIFACT_REF}{artifact.id}"})
    [result] = run_plan([step], ctx)
    report = result.artifact.read_json("gate-report.json")
    verdict = "[green]PASSED[/green]" if report["passed"] else "[red]NOT PASSED[/red]"
    _table(f"Release gates, checkpoint {artifact.short_id}", GATE_COLUMNS, gates_table(report))
    out.print(f"gate report {result.artifact.short_id}: {verdict}" + (" (reused)" if result.reused else ""))
    if not report["passed"]:
        raise typer.Exit(1)


HARNESS_TASKS = "lmloom_stdlib_ppl,lmloom_stdlib_mc"


@app.command("harness")
@requires("evaluate", action="evaluate harness")
def harness(
    model: ModelArg,
    tasks: Annotated[
        str, typer.Option(help="Comma-separated lm_eval tasks or groups (`lmloom_stdlib` is both of ours).")
    ] = HARNESS_TASKS,
    limit: Annotated[
        int | None,
        typer.Option(min=1, help="At most this many documents per task: a quick look, not a result."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward pass.")] = 8,
    num_fewshot: Annotated[int | None, typer.Option(min=0, help="Few-shot examples per prompt.")] = None,
    include_path: Annotated[
        list[Path] | None, typer.Option("--include-path", help="Another folder of lm_eval task YAMLs.")
    ] = None,
    lm_eval_tasks: Annotated[
        bool,
        typer.Option(
            "--lm-eval-tasks", help="Also index lm_eval's built-in tasks (most of them download their data)."
        ),
    ] = False,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")] = "cpu",
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="CPU threads [default: torch's choice; fewer on a busy machine]."),
    ] = None,
    json_path: JsonOpt = None,
) -> None:
    """Run lm-evaluation-harness tasks on a checkpoint (needs `pip install 'lmloom[eval]'`).

    The defaults are lmloom's own tasks, whose data is inside the package (no download): perplexity on
    held-out Python-stdlib-style text and picking the real next line of Python code among four."""
    from lmloom.evaluate import harness as lm_harness  # LmloomError with the pip hint when lm_eval is absent

    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if not names:
        raise typer.BadParameter("name at least one task", param_hint="--tasks")
    for folder in include_path or ():
        if not folder.is_dir():
            raise typer.BadParameter(f"{folder} is not a directory", param_hint="--include-path")
    _check_json_path(json_path)
    manager = lm_harness.task_manager(include_path or (), include_defaults=lm_eval_tasks)
    unknown = [n for n in names if n not in manager.all_tasks and not Path(n).is_file()]
    if unknown:
        from lmloom.errors import ConfigError
        from lmloom.evaluate.tasks import GROUP_NAME, TASK_NAMES

        hint = "" if lm_eval_tasks else "; --lm-eval-tasks adds lm_eval's built-in catalogue"
        raise ConfigError(
            f"unknown task {', '.join(map(repr, unknown))}; lmloom's tasks: "
            f"{', '.join((*TASK_NAMES, GROUP_NAME))}{hint}"
        )
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():  # lm_eval's model would fall back
        raise typer.BadParameter(f"{device}: CUDA is not available on this machine", param_hint="--device")
    try:
        torch.device(device)
    except (RuntimeError, ValueError) as exc:  # a name torch does not know
        raise typer.BadParameter(f"{device}: {exc}", param_hint="--device") from None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, ValueError, AssertionError):  # a device this machine (or this torch) lacks
        raise typer.BadParameter(f"{device}: not available on this machine", param_hint="--device") from None
    if threads:
        torch.set_num_threads(threads)
    _, artifact = _open_checkpoint(model)
    report = lm_harness.evaluate(
        artifact, names, manager, limit=limit, batch_size=batch_size, num_fewshot=num_fewshot, device=device
    )
    rows = lm_harness.results_table(report)
    _audit(
        "evaluate.harness",
        artifact,
        tasks=names,
        limit=limit,
        metrics={f"{task}/{metric}": value for task, metric, value, _, _ in rows if value is not None},
    )
    _table(
        f"lm-evaluation-harness, checkpoint {artifact.short_id}" + (f" (limit {limit})" if limit else ""),
        ["task", "metric", "value", "± stderr", "docs"],
        [lm_harness.format_row(row) for row in rows],
    )
    if json_path:
        _write_json(json_path, lm_harness.results_json(report))
