"""Run a recipe: stages in dependency order, each cached by its stage key, each audited.

The stage key is the hash of (stage name, stage version, full config, input artifact ids, and a
fingerprint of anything read from outside the store, such as the source files). A finished
stage with the same key is reused after its artifact verifies; an unfinished one finds its scratch
directory again and resumes from there.

Under torchrun every rank runs this same plan: a `distributed` stage runs on all ranks, and only rank
0 audits and publishes its artifact (the others write into a staging directory they then discard);
any other stage runs on rank 0 alone while the rest wait for the id of the artifact it made. The
store must therefore be one that every rank sees (a shared filesystem or an object store).
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass

from lmloom.artifacts.hashing import sha256_json
from lmloom.artifacts.store import Artifact
from lmloom.config import Recipe, StrictConfig, validate_config
from lmloom.context import RunContext
from lmloom.distributed import World, barrier, broadcast_text, world
from lmloom.errors import ConfigError
from lmloom.stages import Stage, config_dict, get_stage

ARTIFACT_REF = "artifact:"


@dataclass(frozen=True)
class PlannedStep:
    name: str
    stage: Stage
    config: StrictConfig
    inputs: dict[str, str]  # role -> step name, or "artifact:<id>"
    encrypt: bool = False  # the recipe's security.encrypt


@dataclass(frozen=True)
class StepResult:
    name: str
    stage: Stage
    artifact: Artifact
    reused: bool
    seconds: float


def plan(recipe: Recipe) -> list[PlannedStep]:
    """Validate every stage config and input reference, and order the steps so inputs come first."""
    steps: dict[str, PlannedStep] = {}
    for name, spec in recipe.stages.items():
        stage = get_stage(spec.stage)
        config = validate_config(stage.config, spec.config, f"stages.{name}.config")
        missing = sorted(stage.inputs.keys() - spec.inputs.keys())
        extra = sorted(role for role in spec.inputs if stage.input_kind(role) is None)
        if missing or extra:
            need = ", ".join(f"{role} ({kind})" for role, kind in stage.inputs.items()) or "none"
            bad = f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(extra)}"
            raise ConfigError(f"stages.{name}.inputs: {bad}; {spec.stage} takes inputs: {need}")
        for role, ref in spec.inputs.items():
            if not ref.startswith(ARTIFACT_REF) and ref not in recipe.stages:
                raise ConfigError(
                    f"stages.{name}.inputs.{role} = {ref!r}: no such stage in this recipe "
                    f"(stages: {', '.join(recipe.stages)}; or use artifact:<id>)"
                )
        steps[name] = PlannedStep(name, stage, config, dict(spec.inputs), recipe.security.encrypt)
    return _topological(steps)


def _topological(steps: dict[str, PlannedStep]) -> list[PlannedStep]:
    ordered: list[PlannedStep] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ConfigError(f"stages form a cycle: {' -> '.join([*chain, name])}")
        state[name] = "visiting"
        for ref in steps[name].inputs.values():
            if not ref.startswith(ARTIFACT_REF):
                visit(ref, [*chain, name])
        state[name] = "done"
        ordered.append(steps[name])

    for name in steps:
        visit(name, [])
    return ordered


def stage_key(stage: Stage, config: StrictConfig, input_ids: dict[str, str], encrypt: bool = False) -> str:
    outside = stage.fingerprint(config) if stage.fingerprint else None
    return sha256_json(
        {
            "stage": stage.name,
            "version": stage.version,
            "config": {k: v for k, v in config_dict(config).items() if k not in stage.launch_fields},
            "inputs": input_ids,
            "outside_inputs": outside,
            "encrypt": encrypt,
        }
    )


def run_recipe(recipe: Recipe, ctx: RunContext) -> list[StepResult]:
    return run_plan(plan(recipe), ctx)


def run_plan(steps: list[PlannedStep], ctx: RunContext) -> list[StepResult]:
    for step in steps:  # a stage the principal may not run stops the recipe before anything runs
        authorize(step, ctx)
    if any(step.encrypt for step in steps):
        ctx.store.security.write_codec(True)  # no key configured: fail before any stage starts
    signing = getattr(ctx.store.security, "signing", None)
    if signing is not None:  # a broken signing key (open to others, a folder, missing) fails now, not
        signing.key()  # at the first publish, after a stage has run for nothing
    produced: dict[str, Artifact] = {}
    results: list[StepResult] = []
    w = world()
    for step in steps:
        inputs = {role: _resolve_input(ref, produced, ctx) for role, ref in step.inputs.items()}
        if w.is_distributed:
            result = _run_step_distributed(step, inputs, ctx, w)
        else:
            result = run_step(step, inputs, ctx)
        produced[step.name] = result.artifact
        results.append(result)
    return results


def _resolve_input(ref: str, produced: dict[str, Artifact], ctx: RunContext) -> Artifact:
    if ref.startswith(ARTIFACT_REF):
        return ctx.store.open(ref[len(ARTIFACT_REF) :])
    return produced[ref]


def authorize(step: PlannedStep, ctx: RunContext) -> None:
    """The acting principal must hold the stage's permissions to run it or to reuse its cached result."""
    assert ctx.access is not None
    ctx.access.require(
        *step.stage.permissions, action=f"stage {step.stage.name}", step=step.name, stage=step.stage.name
    )


def _run_step_distributed(
    step: PlannedStep, inputs: dict[str, Artifact], ctx: RunContext, w: World
) -> StepResult:
    """One step of a torchrun launch: every rank ends with the artifact rank 0 published."""
    barrier()  # rank 0's previous commit is visible, and no rank is still reading the cache
    if not step.stage.distributed:
        if w.is_main:
            result = run_step(step, inputs, ctx)
            broadcast_text(result.artifact.id)
            return result
        started = time.perf_counter()
        artifact = ctx.store.open(broadcast_text(None))  # verified like any other read
        return StepResult(step.name, step.stage, artifact, True, round(time.perf_counter() - started, 3))
    result = run_step(step, inputs, ctx, publish=w.is_main)
    barrier()  # every rank is done with the stage's scratch state before anyone moves on
    artifact_id = broadcast_text(result.artifact.id if w.is_main else None)
    if w.is_main:
        shutil.rmtree(
            ctx.store.work_dir(stage_key(step.stage, step.config, _ids(inputs), step.encrypt)), True
        )
    else:
        result = StepResult(step.name, step.stage, ctx.store.open(artifact_id), result.reused, result.seconds)
    return result


def _ids(inputs: dict[str, Artifact]) -> dict[str, str]:
    return {role: artifact.id for role, artifact in inputs.items()}


def _outcome_of(exc: BaseException) -> str:
    """How a failed stage ended, for its `stage.end` audit entry: a sink asking the run to stop (a
    sweep pruning a trial) is a decision, not an error, and the run report does not list it as one."""
    from lmloom.monitor.sinks import StopRun

    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return "stopped" if isinstance(exc, StopRun) else "error"


def run_step(
    step: PlannedStep, inputs: dict[str, Artifact], ctx: RunContext, publish: bool = True
) -> StepResult:
    """Run (or reuse) one stage. publish=False (ranks > 0 of a distributed stage): run it, audit
    nothing, discard the output; the caller takes rank 0's artifact instead."""
    # Before anything else, the stage key included: its fingerprint reads the raw sources.
    authorize(step, ctx)
    stage = step.stage
    for role, artifact in inputs.items():
        want = stage.input_kind(role)
        if artifact.kind != want:
            raise ConfigError(
                f"stages.{step.name}.inputs.{role}: artifact {artifact.short_id} is a {artifact.kind}, "
                f"{stage.name} needs a {want}"
            )
    input_ids = {role: artifact.id for role, artifact in inputs.items()}
    key = stage_key(stage, step.config, input_ids, step.encrypt)
    # Two runs of one stage key would share its work folder (checkpoints, metrics): the second waits,
    # then reuses what the first published. (Under torchrun every rank runs the stage: no lock there.)
    with _stage_lock(ctx, key, step.name) if not world().is_distributed else contextlib.nullcontext():
        return _reuse_or_run(step, inputs, ctx, key, publish)


@contextlib.contextmanager
def _stage_lock(ctx: RunContext, key: str, step: str) -> Iterator[None]:
    folder = ctx.store.root / "locks"  # beside work/, whose folders are one per stage key
    folder.mkdir(exist_ok=True)
    path = folder / f"{key}.lock"  # never removed: unlinking a lock others wait on races
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            ctx.console.print(
                f"[dim]{step}:[/dim] another run is running this stage with the same inputs and config; "
                "waiting for it, to reuse its result",
                highlight=False,
            )
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _reuse_or_run(
    step: PlannedStep, inputs: dict[str, Artifact], ctx: RunContext, key: str, publish: bool
) -> StepResult:
    stage = step.stage
    input_ids = {role: artifact.id for role, artifact in inputs.items()}
    started = time.perf_counter()

    def audit(event: str, **fields) -> None:
        if not publish:
            return
        ctx.audit.append(event, ctx.principal, step=step.name, stage=stage.name, stage_key=key, **fields)

    def elapsed() -> float:
        return round(time.perf_counter() - started, 3)

    cached = ctx.store.find_by_stage_key(key)
    if cached:
        artifact = ctx.store.open(cached)  # a tampered cached artifact is refused, never reused
        audit("stage.reuse", outputs=[artifact.id])
        return StepResult(step.name, stage, artifact, True, elapsed())

    config_json = config_dict(step.config)
    audit("stage.start", inputs=sorted(input_ids.values()), config_hash=sha256_json(config_json))
    stage_ctx = ctx.for_stage(step.name, key, step.encrypt)
    out = None
    try:  # every stage.start gets its stage.end, whatever fails (the writer's key lookup included)
        out = ctx.store.create(
            kind=stage.kind,
            stage=stage.name,
            config=config_json,
            inputs=input_ids,
            stage_key=key,
            principal=ctx.principal,
            encrypt=step.encrypt,
        )
        stage.run(step.config, inputs, stage_ctx, out)
        if not publish:
            out.abort()
            return StepResult(step.name, stage, None, False, elapsed())  # type: ignore[arg-type]
        artifact = out.commit()
    except BaseException as exc:
        if out is not None:
            out.abort()
        outcome = _outcome_of(exc)
        audit("stage.end", outcome=outcome, error=f"{type(exc).__name__}: {exc}"[:500], seconds=elapsed())
        raise
    # The scratch state is only for resuming (under torchrun, removed once every rank is past it).
    if not world().is_distributed:
        shutil.rmtree(stage_ctx.work_dir, ignore_errors=True)
    seconds = elapsed()
    audit("stage.end", outcome="ok", outputs=[artifact.id], seconds=seconds)
    return StepResult(step.name, stage, artifact, False, seconds)
