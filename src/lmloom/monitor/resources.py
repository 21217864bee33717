"""Resource sampling: CPU, memory, disk and GPU every few seconds, in a background thread, into a sink.

Each sample is logged as `resource/*` scalars at the run's current step:

    resource/cpu_percent           this process (100 = one core busy; psutil's convention)
    resource/system_cpu_percent    the whole machine, 0-100
    resource/rss_bytes             this process's resident memory
    resource/ram_percent           system memory in use, 0-100 (MemAvailable, not MemFree)
    resource/ram_used_bytes, resource/ram_total_bytes
    resource/disk_free_percent     free space where the store lives, 0-100
    resource/disk_free_bytes
    resource/gpu<i>_util_percent   when nvidia-ml-py is importable and finds GPUs
    resource/gpu<i>_mem_bytes, resource/gpu<i>_mem_percent   (torch.cuda, or NVML)

psutil is used when installed, else Linux /proc (so it works in a bare container). An alert threshold
crossed produces one `event("resource_alert", ...)` per crossing: it fires when the value goes past the
threshold and re-arms only once it comes back (no alert every sample while RAM stays at 95%).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "resource/"


@dataclass(frozen=True)
class Threshold:
    """Alert when `metric` goes above (`above=True`) or below `limit`."""

    metric: str  # without the prefix, e.g. "ram_percent"
    limit: float
    above: bool = True

    def crossed(self, value: float) -> bool:
        return value > self.limit if self.above else value < self.limit

    def describe(self) -> str:
        return f"{self.metric} {'>' if self.above else '<'} {self.limit:g}"


DEFAULT_THRESHOLDS = (
    Threshold("ram_percent", 90.0),
    Threshold("disk_free_percent", 5.0, above=False),
    Threshold("gpu0_mem_percent", 95.0),
)


# -- readers ----------------------------------------------------------------------------------------
class _ProcReader:
    """/proc fallback: CPU from jiffies between two reads, memory from /proc/meminfo and statm."""

    def __init__(self):
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._last: tuple[float, float, float, float] | None = None  # (wall, proc cpu, sys busy, sys all)

    def _proc_cpu_s(self) -> float:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self._ticks  # utime + stime

    @staticmethod
    def _system_jiffies() -> tuple[float, float]:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return sum(values) - idle, sum(values)

    def cpu(self) -> dict[str, float]:
        now, proc = time.monotonic(), self._proc_cpu_s()
        busy, total = self._system_jiffies()
        found = {}
        if self._last is not None:
            wall, last_proc, last_busy, last_total = self._last
            if now > wall:
                found["cpu_percent"] = 100.0 * (proc - last_proc) / (now - wall)
            if total > last_total:
                found["system_cpu_percent"] = 100.0 * (busy - last_busy) / (total - last_total)
        self._last = (now, proc, busy, total)
        return found

    def memory(self) -> dict[str, float]:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            info[name] = int(rest.split()[0]) * 1024
        total = info["MemTotal"]
        available = info.get("MemAvailable", info.get("MemFree", 0))
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * self._page
        return {
            "rss_bytes": float(rss),
            "ram_total_bytes": float(total),
            "ram_used_bytes": float(total - available),
            "ram_percent": 100.0 * (total - available) / total if total else 0.0,
        }


class _PsutilReader:
    def __init__(self, psutil):
        self._psutil = psutil
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first call only starts the interval
        psutil.cpu_percent(None)

    def cpu(self) -> dict[str, float]:
        return {
            "cpu_percent": float(self._process.cpu_percent(None)),
            "system_cpu_percent": float(self._psutil.cpu_percent(None)),
        }

    def memory(self) -> dict[str, float]:
        vm = self._psutil.virtual_memory()
        return {
            "rss_bytes": float(self._process.memory_info().rss),
            "ram_total_bytes": float(vm.total),
            "ram_used_bytes": float(vm.total - vm.available),
            "ram_percent": float(vm.percent),
        }


def _host_reader():
    try:
        import psutil
    except ImportError:
        return _ProcReader()
    return _PsutilReader(psutil)


def _gpu_reader() -> Callable[[], dict[str, float]] | None:
    """NVML (utilisation and memory of every GPU) if importable, else torch.cuda memory, else None."""
    try:
        import pynvml  # the nvidia-ml-py package

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # noqa: BLE001  (not installed, no driver, no GPU: all mean "no NVML")
        handles = []
    if handles:

        def nvml() -> dict[str, float]:
            found = {}
            for i, handle in enumerate(handles):
                util = pynvml.nvmlDeviceGetUtilizationRates(handle)
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
                found[f"gpu{i}_util_percent"] = float(util.gpu)
                found[f"gpu{i}_mem_bytes"] = float(mem.used)
                found[f"gpu{i}_mem_percent"] = 100.0 * mem.used / mem.total if mem.total else 0.0
            return found

        return nvml
    try:
        import torch

        if not torch.cuda.is_available():
            return None
    except Exception:  # noqa: BLE001
        return None

    def cuda() -> dict[str, float]:
        found = {}
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            found[f"gpu{i}_mem_bytes"] = float(total - free)
            found[f"gpu{i}_mem_percent"] = 100.0 * (total - free) / total if total else 0.0
            with contextlib.suppress(Exception):  # torch.cuda.utilization needs pynvml itself
                found[f"gpu{i}_util_percent"] = float(torch.cuda.utilization(i))
        return found

    return cuda


# -- the sampler ------------------------------------------------------------------------------------
class ResourceSampler:
    """Samples every `interval_s` seconds in a daemon thread and logs to `sink` (any MetricSink).

    `step`: a callable giving the step to log at (e.g. the training loop's last logged step); by
    default the sample's own count. While it gives None (a run still loading its checkpoint, not yet
    placed at a step), readings are held and logged at the step the run is placed at. `sample()` takes
    one sample synchronously (tests, a final reading).

    `record`: the JSONL sink among `sink`'s that must follow the run's metrics when a run is resumed or
    rolled back (`truncate_after`). Its truncation and each sample's step-read-and-log hold one lock, so
    a sample read before a rollback never lands after it. The sampler closes it after its last reading.
    """

    def __init__(
        self,
        sink,
        interval_s: float = 10.0,
        disk_path: Path | str | None = None,
        thresholds: tuple[Threshold, ...] = DEFAULT_THRESHOLDS,
        step: Callable[[], int | None] | None = None,
        gpu: bool = True,
        record=None,
    ):
        self.sink = sink
        self.interval_s = interval_s
        self.disk_path = Path(disk_path) if disk_path is not None else Path.cwd()
        self.thresholds = tuple(thresholds)
        self._step = step
        self._record = record
        self._lock = threading.Lock()
        self._held: list[dict[str, float]] = []  # readings taken before the run was placed at a step
        self._host = _host_reader()
        self._gpu = _gpu_reader() if gpu else None
        self._alerting: set[tuple[str, bool]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples = 0
        self.alerts: list[dict[str, Any]] = []
        self.errors: list[str] = []

    def read(self) -> dict[str, float]:
        """One reading, without the prefix: {"cpu_percent": ..., "ram_percent": ..., ...}."""
        found = {**self._host.cpu(), **self._host.memory()}
        path = self.disk_path
        while not path.exists() and path != path.parent:
            path = path.parent  # the store may not exist yet: measure the filesystem it will be on
        usage = shutil.disk_usage(path)
        found["disk_free_bytes"] = float(usage.free)
        found["disk_free_percent"] = 100.0 * usage.free / usage.total if usage.total else 0.0
        if self._gpu is not None:
            found.update(self._gpu())
        return found

    def sample(self) -> dict[str, float]:
        values = self.read()
        with self._lock:
            self.samples += 1
            step = self._step() if self._step is not None else self.samples
            if step is None:
                self._held.append(values)
            else:
                self._log_held(step)
                self._log(step, values)
        return values

    def truncate_after(self, step: int) -> None:
        """The run is at `step` now (a resume or a rollback; -1, a fresh start, is step 0): `record`
        drops its samples past `step`, and readings held until now are logged at the run's step."""
        with self._lock:
            if self._record is not None:
                self._record.truncate_after(step)
            self._log_held(max(0, step))

    def _log(self, step: int, values: dict[str, float]) -> None:
        self.sink.log(step, **{PREFIX + name: value for name, value in values.items()})
        self._check(values, step)

    def _log_held(self, step: int) -> None:
        held, self._held = self._held, []
        for values in held:
            self._log(step, values)

    def _check(self, values: dict[str, float], step: int) -> None:
        for threshold in self.thresholds:
            value = values.get(threshold.metric)
            if value is None:
                continue
            key = (threshold.metric, threshold.above)  # one alert state per metric and direction
            if threshold.crossed(value):
                if key not in self._alerting:  # once per crossing
                    self._alerting.add(key)
                    alert = {
                        "metric": PREFIX + threshold.metric,
                        "value": round(value, 3),
                        "limit": threshold.limit,
                        "direction": "above" if threshold.above else "below",
                        "step": step,
                    }
                    self.alerts.append(alert)
                    self.sink.event("resource_alert", **alert)
            else:
                self._alerting.discard(key)  # back on the right side: the next crossing alerts again

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001  (a failed reading must not kill the thread)
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def start(self) -> ResourceSampler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lmloom-resources", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5)
            self._thread = None
            try:  # one last reading, so even a run shorter than the interval has its resources logged
                self.sample()
            except Exception as exc:  # noqa: BLE001
                self.errors.append(f"{type(exc).__name__}: {exc}")
        try:
            with self._lock:  # a run that ended before it was placed at a step: its readings at step 0
                self._log_held(0)
        except Exception as exc:  # noqa: BLE001
            self.errors.append(f"{type(exc).__name__}: {exc}")
        if self._record is not None:
            self._record.close()

    def __enter__(self) -> ResourceSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
