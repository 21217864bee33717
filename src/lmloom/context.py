"""What a stage may use: the store, the audit log, who is acting, a console, a scratch dir for resume.

Stages get every capability through this object and never reach for globals, so tests and other
front-ends (a server, a sweep) can hand them their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from lmloom.artifacts.store import ArtifactStore
from lmloom.monitor.progress import progress_bar
from lmloom.security.audit import AuditLog
from lmloom.security.context import store_audit_log
from lmloom.security.policy import Access, resolve_access


@dataclass
class RunContext:
    store: ArtifactStore
    console: Console = field(default_factory=lambda: Console(stderr=True))
    # Who acts, and under which access policy; resolved from the store when not given. A `principal`
    # passed here is a label in single-user mode and must match the policy's principal otherwise.
    principal: str = ""
    access: Access | None = None
    # Extra metric sinks by recipe step name, handed to that step's stage (a sweep's pruning sink).
    observers: dict[str, tuple] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.access is None:
            self.access = resolve_access(self.store.root, claimed=self.principal or None)
        self.principal = self.access.principal

    @property
    def audit(self) -> AuditLog:
        return store_audit_log(self.store.root)

    def for_stage(self, step: str, stage_key: str, encrypt: bool = False) -> StageContext:
        work_dir = self.store.work_dir(stage_key)
        observers = tuple(self.observers.get(step, ()))
        return StageContext(self.store, self.console, self.principal, step, work_dir, encrypt, observers)


@dataclass
class StageContext:
    store: ArtifactStore
    console: Console
    principal: str
    step: str  # the recipe's name for this stage, e.g. "pretrain"
    work_dir: Path  # survives interruption; the same stage key finds it again on re-run
    encrypt: bool = False  # the run encrypts at rest: scratch files in work_dir must be encrypted too
    observers: tuple = ()  # metric sinks to add to the stage's own (lmloom.monitor.sinks.MetricSink)

    def progress(self, total: float | None, description: str, unit: str = "it"):
        return progress_bar(self.console, total, f"{self.step}: {description}", unit)

    def log(self, message: str) -> None:
        self.console.print(f"[dim]{self.step}:[/dim] {message}", highlight=False)
