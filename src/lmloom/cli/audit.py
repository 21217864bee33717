"""`lmloom audit show | verify`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich import box
from rich.table import Table

from lmloom.cli.common import err, open_store, out
from lmloom.errors import IntegrityError

app = typer.Typer(help="Read and verify the tamper-evident audit log.", no_args_is_help=True)


def _audit():
    from lmloom.security.audit import AuditLog

    return AuditLog(open_store().root / "audit.jsonl")


@app.command("verify")
def audit_verify() -> None:
    """Check the hash chain of the whole audit log; exit 3 naming the first bad entry."""
    log = _audit()
    report = log.verify()
    if not report.ok:
        err.print(f"[red]audit log FAILED[/red] {log.path}: {report.problem}", highlight=False)
        raise typer.Exit(IntegrityError.exit_code)
    out.print(f"[green]audit log ok[/green]: {report.entries} entries, chain and head intact ({log.path})")


@app.command("show")
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
