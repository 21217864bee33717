"""Hyperparameter search over a recipe (`lmloom sweep`): Optuna samples the values, each trial is a run.

A space file names what to vary, what to score and how to prune:

    objective: {step: pretrain, metric: val_loss, direction: minimize}
    trials: 8
    set: {pretrain.max_steps: 120, pretrain.eval_every: 20}     # the same for every trial
    params:
      pretrain.optim.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
      pretrain.optim.warmup_steps: {type: int, low: 0, high: 40, step: 10}
      pretrain.model.d_model: {type: categorical, choices: [128, 256]}
    pruner: {type: median, n_startup_trials: 2, n_warmup_steps: 20}
    sampler: {type: tpe, seed: 0}

Keys are dotted paths into the recipe as `--set` takes them (`pretrain.optim.lr` is
`stages.pretrain.config.optim.lr`), each checked against the stage's config before anything runs.

A trial is the recipe with its values, run as a normal run in the same store: the objective's step
and the steps it needs (nothing after it), so data and tokenizer steps are reused from the cache and
every trial's model is a verified artifact with its lineage and audit entries. Pruning: a metric sink
on the objective's step (`PruningSink`, handed to the stage through the run context) reports each
intermediate value of the metric (train.pretrain's periodic validation loss) to the trial; when
Optuna says prune it raises `TrialPruned`, the stage stops, the pipeline discards the unfinished
output and the sweep deletes the trial's scratch checkpoints: nothing of a pruned trial can be reused
as finished. Its outcome is in the audit log (`sweep.trial`) and the summary.

The study is Optuna's journal file `<store>/sweeps/<study>/optuna.journal` (no database server); the
same command with `--resume` continues an interrupted sweep and re-runs an interrupted trial, whose
training resumes from its last checkpoint. `sweep.json` and `sweep.html` (the summary and its plots,
self-contained, no network) are written beside it. One process: sweeps do not run under torchrun.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import shutil
import sys
import time
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from lmloom.artifacts.atomic import write_text_atomic
from lmloom.artifacts.hashing import sha256_json
from lmloom.config import (
    Recipe,
    StageSpec,
    StrictConfig,
    expand_key,
    format_validation_error,
    set_path,
)
from lmloom.context import RunContext
from lmloom.errors import ConfigError, IntegrityError, LmloomError, SecurityError
from lmloom.monitor.sinks import MetricSink, StopRun

SPACES_PACKAGE = "lmloom.recipes"  # built-in space files live in its sweeps/ folder
SPACES_DIR = "sweeps"
JOURNAL = "optuna.journal"
STATES = ("complete", "pruned", "failed", "running", "waiting")
_STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


# -- the space file -------------------------------------------------------------------------------
class FloatParam(StrictConfig):
    type: Literal["float"]
    low: float
    high: float
    log: bool = Field(False, description="sample on a log scale (low must be > 0)")
    step: float | None = Field(None, gt=0, description="sample on a grid of this spacing")

    @model_validator(mode="after")
    def _check(self) -> FloatParam:
        _check_range(self.low, self.high, self.log)
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self


class IntParam(StrictConfig):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> IntParam:
        _check_range(self.low, self.high, self.log)
        if self.log and self.step != 1:
            raise ValueError("log and step cannot be combined")
        return self


Scalar = bool | int | float | str | None


class CategoricalParam(StrictConfig):
    type: Literal["categorical"]
    choices: list[Scalar] = Field(min_length=1, description="numbers, strings, booleans or null")


def _check_range(low: float, high: float, log: bool) -> None:
    if high < low:
        raise ValueError(f"high ({high}) is below low ({low})")
    if log and low <= 0:
        raise ValueError(f"log: true needs low > 0 (got {low})")


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class Objective(StrictConfig):
    step: str | None = Field(None, description="the recipe step scored [default: its first train.* step]")
    metric: str = Field("val_loss", description="a number in the step's artifact metadata and metrics")
    direction: Literal["minimize", "maximize"] = "minimize"


class PrunerSpec(StrictConfig):
    type: Literal["median", "percentile", "none"] = "median"
    n_startup_trials: int = Field(2, ge=0, description="trials that finish before any is pruned")
    n_warmup_steps: int = Field(0, ge=0, description="no pruning before this training step")
    interval_steps: int = Field(1, ge=1)
    percentile: float = Field(25.0, gt=0, lt=100, description="percentile pruner: keep the best this many %")


class SamplerSpec(StrictConfig):
    type: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    n_startup_trials: int = Field(4, ge=0, description="tpe: random trials before it models the space")


class SweepSpace(StrictConfig):
    objective: Objective = Objective()
    params: dict[str, Param] = Field(min_length=1)
    set: dict[str, Any] = Field(default_factory=dict, description="fixed overrides for every trial")
    enqueue: list[dict[str, Any]] = Field(
        default_factory=list, description="trials to run first, params key -> value (e.g. a baseline)"
    )
    trials: int = Field(8, ge=1, description="finished trials the study should have")
    timeout_s: float | None = Field(None, gt=0, description="start no trial after this many seconds")
    pruner: PrunerSpec = PrunerSpec()
    sampler: SamplerSpec = SamplerSpec()


def builtin_spaces() -> list[str]:
    folder = resources.files(SPACES_PACKAGE).joinpath(SPACES_DIR)
    return (
        sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")) if folder.is_dir() else []
    )


def load_space(ref: str) -> tuple[SweepSpace, str]:
    """(space, where) from a YAML file path or the name of a built-in space (`quickstart-pretrain`)."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"space file {ref} does not exist")
        text, where = path.read_text(encoding="utf-8"), str(path)
    elif ref in builtin_spaces():
        text = (
            resources.files(SPACES_PACKAGE)
            .joinpath(SPACES_DIR)
            .joinpath(f"{ref}.yaml")
            .read_text(encoding="utf-8")
        )
        where = ref
    else:
        known = ", ".join(builtin_spaces()) or "none"
        raise ConfigError(f"no space file {ref!r} (a YAML path, or a built-in space: {known})")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"space {where}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"space {where}: expected a mapping with 'params' (and 'objective', 'set', ...)")
    try:
        return SweepSpace.model_validate(raw), where
    except ValidationError as exc:
        raise ConfigError(f"space {where}: " + format_validation_error(exc, "", SweepSpace)) from None


# -- checking a space against a recipe ------------------------------------------------------------
@dataclasses.dataclass
class SweepPlan:
    """A space checked against a recipe: what every trial starts from and which steps it runs."""

    recipe: Recipe  # with the space's fixed `set` applied
    space: SweepSpace
    where: str  # the space file, for messages
    target: str  # the objective's step
    steps: list[str]  # the target and the steps it needs, in run order
    raw: dict[str, Any]  # the recipe as a dict, the base of every trial

    def trial_recipe(self, values: dict[str, Any]) -> Recipe:
        raw = copy.deepcopy(self.raw)
        for key, value in values.items():
            assign(raw, key, value, f"{self.where}: params.{key}")
        return Recipe.model_validate(raw)

    def trial_steps(self, values: dict[str, Any]):
        from lmloom.pipeline import plan

        return [s for s in plan(self.trial_recipe(values)) if s.name in self.steps]


def assign(raw: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set `key` (a `--set` style dotted path into a stage's config) in a raw recipe dict."""
    parts = key.split(".")
    stages = raw.get("stages") or {}
    if parts[0] not in stages:
        raise ConfigError(
            f"{where}: {parts[0]!r} is not a step of recipe {raw.get('name')!r} "
            f"(steps: {', '.join(stages) or 'none'})"
        )
    path = expand_key(raw, parts)
    if len(path) < 4 or path[2] != "config":
        raise ConfigError(f"{where}: only a step's config values can be set, e.g. {parts[0]}.max_steps")
    set_path(raw, path, value, where)


def _needed(recipe: Recipe, target: str) -> set[str]:
    """The target step and every step it takes an input from, transitively."""
    needed, todo = set(), [target]
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        todo.extend(ref for ref in recipe.stages[name].inputs.values() if ref in recipe.stages)
    return needed


def check_space(recipe: Recipe, space: SweepSpace, where: str) -> SweepPlan:
    """Every key of the space names a real config value of a step the sweep runs, and every value the
    sampler can draw (low, high, each choice) validates; errors name the space key."""
    from lmloom.pipeline import plan

    raw = recipe.model_dump(mode="json")
    for key, value in space.set.items():
        assign(raw, key, value, f"{where}: set.{key}")
    base = _validated(raw, f"{where}: set")
    for key, value in space.set.items():
        _check_step_config(raw, key, value, f"{where}: set.{key}")
    target = space.objective.step or next(
        (name for name, spec in base.stages.items() if spec.stage.startswith("train.")), None
    )
    if target is None:
        raise ConfigError(f"{where}: objective.step is missing and recipe {base.name!r} has no train.* step")
    if target not in base.stages:
        raise ConfigError(
            f"{where}: objective.step = {target!r} is not a step of recipe {base.name!r} "
            f"(steps: {', '.join(base.stages)})"
        )
    needed = _needed(base, target)
    runs = [s.name for s in plan(base) if s.name in needed]

    def check(key: str, value: Any, label: str) -> None:
        trial = copy.deepcopy(raw)
        assign(trial, key, value, label)
        _check_step_config(trial, key, value, label)

    for key, param in space.params.items():
        label = f"{where}: params.{key}"
        step = key.split(".")[0]
        if step in raw.get("stages", {}) and step not in needed:
            raise ConfigError(
                f"{label}: step {step!r} does not run in this sweep, which runs {', '.join(runs)} "
                f"(objective.step {target!r} and the steps it needs)"
            )
        for value in param.choices if isinstance(param, CategoricalParam) else (param.low, param.high):
            check(key, value, label)
    for i, entry in enumerate(space.enqueue):
        unknown = sorted(set(entry) - set(space.params))
        if unknown:
            raise ConfigError(
                f"{where}: enqueue[{i}]: {', '.join(unknown)} not in params ({', '.join(space.params)})"
            )
        for key, value in entry.items():
            outside = _outside(space.params[key], value)
            if outside:
                raise ConfigError(f"{where}: enqueue[{i}].{key} = {value!r}: {outside}")
            check(key, value, f"{where}: enqueue[{i}].{key}")
    return SweepPlan(base, space, where, target, runs, raw)


def _outside(param, value: Any) -> str | None:
    """Why `value` is not a point of `param`'s space (Optuna would run an enqueued one anyway), or None."""
    if isinstance(param, CategoricalParam):
        return None if value in param.choices else f"not one of the choices {param.choices}"
    number = int if isinstance(param, IntParam) else int | float
    if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string, which the config takes as a number
        try:
            value = int(value) if number is int else float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, number):
        return f"expected {'an integer' if number is int else 'a number'} in [{param.low}, {param.high}]"
    if not param.low <= value <= param.high:
        return f"outside the range [{param.low}, {param.high}] of params"
    return None


def _check_step_config(raw: dict[str, Any], key: str, value: Any, label: str) -> None:
    """`value` is allowed at `key` of its step's config (an unknown key is named, with the allowed ones).

    Only problems at the key itself count: one a model validator finds in a combination of values
    (d_model not divisible by n_heads) may go away with the other values a trial draws, so such a
    trial fails instead."""
    from lmloom.config import _walk
    from lmloom.stages import get_stage

    path = expand_key(raw, key.split("."))
    step, rel = path[1], path[3:]
    spec: StageSpec = _validated(raw, label).stages[step]
    model = get_stage(spec.stage).config
    try:
        model.model_validate(spec.config)
    except ValidationError as exc:
        if any(_walk(model, e["loc"])[0][: len(rel)] == rel for e in exc.errors()):
            prefix = f"stages.{step}.config"
            raise ConfigError(f"{label} = {value!r}: {format_validation_error(exc, prefix, model)}") from None


def _validated(raw: dict[str, Any], label: str) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{label}: " + format_validation_error(exc, "", Recipe)) from None


# -- pruning --------------------------------------------------------------------------------------
class TrialPruned(StopRun):
    """Optuna pruned the trial at `step` (its metric was `value` there)."""

    def __init__(self, step: int, value: float):
        super().__init__(f"pruned at step {step} ({value:.4f})")
        self.step, self.value = step, value


class PruningSink(MetricSink):
    """Reports each value of `metric` to an Optuna trial and raises `TrialPruned` when it should stop.

    Never at `final_step`: the last value is the trial's result, not a reason to throw it away."""

    def __init__(self, trial, metric: str, final_step: int | None = None):
        self.trial, self.metric, self.final_step = trial, metric, final_step
        self.last_step = 0
        self.reported: dict[int, float] = {}

    def log(self, step: int, **values: Any) -> None:
        self.last_step = step
        value = values.get(self.metric)
        if "event" in values or isinstance(value, bool) or not isinstance(value, int | float):
            return
        if step in self.reported:  # a rolled-back stretch repeats steps: Optuna keeps the first
            return
        self.reported[step] = float(value)
        self.trial.report(float(value), step)
        if (self.final_step is None or step < self.final_step) and self.trial.should_prune():
            raise TrialPruned(step, float(value))


# -- running a sweep ------------------------------------------------------------------------------
@dataclasses.dataclass
class TrialRow:
    number: int
    state: str  # complete / pruned / failed / running / waiting
    params: dict[str, Any]
    value: float | None  # the objective (complete), or the last reported value (pruned)
    steps: int | None  # training steps run
    max_steps: int | None
    seconds: float | None
    artifact: str | None
    reused: bool = False
    error: str | None = None
    intermediate: dict[int, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class SweepResult:
    study: str
    recipe: str
    space: str
    objective: dict[str, Any]
    folder: Path
    trials: list[TrialRow]
    best: int | None  # trial number
    json_path: Path | None = None
    html_path: Path | None = None
    interrupted: bool = False

    def to_json(self) -> dict[str, Any]:
        rows = [
            dataclasses.asdict(t) | {"intermediate": {str(k): v for k, v in t.intermediate.items()}}
            for t in self.trials
        ]
        return {
            "study": self.study,
            "recipe": self.recipe,
            "space": self.space,
            "objective": self.objective,
            "best_trial": self.best,
            "counts": {s: sum(t.state == s for t in self.trials) for s in STATES},
            "trials": rows,
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


def _optuna():
    try:
        import optuna
    except ImportError:
        raise LmloomError("lmloom sweep needs Optuna: pip install 'lmloom[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own lines
    return optuna


def _sampler(optuna, spec: SamplerSpec, offset: int):
    seed = spec.seed + offset  # a resumed study draws new values rather than replaying the first ones
    if spec.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.n_startup_trials)


def _pruner(optuna, spec: PrunerSpec):
    common = {
        "n_startup_trials": spec.n_startup_trials,
        "n_warmup_steps": spec.n_warmup_steps,
        "interval_steps": spec.interval_steps,
    }
    if spec.type == "median":
        return optuna.pruners.MedianPruner(**common)
    if spec.type == "percentile":
        return optuna.pruners.PercentilePruner(spec.percentile, **common)
    return optuna.pruners.NopPruner()


def sweep_folder(store_root: Path, study: str) -> Path:
    return Path(store_root) / "sweeps" / study


def run_sweep(
    sweep: SweepPlan,
    ctx: RunContext,
    *,
    study: str,
    trials: int | None = None,
    timeout_s: float | None = None,
    resume: bool = False,
    say=None,  # one line per trial start / end (the CLI prints them); default: ctx.console
) -> SweepResult:
    """Run trials until the study has `trials` finished ones (or the timeout passes); write the summary.

    A stage failure of a trial (divergence, a sampled value the model cannot take) fails that trial
    and the sweep goes on; an access, key or integrity problem stops it. Ctrl-C stops it too, leaving
    the running trial to be re-run by `--resume`.
    """
    optuna = _optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if not _STUDY_NAME.match(study):
        raise ConfigError(f"study name {study!r}: use letters, digits, '.', '_' and '-' (up to 100)")
    say = say or (lambda line: ctx.console.print(line, highlight=False))
    space = sweep.space
    folder = sweep_folder(ctx.store.root, study)
    folder.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(folder / JOURNAL)))
    fingerprint = sha256_json(
        {"recipe": sweep.raw, "space": space.model_dump(exclude={"trials", "timeout_s"})}
    )
    exists = study in optuna.get_all_study_names(storage)
    done_before = 0
    if exists:
        if not resume:
            raise ConfigError(
                f"study {study!r} already exists in {folder}: pass --resume to continue it, or --study NAME "
                "to start another"
            )
        old = optuna.load_study(study_name=study, storage=storage)
        if old.user_attrs.get("fingerprint") != fingerprint:
            raise ConfigError(
                f"study {study!r} was started with another recipe or space file; --study NAME starts a new one"
            )
        done_before = len(old.trials)
    the_study = optuna.create_study(
        storage=storage,
        study_name=study,
        direction=space.objective.direction,
        sampler=_sampler(optuna, space.sampler, done_before),
        pruner=_pruner(optuna, space.pruner),
        load_if_exists=True,
    )
    if not exists:
        the_study.set_user_attr("fingerprint", fingerprint)
        the_study.set_user_attr("recipe", sweep.recipe.name)
        for entry in space.enqueue:
            the_study.enqueue_trial(entry)
    _requeue_interrupted(the_study, say)

    target_total = trials or space.trials
    timeout = timeout_s if timeout_s is not None else space.timeout_s
    started = time.monotonic()
    result_args = dict(study=study, recipe=sweep.recipe.name, space=sweep.where, folder=folder)
    interrupted = False
    try:
        while _finished(the_study) < target_total:
            if timeout is not None and time.monotonic() - started > timeout:
                say(f"[yellow]timeout[/yellow]: {timeout:g} s passed; no further trial started")
                break
            _one_trial(the_study, sweep, ctx, say, target_total)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        result = summarize(the_study, sweep, **result_args)
        result.interrupted = interrupted
        write_outputs(result)
    return result


def _finished(study) -> int:
    interrupted = set(study.user_attrs.get("interrupted", []))
    return sum(
        t.state.is_finished() and t.number not in interrupted for t in study.get_trials(deepcopy=False)
    )


def _requeue_interrupted(study, say) -> None:
    """A trial left running by an interrupted sweep fails as `interrupted` and is queued again: its
    stage key is the same, so its training resumes from the last checkpoint."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not stale:
        return
    numbers = sorted({*study.user_attrs.get("interrupted", []), *(t.number for t in stale)})
    study.set_user_attr("interrupted", numbers)
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        say(f"trial {t.number} was interrupted: queued again (its training resumes from its checkpoint)")


def _suggest(trial, key: str, param) -> Any:
    if isinstance(param, CategoricalParam):
        return trial.suggest_categorical(key, param.choices)
    if isinstance(param, IntParam):
        return trial.suggest_int(key, param.low, param.high, step=param.step, log=param.log)
    return trial.suggest_float(key, param.low, param.high, step=param.step, log=param.log)


@dataclasses.dataclass
class _Outcome:
    state: str  # complete / pruned / failed
    value: float | None = None
    steps: int | None = None
    artifact: str | None = None
    reused: bool = False
    error: str | None = None
    max_steps: int | None = None


def _one_trial(study, sweep: SweepPlan, ctx: RunContext, say, total: int) -> None:
    from optuna.trial import TrialState

    trial = study.ask()
    values = {key: _suggest(trial, key, param) for key, param in sweep.space.params.items()}
    shown = ", ".join(f"{short_key(key)}={_short(v)}" for key, v in values.items())
    say(f"[bold]trial {trial.number}[/bold] ({_finished(study) + 1} of {total}): {shown}")
    _reset_compiler()
    started = time.perf_counter()
    try:
        outcome = _execute(sweep, values, ctx, trial)
    except KeyboardInterrupt:
        raise  # the trial stays running: --resume queues it again
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    seconds = round(time.perf_counter() - started, 1)
    for key, value in (
        ("seconds", seconds),
        ("max_steps", outcome.max_steps),
        ("steps", outcome.steps),
        ("artifact", outcome.artifact),
        ("reused", outcome.reused),
        ("error", outcome.error),
    ):
        trial.set_user_attr(key, value)
    state = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED}.get(outcome.state, TrialState.FAIL)
    study.tell(trial, outcome.value if state == TrialState.COMPLETE else None, state=state)
    ctx.audit.append(
        "sweep.trial",
        ctx.principal,
        study=study.study_name,
        trial=trial.number,
        state=outcome.state,
        params=values,
        value=outcome.value,
        steps=outcome.steps,
        outputs=[outcome.artifact] if outcome.artifact else [],
        error=outcome.error,
    )
    metric = sweep.space.objective.metric
    if outcome.state == "complete":
        reused = " (reused)" if outcome.reused else ""
        say(
            f"  [green]complete[/green]: {metric} {outcome.value:.4f} after {outcome.steps} steps, "
            f"{seconds:.0f} s, artifact {outcome.artifact[:12]}{reused}"
        )
    elif outcome.state == "pruned":
        say(
            f"  [yellow]pruned[/yellow] at step {outcome.steps} ({metric} {outcome.value:.4f}), {seconds:.0f} s"
        )
    else:
        say(f"  [red]failed[/red] after {seconds:.0f} s: {outcome.error}")


FATAL = (SecurityError, IntegrityError)  # not the trial's values: stop the sweep


def _execute(sweep: SweepPlan, values: dict[str, Any], ctx: RunContext, trial) -> _Outcome:
    """Run one trial's steps; a failure that the trial's values may have caused is its outcome."""
    from lmloom.pipeline import ARTIFACT_REF, authorize, run_plan, run_step, stage_key

    try:
        *before, target = sweep.trial_steps(values)  # a combination a config refuses fails the trial
    except ConfigError as exc:
        return _Outcome("failed", error=_describe(exc))
    authorize(target, ctx)
    max_steps = getattr(target.config, "max_steps", None)
    sink = PruningSink(trial, sweep.space.objective.metric, max_steps)
    tuned_early = any(key.split(".")[0] != sweep.target for key in sweep.space.params)
    try:
        earlier = run_plan(before, ctx) if before else []  # reused from the cache after the first trial
    except FATAL:
        raise
    except Exception as exc:
        if not tuned_early:  # the shared steps failed: every trial would, so the sweep stops
            raise
        return _Outcome("failed", error=_describe(exc))
    produced = {r.name: r.artifact for r in earlier}
    inputs = {
        role: ctx.store.open(ref[len(ARTIFACT_REF) :]) if ref.startswith(ARTIFACT_REF) else produced[ref]
        for role, ref in target.inputs.items()
    }
    try:
        done = run_step(target, inputs, dataclasses.replace(ctx, observers={target.name: (sink,)}))
    except TrialPruned as pruned:
        key = stage_key(target.stage, target.config, {r: a.id for r, a in inputs.items()}, target.encrypt)
        shutil.rmtree(ctx.store.work_dir(key), ignore_errors=True)  # no later run resumes a pruned trial
        return _Outcome("pruned", pruned.value, pruned.step, max_steps=max_steps)
    except FATAL:
        raise
    except Exception as exc:  # noqa: BLE001  (diverged, or a value the model cannot take: the sweep goes on)
        return _Outcome("failed", steps=sink.last_step or None, error=_describe(exc), max_steps=max_steps)
    meta = done.artifact.manifest.metadata
    metric = sweep.space.objective.metric
    steps = meta.get("steps", sink.last_step or None)
    found = meta.get(metric)
    if isinstance(found, bool) or not isinstance(found, int | float):
        numbers = sorted(k for k, v in meta.items() if isinstance(v, int | float) and not isinstance(v, bool))
        # Not the trial's values: every trial would end so, so the sweep stops rather than run them all.
        raise ConfigError(
            f"{sweep.where}: objective.metric = {metric!r} is not a number step {sweep.target!r} records "
            f"(its artifact {done.artifact.short_id} has: {', '.join(numbers)})"
        )
    if not math.isfinite(found):
        return _Outcome(
            "failed", None, steps, done.artifact.id, error=f"{metric} is {found}", max_steps=max_steps
        )
    return _Outcome("complete", float(found), steps, done.artifact.id, done.reused, max_steps=max_steps)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def short_key(key: str) -> str:
    """`pretrain.optim.lr` -> `optim.lr`: the step is the objective's in most spaces."""
    return key.split(".", 1)[-1]


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _reset_compiler() -> None:
    """Each trial builds a new model: clear torch.compile's caches so trials never hit its recompile
    limit (which would silently fall back to eager mode) and start alike."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.compiler.reset()


# -- the summary ----------------------------------------------------------------------------------
def summarize(optuna_study, sweep: SweepPlan, **fields) -> SweepResult:
    from optuna.trial import TrialState

    names = {
        TrialState.COMPLETE: "complete",
        TrialState.PRUNED: "pruned",
        TrialState.FAIL: "failed",
        TrialState.RUNNING: "running",
        TrialState.WAITING: "waiting",
    }
    interrupted = set(optuna_study.user_attrs.get("interrupted", []))
    rows = []
    for t in optuna_study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            continue
        inter = {int(k): float(v) for k, v in sorted(t.intermediate_values.items())}
        value = t.value if t.state == TrialState.COMPLETE else (inter[max(inter)] if inter else None)
        attrs = t.user_attrs
        error = attrs.get("error") or ("interrupted; queued again" if t.number in interrupted else None)
        rows.append(
            TrialRow(
                number=t.number,
                state=names[t.state],
                params=dict(t.params),
                value=value,
                steps=attrs.get("steps"),
                max_steps=attrs.get("max_steps"),
                seconds=attrs.get("seconds"),
                artifact=attrs.get("artifact"),
                reused=bool(attrs.get("reused")),
                error=error,
                intermediate=inter,
            )
        )
    complete = [r for r in rows if r.state == "complete"]
    pick = min if sweep.space.objective.direction == "minimize" else max
    best = pick(complete, key=lambda r: r.value).number if complete else None
    objective = {
        "step": sweep.target,
        "metric": sweep.space.objective.metric,
        "direction": sweep.space.objective.direction,
    }
    return SweepResult(objective=objective, trials=rows, best=best, **fields)


def write_outputs(result: SweepResult) -> None:
    result.json_path = result.folder / "sweep.json"
    write_text_atomic(result.json_path, json.dumps(result.to_json(), indent=2, default=str) + "\n")
    result.html_path = result.folder / "sweep.html"
    write_text_atomic(result.html_path, render_html(result))


def render_html(result: SweepResult) -> str:
    """One self-contained page (inline SVG and CSS, a CSP that forbids any request): the objective by
    trial, every trial's metric over its training steps (pruned ones marked where they stopped), the table."""
    from lmloom import __version__
    from lmloom.monitor.report import CSP, CSS, Raw, Series, esc, fmt, line_chart, table

    metric = result.objective["metric"]
    rows = result.trials
    by_state = {
        state: [r for r in rows if r.state == state and r.value is not None and math.isfinite(r.value)]
        for state in ("complete", "pruned")
    }
    series = [
        Series(state, [r.number for r in shown], [r.value for r in shown], points=True)
        for state, shown in by_state.items()
    ]
    running, xs, ys = None, [], []
    pick = min if result.objective["direction"] == "minimize" else max
    for r in sorted(by_state["complete"], key=lambda r: r.number):
        running = r.value if running is None else pick(running, r.value)
        xs.append(r.number)
        ys.append(running)
    series.append(Series("best so far", xs, ys))
    by_trial = line_chart(f"{metric} by trial", series, xlabel="trial")
    curves = []
    for r in rows:
        pairs = [(s, v) for s, v in r.intermediate.items() if math.isfinite(v)]
        if pairs:
            tag = {"pruned": " pruned", "failed": " failed"}.get(r.state, "")
            curves.append(Series(f"#{r.number}{tag}", [p[0] for p in pairs], [p[1] for p in pairs]))
    markers = [
        (max(r.intermediate), f"trial {r.number} pruned")
        for r in rows
        if r.state == "pruned" and r.intermediate
    ]
    during = line_chart(f"{metric} during training", curves, markers=markers)
    keys = list(dict.fromkeys(k for r in rows for k in r.params))
    notes = any(r.error for r in rows)
    headers = ["trial", "state", *(short_key(k) for k in keys), metric, "steps", "seconds", "artifact"]
    headers += ["note"] if notes else []
    body = []
    for r in rows:
        star = "★ " if r.number == result.best else ""
        cls = "good" if r.number == result.best else ("bad" if r.state == "failed" else "")
        state = Raw(f'<span class="{cls}">{esc(star + r.state)}</span>') if cls else r.state
        steps = f"{r.steps}/{r.max_steps}" if r.steps is not None and r.max_steps else fmt(r.steps or "")
        body.append(
            [
                r.number,
                state,
                *(fmt(r.params.get(k, "")) for k in keys),
                fmt(r.value) if r.value is not None else "",
                steps,
                fmt(r.seconds or ""),
                (r.artifact or "")[:12] + (" (reused)" if r.reused else ""),
                *([r.error or ""] if notes else []),
            ]
        )
    counts = {s: sum(r.state == s for r in rows) for s in STATES}
    best = next((r for r in rows if r.number == result.best), None)
    headline = (
        f"best: trial {best.number}, {metric} {fmt(best.value)}, artifact {best.artifact}"
        if best
        else "no complete trial"
    )
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>lmloom sweep: {esc(result.study)}</title><style>{CSS}</style></head><body>"
        f'<header><h1>lmloom sweep — {esc(result.study)}</h1><div class="meta">recipe {esc(result.recipe)} · '
        f"space {esc(result.space)} · {esc(result.objective['direction'])} {esc(metric)} of step "
        f"{esc(result.objective['step'])} · generated {esc(generated)} by lmloom {esc(__version__)}</div></header>"
        f"<main><section><h2>Trials</h2><p>{esc(summary)}. {esc(headline)}.</p>"
        '<p class="dim">Pruned trials: their last value, and a dashed line at the step they stopped.</p>'
        f'<div class="charts">{by_trial}{during}</div>'
        f"{table(headers, body)}</section></main></body></html>\n"
    )
