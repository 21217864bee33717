"""Monitoring: metric sinks read back by their own tools, the resource sampler, and the HTML run report
opened in a real headless browser that may not make a single request."""

import json
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmloom.artifacts.store import ArtifactStore
from lmloom.cli import app
from lmloom.config import Recipe
from lmloom.context import RunContext
from lmloom.monitor.metrics import JsonlMetrics
from lmloom.monitor.resources import ResourceSampler, Threshold, _ProcReader
from lmloom.monitor.sinks import (
    JsonlSink,
    MetricSink,
    MonitorConfig,
    MultiSink,
    PrometheusSink,
    TensorBoardSink,
    open_sinks,
    task_loss_name,
)
from lmloom.pipeline import run_recipe
from lmloom.security.audit import AuditLog
from lmloom.security.context import store_security

CHROMIUM = Path("/usr/bin/chromium")


class ListSink(MetricSink):
    def __init__(self):
        self.logs, self.events = [], []

    def log(self, step, **values):
        self.logs.append((step, values))

    def event(self, kind, **fields):
        self.events.append((kind, fields))


# -- sinks --------------------------------------------------------------------------------------------
def test_tensorboard_event_files_read_back_by_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path / "tb")
    for step in range(1, 6):
        sink.log(
            step, loss=4.0 - step * 0.5, lr=1e-3 * step, **{task_loss_name("code"): 1.0 / step}, note="x"
        )
    sink.log(5, event="loss_spike", loss=99.0)  # the trainer's event convention: text, not a loss point
    sink.truncate_after(3)  # a resumed run redoes steps 4 and 5
    sink.log(4, loss=0.25)
    sink.log(5, loss=0.125)
    sink.close()

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"loss", "lr", "loss/code"} <= set(acc.Tags()["scalars"])
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [
        (1, 3.5),
        (2, 3.0),
        (3, 2.5),
        (4, 0.25),
        (5, 0.125),
    ]
    assert [e.step for e in acc.Scalars("loss/code")] == [1, 2, 3]  # the orphaned 4 and 5 were dropped
    assert acc.Scalars("lr")[0].value == pytest.approx(1e-3)


def test_prometheus_endpoint_scraped_on_loopback():
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    sink = PrometheusSink(port=0, labels={"step": "pretrain"})
    try:
        assert sink.host == "127.0.0.1" and sink.port > 0
        sink.log(7, loss=2.5, tokens_per_s=1234.0, **{"loss/code": 1.5})
        sink.log(8, loss=2.25)
        sink.event("resource_alert", metric="resource/ram_percent")
        sink.log(8, event="loss_spike", loss=50.0)  # an event record: counted, not a loss value
        text = urllib.request.urlopen(sink.url, timeout=5).read().decode()
    finally:
        sink.close()
    samples = {
        (s.name, s.labels.get("kind")): (s.value, s.labels)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("lmloom_loss", None)] == (2.25, {"step": "pretrain"})
    assert samples[("lmloom_loss_code", None)][0] == 1.5
    assert samples[("lmloom_tokens_per_s", None)][0] == 1234.0
    assert samples[("lmloom_step", None)][0] == 8
    assert samples[("lmloom_events_total", "resource_alert")][0] == 1
    assert samples[("lmloom_events_total", "loss_spike")][0] == 1
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(sink.url, timeout=2)  # closed: the port is released


def test_multisink_is_a_drop_in_for_jsonl_metrics(tmp_path):
    class Broken(MetricSink):
        def log(self, step, **values):
            raise OSError("disk full")

    plain = JsonlMetrics(tmp_path / "plain.jsonl")
    multi = MultiSink([JsonlSink(tmp_path / "multi.jsonl"), Broken(), ListSink()])
    for target in (plain, multi):
        target.log(1, loss=3.0, lr=0.1)
        target.log(2, loss=2.0, lr=0.1)
        target.log(2, event="loss_spike", flagged_step=3)
        target.truncate_after(1)
        target.log(2, loss=1.5, lr=0.1)
    assert (
        multi.records()
        == plain.records()
        == [
            {"step": 1, "loss": 3.0, "lr": 0.1},
            {"step": 2, "loss": 1.5, "lr": 0.1},
        ]
    )
    assert multi.path == tmp_path / "multi.jsonl"
    assert [name for name, _ in multi.errors] == ["Broken"]  # dropped once, the run went on
    multi.event("resource_alert", metric="resource/ram_percent")
    assert multi.records()[-1] == {"step": 2, "event": "resource_alert", "metric": "resource/ram_percent"}
    multi.close()


def test_open_sinks_from_a_monitor_block(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("prometheus_client")
    config = MonitorConfig(tensorboard=True, prometheus_port=0, resources=True, resource_interval_s=0.05)
    sinks = open_sinks(config, tmp_path / "work" / "metrics.jsonl", store_root=tmp_path, step_name="pretrain")
    try:
        prom = next(s for s in sinks.sinks if isinstance(s, PrometheusSink))
        sinks.log(1, loss=2.0)
        # The JSONL file is created when the sink opens, before the first sample: wait on the
        # endpoint itself until the sampler's first reading has reached it.
        deadline = time.monotonic() + 10
        while True:
            text = urllib.request.urlopen(prom.url, timeout=5).read().decode()
            if "lmloom_resource_ram_percent" in text or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        sinks.close()
    assert "lmloom_resource_ram_percent" in text and "lmloom_loss" in text
    assert sinks.records() == [{"step": 1, "loss": 2.0}]  # resources never enter metrics.jsonl
    assert list((tmp_path / "tensorboard" / "pretrain").glob("events.out.tfevents.*"))
    assert "resource/rss_bytes" in (tmp_path / "work" / "resources.jsonl").read_text()
    assert MonitorConfig().model_dump()["prometheus_host"] == "127.0.0.1"


def test_resources_jsonl_is_truncated_with_the_metrics(tmp_path):
    """A rerun after a crash: resources.jsonl drops the dead run's samples past the resume point (all
    of them on a fresh start), like metrics.jsonl, so its steps never go backwards."""
    work = tmp_path / "work"
    resources = work / "resources.jsonl"
    config = MonitorConfig(resources=True, resource_interval_s=3600)  # samples only when told to here

    def rerun(resume_step: int) -> list[int]:
        sinks = open_sinks(config, work / "metrics.jsonl", store_root=tmp_path)
        sampler = next(s for s in sinks.owned if isinstance(s, ResourceSampler))
        try:
            sampler.sample()  # while the checkpoint loads, before the run knows its step: held
            sinks.truncate_after(resume_step)  # what train_loop does first; the held reading lands here
            sampler.sample()  # before the resumed run's first log: at the resume step
            sinks.log(resume_step + 1, loss=1.0)
            sampler.sample()
        finally:
            sinks.close()  # one last sample, at the last logged step
        return [json.loads(line)["step"] for line in resources.read_text().splitlines()]

    work.mkdir()
    dead = JsonlSink(resources)  # the crashed run's samples, and an alert among them
    for step in range(1, 6):
        dead.log(step, **{"resource/ram_percent": 50.0})
    dead.event("resource_alert", metric="resource/ram_percent", step=5)

    assert rerun(3) == [1, 2, 3, 3, 3, 4, 4]  # resumed at step 3: the dead run's 4, 5 and its alert gone
    assert rerun(-1) == [0, 0, 0, 0]  # a fresh start: nothing of the earlier runs


def test_a_sample_read_before_a_rollback_never_lands_after_it(tmp_path):
    """The sampler's thread reads the run's step (10), then the run rolls back to 4 and truncates
    before that sample is written: the truncation waits for it, so no step-10 line survives."""
    record = JsonlSink(tmp_path / "resources.jsonl")
    read, release = threading.Event(), threading.Event()
    run = {"step": 10}

    def step() -> int:
        seen = run["step"]
        read.set()
        release.wait(10)  # the sample is between reading its step and writing its line
        return seen

    sampler = ResourceSampler(record, disk_path=tmp_path, step=step, record=record, gpu=False)
    sampling = threading.Thread(target=sampler.sample)
    sampling.start()
    assert read.wait(10)
    run["step"] = 4
    rollback = threading.Thread(target=sampler.truncate_after, args=(4,))
    rollback.start()
    rollback.join(0.2)  # unguarded, the truncation would be done by now, before the line is written
    release.set()
    sampling.join(10)
    rollback.join(10)
    sampler.sample()
    sampler.close()
    assert [json.loads(line)["step"] for line in record.path.read_text().splitlines()] == [4]


# -- resources ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("reader", ["default", "proc"])
def test_resource_sampler_samples_and_alerts_once_per_crossing(tmp_path, monkeypatch, reader):
    if reader == "proc":
        monkeypatch.setattr("lmloom.monitor.resources._host_reader", _ProcReader)
    sink = ListSink()
    ram = Threshold("ram_percent", 0.0)  # forced: any machine is above it
    sampler = ResourceSampler(sink, disk_path=tmp_path, thresholds=(ram,), gpu=False)
    sampler.sample()
    values = sampler.sample()
    assert 0 < values["ram_percent"] <= 100 and values["rss_bytes"] > 1e6 and values["disk_free_bytes"] > 0
    assert {"resource/cpu_percent", "resource/ram_percent", "resource/disk_free_percent"} <= set(
        sink.logs[-1][1]
    )
    assert [kind for kind, _ in sink.events] == ["resource_alert"]  # two samples above: one alert
    assert sink.events[0][1]["metric"] == "resource/ram_percent" and sink.events[0][1]["direction"] == "above"
    sampler.thresholds = (Threshold("ram_percent", 101.0),)  # back below: re-armed, no alert
    sampler.sample()
    sampler.thresholds = (ram,)
    sampler.sample()
    assert len(sink.events) == 2  # the second crossing alerts again


def test_resource_sampler_runs_in_the_background(tmp_path):
    sink = ListSink()
    with ResourceSampler(sink, interval_s=0.02, disk_path=tmp_path, step=lambda: 42, gpu=False) as sampler:
        deadline = time.monotonic() + 10
        while sampler.samples < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    count = sampler.samples
    time.sleep(0.1)
    assert count >= 3 and sampler.samples == count  # stopped on close
    assert {step for step, _ in sink.logs} == {42} and not sampler.errors


# -- the HTML report ----------------------------------------------------------------------------------
def tiny_recipe(docs: Path) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "tiny",
            "stages": {
                "corpus": {
                    "stage": "data.prepare",
                    "config": {"sources": [{"type": "text-dir", "path": str(docs)}], "val_fraction": 0.2},
                },
                "tokenizer": {
                    "stage": "tokenizer.train",
                    "inputs": {"corpus": "corpus"},
                    "config": {"vocab_size": 300},
                },
                "shards": {
                    "stage": "tokenizer.encode",
                    "inputs": {"corpus": "corpus", "tokenizer": "tokenizer"},
                },
                "pretrain": {
                    "stage": "train.pretrain",
                    "inputs": {"shards": "shards", "tokenizer": "tokenizer"},
                    "config": {
                        "model": {"seq_len": 32, "d_model": 32, "n_layers": 1, "n_heads": 2},
                        "batch_size": 4,
                        "max_steps": 8,
                        "precision": "fp32",
                        "compile": False,
                        "log_every": 1,
                        "eval_every": 4,
                        "eval_windows": 4,
                        "final_eval_windows": 4,
                        "checkpoint_every": 4,
                        "optim": {"warmup_steps": 2, "lr": 0.003},
                    },
                },
                "samples": {
                    "stage": "serve.samples",
                    "inputs": {"checkpoint": "pretrain"},
                    "config": {"prompts": ["the quick"], "max_new_tokens": 8},
                },
            },
        }
    )


@pytest.fixture(scope="module")
def run_store(tmp_path_factory):
    """A store holding one real tiny run (data -> tokenizer -> shards -> pretrain -> samples)."""
    root = tmp_path_factory.mktemp("report")
    docs = root / "docs"
    docs.mkdir()
    words = "the quick brown fox jumps over lazy dog and then runs far away from home into a river".split()
    for i in range(24):
        text = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(150))
        (docs / f"doc{i:02d}.txt").write_text(f"document {i}: {text}\n")
    (docs / "dup.txt").write_text((docs / "doc00.txt").read_text())  # removed by dedup
    (docs / "tiny.txt").write_text("x")  # removed as too short
    store_root = root / "store"
    store = ArtifactStore(store_root, security=store_security(store_root))
    results = run_recipe(tiny_recipe(docs), RunContext(store))
    # Something for the security section, with markup that must come out as text.
    AuditLog(store_root / "audit.jsonl").append(
        "security.denied",
        "<script>window.bad=1</script>",
        action="<img src=x onerror=alert(1)>",
        permission="train",
    )
    return store_root, results


def lmloom(store_root: Path, *args):
    result = CliRunner().invoke(
        app,
        [str(a) for a in args],
        env={"LMLOOM_HOME": str(store_root), "LMLOOM_POLICY": None, "COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def open_in_chromium(path: Path, screenshot: Path | None = None) -> dict:
    """Load the file in headless Chromium, every request routed through a handler that lets only the
    file itself through; returns what the page did."""
    playwright = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip("no system Chromium at /usr/bin/chromium")
    url = path.resolve().as_uri()
    seen = {"requests": [], "blocked": [], "console_errors": [], "page_errors": []}
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})

            def route(r):
                seen["requests"].append(r.request.url)
                if r.request.url == url:
                    r.continue_()
                else:
                    seen["blocked"].append(r.request.url)
                    r.abort()

            page.route("**/*", route)
            page.on("console", lambda m: m.type == "error" and seen["console_errors"].append(m.text))
            page.on("pageerror", lambda e: seen["page_errors"].append(str(e)))
            page.goto(url, wait_until="load")
            seen["svg_sizes"] = page.eval_on_selector_all(
                "svg.plot",
                "els => els.map(e => { const r = e.getBoundingClientRect(); return [r.width, r.height]; })",
            )
            seen["paths"] = page.eval_on_selector_all("svg.plot path", "els => els.length")
            seen["scripts"] = page.eval_on_selector_all("script, img, iframe", "els => els.length")
            seen["bad_global"] = page.evaluate("() => window.bad === 1")
            seen["headings"] = page.eval_on_selector_all("h2", "els => els.map(e => e.textContent)")
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return seen


def test_report_of_a_real_run_opens_offline_in_chromium(run_store, tmp_path):
    store_root, results = run_store
    out = tmp_path / "report.html"
    assert "report written" in lmloom(store_root, "report", "--out", out)
    page = out.read_text()
    # Self-contained: no URL it could fetch (the SVG namespace is an identifier, not a request).
    assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?\s*(https?:)?//""", page, re.I)
    assert "Content-Security-Policy" in page
    for r in results:
        assert r.artifact.short_id in page  # every artifact of the run, in the graph and the table
    assert "&lt;script&gt;window.bad=1&lt;/script&gt;" in page and "<img src=x" not in page

    seen = open_in_chromium(out)
    assert seen["requests"] == [out.resolve().as_uri()] and not seen["blocked"]
    assert not seen["console_errors"] and not seen["page_errors"]
    assert seen["scripts"] == 0 and not seen["bad_global"]
    # lineage graph, documents per data step, and the training curves (loss, lr, grad norm, ...)
    assert len(seen["svg_sizes"]) >= 5
    assert all(w > 100 and h > 50 for w, h in seen["svg_sizes"]), seen["svg_sizes"]
    assert seen["paths"] >= 4
    for heading in (
        "Pipeline",
        "Data",
        "Tokenizer and shards",
        "Training",
        "Samples",
        "Security events",
        "Artifacts",
    ):
        assert heading in seen["headings"]


def test_report_of_one_artifact_and_of_a_tampered_store(run_store, tmp_path):
    store_root, results = run_store
    copy = tmp_path / "store"
    shutil.copytree(store_root, copy)
    checkpoint = next(r.artifact for r in results if r.artifact.kind == "checkpoint")
    # An evaluation artifact of a kind the report has never heard of: rendered from its metadata.
    store = ArtifactStore(copy, security=store_security(copy))
    gate = store.create(
        kind="gate-report", stage="evaluate.gates", config={}, inputs={"model": checkpoint.id}
    )
    gate.metadata = {
        "passed": False,
        "checks": [{"name": "toxicity", "value": 0.2, "limit": 0.1, "verdict": "fail"}],
    }
    gate.write_json("report.json", {"ppl": {"val": 171.3}})
    gate = gate.commit()
    out = tmp_path / "lineage.html"
    lmloom(copy, "report", gate.short_id, "--out", out)
    page = out.read_text()
    assert "checkpoint " + checkpoint.short_id in page and "serve.samples" not in page  # lineage only
    assert f"gate-report {gate.short_id}" in page and '<span class="bad">FAILED</span>' in page
    assert "toxicity" in page and "report.json" in page and "171.3" in page
    assert "failed verification" not in page

    metrics = copy / "artifacts" / checkpoint.id / "metrics.jsonl"
    metrics.chmod(0o644)
    metrics.write_text(metrics.read_text().replace('"step": 1,', '"step": 9,', 1))  # same size
    lmloom(copy, "report", "--out", out)
    page = out.read_text()
    assert "failed verification" in page and "metrics.jsonl does not match its sha256" in page
    assert "security.read_refused" in page  # the refused read is in the audit log, and in the report
    events = [json.loads(line)["event"] for line in (copy / "audit.jsonl").read_text().splitlines()]
    assert "security.read_refused" in events


def test_write_run_report_for_lmloom_run(run_store):
    from lmloom.monitor.report import write_run_report

    store_root, results = run_store
    store = ArtifactStore(store_root, security=store_security(store_root))
    path = write_run_report(results, store)
    assert path.parent == store_root / "reports" and path.suffix == ".html"
    page = path.read_text()
    assert "run: corpus → tokenizer → shards → pretrain → samples" in page
    assert "Security events" in page


def test_the_training_loop_takes_a_multisink(run_store, tmp_path):
    """train.pretrain's `monitor:` block: the loop logs through open_sinks' MultiSink (TensorBoard and the
    resource sampler here); metrics.jsonl stays free of resource samples, and the stage key is unchanged."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store_root, results = run_store
    store_copy = tmp_path / "store"
    shutil.copytree(store_root, store_copy)
    ids = {r.name: r.artifact.id for r in results}
    spec = tiny_recipe(tmp_path).stages["pretrain"].model_dump()
    spec["inputs"] = {"shards": f"artifact:{ids['shards']}", "tokenizer": f"artifact:{ids['tokenizer']}"}
    spec["config"]["max_steps"] = 4
    spec["config"]["monitor"] = {
        "tensorboard": True,
        "tensorboard_dir": str(tmp_path / "tensorboard" / "pretrain"),
        "resources": True,
        "resource_interval_s": 0.05,
    }
    recipe = Recipe.model_validate({"name": "monitored", "stages": {"pretrain": spec}})
    store = ArtifactStore(store_copy, security=store_security(store_copy))
    (result,) = run_recipe(recipe, RunContext(store))
    logged = [json.loads(line) for line in result.artifact.lines("metrics.jsonl")]
    assert [r["step"] for r in logged] == [1, 2, 3, 4] and "resource/cpu_percent" not in logged[0]
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "pretrain"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    assert {"lr", "grad_norm", "tokens_per_s", "val_loss", "resource/rss_bytes"} <= set(acc.Tags()["scalars"])
