"""Metric sinks: one interface, several destinations (JSONL, TensorBoard, Prometheus, MLflow), and a fan-out.

Every sink takes the same two calls:

    sink.log(step, loss=2.31, lr=3e-4, grad_norm=0.8, tokens_per_s=7500.0)   # scalars at a step
    sink.event("resource_alert", metric="ram_percent", value=93.1)           # something that happened
    sink.close()

Standard scalar names (what the trainer logs and the report draws): `loss`, `lr`, `grad_norm`,
`tokens_per_s`, `mfu`, `val_loss`, `val_ppl`, per-task losses `loss/<task>` (`task_loss_name`), and the
resource sampler's `resource/*`. Non-numeric values (strings, lists) are kept by the JSONL sink only;
the others take what is a real number.

`MultiSink` fans out to several sinks and keeps the `JsonlMetrics` surface (`path`, `records`,
`truncate_after`), so the training loop, which calls `metrics.log(step, ...)` and
`metrics.truncate_after(step)`, can be handed one unchanged. The trainer's own event convention —
`metrics.log(step, event="loss_spike", ...)` — is understood too: sinks other than JSONL turn such a
record into an `event`.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import Field

from lmloom.config import StrictConfig
from lmloom.monitor.metrics import JsonlMetrics, _plain

STANDARD_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "val_loss", "val_ppl")
EVENT_KEY = "event"  # the trainer's marker for an event record in metrics.jsonl


def task_loss_name(task: str) -> str:
    """The standard name of one task's loss in a multi-task run: `loss/<task>`."""
    return f"loss/{task}"


def scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """The real-number values of a record (bools and strings dropped; torch/numpy scalars unwrapped)."""
    found = {}
    for name, value in values.items():
        value = _plain(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        found[name] = float(value)
    return found


class StopRun(Exception):
    """Raised by a sink that wants the run to stop (a sweep pruning a trial): `MultiSink` lets it
    through instead of dropping the sink, and the trainer does not catch it, so the stage ends there
    and the pipeline discards its unfinished output."""


class MetricSink:
    """Where metrics go. Subclasses implement `log`; `event` and `close` default to doing nothing."""

    def log(self, step: int, **scalars: Any) -> None:
        raise NotImplementedError

    def event(self, kind: str, **fields: Any) -> None:
        """Something that happened (an alert, a rollback); `step=` may be given among the fields."""

    def close(self) -> None:
        """Flush and release files, ports and threads; a closed sink may not be logged to again."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _split_event(values: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The trainer logs events as `log(step, event=kind, ...)`: (kind, the other fields) or (None, values)."""
    kind = values.get(EVENT_KEY)
    if isinstance(kind, str):
        return kind, {k: v for k, v in values.items() if k != EVENT_KEY}
    return None, values


# -- JSONL ------------------------------------------------------------------------------------------
class JsonlSink(JsonlMetrics, MetricSink):
    """The JSONL file every stage writes (`JsonlMetrics`, unchanged), plus events as
    `{"step": <last step>, "event": kind, ...fields}` lines, the trainer's own event format."""

    def __init__(self, path: Path):
        super().__init__(path)
        self._lock = threading.Lock()  # the resource sampler logs from its own thread
        self.last_step = 0

    def log(self, step: int, **values: Any) -> None:
        with self._lock:
            self.last_step = step
            super().log(step, **values)

    def event(self, kind: str, **fields: Any) -> None:
        step = fields.pop("step", self.last_step)
        self.log(step, **{EVENT_KEY: kind, **fields})

    def truncate_after(self, step: int) -> None:
        with self._lock:  # not while the sampler's thread is appending a line
            super().truncate_after(step)


# -- TensorBoard ------------------------------------------------------------------------------------
class TensorBoardSink(MetricSink):
    """TensorBoard event files in `log_dir` (`tensorboard --logdir <dir>`): every scalar under its own
    tag (`loss`, `loss/code`, `resource/cpu_percent`), events as text under `events/<kind>`."""

    def __init__(self, log_dir: Path, flush_secs: int = 30):
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(str(self.log_dir), flush_secs=flush_secs)
        self._lock = threading.Lock()
        self.last_step = 0

    def log(self, step: int, **values: Any) -> None:
        kind, values = _split_event(values)
        if kind is not None:
            self.event(kind, step=step, **values)
            return
        now = time.time()
        with self._lock:
            self.last_step = step
            for name, value in scalars(values).items():
                self._writer.add_scalar(name, value, global_step=step, walltime=now)

    def event(self, kind: str, **fields: Any) -> None:
        step = fields.pop("step", self.last_step)
        text = json.dumps({k: _plain(v) for k, v in fields.items()}, sort_keys=True, default=str)
        with self._lock:
            self._writer.add_text(f"events/{kind}", text, global_step=step)

    def truncate_after(self, step: int) -> None:
        """A resumed run redoes the steps after `step`: a SessionLog START at `step` makes TensorBoard's
        reader drop the orphaned points past it (what SummaryWriter's `purge_step` does: points at or
        after the START step are dropped, so it goes at `step + 1`)."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        with self._lock:
            self._writer._get_file_writer().add_event(
                Event(step=step + 1, session_log=SessionLog(status=SessionLog.START))
            )

    def flush(self) -> None:
        with self._lock:
            self._writer.flush()

    def close(self) -> None:
        with self._lock:
            self._writer.close()


# -- Prometheus -------------------------------------------------------------------------------------
_PROM_BAD = re.compile(r"[^a-zA-Z0-9_:]")


def prometheus_name(name: str, prefix: str = "lmloom") -> str:
    """`loss/code` -> `lmloom_loss_code`; `resource/ram_percent` -> `lmloom_resource_ram_percent`."""
    cleaned = _PROM_BAD.sub("_", name).strip("_") or "value"
    return f"{prefix}_{cleaned}" if prefix else cleaned


class PrometheusSink(MetricSink):
    """Gauges of the latest values, served for scraping while a long job runs.

    Its own registry (never the process-wide default, so two sinks or a test never collide), served by
    `prometheus_client.start_http_server` on `host` (loopback unless told otherwise: the endpoint has
    no authentication) at `port` (0: any free port; `self.port` says which). Besides one gauge per
    scalar it exports `lmloom_step`, `lmloom_last_log_timestamp_seconds` (a stalled job stops moving
    it) and `lmloom_events_total{kind=...}`. `labels` (e.g. {"step": "pretrain"}) are attached to
    every series.
    """

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        labels: Mapping[str, str] | None = None,
        prefix: str = "lmloom",
        serve: bool = True,
    ):
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self._Gauge = Gauge
        self.registry = CollectorRegistry()
        self.prefix = prefix
        self.labels = {str(k): str(v) for k, v in (labels or {}).items()}
        names = list(self.labels)
        self._gauges: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._step = Gauge(f"{prefix}_step", "last step logged", names, registry=self.registry)
        self._stamp = Gauge(
            f"{prefix}_last_log_timestamp_seconds", "unix time of the last log", names, registry=self.registry
        )
        self._events = Counter(f"{prefix}_events", "events by kind", [*names, "kind"], registry=self.registry)
        self._server = self._thread = None
        self.host, self.port = host, port
        if serve:
            from prometheus_client import start_http_server

            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
            self.port = self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def _labelled(self, metric):
        return metric.labels(**self.labels) if self.labels else metric

    def _gauge(self, name: str):
        key = prometheus_name(name, self.prefix)
        gauge = self._gauges.get(key)
        if gauge is None:
            gauge = self._Gauge(key, f"latest {name}", list(self.labels), registry=self.registry)
            self._gauges[key] = gauge
        return gauge

    def log(self, step: int, **values: Any) -> None:
        kind, values = _split_event(values)
        if kind is not None:
            self.event(kind, step=step, **values)
            return
        with self._lock:
            for name, value in scalars(values).items():
                self._labelled(self._gauge(name)).set(value)
            self._labelled(self._step).set(step)
            self._labelled(self._stamp).set(time.time())

    def event(self, kind: str, **fields: Any) -> None:
        with self._lock:
            self._events.labels(**self.labels, kind=kind).inc()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# -- MLflow (optional) ------------------------------------------------------------------------------
def mlflow_available() -> bool:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return False
    return True


class MlflowSink(MetricSink):
    """Scalars to the active (or a new) MLflow run, events as JSON artifacts. Only when `mlflow` is
    installed; lmloom does not depend on it. MLflow metric names allow `/`, so names pass unchanged."""

    def __init__(self, run_name: str | None = None, tracking_uri: str | None = None):
        import mlflow

        self._mlflow = mlflow
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        self._own_run = mlflow.active_run() is None
        if self._own_run:
            mlflow.start_run(run_name=run_name)
        self._events = 0
        self.last_step = 0

    def log(self, step: int, **values: Any) -> None:
        kind, values = _split_event(values)
        if kind is not None:
            self.event(kind, step=step, **values)
            return
        self.last_step = step
        found = {k: v for k, v in scalars(values).items() if math.isfinite(v)}
        if found:
            self._mlflow.log_metrics(found, step=step)

    def event(self, kind: str, **fields: Any) -> None:
        self._events += 1
        record = {"kind": kind, "step": fields.pop("step", self.last_step), **fields}
        self._mlflow.log_dict(record, f"events/{self._events:05d}-{kind}.json")

    def close(self) -> None:
        if self._own_run:
            self._mlflow.end_run()


# -- fan-out ----------------------------------------------------------------------------------------
class MultiSink(MetricSink):
    """Every call to every sink; one failing sink (a full disk for TensorBoard) does not stop the
    others or the training run: its error is kept in `errors` and it is dropped.

    Drop-in for `JsonlMetrics`: `path`, `records()` and `truncate_after()` are those of the first JSONL
    sink (truncation is passed to every sink that supports it, and to every `owned` thing that does,
    e.g. the resource sampler's own `resources.jsonl`).
    """

    def __init__(self, sinks: Iterable[MetricSink], owned: Iterable[Any] = ()):
        self.sinks = list(sinks)
        # Closed before the sinks (e.g. a resource sampler logging into us), truncated with them if they can be.
        self.owned = list(owned)
        self.errors: list[tuple[str, str]] = []
        # None until the run logs or says where it is (`truncate_after`): a resource sampler holds its
        # readings until then, so one taken while a checkpoint loads is not logged at step 0.
        self.last_step: int | None = None

    @property
    def jsonl(self) -> JsonlMetrics | None:
        return next((s for s in self.sinks if isinstance(s, JsonlMetrics)), None)

    @property
    def path(self) -> Path:
        jsonl = self.jsonl
        if jsonl is None:
            raise AttributeError("this MultiSink has no JSONL sink, so no path")
        return jsonl.path

    def records(self) -> list[dict[str, Any]]:
        jsonl = self.jsonl
        return jsonl.records() if jsonl is not None else []

    def _each(self, method: str, *args: Any, **kwargs: Any) -> None:
        for sink in list(self.sinks):
            call = getattr(sink, method, None)
            if call is None:
                continue
            try:
                call(*args, **kwargs)
            except StopRun:
                raise
            except Exception as exc:  # noqa: BLE001  (a monitoring failure must not end a training run)
                if isinstance(sink, JsonlMetrics):
                    raise  # the run's own record: losing it silently is not acceptable
                self.errors.append((type(sink).__name__, f"{type(exc).__name__}: {exc}"))
                self.sinks.remove(sink)

    def log(self, step: int, **values: Any) -> None:
        self.last_step = step
        self._each("log", step, **values)

    def event(self, kind: str, **fields: Any) -> None:
        self._each("event", kind, **fields)

    def truncate_after(self, step: int) -> None:
        # The run is at `step` now (a resume, a rollback; -1, a fresh start, is step 0): the resource
        # sampler logs at `last_step`, so its samples until the next log are at `step`, not before it.
        self.last_step = max(0, step)
        self._each("truncate_after", step)
        for thing in self.owned:
            truncate = getattr(thing, "truncate_after", None)
            if truncate is None:
                continue
            try:
                truncate(step)
            except Exception as exc:  # noqa: BLE001  (like a monitoring sink: must not end the run)
                self.errors.append((type(thing).__name__, f"{type(exc).__name__}: {exc}"))

    def close(self) -> None:
        for thing in self.owned:
            thing.close()
        self.owned = []
        self._each("close")


# -- configuration ----------------------------------------------------------------------------------
class MonitorConfig(StrictConfig):
    """A stage's `monitor:` block. Nothing here changes what a stage computes, so a stage lists
    `monitor` in its `launch_fields` and these settings never change its stage key."""

    tensorboard: bool = Field(False, description="write TensorBoard event files")
    tensorboard_dir: str | None = Field(
        None, description="where [default: <store>/tensorboard/<step>]; `tensorboard --logdir` it"
    )
    prometheus_port: int | None = Field(
        None, ge=0, le=65535, description="serve /metrics on this port (0: any free port) while running"
    )
    prometheus_host: str = Field("127.0.0.1", description="address to bind; the endpoint has no auth")
    resources: bool = Field(False, description="sample CPU, memory, disk and GPU in the background")
    resource_interval_s: float = Field(10.0, gt=0, description="seconds between resource samples")
    mlflow: bool = Field(False, description="also log to MLflow (only if mlflow is installed)")


def open_sinks(
    config: MonitorConfig | None,
    jsonl_path: Path,
    *,
    store_root: Path | None = None,
    step_name: str = "run",
    main: bool = True,
    console_log=None,
    observers: Iterable[MetricSink] = (),
) -> MultiSink:
    """The sinks a `monitor:` block asks for, behind one MultiSink whose JSONL sink is `jsonl_path`.

    Only the main process (`main`, rank 0 under torchrun) adds TensorBoard, Prometheus, MLflow and the
    resource sampler; other ranks get their JSONL file alone. With resources on, the sampler's
    `resource/*` scalars go to the other sinks and to `resources.jsonl` beside `jsonl_path`, never into
    the run's metrics.jsonl (which resume compares exactly). `observers` (the stage context's, e.g. a
    sweep's pruning sink) see every record after the JSONL sink, on the main process only.
    """
    config = config or MonitorConfig()
    jsonl = JsonlSink(jsonl_path)
    extra: list[MetricSink] = []
    if main and config.tensorboard:
        root = Path(store_root) if store_root is not None else Path(jsonl_path).parent
        log_dir = Path(config.tensorboard_dir) if config.tensorboard_dir else root / "tensorboard" / step_name
        extra.append(TensorBoardSink(log_dir))
    if main and config.prometheus_port is not None:
        extra.append(
            PrometheusSink(config.prometheus_port, config.prometheus_host, labels={"step": step_name})
        )
        if console_log is not None:
            console_log(f"Prometheus metrics at {extra[-1].url}")
    if main and config.mlflow:
        if mlflow_available():
            extra.append(MlflowSink(run_name=step_name))
        elif console_log is not None:
            console_log("monitor.mlflow is set but mlflow is not installed; not logging to MLflow")
    multi = MultiSink([jsonl, *extra, *(observers if main else ())])
    if main and config.resources:
        from lmloom.monitor.resources import ResourceSampler

        record = JsonlSink(Path(jsonl_path).with_name("resources.jsonl"))
        sampler = ResourceSampler(
            MultiSink([record, *extra]),
            interval_s=config.resource_interval_s,
            disk_path=store_root or Path(jsonl_path).parent,
            step=lambda: multi.last_step,
            record=record,  # truncated and closed by the sampler (the others are multi's sinks already)
        )
        sampler.start()
        multi.owned.append(sampler)
    return multi
