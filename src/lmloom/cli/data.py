"""`lmloom data`: what a corpus went through (per-step statistics), the steps a recipe can use, and
copying a corpus out of the store."""

from __future__ import annotations

import json
from collections import Counter
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from lmloom.cli.common import open_store, out, public, requires

app = typer.Typer(
    help="Corpora: per-step statistics, the data steps a recipe can list, export to a URL.",
    no_args_is_help=True,
)


@app.command("stats")
@requires("read-artifacts")
def data_stats(
    artifact: Annotated[str, typer.Argument(help="Corpus artifact id or unique prefix.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the statistics as JSON.")] = False,
) -> None:
    """Per-step table of a corpus: documents and bytes in and out, removed and rewritten, seconds,
    and the reasons. Every document behind these counts is listed in the corpus's removed.jsonl and
    edited.jsonl (`lmloom artifacts show ID` names the files)."""
    from lmloom.errors import ConfigError

    manifest = open_store().read_manifest(artifact)
    if manifest.kind != "corpus":
        raise ConfigError(f"{manifest.id[:12]} is a {manifest.kind}, not a corpus")
    meta = manifest.metadata
    if json_out:
        out.print_json(json.dumps({key: meta.get(key) for key in ("documents", "bytes", "rejects", "steps")}))
        return
    out.print(step_table(meta["steps"]))
    docs, rejects = meta["documents"], meta["rejects"]
    out.print(
        f"read {docs['read']:,} documents, kept {docs['kept']:,} (train {docs['train']:,} / val "
        f"{docs['val']:,}); source records rejected: {rejects['total']:,}"
        + (f" ({_counts(rejects['by_reason'])})" if rejects["total"] else ""),
        highlight=False,
    )
    for extra in ("mixture", "poisoning"):
        if meta.get(extra):
            out.print(f"{extra}: {json.dumps(meta[extra])[:2000]}", highlight=False, markup=False)


def step_table(steps: list[dict[str, Any]]) -> Table:
    table = Table(title="Steps", title_justify="left")
    for name in (
        "step",
        "in",
        "out",
        "removed",
        "rewritten",
        "MB in",
        "MB out",
        "seconds",
        "docs/s",
        "reasons",
    ):
        numeric = name not in ("step", "reasons")
        table.add_column(name, justify="right" if numeric else "left", overflow="fold")
    for step in steps:
        removed = sum(step["removed"].values())
        rate = step["docs_in"] / step["seconds"] if step["seconds"] else 0.0
        reasons = Counter(step["removed"]).most_common(4)
        table.add_row(
            step["name"],
            f"{step['docs_in']:,}",
            f"{step['docs_out']:,}",
            f"{removed:,}",
            f"{step['modified']:,}",
            f"{step['bytes_in'] / 1e6:,.1f}",
            f"{step['bytes_out'] / 1e6:,.1f}",
            f"{step['seconds']:,.2f}",
            f"{rate:,.0f}" if rate else "-",
            ", ".join(f"{reason} {n:,}" for reason, n in reasons)
            + (" …" if len(step["removed"]) > 4 else ""),
        )
    return table


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} {n:,}" for reason, n in counts.items())


@app.command("steps")
@public
def data_steps() -> None:
    """The step types `data.prepare` can list under `steps:`, with their config keys and defaults."""
    from lmloom.data.step_registry import STEP_CONFIGS

    table = Table(title="data.prepare steps", title_justify="left")
    for name in ("type", "what it does", "config keys (default)"):
        table.add_column(name, overflow="fold")
    for cls in sorted(STEP_CONFIGS, key=lambda c: c.model_fields["type"].default):
        keys = ", ".join(
            _key_with_default(name, field.get_default(call_default_factory=True))
            for name, field in cls.model_fields.items()
            if name != "type" and not field.is_required()
        )
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        table.add_row(cls.model_fields["type"].default, escape(doc), escape(keys))
    out.print(table)
    out.print(
        "Use them in a recipe: `steps: [{type: language, keep: [en]}, {type: pii}]`; every step also "
        "takes `kinds: [prose]` to apply only to some document kinds. Order: fix_text and markup run "
        "first, then normalisation; min_chars and exact dedup come before the first whole-corpus step "
        "(near_dedup, paragraph_dedup); otherwise steps run in the order listed.",
        highlight=False,
        markup=False,
    )


def _key_with_default(name: str, default: Any) -> str:
    if default is None or default == [] or default == {}:
        return name
    if hasattr(default, "model_dump"):
        default = default.model_dump()
    return f"{name} ({default!r})"


@app.command("export")
@requires("export")
def data_export(
    artifact: Annotated[str, typer.Argument(help="Corpus artifact id or unique prefix.")],
    url: Annotated[str, typer.Argument(help="A directory or fsspec URL prefix, e.g. s3://bucket/corpus/v1")],
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            "-o",
            help="A storage option KEY=VALUE (parsed as YAML), e.g. -o endpoint_url=http://127.0.0.1:9000; "
            "secrets only as ${env:NAME}. Repeatable.",
        ),
    ] = None,
) -> None:
    """Copy a corpus's train.jsonl and val.jsonl (decrypted) out of the store to a directory or URL,
    and print each copy's sha256. The export is an audit entry (who, which corpus, where, digests)."""
    import yaml

    from lmloom.cli.common import current_access
    from lmloom.data.sinks import export_corpus
    from lmloom.errors import ConfigError
    from lmloom.security.context import store_audit_log

    options: dict[str, Any] = {}
    for item in option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE")
        try:
            options[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
            raise ConfigError(f"--option {item!r}: the value is not valid YAML ({problem})") from None
    store = open_store()
    corpus = store.open(artifact)
    if corpus.kind != "corpus":
        raise ConfigError(f"{corpus.short_id} is a {corpus.kind}, not a corpus")
    written = export_corpus(corpus, url, options)
    store_audit_log(store.root).append(
        "data.export",
        current_access().principal,
        artifact=corpus.id,
        destination=url,
        files=[item.to_json() for item in written],
    )
    for item in written:
        out.print(f"{item.url}  {item.size:,} bytes  sha256 {item.sha256}", highlight=False, markup=False)
