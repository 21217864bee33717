"""`align.grpo`: Group Relative Policy Optimization of a checkpoint against verifiable rewards.

Every optimizer step, for `batch_size` prompts (times `grad_accum`): sample `num_generations` completions
of each with the current policy (temperature sampling, one batched KV-cached decode per prompt, cut at the
chat end marker or EOS), score them with the configured rewards (`lmloom.align.rewards`: code run in a
sandboxed subprocess, function definition, safety, format, and an optional `align.reward` model), turn the
rewards into group-relative advantages (`group_advantages`), and minimise the clipped GRPO loss with the
k3 KL to the frozen input model (`grpo_loss`) with AdamW.

It drives the shared `train_loop` like `align.dpo`: the "model" is `GRPOObjective` (the policy + the
loss) and the batch source is `RolloutSource`, whose batch for sample index i samples its completions
with a generator seeded by (seed, i) from the policy as it is at that moment. Since the policy at a step
is restored exactly from a checkpoint, a resumed run samples the same completions and replays the
uninterrupted one (with `num_iterations` > 1 only when it resumes at the start of a generation round).
The statistics (reward mean and std, each reward's mean, KL, clip fraction, completion length, groups
with no signal), averaged over the steps since the last logged one, go to metrics.jsonl through the
source's `describe` hook. `train_loop`'s validation loss has no meaning here (there is no held-out loss
to fall): instead the stage scores a held-out set of prompts (one greedy completion each) before and
after training.

Prompts: `prompts: builtin` takes the standard-library instruction set's "write a function" instructions
(its held-out modules for the held-out prompts) and, with `safety_prompts: true`, the safety set's prompts
flagged harmful or benign; or a JSONL file of {"prompt", "function"?, "tests"?, "harmful"?, "reference"?}
(malformed rows counted per reason and skipped; a seeded hash holds out `val_fraction`).
"""

from __future__ import annotations

import functools
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from lmloom.align.grpo import GRPOConfig, group_advantages, grpo_loss
from lmloom.align.logprobs import per_token_logprobs
from lmloom.align.rewards import (
    PROGRAMMATIC,
    REWARD_NAMES,
    PromptTask,
    RewardModelScorer,
    RewardSettings,
    Sample,
    combine,
    score_programmatic,
)
from lmloom.artifacts.manifest import Manifest
from lmloom.errors import ConfigError, DataError
from lmloom.models.decoder import Decoder
from lmloom.models.io import model_files, model_from_files
from lmloom.monitor.metrics import JsonlMetrics
from lmloom.serve.generate import filter_logits
from lmloom.stages import Stage
from lmloom.tokenizers.base import ALL_TOKENIZER_FILES, EOS_ID, PAD_ID, TextTokenizer
from lmloom.train.checkpoint import CheckpointCodecs
from lmloom.train.guards import StabilityGuard
from lmloom.train.optim import OptimConfig, build_optimizer
from lmloom.train.trainer import LoopConfig, autocast, train_loop
from lmloom.tune.chat import END_MARKER, ChatFormatError, encode_prompt, reply_text
from lmloom.tune.formats import LoadReport
from lmloom.tune.safety import load_safety_set
from lmloom.tune.stage import (
    BUILTIN,
    builtin_instructions,
    data_fingerprint,
    format_safety,
    open_checkpoint,
    unit_hash,
)

PAD_MULTIPLE = 16
_MARKER_TAIL = 16  # tokens decoded to look for the end marker (it is several tokens)


class GRPOStageConfig(LoopConfig, GRPOConfig):
    seed: int = Field(1337, description="seeds the prompt order, the sampling and the held-out split")
    prompts: str = Field(BUILTIN, description="'builtin' (write-a-function instructions) or a prompts JSONL")
    max_prompts: int | None = Field(512, ge=1, description="training prompts kept (a seeded sample)")
    safety_prompts: bool = Field(False, description="builtin: add the safety set's harmful/benign prompts")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="prompts file: share held out")
    eval_prompts: int = Field(16, ge=0, description="held-out prompts scored (greedy) before and after")
    rewards: dict[str, float] = Field(
        default_factory=lambda: {"code": 1.0, "format": 0.25},
        description=f"reward name -> weight; names: {', '.join(REWARD_NAMES)}",
    )
    reward_settings: RewardSettings = Field(default_factory=RewardSettings)
    reward_model_scale: float = Field(1.0, gt=0, description="reward_model: sigmoid(scale * score)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (the logprobs use it too)")
    top_k: int | None = Field(None, ge=1)
    top_p: float = Field(1.0, gt=0, le=1)
    num_iterations: int = Field(1, ge=1, description="optimizer steps per generated batch (mu)")
    beta: float = Field(0.04, ge=0, description="k3 KL coefficient to the frozen input model")
    max_completion_length: int = Field(64, ge=1, description="new tokens sampled per completion")
    num_generations: int = Field(8, ge=2, description="completions sampled per prompt (the group)")
    safety_eval: bool = Field(True, description="measure refusal / over-refusal before and after")
    safety_max_new_tokens: int = Field(48, ge=1)
    threads: int | None = Field(None, ge=1, description="CPU threads (default: torch's choice)")
    batch_size: int = Field(4, ge=1, description="prompts per micro-batch (each gives num_generations rows)")
    max_steps: int = Field(50, ge=1)
    compile: bool = Field(False, description="not supported (completions of varying length run eagerly)")
    log_every: int = Field(1, ge=1)
    eval_every: int = Field(1_000_000, ge=1, description="unused: GRPO has no held-out loss")
    checkpoint_every: int = Field(10, ge=1)
    # GRPO's loss is a signed, advantage-weighted quantity that does not fall: its "spikes" mean nothing.
    guard: StabilityGuard = Field(default_factory=lambda: StabilityGuard(enabled=False))
    optim: OptimConfig = OptimConfig(lr=1e-4, warmup_steps=0, weight_decay=0.0, min_lr_ratio=1.0)

    @field_validator("rewards")
    @classmethod
    def _known_rewards(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(REWARD_NAMES))
        if unknown:
            raise ValueError(f"unknown reward {', '.join(unknown)}; choose from {', '.join(REWARD_NAMES)}")
        if not value or any(w < 0 for w in value.values()) or sum(value.values()) <= 0:
            raise ValueError("give at least one reward with a positive weight (weights >= 0)")
        return value

    @model_validator(mode="after")
    def _supported(self):
        if self.compile:
            raise ValueError("compile = true is not supported by align.grpo; set it to false")
        if self.batch_size_ramp.steps or self.seq_len_warmup.steps:
            raise ValueError("batch_size_ramp and seq_len_warmup are not supported by align.grpo")
        return self


# -- prompts -----------------------------------------------------------------------------------------


def load_prompt_tasks(path: str) -> tuple[list[PromptTask], LoadReport]:
    report = LoadReport(path, "prompts")
    tasks = []
    file = Path(path)
    if not file.is_file():
        raise DataError(f"prompts file {path}: not found")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"prompts file {path}: not UTF-8 text ({exc})") from None
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        report.rows += 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            report.skip("invalid_json", line_no, str(exc))
            continue
        if not isinstance(row, dict):
            report.skip("not_an_object", line_no, type(row).__name__)
            continue
        try:
            tasks.append(PromptTask.from_row(row, line_no))
        except ValueError as exc:
            report.skip("bad_row", line_no, str(exc))
    report.kept = len(tasks)
    report.require_some()  # a file of bad rows is that, not "no prompt fits the context" later
    return tasks, report


def prompt_tasks(config: GRPOStageConfig) -> tuple[list[PromptTask], list[PromptTask], LoadReport]:
    """(training tasks, held-out tasks, load report)."""
    if config.prompts == BUILTIN:
        instructions = builtin_instructions()

        def tasks(items) -> list[PromptTask]:
            return [
                PromptTask.from_row({"prompt": i.prompt, "reference": i.response, "id": i.id})
                for i in items
                if i.kind == "write_function"
            ]

        train, held = tasks(instructions.train), tasks(instructions.held_out)
        if config.safety_prompts:
            for split, target in (("train", train), ("held_out", held)):
                target += [
                    PromptTask(s.prompt, harmful=s.kind == "harmful", reference=s.response, id=s.id)
                    for s in load_safety_set(split)
                ]
        report = LoadReport(
            "builtin:write-function" + ("+safety" if config.safety_prompts else ""), "prompts"
        )
        report.rows = report.kept = len(train) + len(held)
    else:
        rows, report = load_prompt_tasks(config.prompts)
        train, held = [], []
        for task in rows:
            (held if unit_hash(config.seed, task.prompt) < config.val_fraction else train).append(task)
    if config.max_prompts is not None and len(train) > config.max_prompts:
        train = random.Random(config.seed).sample(train, config.max_prompts)
    return train, held, report


@dataclass
class EncodedTask:
    task: PromptTask
    ids: list[int]  # EOS + the chat prompt, ending with the assistant header


def encode_tasks(
    tokenizer: TextTokenizer, tasks: list[PromptTask], room: int, skipped: Counter
) -> list[EncodedTask]:
    out = []
    for task in tasks:
        try:
            ids = [EOS_ID, *encode_prompt(tokenizer, [{"role": "user", "content": task.prompt}])]
        except ChatFormatError as exc:
            skipped[exc.reason] += 1
            continue
        if len(ids) > room:
            skipped["too_long"] += 1
            continue
        out.append(EncodedTask(task, ids))
    return out


# -- sampling ----------------------------------------------------------------------------------------


def _ended(tokenizer: TextTokenizer, ids: list[int], token: int) -> bool:
    return token == EOS_ID or END_MARKER in tokenizer.decode(ids[-_MARKER_TAIL:])


@torch.no_grad()
def sample_group(
    model: Decoder,
    tokenizer: TextTokenizer,
    prompt: list[int],
    n: int,
    max_new_tokens: int,
    *,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> list[tuple[list[int], bool]]:
    """`n` completions of one prompt, decoded together in one KV-cached batch: (ids, ended) each. A
    completion ends with EOS or the token that completes the chat end marker (both kept: the model must
    learn to end its turn); temperature 0 is greedy."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            cache = model.new_kv_cache(n, len(prompt) + max_new_tokens)
            idx = torch.tensor([prompt] * n, dtype=torch.long)
            logits = model(idx, kv_cache=cache, start_pos=0)[:, -1].float()
            pos = len(prompt)
            out: list[list[int]] = [[] for _ in range(n)]
            done = [False] * n
            for step in range(max_new_tokens):
                if temperature == 0:
                    tokens = logits.argmax(-1)
                else:
                    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
                    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                for row, token in enumerate(tokens.tolist()):
                    if not done[row]:
                        out[row].append(token)
                        done[row] = _ended(tokenizer, out[row], token)
                if all(done) or step == max_new_tokens - 1:
                    break
                logits = model(tokens[:, None], kv_cache=cache, start_pos=pos)[:, -1].float()
                pos += 1
    finally:
        model.train(was_training)
    return [(ids, ended) for ids, ended in zip(out, done, strict=True)]


# -- rollouts as a batch source -----------------------------------------------------------------------


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # [N, T] prompt + completion, right-padded
    loss_mask: torch.Tensor  # [N, T] 1 on completion tokens
    advantages: torch.Tensor  # [N]
    old_logps: torch.Tensor | None  # [N, T - 1] (num_iterations > 1), else on-policy
    ref_logps: torch.Tensor | None  # [N, T - 1] (beta > 0)

    @property
    def device(self) -> torch.device:
        return self.input_ids.device


class Scorer:
    """Every configured reward of a list of samples: (combined [N], per-reward means)."""

    def __init__(self, config: GRPOStageConfig, reward_model: RewardModelScorer | None):
        self.weights = dict(config.rewards)
        self.settings = config.reward_settings
        self.reward_model = reward_model
        if "reward_model" in self.weights and reward_model is None:
            raise ConfigError(
                "rewards.reward_model needs the optional input `reward_model` (an align.reward)"
            )

    def __call__(self, samples: list[Sample]) -> tuple[list[float], dict[str, float]]:
        components: dict[str, list[float]] = {}
        for name in self.weights:
            if name in PROGRAMMATIC:
                components[name] = score_programmatic(name, samples, self.settings)
            else:
                components[name] = self.reward_model(samples)  # type: ignore[misc]
        total = combine(components, self.weights)
        means = {f"reward/{name}": sum(v) / max(len(v), 1) for name, v in components.items()}
        return total, means


class RolloutSource:
    """The batch of sample index i: prompts chosen by a seeded per-epoch order, completions sampled now."""

    def __init__(
        self,
        policy: Decoder,
        reference: Decoder | None,
        tokenizer: TextTokenizer,
        tasks: list[EncodedTask],
        scorer: Scorer,
        config: GRPOStageConfig,
    ):
        self.policy, self.reference, self.tokenizer = policy, reference, tokenizer
        self.tasks, self.scorer, self.config = tasks, scorer, config
        self.n = len(tasks)
        self.objective: GRPOObjective | None = None
        self._rollouts: dict[tuple[int, int], RolloutBatch] = {}  # (round, micro index) -> batch
        self._stats: list[dict[str, float]] = []

    @functools.lru_cache(maxsize=4)  # noqa: B019 (one instance per stage run)
    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=generator).tolist()

    def batch(self, start_sample: int, batch_size: int) -> tuple[RolloutBatch, torch.Tensor]:
        cfg = self.config
        micro = start_sample // batch_size
        step, part = divmod(micro, cfg.grad_accum)
        round_, iteration = divmod(step, cfg.num_iterations)
        key = (round_, part)
        if iteration == 0 or key not in self._rollouts:
            if iteration == 0 and part == 0:
                self._rollouts.clear()
            first = (round_ * cfg.grad_accum + part) * batch_size  # prompts consumed by earlier rounds
            self._rollouts[key] = self._rollout(first, batch_size)
        batch = self._rollouts[key]
        return batch, torch.ones(batch.input_ids.shape[0])

    def _rollout(self, first: int, count: int) -> RolloutBatch:
        cfg = self.config
        G = cfg.num_generations
        generator = torch.Generator().manual_seed(cfg.seed * 7_919 + first)
        chosen = [self.tasks[self._order(s // self.n)[s % self.n]] for s in range(first, first + count)]
        rows: list[tuple[list[int], list[int]]] = []
        samples: list[Sample] = []
        lengths, ended = [], []
        for task in chosen:
            for ids, done in sample_group(
                self.policy,
                self.tokenizer,
                task.ids,
                G,
                cfg.max_completion_length,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                generator=generator,
            ):
                text, finished = reply_text(self.tokenizer.decode([t for t in ids if t != EOS_ID]))
                samples.append(Sample(task.task, text, finished or (done and ids[-1] == EOS_ID)))
                rows.append((task.ids, ids))
                lengths.append(len(ids))
                ended.append(done)
        rewards, means = self.scorer(samples)
        reward_t = torch.tensor(rewards, dtype=torch.float32)
        advantages = group_advantages(reward_t, G, cfg.scale_rewards)
        longest = max(len(p) + len(c) for p, c in rows)
        T = min(self.policy.config.seq_len, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
        input_ids = torch.full((len(rows), T), PAD_ID, dtype=torch.long)
        loss_mask = torch.zeros((len(rows), T), dtype=torch.long)
        for r, (prompt, completion) in enumerate(rows):
            input_ids[r, : len(prompt) + len(completion)] = torch.tensor(prompt + completion)
            loss_mask[r, len(prompt) : len(prompt) + len(completion)] = 1
        old = ref = None
        with torch.no_grad(), autocast(cfg.precision):
            if cfg.num_iterations > 1:
                was = self.policy.training
                self.policy.eval()
                old = per_token_logprobs(self.policy, input_ids, loss_mask, temperature=cfg.temperature)
                self.policy.train(was)
            if self.reference is not None:
                ref = per_token_logprobs(self.reference, input_ids, loss_mask, temperature=cfg.temperature)
        grouped = reward_t.view(-1, G)
        self._stats.append(
            {
                "reward/mean": float(reward_t.mean()),
                "reward/std": float(reward_t.std()) if len(rewards) > 1 else 0.0,
                **means,
                "completion_length": sum(lengths) / len(lengths),
                "completions_ended": sum(ended) / len(ended),
                "groups_without_signal": float(
                    (grouped.max(1).values == grouped.min(1).values).float().mean()
                ),
            }
        )
        return RolloutBatch(input_ids, loss_mask, advantages, old, ref)

    def describe(self, step: int) -> dict[str, float]:
        """The statistics of every step since the last call (`train_loop` calls it on the steps it logs),
        averaged."""
        stats, self._stats = self._stats, []
        merged = _mean_dicts(stats)
        if self.objective is not None:
            merged.update(self.objective.pop_stats())
        return merged

    def no_validation(self, limit: int) -> Iterator:
        return iter(())


def _mean_dicts(stats: list[dict[str, float]]) -> dict[str, float]:
    if not stats:
        return {}
    return {key: sum(s[key] for s in stats) / len(stats) for key in stats[0]}


class GRPOObjective(nn.Module):
    """The policy + the GRPO loss, as `train_loop` trains it: forward(RolloutBatch, weights) -> loss."""

    def __init__(self, policy: Decoder, config: GRPOStageConfig):
        super().__init__()
        self.policy, self.config = policy, config
        self._stats: list[dict[str, float]] = []

    def forward(self, batch: RolloutBatch, weights: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        logps = per_token_logprobs(self.policy, batch.input_ids, batch.loss_mask, temperature=cfg.temperature)
        mask = batch.loss_mask[:, 1:]
        out = grpo_loss(cfg, logps, batch.old_logps, batch.advantages, mask, batch.ref_logps)
        if self.training:
            active = mask.bool()
            count = max(int(active.sum()), 1)
            stats = {
                "clip_fraction": float((out.low_clipped | out.high_clipped)[active].sum()) / count,
                "ratio_mean": float(out.ratio.detach()[active].mean()) if active.any() else 1.0,
            }
            if out.kl is not None:
                stats["kl"] = float(out.kl.detach()[active].mean()) if active.any() else 0.0
            self._stats.append(stats)
        return out.loss

    def pop_stats(self) -> dict[str, float]:
        stats, self._stats = self._stats, []
        return _mean_dicts(stats)


# -- held-out scoring --------------------------------------------------------------------------------


def held_out_reward(
    model: Decoder, tokenizer: TextTokenizer, tasks: list[EncodedTask], scorer: Scorer, max_new: int
) -> tuple[float | None, list[dict[str, Any]]]:
    """Mean combined reward of one greedy completion per held-out prompt, and the rows."""
    if not tasks:
        return None, []
    samples = []
    for task in tasks:
        [(ids, done)] = sample_group(model, tokenizer, task.ids, 1, max_new, temperature=0.0)
        text, finished = reply_text(tokenizer.decode([t for t in ids if t != EOS_ID]))
        samples.append(Sample(task.task, text, finished or (done and ids[-1] == EOS_ID)))
    rewards, _ = scorer(samples)
    rows = [
        {"id": s.task.id, "prompt": s.task.prompt, "reply": s.text, "reward": r}
        for s, r in zip(samples, rewards, strict=True)
    ]
    return sum(rewards) / len(rewards), rows


def reward_curve(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean reward per logged step, and the means of its first and last thirds."""
    curve = [(r["step"], r["reward/mean"]) for r in records if "reward/mean" in r]
    values = [v for _, v in curve]
    third = max(len(values) // 3, 1)
    return {
        "steps": [s for s, _ in curve],
        "reward_mean": [round(v, 4) for v in values],
        "first_third": sum(values[:third]) / third if values else None,
        "last_third": sum(values[-third:]) / third if values else None,
    }


# -- the stage ---------------------------------------------------------------------------------------


def run(config: GRPOStageConfig, inputs, ctx, out) -> None:
    from lmloom.tune.stage import safety_figures

    checkpoint = inputs["checkpoint"]
    tokenizer, policy = open_checkpoint(config, checkpoint)
    reference = None
    if config.beta > 0:
        reference = model_from_files(checkpoint.read_bytes).eval().requires_grad_(False)
    reward_model = None
    if "reward_model" in inputs:
        from lmloom.align.stage import reward_model_from_files

        rm = reward_model_from_files(inputs["reward_model"].read_bytes)
        if rm.trunk.config.vocab_size != policy.config.vocab_size:
            raise ConfigError(
                f"reward model {inputs['reward_model'].short_id} has vocabulary {rm.trunk.config.vocab_size}, "
                f"the policy {policy.config.vocab_size}: they must share the tokenizer"
            )
        reward_model = RewardModelScorer(rm, tokenizer, config.reward_model_scale)
    weights = dict(config.rewards)
    if reward_model is not None and "reward_model" not in weights:
        weights["reward_model"] = 1.0
        ctx.log("reward model given: added to the rewards with weight 1.0")
    scorer = Scorer(config.model_copy(update={"rewards": weights}), reward_model)

    train_tasks, held_tasks, report = prompt_tasks(config)
    room = policy.config.seq_len - config.max_completion_length
    skipped: Counter = Counter()
    train = encode_tasks(tokenizer, train_tasks, room, skipped)
    held = encode_tasks(tokenizer, held_tasks[: config.eval_prompts * 4], room, skipped)[
        : config.eval_prompts
    ]
    if not train:
        raise DataError(
            f"stages.{ctx.step}: no prompt fits in seq_len {policy.config.seq_len} - max_completion_length "
            f"{config.max_completion_length} = {room} tokens ({report.source}; skipped {dict(skipped)})"
        )
    ctx.log(report.summary().replace("\n", "; "))

    before, before_rows = held_out_reward(policy, tokenizer, held, scorer, config.max_completion_length)
    safety_before, safety_rows_before = (
        safety_figures(policy, tokenizer, config.safety_max_new_tokens) if config.safety_eval else (None, [])
    )
    objective = GRPOObjective(policy, config)
    source = RolloutSource(policy, reference, tokenizer, train, scorer, config)
    source.objective = objective
    optimizer = build_optimizer(objective, config.optim)
    ctx.log(
        f"GRPO on {checkpoint.short_id}: {len(train):,} prompts x {config.num_generations} completions, "
        f"{config.batch_size * config.grad_accum} prompts per step, rewards "
        + ", ".join(f"{k} x{v:g}" for k, v in weights.items())
        + (f"; held-out reward before {before:.3f}" if before is not None else "")
    )
    metrics = JsonlMetrics(ctx.work_dir / "metrics.jsonl")
    scratch_codecs = CheckpointCodecs.from_store_security(ctx.store.security) if ctx.encrypt else None
    quiet = ctx.console.is_terminal
    with ctx.progress(config.max_steps, "GRPO") as bar:
        result = train_loop(
            objective,
            optimizer,
            source,
            source.no_validation,
            config,
            policy.config.seq_len,
            ctx.work_dir / "checkpoints",
            metrics,
            progress=bar,
            log=(lambda _msg: None) if quiet else ctx.log,
            checkpoint_codecs=scratch_codecs,
        )
    policy.eval()
    after, after_rows = held_out_reward(policy, tokenizer, held, scorer, config.max_completion_length)
    safety_after, safety_rows_after = (
        safety_figures(policy, tokenizer, config.safety_max_new_tokens) if config.safety_eval else (None, [])
    )
    # train_loop's validation loss is over no batches here (0.0): left out rather than misread.
    records = [
        {k: v for k, v in json.loads(line).items() if k not in ("val_loss", "val_ppl")}
        for line in metrics.path.read_text().splitlines()
        if line.strip()
    ]
    curve = reward_curve(records)
    last = records[-1] if records else {}

    for name, payload in model_files(policy).items():
        out.write_bytes(name, payload)
    for name in ALL_TOKENIZER_FILES:
        if checkpoint.has(name):
            out.copy_from(checkpoint, name)
    out.write_bytes("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    out.write_json("held_out_replies.json", {"before": before_rows, "after": after_rows})
    if config.safety_eval:
        out.write_json("safety_replies.json", {"before": safety_rows_before, "after": safety_rows_after})
    out.metadata.update(
        parameters=policy.num_params(),
        model=policy.config.model_dump(mode="json"),
        steps=result.state.step,
        rewards=weights,
        num_generations=config.num_generations,
        beta=config.beta,
        loss_type=config.loss_type,
        prompts=config.prompts,
        train_prompts=len(train),
        held_out_prompts=len(held),
        prompts_skipped=dict(sorted(skipped.items())),
        load_report={
            "source": report.source,
            "rows": report.rows,
            "kept": report.kept,
            "skipped": dict(sorted(report.skipped.items())),
        },
        reward_curve=curve,
        final_kl=last.get("kl"),
        final_completion_length=last.get("completion_length"),
        held_out_reward_before=before,
        held_out_reward_after=after,
        safety_before=safety_before,
        safety_after=safety_after,
        aligned_from=checkpoint.id,
        reward_model_from=inputs["reward_model"].id if "reward_model" in inputs else None,
        seconds=round(result.seconds, 1),
        resumed_from_step=result.resumed_from,
        precision=config.precision,
        tokenizer=checkpoint.manifest.metadata.get("tokenizer"),
    )
    ctx.log(
        f"done: mean reward {curve['first_third']:.3f} (first third of steps) -> {curve['last_third']:.3f} "
        f"(last third)"
        if curve["first_third"] is not None
        else "done"
    )


def summary(manifest: Manifest) -> list[tuple[str, str]]:
    m = manifest.metadata
    curve = m["reward_curve"]
    rows = [
        (
            "aligned from",
            f"{m['aligned_from'][:12]} (GRPO, {m['num_generations']} per group, beta {m['beta']}, "
            + ", ".join(f"{k} x{v:g}" for k, v in m["rewards"].items())
            + ")",
        ),
        ("prompts", f"{m['train_prompts']:,} train, {m['held_out_prompts']:,} held out"),
    ]
    if curve["first_third"] is not None:
        rows.append(
            (
                "mean reward",
                f"{curve['first_third']:.3f} (first third of {m['steps']} steps) -> "
                f"{curve['last_third']:.3f} (last third)",
            )
        )
    if m.get("held_out_reward_before") is not None:
        rows.append(
            (
                "held-out reward (greedy)",
                f"{m['held_out_reward_before']:.3f} -> {m['held_out_reward_after']:.3f}",
            )
        )
    if m.get("final_kl") is not None:
        rows.append(("KL to the input model (last step)", f"{m['final_kl']:.4f}"))
    return rows + format_safety(m.get("safety_before"), m.get("safety_after"))


GRPO = Stage(
    name="align.grpo",
    kind="checkpoint",
    config=GRPOStageConfig,
    run=run,
    inputs={"checkpoint": "checkpoint"},
    optional_inputs={"reward_model": "reward-model"},
    permissions=("train",),
    summary=summary,
    fingerprint=lambda config: data_fingerprint(config.prompts),
    description="GRPO against verifiable rewards (sandboxed code tests, safety, format, a reward model)",
)
