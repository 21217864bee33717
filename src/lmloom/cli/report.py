"""`lmloom report`: one self-contained HTML file about a run (or an artifact and its lineage)."""

from __future__ import annotations

import os
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
        typer.Option(
            "--out",
            "-o",
            help="The HTML file to write (missing folders are created), e.g. `-o run.html` "
            "[default: STORE/reports/report-TIME-ID.html]",
        ),
    ] = None,
) -> None:
    """Write an HTML report: lineage graph, data and tokenizer statistics, training curves, resources,
    evaluation and gate results, security events and the artifacts with their signatures.

    One file, no network: inline CSS and SVG, and a Content-Security-Policy that forbids any request.
    Every artifact is verified as it is read; one that fails is reported, not read. The security
    section needs the read-audit permission as well (without it, the report says it is left out).
    """
    from lmloom.errors import ConfigError
    from lmloom.monitor.report import write_report

    if out_file is not None:  # checked before the report is built, so a bad path costs nothing
        if out_file.is_dir():
            raise ConfigError(
                f"--out {out_file} is a directory; give a file name, e.g. {out_file / 'report.html'}"
            )
        blocking = next((p for p in out_file.parents if p.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise ConfigError(f"--out {out_file}: {blocking} is a file, not a directory")
        if blocking is not None and not os.access(blocking, os.W_OK):
            raise ConfigError(f"--out {out_file}: you may not write in {blocking}")
    store = open_store(create=False)
    may_read_audit = current_access().allows(Permission.READ_AUDIT)
    path = write_report(store, run_or_artifact, out_file, include_audit=may_read_audit)
    out.print(f"report written to [bold]{path}[/bold]", highlight=False)
