"""The `lmloom` command: parses, loads config, calls one stage or the pipeline. Nothing else lives here.

One module per command group; this file only assembles them and turns user errors into one line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from lmloom import __version__
from lmloom.cli import artifacts, audit, data, generate, keys, policy, run, signing
from lmloom.cli import evaluate as evaluate_cli
from lmloom.cli import export as export_cli
from lmloom.cli import report as report_cli
from lmloom.cli import serve as serve_cli
from lmloom.cli import sweep as sweep_cli
from lmloom.cli import tune as tune_cli
from lmloom.cli.common import State, err, out
from lmloom.errors import LmloomError

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
app.add_typer(artifacts.app, name="artifacts")
app.add_typer(audit.app, name="audit")
app.add_typer(evaluate_cli.app, name="evaluate")
app.add_typer(data.app, name="data")
app.add_typer(keys.app, name="keys")
app.add_typer(policy.app, name="policy")
app.add_typer(signing.signing_app, name="signing")
app.add_typer(signing.trust_app, name="trust")
artifacts.app.command("sign")(signing.artifacts_sign)
app.command()(run.run)
app.command()(run.train)
app.command()(run.recipes)
app.command()(run.stages)
app.command()(sweep_cli.sweep)
app.command()(generate.generate)
app.command()(serve_cli.serve)
app.add_typer(tune_cli.tune_app, name="tune")
app.add_typer(tune_cli.align_app, name="align")
app.command()(tune_cli.chat)
app.command()(report_cli.report)
app.command("export")(export_cli.export)


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
    State.access = None  # resolved afresh for each invocation (tests run several in one process)


def main() -> None:
    """Entry point: user errors become one red line and an exit code, never a traceback."""
    try:
        app()  # typer reports usage errors itself
    except LmloomError as exc:
        # escaped: messages quote what the user typed (ids, names, paths), which is never markup
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
