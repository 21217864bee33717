"""`lmloom report`: one self-contained HTML file about a run (or an artifact and its lineage)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmloom.cli.common import current_access, open_store, out, requires
from lmloom.security.policy import Permission


@requires(Permission.READ_ARTIFACTS)
def report(
    run_or_artifact: Annotated[
        str | None,
        typer.Argument(
            help="`latest` (the default: the last `lmloom run`), or an artifact id or prefix: that "
            "artifact and everything it was made from.",
        ),
    ] = None,
    out_file: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Where to write [default: STORE/reports/report-TIME-ID.html]"),
    ] = None,
) -> None:
    """Write an HTML report: lineage graph, data and tokenizer statistics, training curves, resources,
    evaluation and gate results, security events and the artifacts with their signatures.

    One file, no network: inline CSS and SVG, and a Content-Security-Policy that forbids any request.
    Every artifact is verified as it is read; one that fails is reported, not read. The security
    section needs the read-audit permission as well (without it, the report says it is left out).
    """
    from lmloom.monitor.report import write_report

    store = open_store()
    may_read_audit = current_access().allows(Permission.READ_AUDIT)
    path = write_report(store, run_or_artifact, out_file, include_audit=may_read_audit)
    out.print(f"report written to [bold]{path}[/bold]", highlight=False)
