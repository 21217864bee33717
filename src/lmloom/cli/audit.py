"""`lmloom audit show | verify`."""

from __future__ import annotations

import json
import sys
from datetime import date, datetime, time
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from lmloom.cli.common import err, open_store, out, requires
from lmloom.errors import IntegrityError

app = typer.Typer(help="Read and verify the tamper-evident audit log.", no_args_is_help=True)


def _audit():
    from lmloom.security.context import store_audit_log

    return store_audit_log(open_store(create=False).root)


@app.command("verify")
@requires("read-audit")
def audit_verify() -> None:
    """Check the hash chain, the head and the signed head checkpoint; exit 3 naming the first bad entry."""
    log = _audit()
    report = log.verify()
    if not report.ok:
        err.print(f"[red]audit log FAILED[/red] {log.path}: {report.problem}", highlight=False)
        raise typer.Exit(IntegrityError.exit_code)
    signed = log.signed_through()
    signature = (
        f"; signed checkpoint through entry {signed}" if signed is not None else "; no signed checkpoint"
    )
    out.print(
        f"[green]audit log ok[/green]: {report.entries} entries, chain and head intact{signature} ({log.path})"
    )


@app.command("show")
@requires("read-audit")
def audit_show(
    last: Annotated[
        int | None,
        typer.Option(
            min=0, help="Show only the last N matching entries (0 = all) [default: 50, all with --json]"
        ),
    ] = None,
    principal: Annotated[
        str | None, typer.Option(help="Only this principal (`alice` also matches alice@any-host).")
    ] = None,
    event: Annotated[
        str | None, typer.Option(help="Only events starting with this, e.g. `security.` or `stage.end`.")
    ] = None,
    artifact: Annotated[
        str | None, typer.Option(help="Only entries whose artifact, inputs or outputs match this id/prefix.")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            help="Only entries at or after this ISO date/time (UTC unless it has an offset).", callback=_since
        ),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(
            help="Only entries at or before this ISO date/time; a date includes its whole day.",
            callback=_until,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the matching entries as a JSON array, unabridged.")
    ] = False,
) -> None:
    """Print the audit log as a table (newest last), optionally filtered; `audit verify` checks it."""
    from lmloom.security.audit import AuditQuery

    query = AuditQuery(principal, event, artifact, since, until)  # type: ignore[arg-type]  # parsed
    entries = list(query.select(_audit().entries()))
    last = (0 if as_json else 50) if last is None else last
    shown = entries[-last:] if last else entries
    if as_json:
        sys.stdout.write("[\n" + ",\n".join(json.dumps(e, ensure_ascii=False) for e in shown) + "\n]\n")
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("seq", "time (UTC)", "principal", "event", "step", "details"):
        table.add_column(column, no_wrap=column != "details", overflow="fold")
    for e in shown:
        cells = (
            "?" if e.get("seq") is None else str(e["seq"]),
            str(e.get("time", ""))[:19].replace("T", " "),
            str(e.get("principal", "")),
            str(e.get("event", "")),
            str(e.get("step", "")),
            _audit_details(e),
        )
        table.add_row(*(escape(cell) for cell in cells))  # entries hold names users chose: never markup
    out.print(table)
    if len(shown) < len(entries):
        out.print(f"[dim]{len(entries) - len(shown)} earlier entries not shown (--last 0 shows all)[/dim]")


def _parse_time(value: str | None, end_of_day: bool) -> datetime | None:
    if value is None:
        return None
    try:
        if len(value.strip()) == 10:  # a date: the whole day
            day = date.fromisoformat(value.strip())
            return datetime.combine(day, time.max if end_of_day else time.min)
        return datetime.fromisoformat(value.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not an ISO date or date/time (e.g. 2025-05-01 or 2025-05-01T13:30)"
        ) from None


def _since(value: str | None) -> datetime | None:
    return _parse_time(value, end_of_day=False)


def _until(value: str | None) -> datetime | None:
    return _parse_time(value, end_of_day=True)


def _audit_details(e: dict) -> str:
    # str() throughout: an entry edited by hand may hold any JSON type, and must still be shown
    details = []
    if "outcome" in e:
        details.append(str(e["outcome"]) + (f" ({e['error']})" if e.get("error") else ""))
    for key, label in (("inputs", "in "), ("outputs", "out ")):
        refs = e.get(key)
        if refs:
            refs = refs.values() if isinstance(refs, dict) else refs if isinstance(refs, list) else [refs]
            details.append(label + ",".join(str(i)[:8] for i in refs))
    if "seconds" in e:
        seconds = e["seconds"]
        details.append(f"{seconds:.1f}s" if isinstance(seconds, int | float) else f"{seconds}s")
    for key in ("action", "permission", "artifact", "reason", "detail"):  # security events
        if e.get(key):
            details.append(f"{key} {e[key]}")
    return " ".join(details)
