"""The run report: one self-contained HTML file about a pipeline run, readable anywhere, offline.

Everything is inline (CSS, SVG plots; no script, no font, no image fetched from anywhere) and a
Content-Security-Policy forbids the page any request at all, so the file can be mailed, archived next
to a model card or opened on an air-gapped machine. Every value in it comes from the store, read the
way lmloom reads anything: manifests checked against their ids, files through `store.open` (hashes,
signatures, decryption). An artifact that fails verification is reported as such and its files are
not read. Text from artifacts (paths, samples, metadata) is escaped, never interpreted.

What a run is: the artifacts the last `lmloom run` made or reused (its `stage.end` / `stage.reuse`
audit entries: a run is the newest stretch of stage entries in which no step appears twice), or a
given artifact and everything in its lineage. Sections: the pipeline as a lineage graph, the steps,
data statistics per cleaning step, tokenizer and shard statistics, training curves (loss, validation
loss, learning rate, gradient norm, throughput, update ratio) and training events, resource plots,
evaluation / gate results (any other artifact kind, its metadata rendered generically), samples,
security events from the audit log, and the artifacts with their verification and signatures.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmloom.artifacts.atomic import write_text_atomic
from lmloom.artifacts.store import ArtifactStore
from lmloom.errors import LmloomError

METRICS_FILE = "metrics.jsonl"
RESOURCES_FILE = "resources.jsonl"
PIPELINE_KINDS = ("corpus", "tokenizer", "shards", "checkpoint", "reward-model", "samples")
SECURITY_WORDS = ("denied", "refused", "fail", "override", "injection", "blocked", "tamper", "untrusted")
MAX_AUDIT_ROWS = 300
MAX_POINTS = 2000  # per series: longer runs are thinned evenly (first and last kept)
_HEX_ID = re.compile(r"[0-9a-f]{64}")
PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f")


# -- what the report is about --------------------------------------------------------------------
@dataclass
class StepInfo:
    name: str
    stage: str
    status: str  # made | reused | error | interrupted
    seconds: float | None = None
    artifact: str | None = None
    error: str | None = None


@dataclass
class ArtifactInfo:
    id: str
    kind: str
    stage: str
    created: str
    principal: str
    inputs: dict[str, str]
    metadata: dict[str, Any]
    files: dict[str, int]  # name -> size
    encrypted: bool
    step: str | None = None  # the recipe step that made it in this run, if it was
    in_run: bool = True  # False: an ancestor from an earlier run
    verified: bool = False
    problem: str | None = None  # why verification failed (files then left unread)
    signature: str = "unknown"  # unsigned | trusted | untrusted | bad | unknown
    signature_detail: str = ""
    metrics: list[dict[str, Any]] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)
    json_files: dict[str, Any] = field(default_factory=dict)

    @property
    def short(self) -> str:
        return self.id[:12]


@dataclass
class RunData:
    title: str
    store_root: Path
    steps: list[StepInfo]
    artifacts: dict[str, ArtifactInfo]  # pipeline order (inputs first)
    audit: list[dict[str, Any]] | None  # None: not readable by this principal
    audit_status: str = ""
    audit_counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    since: str | None = None


def _audit_log(store: ArtifactStore):
    from lmloom.security.context import store_audit_log

    return store_audit_log(store.root)


def latest_run_steps(entries: Sequence[dict[str, Any]]) -> tuple[list[StepInfo], str | None]:
    """The steps of the newest run in the audit log, and the time its first entry was written.

    Walking back from the end, stage entries belong to the newest run until a step name comes up a
    second time (that is the run before it). Entries of other kinds in between are skipped.
    """
    ends: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    since = None
    for entry in reversed(entries):
        event = entry.get("event", "")
        if event not in ("stage.end", "stage.reuse", "stage.start"):
            continue
        step = str(entry.get("step", ""))
        if event == "stage.start":
            if step in ends and ends[step].get("event") == "stage.end":
                since = entry.get("time", since)
                continue
            if step not in ends:  # started, never ended: still running, or killed
                ends[step] = {**entry, "outcome": "interrupted"}
                order.append(step)
                since = entry.get("time", since)
                continue
            break
        if step in ends:
            break
        ends[step] = entry
        order.append(step)
        since = entry.get("time", since)
    steps = []
    for step in reversed(order):
        entry = ends[step]
        outputs = entry.get("outputs") or []
        if entry["event"] == "stage.reuse":
            status = "reused"
        elif entry.get("outcome", "ok") == "ok":
            status = "made"
        else:
            status = str(entry.get("outcome"))
        steps.append(
            StepInfo(
                step,
                str(entry.get("stage", "")),
                status,
                entry.get("seconds"),
                outputs[0] if outputs else None,
                entry.get("error"),
            )
        )
    return steps, since


def collect(
    store: ArtifactStore,
    ref: str | None = None,
    *,
    steps: list[StepInfo] | None = None,
    include_audit: bool = True,
) -> RunData:
    """Gather what the report shows. `ref`: an artifact id or prefix (its lineage); else `steps`
    (e.g. from `lmloom run`'s results); else the latest run in the audit log."""
    notes: list[str] = []
    entries = list(_audit_log(store).entries()) if include_audit else None
    since = None
    if ref is not None and ref != "latest":
        root = store.resolve(ref)
        manifest = store.read_manifest(root)
        steps = steps or []
        title = f"{manifest.kind} {root[:12]} and its lineage"
        roots = [root]
    else:
        if steps is None:
            if entries is None:
                newest = _newest_artifact(store)
                if newest is None:
                    raise LmloomError(f"store {store.root} holds no artifacts to report on")
                notes.append(
                    "The audit log is not readable by this principal (read-audit), so the run is the "
                    "newest artifact and its lineage, and there is no security section."
                )
                return _with_notes(collect(store, newest, include_audit=False), notes)
            steps, since = latest_run_steps(entries)
            if not steps:
                raise LmloomError(f"the audit log of {store.root} records no run yet; run `lmloom run` first")
        title = "run: " + " → ".join(s.name for s in steps)
        roots = [s.artifact for s in steps if s.artifact]
        if since is None and entries:  # steps given by `lmloom run`, which just wrote the newest run
            since = latest_run_steps(entries)[1] or _first_time_of(entries, roots)
    artifacts = _gather_artifacts(store, roots, steps)
    if since is None and artifacts:  # an artifact's lineage: security events since the oldest was made
        since = min((a.created for a in artifacts.values() if a.created), default=None)
    data = RunData(title, Path(store.root), steps, artifacts, None, notes=notes, since=since)
    if entries is not None:  # read again: opening the artifacts may have audited a refused read
        entries = list(_audit_log(store).entries())
        data.audit, data.audit_counts = _security_entries(entries, since)
        report = _audit_log(store).verify()
        data.audit_status = (
            f"chain intact ({report.entries} entries)" if report.ok else f"FAILED: {report.problem}"
        )
    return data


def _with_notes(data: RunData, notes: list[str]) -> RunData:
    data.notes[:0] = notes
    return data


def _newest_artifact(store: ArtifactStore) -> str | None:
    newest = None
    for artifact_id in store.ids():
        try:
            created = store.read_manifest(artifact_id).created
        except LmloomError:
            continue
        if newest is None or created > newest[0]:
            newest = (created, artifact_id)
    return newest[1] if newest else None


def _first_time_of(entries: list[dict[str, Any]], ids: list[str]) -> str | None:
    wanted = set(ids)
    for entry in entries:
        if wanted & set(entry.get("outputs") or ()):
            return entry.get("time")
    return None


def _gather_artifacts(
    store: ArtifactStore, roots: Iterable[str], steps: list[StepInfo]
) -> dict[str, ArtifactInfo]:
    step_of = {s.artifact: s.name for s in steps if s.artifact}
    ordered: dict[str, ArtifactInfo] = {}

    def visit(artifact_id: str) -> None:
        if artifact_id in ordered:
            return
        try:
            manifest = store.read_manifest(artifact_id)
        except LmloomError as exc:
            # Shown for what it claims to be (marked unverified); none of its files is read.
            claimed = _claimed_manifest(store, artifact_id)
            inputs = {str(k): str(v) for k, v in (claimed.get("inputs") or {}).items()}
            for _, child in sorted(inputs.items()):
                if _HEX_ID.fullmatch(child) and store.artifact_dir(child).is_dir():
                    visit(child)
            ordered[artifact_id] = ArtifactInfo(
                artifact_id,
                f"{claimed.get('kind', '?')}",
                f"{claimed.get('stage', '?')}",
                str(claimed.get("created", "")),
                str(claimed.get("principal", "")),
                inputs,
                {},
                {},
                bool(claimed.get("encryption")),
                step=step_of.get(artifact_id),
                problem=str(exc),
            )
            return
        for _, child in sorted(manifest.inputs.items()):
            visit(child)  # inputs first: the table and the graph read in pipeline order
        ordered[artifact_id] = _inspect(store, artifact_id, manifest, step_of)

    for root in roots:
        visit(root)
    in_run = set(step_of)
    if in_run:
        for info in ordered.values():
            info.in_run = info.id in in_run
    return ordered


def _claimed_manifest(store: ArtifactStore, artifact_id: str) -> dict[str, Any]:
    try:
        raw = json.loads((store.artifact_dir(artifact_id) / "manifest.json").read_bytes()[:1_000_000])
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _inspect(store: ArtifactStore, artifact_id: str, manifest, step_of: dict[str, str]) -> ArtifactInfo:
    info = ArtifactInfo(
        id=artifact_id,
        kind=manifest.kind,
        stage=manifest.stage,
        created=manifest.created,
        principal=manifest.principal,
        inputs=dict(manifest.inputs),
        metadata=dict(manifest.metadata),
        files={name: entry.size for name, entry in manifest.files.items()},
        encrypted=manifest.encryption is not None,
        step=step_of.get(artifact_id),
    )
    try:
        artifact = store.open(artifact_id)  # every file hashed, signatures enforced, keys checked
    except LmloomError as exc:
        info.problem = str(exc)
        return info
    info.verified = True
    signing = getattr(store.security, "signing", None)
    if signing is not None:
        try:
            report = signing.report(artifact)
            info.signature, info.signature_detail = report.status, report.describe()
        except LmloomError as exc:
            info.signature, info.signature_detail = "bad", str(exc)
    else:
        info.signature = "signed" if (artifact.path / "signatures").is_dir() else "unsigned"
    try:
        if artifact.has(METRICS_FILE):
            info.metrics = _jsonl(artifact.lines(METRICS_FILE))
        if artifact.has(RESOURCES_FILE):
            info.resources = _jsonl(artifact.lines(RESOURCES_FILE))
        for name, size in info.files.items():
            # small JSON documents (evaluation results, gate reports, samples); not model configs
            if name.endswith(".json") and size <= 256_000 and not name.startswith(("tokenizer", "special_")):
                if info.kind not in PIPELINE_KINDS or name == "samples.json":
                    info.json_files[name] = artifact.read_json(name)
    except (LmloomError, ValueError) as exc:
        info.problem = f"reading files: {exc}"
    return info


def _jsonl(lines: Iterable[str]) -> list[dict[str, Any]]:
    records = []
    for line in lines:
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def is_security_event(entry: dict[str, Any]) -> bool:
    event = str(entry.get("event", ""))
    if event.startswith(("security.", "trust.", "signing.")) or event in ("artifact.signed", "data.export"):
        return True
    if event == "stage.end" and entry.get("outcome", "ok") not in ("ok", "stopped"):
        return True
    return any(word in event for word in SECURITY_WORDS)


def _security_entries(entries: list[dict[str, Any]], since: str | None) -> tuple[list[dict], dict[str, int]]:
    counts = Counter(str(e.get("event")) for e in entries if is_security_event(e))
    recent = [
        e for e in entries if is_security_event(e) and (since is None or str(e.get("time", "")) >= since)
    ]
    return recent[-MAX_AUDIT_ROWS:], dict(sorted(counts.items()))


# -- HTML helpers --------------------------------------------------------------------------------
def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.4g}"
        return f"{value:,.4f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> str:
    """Cells are escaped unless given as `Raw`."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers) if any(headers) else ""
    body = "".join(
        "<tr>" + "".join(f"<td>{c if isinstance(c, Raw) else esc(c)}</td>" for c in row) + "</tr>"
        for row in rows
    )
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f'<table class="{cls}">{thead}<tbody>{body}</tbody></table>'


class Raw(str):
    """Already-safe HTML (built here from escaped parts)."""


def generic(value: Any, depth: int = 0) -> str:
    """Any JSON value as nested HTML tables (metadata, evaluation results): escaped, bounded in size."""
    if isinstance(value, dict):
        if not value:
            return '<span class="dim">{}</span>'
        if depth >= 4:
            return f"<code>{esc(json.dumps(value, default=str)[:300])}</code>"
        rows = [(Raw(f"<b>{esc(k)}</b>"), Raw(generic(v, depth + 1))) for k, v in list(value.items())[:200]]
        return table(("key", "value"), rows, "kv")
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value) and depth < 4:
            keys: list[str] = []
            for item in value[:100]:
                keys.extend(k for k in item if k not in keys)
            rows = [[Raw(generic(item.get(k, ""), depth + 1)) for k in keys[:20]] for item in value[:100]]
            more = f'<div class="dim">… {len(value) - 100} more</div>' if len(value) > 100 else ""
            if depth < 2:
                return table(keys[:20], rows, "inner") + more
            # Deeper tables (per-template results of an audit) are detail: folded, so that the
            # headline figures stay on one screen and nested columns are not squeezed to a letter wide.
            summary = f"{len(value)} rows: {', '.join(keys[:6])}{', …' if len(keys) > 6 else ''}"
            return (
                f"<details><summary>{esc(summary)}</summary>{table(keys[:20], rows, 'inner')}{more}</details>"
            )
        shown = ", ".join(
            fmt(v) if not isinstance(v, dict | list) else json.dumps(v)[:80] for v in value[:50]
        )
        return esc(shown + (f", … ({len(value)} in all)" if len(value) > 50 else ""))
    if isinstance(value, str) and len(value) > 400:
        return f'<pre class="text">{esc(value[:400])}…</pre>'
    verdict = _verdict_class(value)
    return f'<span class="{verdict}">{esc(fmt(value))}</span>' if verdict else esc(fmt(value))


def _verdict_class(value: Any) -> str:
    if isinstance(value, str) and value.lower() in ("pass", "passed", "ok", "release"):
        return "good"
    if isinstance(value, str) and value.lower() in ("fail", "failed", "block", "blocked"):
        return "bad"
    return ""


# -- SVG plots -----------------------------------------------------------------------------------
def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9 and len(ticks) < 20:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _tick_label(v: float) -> str:
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-2):
        return f"{v:.1e}"
    return f"{v:g}"


@dataclass
class Series:
    label: str
    xs: list[float]
    ys: list[float]
    points: bool = False  # dots (sparse series such as validation loss) instead of a line


def line_chart(
    title: str, series: list[Series], xlabel: str = "step", markers: Sequence[tuple[float, str]] = ()
) -> str:
    """A line chart as inline SVG (axes, ticks, legend, optional vertical event markers)."""
    series = [s for s in series if s.xs]
    if not series:
        return ""
    w, h, left, right, top, bottom = 560, 250, 62, 16, 30, 40
    xs = [x for s in series for x in s.xs]
    ys = [y for s in series for y in s.ys]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * (h - top - bottom)

    parts = [
        f'<svg class="plot" role="img" aria-label="{esc(title)}" viewBox="0 0 {w} {h}" '
        f'width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="{left}" y="18" class="title">{esc(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" class="frame"/>',
    ]
    for t in nice_ticks(y0, y1):
        if y0 <= t <= y1:
            parts.append(
                f'<line x1="{left}" x2="{w - right}" y1="{py(t):.1f}" y2="{py(t):.1f}" class="grid"/>'
            )
            parts.append(
                f'<text x="{left - 6}" y="{py(t) + 4:.1f}" class="tick" text-anchor="end">{_tick_label(t)}</text>'
            )
    for t in nice_ticks(x0, x1, 6):
        if x0 <= t <= x1:
            parts.append(
                f'<text x="{px(t):.1f}" y="{h - bottom + 16}" class="tick" text-anchor="middle">{_tick_label(t)}</text>'
            )
    parts.append(
        f'<text x="{(left + w - right) / 2}" y="{h - 6}" class="axis" text-anchor="middle">{esc(xlabel)}</text>'
    )
    for x, label in markers:
        if x0 <= x <= x1:
            parts.append(
                f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top}" y2="{h - bottom}" class="marker">'
                f"<title>{esc(label)}</title></line>"
            )
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        pts = list(zip(s.xs, s.ys, strict=True))
        if s.points or len(pts) == 1:
            for x, y in pts:
                parts.append(
                    f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.2" fill="{color}">'
                    f"<title>{esc(s.label)} at {fmt(x)}: {fmt(y)}</title></circle>"
                )
        else:
            d = " ".join(f"{'M' if j == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for j, (x, y) in enumerate(pts))
            parts.append(
                f'<path d="{d}" fill="none" stroke="{color}" stroke-width="1.6">'
                f"<title>{esc(s.label)}: last {fmt(s.ys[-1])}</title></path>"
            )
        if len(series) <= 3:  # on the title's line, right-aligned
            lx, ly = w - right - 120 * (len(series) - i), 9
        else:  # rows of four inside the frame
            lx, ly = left + 8 + (i % 4) * 120, top + 4 + (i // 4) * 14
        parts.append(f'<rect x="{lx}" y="{ly}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{lx + 14}" y="{ly + 9}" class="legend">{esc(s.label[:17])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(title: str, bars: list[tuple[str, float]], unit: str = "") -> str:
    """Horizontal bars (e.g. documents left after each cleaning step)."""
    if not bars:
        return ""
    w, row, left, top = 680, 22, 170, 28
    h = top + row * len(bars) + 12
    top_value = max(v for _, v in bars) or 1.0
    bars = [(label, int(v) if float(v).is_integer() else v) for label, v in bars]
    parts = [
        f'<svg class="plot" role="img" aria-label="{esc(title)}" viewBox="0 0 {w} {h}" '
        f'width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="8" y="18" class="title">{esc(title)}</text>',
    ]
    for i, (label, value) in enumerate(bars):
        y = top + i * row
        width = max(1.0, (w - left - 110) * value / top_value)
        parts.append(
            f'<text x="{left - 8}" y="{y + 15}" class="tick" text-anchor="end">{esc(label[:26])}</text>'
        )
        parts.append(
            f'<rect x="{left}" y="{y + 3}" width="{width:.1f}" height="{row - 6}" fill="{PALETTE[0]}">'
            f"<title>{esc(label)}: {fmt(value)}{esc(unit)}</title></rect>"
        )
        parts.append(
            f'<text x="{left + width + 6:.1f}" y="{y + 15}" class="tick">{esc(fmt(value))}{esc(unit)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _thin(pairs: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(pairs) <= MAX_POINTS:
        return pairs
    stride = len(pairs) / MAX_POINTS
    kept = [pairs[int(i * stride)] for i in range(MAX_POINTS)]
    return [*kept[:-1], pairs[-1]]


def series_of(
    records: list[dict[str, Any]], name: str, x: str = "step", label: str | None = None, points: bool = False
) -> Series:
    pairs = []
    for i, r in enumerate(records):
        value = r.get(name)
        xv = r.get(x, i) if x != "index" else i
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            if isinstance(xv, int | float) and math.isfinite(xv):
                pairs.append((float(xv), float(value)))
    pairs = _thin(pairs)
    return Series(label or name, [p[0] for p in pairs], [p[1] for p in pairs], points)


# -- the lineage graph ---------------------------------------------------------------------------
def lineage_svg(artifacts: dict[str, ArtifactInfo]) -> str:
    """Boxes (step, stage, kind, short id, verified / signed) in columns by depth; arrows input -> output."""
    if not artifacts:
        return ""
    depth: dict[str, int] = {}

    def level(aid: str, seen: tuple[str, ...] = ()) -> int:
        if aid not in depth:
            inputs = [i for i in artifacts[aid].inputs.values() if i in artifacts and i not in seen]
            depth[aid] = 1 + max((level(i, (*seen, aid)) for i in inputs), default=0)
        return depth[aid]

    for aid in artifacts:
        level(aid)
    sources: dict[str, list[str]] = {}
    for aid, info in artifacts.items():
        found = info.metadata.get("sources") if info.kind == "corpus" else None
        if isinstance(found, list):
            labels = []
            for src in found[:4]:
                if isinstance(src, dict):
                    files = src.get("files_available") or src.get("files")
                    extra = f", {fmt(files)} files" if isinstance(files, int) else ""
                    labels.append(f"{src.get('name') or src.get('type', 'source')}{extra}")
            sources[aid] = labels
    has_sources = bool(sources)
    columns: dict[int, list[str]] = {}
    for aid in artifacts:
        columns.setdefault(depth[aid], []).append(aid)
    bw, bh, gx, gy, margin = 184, 78, 56, 22, 16
    offset = 1 if has_sources else 0
    rows = max(len(c) for c in columns.values())
    rows = max(rows, sum(1 for _ in sources) or 0)
    # An edge that skips a column (corpus -> shards past the tokenizer) arcs over the boxes between.
    skips = [
        (src, aid, role)
        for aid, info in artifacts.items()
        for role, src in sorted(info.inputs.items())
        if src in depth and depth[aid] - depth[src] > 1
    ]
    arc_room = 18 + 14 * len(skips) if skips else 0
    width = margin * 2 + (max(columns) + offset) * (bw + gx) - gx
    height = margin * 2 + arc_room + rows * (bh + gy) - gy
    pos: dict[str, tuple[float, float]] = {}
    for d, ids in columns.items():
        x = margin + (d - 1 + offset) * (bw + gx)
        top = margin + arc_room + (rows - len(ids)) * (bh + gy) / 2
        for i, aid in enumerate(ids):
            pos[aid] = (x, top + i * (bh + gy))
    parts = [
        f'<svg class="plot lineage" role="img" aria-label="pipeline lineage graph" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#64748b"/></marker></defs>',
    ]
    for aid, labels in sources.items():
        x, y = margin, pos[aid][1]
        text = "".join(
            f'<text x="{x + 10}" y="{y + 36 + j * 14}" class="boxsmall">{esc(label[:28])}</text>'
            for j, label in enumerate(labels[:3])
        )
        parts.append(
            f'<g class="node source"><rect x="{x}" y="{y}" width="{bw}" height="{bh}" rx="8"/>'
            f'<text x="{x + 10}" y="{y + 18}" class="boxtitle">raw sources</text>{text}</g>'
        )
        parts.append(_arrow(x + bw, y + bh / 2, pos[aid][0], pos[aid][1] + bh / 2, "source"))
    skipped = {(src, aid, role) for src, aid, role in skips}
    for aid, info in artifacts.items():
        x, y = pos[aid]
        for role, src in sorted(info.inputs.items()):
            if src in pos and (src, aid, role) not in skipped:
                sx, sy = pos[src]
                parts.append(_arrow(sx + bw, sy + bh / 2, x, y + bh / 2, role))
    for k, (src, aid, role) in enumerate(skips):
        (sx, sy), (x, y) = pos[src], pos[aid]
        lift = min(sy, y) - 18 - 14 * k
        x1, x2 = sx + bw * 0.6, x + bw * 0.4
        parts.append(
            f'<path d="M{x1:.1f},{sy:.1f} C{x1:.1f},{lift:.1f} {x2:.1f},{lift:.1f} {x2:.1f},{y - 2:.1f}" '
            f'class="edge" marker-end="url(#arrow)"/><text x="{(x1 + x2) / 2:.1f}" y="{lift + 8:.1f}" '
            f'class="edgelabel" text-anchor="middle">{esc(role)}</text>'
        )
    for aid, info in artifacts.items():
        x, y = pos[aid]
        state = "bad" if info.problem else ("run" if info.in_run else "earlier")
        signed = {
            "trusted": "signed ✓",
            "untrusted": "signed (untrusted key)",
            "bad": "BAD signature",
            "unsigned": "unsigned",
            "signed": "signed",
        }.get(info.signature, "signature ?")
        check = "verified" if info.verified else "NOT verified"
        name = info.step or ("(earlier run)" if not info.in_run else info.kind)
        parts.append(
            f'<g class="node {state}"><title>{esc(info.id)}\n{esc(info.problem or check)}</title>'
            f'<rect x="{x}" y="{y}" width="{bw}" height="{bh}" rx="8"/>'
            f'<text x="{x + 10}" y="{y + 18}" class="boxtitle">{esc(name[:24])}</text>'
            f'<text x="{x + 10}" y="{y + 35}" class="boxsmall">{esc(info.stage)} → {esc(info.kind)}</text>'
            f'<text x="{x + 10}" y="{y + 51}" class="boxmono">{esc(info.short)}</text>'
            f'<text x="{x + 10}" y="{y + 67}" class="boxsmall">{esc(check)} · {esc(signed)}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _arrow(x1: float, y1: float, x2: float, y2: float, label: str) -> str:
    mx = (x1 + x2) / 2
    return (
        f'<path d="M{x1:.1f},{y1:.1f} C{mx:.1f},{y1:.1f} {mx:.1f},{y2:.1f} {x2 - 2:.1f},{y2:.1f}" class="edge" '
        f'marker-end="url(#arrow)"/><text x="{mx:.1f}" y="{(y1 + y2) / 2 - 4:.1f}" class="edgelabel" '
        f'text-anchor="middle">{esc(label)}</text>'
    )


# -- sections ------------------------------------------------------------------------------------
def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>' if body else ""


def _steps_section(data: RunData) -> str:
    if not data.steps:
        return ""
    rows = [
        (
            s.name,
            s.stage,
            s.artifact[:12] if s.artifact else "-",
            Raw(
                f'<span class="{"bad" if s.status not in ("made", "reused") else "good"}">{esc(s.status)}</span>'
            ),
            fmt(s.seconds) if s.seconds is not None else "-",
            s.error or "",
        )
        for s in data.steps
    ]
    return table(("step", "stage", "artifact", "status", "seconds", "error"), rows)


def _data_section(data: RunData) -> str:
    out = []
    for info in data.artifacts.values():
        if info.kind != "corpus":
            continue
        meta = info.metadata
        docs = meta.get("documents", {}) if isinstance(meta.get("documents"), dict) else {}
        head = f"<h3>corpus {esc(info.short)}{' (' + esc(info.step) + ')' if info.step else ''}</h3>"
        if not info.verified:
            out.append(head + _unverified(info))
            continue
        facts = []
        for key in ("read", "kept", "train", "val"):
            if key in docs:
                facts.append((f"documents {key}", fmt(docs[key])))
        if isinstance(docs.get("kept_by_kind"), dict):
            facts.append(
                ("kept by kind", ", ".join(f"{k} {fmt(v)}" for k, v in docs["kept_by_kind"].items()))
            )
        if isinstance(docs.get("removed"), dict):
            facts.append(
                ("removed", ", ".join(f"{k} {fmt(v)}" for k, v in docs["removed"].items()) or "none")
            )
        by_bytes = meta.get("bytes", {})
        if isinstance(by_bytes, dict):
            facts.extend(
                (f"bytes {k}", human_bytes(v)) for k, v in by_bytes.items() if isinstance(v, int | float)
            )
        rejects = meta.get("rejects")
        if isinstance(rejects, dict):
            facts.append(("rejected records", fmt(rejects.get("total", 0))))
        steps = [s for s in meta.get("steps", []) if isinstance(s, dict)]
        rows = []
        for s in steps:
            removed = s.get("removed") or {}
            rows.append(
                (
                    s.get("name", "?"),
                    fmt(s.get("docs_in", "")),
                    fmt(s.get("docs_out", "")),
                    ", ".join(f"{k} {fmt(v)}" for k, v in removed.items())
                    if isinstance(removed, dict)
                    else fmt(removed),
                    fmt(s.get("modified", "")),
                    human_bytes(s["bytes_in"]) if isinstance(s.get("bytes_in"), int) else "",
                    human_bytes(s["bytes_out"]) if isinstance(s.get("bytes_out"), int) else "",
                    fmt(s.get("seconds", "")),
                )
            )
        bars = []
        if steps and isinstance(steps[0].get("docs_in"), int):
            bars.append(("read", float(steps[0]["docs_in"])))
        bars.extend(
            (str(s.get("name")), float(s["docs_out"])) for s in steps if isinstance(s.get("docs_out"), int)
        )
        out.append(
            head
            + table(("", ""), facts, "kv")
            + (bar_chart("documents after each data step", bars) if bars else "")
            + (
                table(
                    (
                        "step",
                        "docs in",
                        "docs out",
                        "removed",
                        "modified",
                        "bytes in",
                        "bytes out",
                        "seconds",
                    ),
                    rows,
                )
                if rows
                else ""
            )
        )
        if meta.get("sources"):
            out.append("<h4>sources</h4>" + generic(meta["sources"]))
    return "".join(out)


def _tokenizer_section(data: RunData) -> str:
    out = []
    for info in data.artifacts.values():
        if info.kind not in ("tokenizer", "shards"):
            continue
        meta = dict(info.metadata)
        head = (
            f"<h3>{esc(info.kind)} {esc(info.short)}{' (' + esc(info.step) + ')' if info.step else ''}</h3>"
        )
        if not info.verified:
            out.append(head + _unverified(info))
            continue
        if info.kind == "shards" and isinstance(meta.get("splits"), dict):
            rows = [
                (
                    split,
                    fmt(s.get("tokens", "")),
                    fmt(s.get("documents", "")),
                    fmt(s.get("shards", "")),
                    f"{s['bytes'] / s['tokens']:.2f}" if s.get("tokens") and s.get("bytes") else "",
                )
                for split, s in meta.pop("splits").items()
                if isinstance(s, dict)
            ]
            out.append(
                head + table(("split", "tokens", "documents", "shards", "bytes/token"), rows) + generic(meta)
            )
        else:
            out.append(head + generic(meta))
    return "".join(out)


TRAINING_CHARTS = (
    ("Loss", ("loss", "val_loss"), True),
    ("Learning rate", ("lr",), False),
    ("Gradient norm", ("grad_norm",), False),
    ("Throughput (tokens/s)", ("tokens_per_s",), False),
    ("Validation perplexity", ("val_ppl",), False),
    ("Update ratio (|Δw| / |w|)", ("update_ratio",), False),
    ("Model FLOPs utilisation", ("mfu",), False),
)


def _training_section(data: RunData) -> str:
    out = []
    for info in data.artifacts.values():
        records = [r for r in info.metrics if "event" not in r]
        events = [r for r in info.metrics if "event" in r]
        if not info.metrics and info.kind != "checkpoint":
            continue
        head = (
            f"<h3>{esc(info.kind)} {esc(info.short)}{' (' + esc(info.step) + ')' if info.step else ''}</h3>"
        )
        meta = {k: v for k, v in info.metadata.items() if not isinstance(v, dict | list)}
        body = [head]
        if meta:
            body.append(_figures(meta))
        markers = [(float(e.get("step", 0)), f"{e['event']} at step {e.get('step')}") for e in events]
        charts = []
        for title, names, with_tasks in TRAINING_CHARTS:
            series = [series_of(records, n, points=n.startswith("val_")) for n in names]
            if with_tasks:
                tasks = sorted({k for r in records for k in r if k.startswith("loss/")})
                series += [series_of(records, k) for k in tasks]
            chart = line_chart(title, series, markers=markers if title == "Loss" else ())
            if chart:
                charts.append(chart)
        if charts:
            body.append('<div class="charts">' + "".join(charts) + "</div>")
        elif not info.verified:
            body.append(_unverified(info))
        elif info.kind == "checkpoint":
            body.append('<p class="dim">no metrics.jsonl in this artifact.</p>')
        if events:
            keys = []
            for e in events:
                keys.extend(k for k in e if k not in keys and k not in ("step", "event"))
            rows = [
                (fmt(e.get("step")), e["event"], *(generic(e.get(k, "")) for k in keys[:8])) for e in events
            ]
            body.append(
                "<h4>training events</h4>"
                + table(
                    ("step", "event", *keys[:8]),
                    [tuple(Raw(c) if i >= 2 else c for i, c in enumerate(r)) for r in rows],
                )
            )
        out.append("".join(body))
    return "".join(out)


def _unverified(info: ArtifactInfo) -> str:
    return f'<p class="bad">not shown: the artifact failed verification ({esc(info.problem)})</p>'


def _figures(meta: dict[str, Any]) -> str:
    def short(v: Any) -> str:
        text = fmt(v)
        return text[:12] if isinstance(v, str) and _HEX_ID.fullmatch(v) else text[:40]

    cells = "".join(
        f'<div class="fig"><div class="figv">{esc(short(v))}</div><div class="figk">{esc(k)}</div></div>'
        for k, v in meta.items()
    )
    return f'<div class="figs">{cells}</div>'


RESOURCE_CHARTS = (
    ("CPU (%)", ("cpu_percent", "system_cpu_percent"), 1.0),
    ("System memory used (%)", ("ram_percent",), 1.0),
    ("Process RSS (MB)", ("rss_bytes",), 1e-6),
    ("Disk free (%)", ("disk_free_percent",), 1.0),
)


def _resources_section(data: RunData) -> str:
    out = []
    for info in data.artifacts.values():
        records = [r for r in info.resources or info.metrics if any(k.startswith("resource/") for k in r)]
        if not records:
            continue
        charts = []
        for title, names, scale in RESOURCE_CHARTS:
            series = []
            for n in names:
                s = series_of(records, "resource/" + n, x="index", label=n)
                series.append(Series(s.label, s.xs, [y * scale for y in s.ys]))
            charts.append(line_chart(title, series, xlabel="sample"))
        gpu = sorted(
            {k for r in records for k in r if k.startswith("resource/gpu") and k.endswith("_percent")}
        )
        if gpu:
            charts.append(
                line_chart(
                    "GPU (%)", [series_of(records, k, x="index", label=k[9:]) for k in gpu], xlabel="sample"
                )
            )
        alerts = [r for r in (info.resources or info.metrics) if r.get("event") == "resource_alert"]
        body = (
            f"<h3>{esc(info.kind)} {esc(info.short)}</h3>"
            + '<div class="charts">'
            + "".join(charts)
            + "</div>"
        )
        if alerts:
            body += "<h4>resource alerts</h4>" + generic(alerts)
        out.append(body)
    return "".join(out)


def _results_section(data: RunData) -> str:
    """Evaluation, privacy, bias, robustness and gate artifacts (any kind the pipeline section does
    not draw), rendered generically from their metadata and small JSON files."""
    out = []
    for info in data.artifacts.values():
        if info.kind in PIPELINE_KINDS:
            continue
        verdict = _overall_verdict(info.metadata)
        badge = f' <span class="{verdict[0]}">{esc(verdict[1])}</span>' if verdict else ""
        body = f"<h3>{esc(info.kind)} {esc(info.short)}{' (' + esc(info.step) + ')' if info.step else ''}{badge}</h3>"
        body += generic(info.metadata) if info.verified else _unverified(info)
        for name, value in info.json_files.items():
            body += f"<h4>{esc(name)}</h4>" + generic(value)
        out.append(body)
    return "".join(out)


def _overall_verdict(meta: dict[str, Any]) -> tuple[str, str] | None:
    for key in ("passed", "pass", "ok", "released"):
        if isinstance(meta.get(key), bool):
            return ("good", "PASSED") if meta[key] else ("bad", "FAILED")
    for key in ("verdict", "decision", "status"):
        cls = _verdict_class(meta.get(key))
        if cls:
            return cls, str(meta[key]).upper()
    return None


def _samples_section(data: RunData) -> str:
    out = []
    for info in data.artifacts.values():
        samples = info.json_files.get("samples.json")
        if info.kind != "samples" or not isinstance(samples, list):
            continue
        for s in samples[:8]:
            if isinstance(s, dict):
                out.append(
                    f'<pre class="sample"><b>{esc(s.get("prompt", ""))}</b>{esc(s.get("completion", ""))}</pre>'
                )
    return "".join(out)


def _security_section(data: RunData) -> str:
    if data.audit is None:
        return '<p class="dim">Not shown: the acting principal lacks the read-audit permission.</p>'
    body = f'<p>Audit log: <b class="{"good" if "intact" in data.audit_status else "bad"}">{esc(data.audit_status)}</b>'
    body += f"; entries since {esc(data.since)}.</p>" if data.since else ".</p>"
    if data.audit_counts:
        body += "<h4>all-time counts</h4>" + table(
            ("event", "count"), [(k, fmt(v)) for k, v in data.audit_counts.items()]
        )
    if data.audit:
        rows = []
        for e in data.audit:
            details = {
                k: v
                for k, v in e.items()
                if k not in ("seq", "time", "principal", "event", "prev", "hash", "stage_key")
            }
            cls = "bad" if any(w in str(e.get("event")) for w in (*SECURITY_WORDS, "stage.end")) else ""
            rows.append(
                (
                    fmt(e.get("seq")),
                    str(e.get("time", ""))[:19].replace("T", " "),
                    e.get("principal", ""),
                    Raw(f'<span class="{cls}">{esc(e.get("event"))}</span>'),
                    Raw(esc(json.dumps(details, ensure_ascii=False, default=str)[:400])),
                )
            )
        body += "<h4>security events in this run and after</h4>" + table(
            ("seq", "time (UTC)", "principal", "event", "details"), rows
        )
    else:
        body += "<p>No security events (denials, refused reads, failed verifications, signature or trust changes, failed stages) in this run.</p>"
    return body


def _artifacts_section(data: RunData) -> str:
    rows = []
    for info in data.artifacts.values():
        verified = (
            Raw('<span class="good">ok</span>')
            if info.verified and not info.problem
            else Raw(f'<span class="bad">FAILED</span> {esc(info.problem or "")}')
        )
        sig_cls = {"trusted": "good", "bad": "bad"}.get(info.signature, "")
        rows.append(
            (
                Raw(f'<code title="{esc(info.id)}">{esc(info.short)}</code>'),
                info.step or ("earlier" if not info.in_run else ""),
                info.kind,
                info.stage,
                info.created[:19].replace("T", " "),
                info.principal,
                f"{len(info.files)} ({human_bytes(sum(info.files.values()))})",
                "yes" if info.encrypted else "no",
                verified,
                Raw(
                    f'<span class="{sig_cls}" title="{esc(info.signature_detail)}">{esc(info.signature)}</span>'
                ),
            )
        )
    return table(
        (
            "id",
            "step",
            "kind",
            "stage",
            "created (UTC)",
            "principal",
            "files",
            "encrypted",
            "verified",
            "signature",
        ),
        rows,
    )


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#0f172a;background:#f8fafc}
header{background:#0f172a;color:#f8fafc;padding:18px 28px}header h1{margin:0 0 4px;font-size:20px}
header .meta{color:#cbd5e1;font-size:13px}nav{padding:6px 28px;background:#e2e8f0;font-size:13px}
nav a{margin-right:14px;color:#1e3a8a;text-decoration:none}main{padding:8px 28px 40px}
section{background:#fff;border:1px solid #e2e8f0;border-radius:10px;padding:10px 18px 16px;margin:16px 0}
h2{font-size:17px;margin:6px 0 10px}h3{font-size:15px;margin:14px 0 6px}h4{font-size:13px;margin:12px 0 4px;color:#334155}
table{border-collapse:collapse;margin:6px 0;font-size:12.5px}th,td{border:1px solid #e2e8f0;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f1f5f9}td{overflow-wrap:anywhere;max-width:520px}section{overflow-x:auto}table.kv td:first-child{white-space:nowrap}table.inner{font-size:12px}
.good{color:#15803d;font-weight:600}.bad{color:#b91c1c;font-weight:600}.dim{color:#64748b}
code,.boxmono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace}
.charts{display:flex;flex-wrap:wrap;gap:10px}svg.plot{background:#fff;max-width:100%;height:auto}
.charts svg.plot{border:1px solid #e2e8f0;border-radius:6px}.scroll{overflow-x:auto}
svg .title{font-size:13px;font-weight:600;fill:#0f172a}svg .tick{font-size:10.5px;fill:#475569}
svg .axis{font-size:11px;fill:#475569}svg .legend{font-size:11px;fill:#0f172a}
svg .frame{fill:none;stroke:#cbd5e1}svg .grid{stroke:#eef2f7}svg .marker{stroke:#dc2626;stroke-dasharray:4 3}
svg .edge{fill:none;stroke:#64748b;stroke-width:1.4}svg .edgelabel{font-size:10px;fill:#475569}
svg .node rect{stroke-width:1.5}svg .node.run rect{fill:#eff6ff;stroke:#2563eb}
svg .node.earlier rect{fill:#f8fafc;stroke:#94a3b8;stroke-dasharray:5 3}svg .node.bad rect{fill:#fef2f2;stroke:#dc2626}
svg .node.source rect{fill:#f0fdf4;stroke:#16a34a}svg .boxtitle{font-size:13px;font-weight:600}
svg .boxsmall{font-size:10.5px;fill:#334155}svg .boxmono{font-size:11px;fill:#1e3a8a}
.figs{display:flex;flex-wrap:wrap;gap:8px;margin:6px 0}.fig{border:1px solid #e2e8f0;border-radius:8px;padding:6px 10px;min-width:90px}
.figv{font-size:15px;font-weight:600}.figk{font-size:11px;color:#64748b}
pre.sample,pre.text{background:#f1f5f9;padding:8px;border-radius:6px;white-space:pre-wrap;font-size:12px}
details>summary{cursor:pointer;color:#475569}.notes{background:#fffbeb;border:1px solid #fde68a;padding:8px 12px;border-radius:8px}
"""

# No request of any kind may leave the page: only inline styles (and nothing else) are allowed.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"


def render(data: RunData) -> str:
    from lmloom import __version__

    sections = [
        (
            "pipeline",
            "Pipeline",
            '<div class="scroll">' + lineage_svg(data.artifacts) + "</div>" + _steps_section(data),
        ),
        ("data", "Data", _data_section(data)),
        ("tokenizer", "Tokenizer and shards", _tokenizer_section(data)),
        ("training", "Training", _training_section(data)),
        ("resources", "Resources", _resources_section(data)),
        ("results", "Evaluation, privacy, bias, robustness and gates", _results_section(data)),
        ("samples", "Samples", _samples_section(data)),
        ("security", "Security events", _security_section(data)),
        ("artifacts", "Artifacts", _artifacts_section(data)),
    ]
    shown = [(a, t, b) for a, t, b in sections if b]
    nav = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t, _ in shown)
    failed = [i for i in data.artifacts.values() if i.problem]
    status = (
        f'<span class="bad">{len(failed)} artifact(s) failed verification</span>'
        if failed
        else f"{len(data.artifacts)} artifacts, all verified"
    )
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    notes = "".join(f'<p class="notes">{esc(n)}</p>' for n in data.notes)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>lmloom report: {esc(data.title)}</title><style>{CSS}</style></head><body>"
        f'<header><h1>lmloom report — {esc(data.title)}</h1><div class="meta">store {esc(data.store_root)} · '
        f"generated {esc(generated)} by lmloom {esc(__version__)} · {status}</div></header>"
        f"<nav>{nav}</nav><main>{notes}"
        + "".join(_section(a, t, b) for a, t, b in shown)
        + "</main></body></html>\n"
    )


# -- entry points --------------------------------------------------------------------------------
def build_report(
    store: ArtifactStore, ref: str | None = None, *, include_audit: bool = True, steps=None
) -> str:
    return render(collect(store, ref, steps=steps, include_audit=include_audit))


def default_report_path(store: ArtifactStore, data_title_id: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(store.root) / "reports" / f"report-{stamp}-{data_title_id[:12]}.html"


def write_report(
    store: ArtifactStore,
    ref: str | None = None,
    out: Path | None = None,
    *,
    include_audit: bool = True,
    steps: list[StepInfo] | None = None,
) -> Path:
    """Write the report (atomically) to `out`, default `<store>/reports/report-<time>-<id>.html`."""
    data = collect(store, ref, steps=steps, include_audit=include_audit)
    last = next(reversed(data.artifacts), "run") if data.artifacts else "run"
    path = Path(out) if out is not None else default_report_path(store, last)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, render(data))
    return path


def steps_from_results(results) -> list[StepInfo]:
    """`lmloom run`'s StepResults as report steps."""
    return [
        StepInfo(
            r.name,
            r.stage.name,
            "reused" if r.reused else "made",
            r.seconds,
            r.artifact.id if r.artifact else None,
        )
        for r in results
    ]


def write_run_report(
    results, store: ArtifactStore, out: Path | None = None, include_audit: bool | None = None
) -> Path:
    """The report of the run `lmloom run` just finished (`results`: pipeline StepResults).

    The audit section is included when the acting principal may read the audit log (`include_audit`
    None: decided from the store's access policy).
    """
    if include_audit is None:
        from lmloom.security.policy import Permission, resolve_access

        include_audit = resolve_access(store.root).allows(Permission.READ_AUDIT)
    return write_report(store, None, out, include_audit=include_audit, steps=steps_from_results(results))
