"""`align.reward` (a Bradley–Terry reward model) and `align.dpo` (the DPO loss family) on preference pairs.

Data: `data: builtin` is `lmloom.align.pairs` (refusal / helpfulness pairs from the safety set and
mismatched-answer pairs from the standard-library instruction set, split as their sources are), or a
preference JSONL file (`load_preferences`: malformed rows counted per reason and skipped; a seeded hash
holds out `val_fraction` of the pairs). Each answer is encoded with the chat template after EOS, as
`tune.sft` trains; a pair longer than the model's context is skipped and counted (`too_long`).

Both stages run the shared `train_loop` (checkpoints, exact resume, metrics): the "model" it trains is
a small objective module around the network (`RewardObjective`, `DPOObjective`) that takes a
`PairBatch` and returns the loss, and the pair source draws pairs in a seeded order that is a pure
function of the sample index. The loop only hands the batch to the model and weighs validation by
the number of entries of its second element (here one per pair). Per-step preference statistics
(rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins) reach metrics.jsonl through the
source's `describe` hook.

`align.reward` by default trains the score head alone on the frozen input model (`train_trunk: false`):
the trunk's features of every pair are computed once and the head trains on them, several passes over
all the built-in pairs for the cost of one forward pass (`lmloom.align.reward` says why the default
`relevance` pooling reads the prompt as well as the last token).

`align.dpo`'s reference is the input model, frozen: run on every batch (`reference: model`) or scored
once before training (`reference: precomputed`: half the forward passes per step). At step 1 policy ==
reference, so the sigmoid loss starts at log 2.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field, model_validator
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from lmloom.align.logprobs import completion_lengths, sequence_logprobs
from lmloom.align.pairs import builtin_pairs
from lmloom.align.preference import PreferenceConfig, preference_loss_from_config
from lmloom.align.reward import Pooling, RewardModel, bradley_terry_loss
from lmloom.artifacts.manifest import Manifest
from lmloom.errors import ConfigError, DataError
from lmloom.models.decoder import Decoder, DecoderConfig
from lmloom.models.io import model_files, model_from_files
from lmloom.monitor.metrics import JsonlMetrics
from lmloom.stages import Stage
from lmloom.tokenizers.base import ALL_TOKENIZER_FILES, EOS_ID, PAD_ID, TextTokenizer
from lmloom.train.checkpoint import CheckpointCodecs
from lmloom.train.optim import OptimConfig, build_optimizer
from lmloom.train.trainer import LoopConfig, autocast, train_loop
from lmloom.tune.chat import ChatFormatError, encode_conversation
from lmloom.tune.formats import LoadReport, PreferenceExample, load_preferences
from lmloom.tune.stage import (
    BUILTIN,
    builtin_instructions,
    data_fingerprint,
    format_safety,
    open_checkpoint,
    safety_figures,
    unit_hash,
)

REWARD_ARCHITECTURE = "reward-model"
PAD_MULTIPLE = 32  # pad each batch to a multiple of this many tokens: few distinct shapes
BUCKET_BATCHES = 16  # length bucketing: batches per sorted run (see PairSource)


class PairDataConfig(LoopConfig):
    seed: int = Field(1337, description="seeds the held-out split of a file, the pair order and the head")
    data: str = Field(
        BUILTIN, description="'builtin' (safety + instruction pairs) or a preference JSONL file"
    )
    max_instruction_pairs: int | None = Field(
        1024, ge=1, description="builtin: training pairs drawn from the instruction set (None: all)"
    )
    val_instruction_pairs: int = Field(128, ge=0, description="builtin: held-out instruction pairs")
    builtin_safety: bool = Field(True, description="builtin: include the safety set's pairs")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="data file: share of pairs held out")
    threads: int | None = Field(None, ge=1, description="CPU threads (default: torch's choice)")
    compile: bool = Field(False, description="not supported here yet (pairs of varying length run eagerly)")
    batch_size: int = Field(8, ge=1, description="preference pairs per micro-batch")
    max_steps: int = Field(100, ge=1)
    eval_every: int = Field(50, ge=1)
    eval_windows: int = Field(64, ge=1, description="held-out pairs per periodic validation pass")
    final_eval_windows: int = Field(512, ge=1, description="held-out pairs in the final pass")

    @model_validator(mode="after")
    def _no_compile(self):
        if self.compile:
            raise ValueError("compile = true is not supported by the preference stages yet; set it to false")
        return self


# -- pairs as tensors --------------------------------------------------------------------------------


@dataclass
class EncodedPair:
    chosen: tuple[list[int], list[int]]  # (ids, loss mask), EOS first
    rejected: tuple[list[int], list[int]]

    @property
    def length(self) -> int:
        return max(len(self.chosen[0]), len(self.rejected[0]))


@dataclass
class PairBatch:
    """B pairs as 2B right-padded rows: the chosen answers, then the rejected ones."""

    input_ids: torch.Tensor  # [2B, T]
    loss_mask: torch.Tensor  # [2B, T], 1 on the answer's tokens
    attention_mask: torch.Tensor  # [2B, T], 1 on real tokens
    reference_logps: torch.Tensor | None = None  # [2B], when precomputed

    @property
    def pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    @property
    def device(self) -> torch.device:  # the training loop picks its autocast device from the batch
        return self.input_ids.device


def encode_pairs(
    tokenizer: TextTokenizer, pairs: list[PreferenceExample], max_len: int, report: LoadReport
) -> list[EncodedPair]:
    out = []
    for pair in pairs:
        try:
            chosen = encode_conversation(tokenizer, [*pair.prompt, *pair.chosen], max_len - 1)
            rejected = encode_conversation(tokenizer, [*pair.prompt, *pair.rejected], max_len - 1)
        except ChatFormatError as exc:
            report.skip(exc.reason, pair.line, exc.detail)
            continue
        out.append(
            EncodedPair(([EOS_ID, *chosen[0]], [0, *chosen[1]]), ([EOS_ID, *rejected[0]], [0, *rejected[1]]))
        )
    return out


def collate(pairs: list[EncodedPair], cap: int, reference: torch.Tensor | None = None) -> PairBatch:
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    longest = max(len(ids) for ids, _ in rows)
    T = min(cap, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)  # longest <= cap: encode_pairs saw to it
    ids = torch.full((len(rows), T), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    attention = torch.zeros((len(rows), T), dtype=torch.long)
    for r, (row_ids, row_mask) in enumerate(rows):
        ids[r, : len(row_ids)] = torch.tensor(row_ids)
        mask[r, : len(row_mask)] = torch.tensor(row_mask)
        attention[r, : len(row_ids)] = 1
    return PairBatch(ids, mask, attention, reference)


class PairSource:
    """Pairs in a seeded order per epoch (sample i is a pure function of i): the loop's BatchSource.

    With `bucket` (the micro-batch size), each epoch's shuffled order is cut into runs of BUCKET_BATCHES
    batches, each run sorted by pair length and its batches shuffled again: a batch holds pairs of similar
    length, so far less of it is padding (the built-in pairs run from ~30 to 255 tokens), while the
    order stays random at the level of batches.
    """

    def __init__(
        self,
        pairs: list[EncodedPair],
        seed: int,
        cap: int,
        reference: torch.Tensor | None = None,
        bucket: int | None = None,
    ):
        self.pairs, self.seed, self.cap, self.bucket = pairs, seed, cap, bucket
        self.reference = reference  # [N, 2] precomputed (chosen, rejected) reference log-probs
        self.n = len(pairs)
        self.objective: PairObjective | None = None  # its step statistics go to the metrics

    @functools.lru_cache(maxsize=4)  # noqa: B019 (a handful of instances, each alive for one stage)
    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        if not self.bucket or self.bucket >= self.n:
            return order
        size = self.bucket * BUCKET_BATCHES
        batches = []
        for start in range(0, self.n, size):
            run = sorted(order[start : start + size], key=lambda i: self.pairs[i].length)
            batches += [run[b : b + self.bucket] for b in range(0, len(run), self.bucket)]
        # Keep a short final batch last, so every other batch is whole when n is not a multiple.
        whole = [b for b in batches if len(b) == self.bucket]
        short = [b for b in batches if len(b) != self.bucket]
        shuffled = [whole[i] for i in torch.randperm(len(whole), generator=generator).tolist()]
        return [i for batch in shuffled + short for i in batch]

    def _batch(self, indices: list[int]) -> tuple[PairBatch, torch.Tensor]:
        ref = None
        if self.reference is not None:
            ref = torch.cat([self.reference[indices, 0], self.reference[indices, 1]])
        batch = collate([self.pairs[i] for i in indices], self.cap, ref)
        return batch, torch.ones(len(indices))  # one validation weight per pair

    def batch(self, start_sample: int, batch_size: int) -> tuple[PairBatch, torch.Tensor]:
        samples = range(start_sample, start_sample + batch_size)
        return self._batch([self._order(s // self.n)[s % self.n] for s in samples])

    def in_order(self, batch_size: int, limit: int | None = None) -> Iterator[tuple[PairBatch, torch.Tensor]]:
        end = self.n if limit is None else min(limit, self.n)
        for s in range(0, end, batch_size):
            yield self._batch(list(range(s, min(s + batch_size, end))))

    def describe(self, step: int) -> dict[str, float]:
        return self.objective.pop_stats() if self.objective is not None else {}


@dataclass
class FeatureBatch:
    """B pairs as the frozen trunk's pooled features: [2B, F], the chosen answers, then the rejected ones."""

    features: torch.Tensor

    @property
    def pairs(self) -> int:
        return self.features.shape[0] // 2

    @property
    def device(self) -> torch.device:
        return self.features.device


class FeatureSource(PairSource):
    """A PairSource over precomputed features [N, 2, F] (chosen, rejected): the same seeded order, no trunk."""

    def __init__(self, features: torch.Tensor, seed: int, cap: int):
        self.features, self.seed, self.cap, self.bucket = features, seed, cap, None
        self.reference = None
        self.n = features.shape[0]
        self.objective = None

    def _batch(self, indices: list[int]) -> tuple[FeatureBatch, torch.Tensor]:
        picked = self.features[indices]
        return FeatureBatch(torch.cat([picked[:, 0], picked[:, 1]])), torch.ones(len(indices))


@torch.no_grad()
def precompute_features(
    reward: RewardModel, pairs: list[EncodedPair], cap: int, batch_size: int, precision: str
) -> torch.Tensor:
    """[N, 2, F] float32: what the score head reads for each pair's (chosen, rejected), in pair order.

    A frozen trunk gives every pair the same features at every step, so `align.reward` computes them once
    (one forward pass over the pairs, in batches of similar length) and trains the head on them.
    """
    was_training = reward.training
    reward.eval()
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length)
    out = torch.empty(0)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = collate([pairs[i] for i in indices], cap)
        with autocast(precision):
            feats = reward.features(batch.input_ids, batch.attention_mask, batch.loss_mask).float()
        if out.numel() == 0:
            out = torch.empty(len(pairs), 2, feats.shape[-1])
        out[indices, 0], out[indices, 1] = feats[: batch.pairs], feats[batch.pairs :]
    reward.train(was_training)
    return out


class PairObjective(nn.Module):
    """A network + its pairwise loss, as `train_loop` trains it: forward(PairBatch, weights) -> loss."""

    def __init__(self):
        super().__init__()
        self._stats: list[dict[str, float]] = []

    def statistics(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def forward(self, batch: PairBatch, weights: torch.Tensor | None = None) -> torch.Tensor:
        loss, stats = self.statistics(batch)
        if self.training:
            self._stats.append(stats)
        return loss

    def pop_stats(self) -> dict[str, float]:
        stats, self._stats = self._stats, []
        if not stats:
            return {}
        return {key: sum(s[key] for s in stats) / len(stats) for key in stats[0]}


@torch.no_grad()
def evaluate_pairs(objective: PairObjective, source: PairSource, batch_size: int, precision: str) -> dict:
    """Pair-weighted means of the objective's loss and statistics over all of `source`."""
    was_training = objective.training
    objective.eval()
    totals: dict[str, float] = {}
    count = 0
    for batch, _ in source.in_order(batch_size):
        with autocast(precision):
            loss, stats = objective.statistics(batch)
        n = batch.pairs
        for key, value in {"loss": float(loss), **stats}.items():
            totals[key] = totals.get(key, 0.0) + value * n
        count += n
    objective.train(was_training)
    return {key: value / max(count, 1) for key, value in totals.items()}


# -- data --------------------------------------------------------------------------------------------


def preference_data(
    config: PairDataConfig, tokenizer: TextTokenizer, max_len: int
) -> tuple[list[EncodedPair], list[EncodedPair], LoadReport]:
    """(train pairs, held-out pairs, load report), encoded."""
    if config.data == BUILTIN:
        instructions = builtin_instructions()
        train = builtin_pairs(
            "train",
            instructions.train,
            max_instruction_pairs=config.max_instruction_pairs,
            seed=config.seed,
            safety=config.builtin_safety,
        )
        held = builtin_pairs(
            "held_out",
            instructions.held_out,
            max_instruction_pairs=config.val_instruction_pairs,
            seed=config.seed,
            safety=config.builtin_safety,
        )
        report = LoadReport("builtin:safety+instruction-pairs", "preference", rows=len(train) + len(held))
    else:
        examples, report = load_preferences(config.data)
        train, held = [], []
        for example in examples:
            key = "\0".join(m.content for m in [*example.prompt, *example.chosen, *example.rejected])
            (held if unit_hash(config.seed, key) < config.val_fraction else train).append(example)
    train_encoded = encode_pairs(tokenizer, train, max_len, report)
    held_encoded = encode_pairs(tokenizer, held, max_len, report)
    report.kept = len(train_encoded) + len(held_encoded)
    if not train_encoded:
        raise DataError(f"{report.source}: no usable training pair\n{report.summary()}")
    if not held_encoded:
        raise DataError(f"{report.source}: no held-out pair to validate on")
    return train_encoded, held_encoded, report


def report_facts(report: LoadReport) -> dict[str, Any]:
    return {
        "source": report.source,
        "rows": report.rows,
        "kept": report.kept,
        "skipped": dict(sorted(report.skipped.items())),
    }


def _train(
    ctx, config: PairDataConfig, objective: PairObjective, data: PairSource, val: PairSource, what: str
):
    optimizer = build_optimizer(objective, config.optim)
    data.objective = objective
    metrics = JsonlMetrics(ctx.work_dir / "metrics.jsonl")
    scratch_codecs = CheckpointCodecs.from_store_security(ctx.store.security) if ctx.encrypt else None
    quiet = ctx.console.is_terminal
    with ctx.progress(config.max_steps, what) as bar:
        result = train_loop(
            objective,
            optimizer,
            data,
            lambda limit: val.in_order(config.batch_size, limit),
            config,
            data.cap,
            ctx.work_dir / "checkpoints",
            metrics,
            progress=bar,
            log=(lambda _msg: None) if quiet else ctx.log,
            checkpoint_codecs=scratch_codecs,
        )
    return result, metrics


def _copy_tokenizer(checkpoint, out) -> None:
    for name in ALL_TOKENIZER_FILES:
        if checkpoint.has(name):
            out.copy_from(checkpoint, name)


# -- align.reward ------------------------------------------------------------------------------------


class RewardConfig(PairDataConfig):
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="adds c * mean((r_chosen + r_rejected)^2) to pin the rewards' offset"
    )
    pooling: Pooling = Field(
        "relevance",
        description="'relevance': last token + a prompt-answer relevance term; 'last': the last token only "
        "(Hugging Face / TRL)",
    )
    train_trunk: bool = Field(
        False,
        description="also fine-tune the trunk (then set optim.lr ~1e-4 and fewer max_steps: every step runs "
        "the trunk); default: train the head alone on the frozen trunk's features",
    )
    # All the built-in pairs (about 5,750 train, 300 held out), three passes over them with the head alone
    # (cheap: the frozen trunk's features are computed once). On ~1,000 pairs, or with only the last
    # token, the reward model stays near chance on held-out pairs (docs/fine-tuning.md).
    max_instruction_pairs: int | None = Field(
        None, ge=1, description="builtin: training pairs drawn from the instruction set (None: all)"
    )
    val_instruction_pairs: int | None = Field(
        None, ge=0, description="builtin: held-out instruction pairs (None: all)"
    )
    batch_size: int = Field(16, ge=1, description="preference pairs per micro-batch")
    max_steps: int = Field(1080, ge=1)
    eval_every: int = Field(360, ge=1)
    checkpoint_every: int = Field(360, ge=1)
    final_eval_windows: int = Field(1024, ge=1, description="held-out pairs in the final pass")
    optim: OptimConfig = OptimConfig(lr=1e-2, warmup_steps=10, weight_decay=0.0)

    @model_validator(mode="after")
    def _trunk_lr(self):
        if self.train_trunk and self.optim.lr > 1e-3:
            raise ValueError(
                f"train_trunk = true with optim.lr = {self.optim.lr:g} (a rate for the head alone) would wreck "
                "the pre-trained trunk: set optim to e.g. {lr: 1.0e-4, warmup_steps: 10, weight_decay: 0.0}"
            )
        return self


class RewardObjective(PairObjective):
    def __init__(self, reward: RewardModel, center: float | None):
        super().__init__()
        self.reward, self.center = reward, center

    def statistics(self, batch: PairBatch | FeatureBatch) -> tuple[torch.Tensor, dict[str, float]]:
        if isinstance(batch, FeatureBatch):  # a frozen trunk's precomputed features: the head alone
            rewards = self.reward.score(batch.features).squeeze(-1).float()
        else:
            rewards = self.reward(batch.input_ids, batch.attention_mask, batch.loss_mask)
        chosen, rejected = rewards[: batch.pairs], rewards[batch.pairs :]
        loss = bradley_terry_loss(chosen, rejected, center_rewards_coefficient=self.center)
        chosen, rejected = chosen.detach(), rejected.detach()
        return loss, {
            "rewards/chosen": chosen.mean().item(),
            "rewards/rejected": rejected.mean().item(),
            "accuracy": (chosen > rejected).float().mean().item(),
            "margin": (chosen - rejected).mean().item(),
        }


def reward_model_files(model: RewardModel) -> dict[str, bytes]:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    payload = {
        "architecture": REWARD_ARCHITECTURE,
        "pooling": model.pooling,
        "config": model.trunk.config.model_dump(mode="json"),
    }
    return {
        "model.safetensors": save_safetensors(state),
        "model.json": json.dumps(payload, indent=2).encode(),
    }


def reward_model_from_files(read_bytes: Callable[[str], bytes]) -> RewardModel:
    """The reward model of an `align.reward` artifact (`artifact.read_bytes`, verified)."""
    payload = json.loads(read_bytes("model.json"))
    if payload.get("architecture") != REWARD_ARCHITECTURE:
        raise ConfigError(f"not a reward model: architecture {payload.get('architecture')!r}")
    # Artifacts written before `pooling` existed read the last token.
    model = RewardModel(
        Decoder(DecoderConfig.model_validate(payload["config"])), payload.get("pooling", "last")
    )
    model.load_state_dict(load_safetensors(read_bytes("model.safetensors")))
    return model.eval()


def run_reward(config: RewardConfig, inputs, ctx, out) -> None:
    checkpoint = inputs["checkpoint"]
    tokenizer, trunk = open_checkpoint(config, checkpoint)
    cap = trunk.config.seq_len
    train, held, report = preference_data(config, tokenizer, cap)
    ctx.log(report.summary().replace("\n", "; "))
    trunk.requires_grad_(config.train_trunk)
    objective = RewardObjective(RewardModel(trunk, config.pooling), config.center_rewards_coefficient)
    if config.train_trunk:
        data = PairSource(train, config.seed, cap, bucket=config.batch_size)
        val = PairSource(held, config.seed, cap)
        # The whole held-out set, sorted by length: the same accuracy with far fewer pad tokens.
        held_all = PairSource(sorted(held, key=lambda p: p.length), config.seed, cap)
        seen = PairSource(sorted(train[:256], key=lambda p: p.length), config.seed, cap)
    else:  # the trunk never changes: its features of every pair are computed once, the head trains on them
        started = time.perf_counter()
        batch = max(config.batch_size, 32)
        train_features = precompute_features(objective.reward, train, cap, batch, config.precision)
        held_features = precompute_features(objective.reward, held, cap, batch, config.precision)
        ctx.log(f"features of {len(train) + len(held):,} pairs in {time.perf_counter() - started:.0f} s")
        data = FeatureSource(train_features, config.seed, cap)
        val = held_all = FeatureSource(held_features, config.seed, cap)
        seen = FeatureSource(train_features[:256], config.seed, cap)
    before = evaluate_pairs(objective, held_all, config.batch_size, config.precision)
    trainable = sum(p.numel() for p in objective.parameters() if p.requires_grad)
    ctx.log(
        f"reward model on {checkpoint.short_id} ({config.pooling} pooling, "
        f"{'whole model' if config.train_trunk else 'head only'}: {trainable:,} trainable parameters): "
        f"{len(train):,} training pairs, {len(held):,} held out; held-out accuracy before {before['accuracy']:.1%}"
    )
    result, metrics = _train(ctx, config, objective, data, val, "training the reward model")
    after = evaluate_pairs(objective, held_all, config.batch_size, config.precision)
    train_eval = evaluate_pairs(objective, seen, config.batch_size, config.precision)

    for name, payload in reward_model_files(objective.reward).items():
        out.write_bytes(name, payload)
    _copy_tokenizer(checkpoint, out)
    out.write_bytes("metrics.jsonl", metrics.path.read_bytes())
    out.metadata.update(
        parameters=sum(p.numel() for p in objective.reward.parameters()),
        trainable_parameters=trainable,
        pooling=config.pooling,
        train_trunk=config.train_trunk,
        model=trunk.config.model_dump(mode="json"),
        steps=result.state.step,
        pairs_seen=result.state.sample,
        train_loss=result.train_loss,
        val_loss=after["loss"],
        val_accuracy_before=before["accuracy"],
        val_accuracy=after["accuracy"],
        val_margin=after["margin"],
        train_accuracy=train_eval["accuracy"],
        train_pairs=len(train),
        held_out_pairs=len(held),
        data=config.data,
        load_report=report_facts(report),
        trunk_from=checkpoint.id,
        seconds=round(result.seconds, 1),
        resumed_from_step=result.resumed_from,
        precision=config.precision,
        tokenizer=checkpoint.manifest.metadata.get("tokenizer"),
    )
    ctx.log(
        f"done: held-out pairwise accuracy {before['accuracy']:.1%} -> {after['accuracy']:.1%} "
        f"(train {train_eval['accuracy']:.1%}), loss {after['loss']:.4f}"
    )


def reward_summary(manifest: Manifest) -> list[tuple[str, str]]:
    m = manifest.metadata
    skipped = ", ".join(f"{k} {v}" for k, v in m["load_report"]["skipped"].items()) or "none"
    return [
        (
            "reward model on",
            f"{m['trunk_from'][:12]} ({m['parameters']:,} parameters, {m.get('pooling', 'last')} pooling, "
            + ("whole model trained)" if m.get("train_trunk", True) else "head only trained)"),
        ),
        ("pairs", f"{m['train_pairs']:,} train, {m['held_out_pairs']:,} held out; skipped: {skipped}"),
        ("training steps", f"{m['steps']:,} ({m['pairs_seen']:,} pairs)"),
        (
            "held-out pairwise accuracy",
            f"{m['val_accuracy_before']:.1%} -> {m['val_accuracy']:.1%} (train {m['train_accuracy']:.1%})",
        ),
        ("held-out Bradley-Terry loss", f"{m['val_loss']:.4f}"),
    ]


REWARD = Stage(
    name="align.reward",
    kind="reward-model",
    config=RewardConfig,
    run=run_reward,
    inputs={"checkpoint": "checkpoint"},
    permissions=("train",),
    summary=reward_summary,
    fingerprint=lambda config: data_fingerprint(config.data),
    description="train a Bradley-Terry reward model on preference pairs; reports held-out pairwise accuracy",
)


# -- align.dpo ---------------------------------------------------------------------------------------


class DPOConfig(PairDataConfig, PreferenceConfig):
    safety_eval: bool = Field(True, description="measure refusal / over-refusal before and after")
    safety_max_new_tokens: int = Field(48, ge=1, description="greedy reply length for the safety figures")
    optim: OptimConfig = OptimConfig(lr=3e-4, warmup_steps=10, weight_decay=0.0)


class DPOObjective(PairObjective):
    def __init__(self, policy: Decoder, reference: Decoder | None, config: PreferenceConfig):
        super().__init__()
        self.policy, self.config = policy, config
        # A tuple, not a submodule: the reference is neither trained nor saved in checkpoints.
        self._reference = (reference,)

    def reference_logps(self, batch: PairBatch) -> torch.Tensor:
        if batch.reference_logps is not None:
            return batch.reference_logps
        reference = self._reference[0]
        if reference is None:
            raise ValueError("reference = precomputed, but the batch carries no reference log-probs")
        with torch.no_grad():
            return sequence_logprobs(reference, batch.input_ids, batch.loss_mask)

    def statistics(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        B = batch.pairs
        policy = sequence_logprobs(self.policy, batch.input_ids, batch.loss_mask)
        ref = self.reference_logps(batch)
        lengths = completion_lengths(batch.loss_mask).float()
        result = preference_loss_from_config(
            self.config,
            policy[:B],
            policy[B:],
            ref[:B],
            ref[B:],
            chosen_lengths=lengths[:B],
            rejected_lengths=lengths[B:],
        )
        return result.loss, result.metrics()


@torch.no_grad()
def precompute_reference(
    reference: Decoder, pairs: list[EncodedPair], cap: int, batch_size: int, precision: str
):
    """[N, 2] (chosen, rejected) summed answer log-probs of each pair under the frozen reference."""
    rows = []
    source = PairSource(pairs, 0, cap)
    for batch, _ in source.in_order(batch_size):
        with autocast(precision):
            logps = sequence_logprobs(reference, batch.input_ids, batch.loss_mask)
        rows.append(torch.stack([logps[: batch.pairs], logps[batch.pairs :]], dim=1))
    return torch.cat(rows)


def run_dpo(config: DPOConfig, inputs, ctx, out) -> None:
    checkpoint = inputs["checkpoint"]
    tokenizer, policy = open_checkpoint(config, checkpoint)
    reference = model_from_files(checkpoint.read_bytes).eval().requires_grad_(False)
    cap = policy.config.seq_len
    train, held, report = preference_data(config, tokenizer, cap)
    ctx.log(report.summary().replace("\n", "; "))
    train_ref = val_ref = None
    if config.reference == "precomputed":
        train_ref = precompute_reference(reference, train, cap, config.batch_size, config.precision)
        val_ref = precompute_reference(reference, held, cap, config.batch_size, config.precision)
    data = PairSource(train, config.seed, cap, train_ref)
    val = PairSource(held, config.seed, cap, val_ref)
    before, rows_before = (
        safety_figures(reference, tokenizer, config.safety_max_new_tokens)
        if config.safety_eval
        else (None, [])
    )
    objective = DPOObjective(policy, None if config.reference == "precomputed" else reference, config)
    ctx.log(
        f"DPO ({config.loss_type}, beta {config.beta}, reference {config.reference}) on {checkpoint.short_id}: "
        f"{len(train):,} training pairs, {len(held):,} held out"
        + (
            f"; refusal {before['refusal_rate']:.0%}, over-refusal {before['over_refusal_rate']:.0%}"
            if before
            else ""
        )
    )
    if config.reference == "precomputed":
        del reference  # the log-probs are all it was needed for
    # The loss of the first step's batch before any update (policy == reference: log 2 for sigmoid).
    with torch.no_grad(), autocast(config.precision):
        initial, _ = objective.statistics(data.batch(0, config.batch_size)[0])
    result, metrics = _train(ctx, config, objective, data, val, f"preference tuning ({config.loss_type})")
    final = evaluate_pairs(objective, val, config.batch_size, config.precision)
    policy.eval()
    after, rows_after = (
        safety_figures(policy, tokenizer, config.safety_max_new_tokens) if config.safety_eval else (None, [])
    )

    for name, payload in model_files(policy).items():
        out.write_bytes(name, payload)
    _copy_tokenizer(checkpoint, out)
    out.write_bytes("metrics.jsonl", metrics.path.read_bytes())
    if config.safety_eval:
        out.write_json("safety_replies.json", {"before": rows_before, "after": rows_after})
    out.metadata.update(
        parameters=policy.num_params(),
        model=policy.config.model_dump(mode="json"),
        steps=result.state.step,
        pairs_seen=result.state.sample,
        loss_type=config.loss_type,
        beta=config.beta,
        reference=config.reference,
        initial_loss=float(initial),
        train_loss=result.train_loss,
        val_loss=final["loss"],
        val_metrics={k: v for k, v in final.items() if k != "loss"},
        train_pairs=len(train),
        held_out_pairs=len(held),
        data=config.data,
        load_report=report_facts(report),
        safety_before=before,
        safety_after=after,
        aligned_from=checkpoint.id,
        seconds=round(result.seconds, 1),
        resumed_from_step=result.resumed_from,
        precision=config.precision,
        tokenizer=checkpoint.manifest.metadata.get("tokenizer"),
    )
    ctx.log(
        f"done: held-out loss {final['loss']:.4f}, accuracy {final['rewards/accuracies']:.1%}, "
        f"margin {final['rewards/margins']:+.4f}"
        + (
            f"; refusal {before['refusal_rate']:.0%} -> {after['refusal_rate']:.0%}, over-refusal "
            f"{before['over_refusal_rate']:.0%} -> {after['over_refusal_rate']:.0%}"
            if before and after
            else ""
        )
    )


def dpo_summary(manifest: Manifest) -> list[tuple[str, str]]:
    m = manifest.metadata
    v = m["val_metrics"]
    skipped = ", ".join(f"{k} {n}" for k, n in m["load_report"]["skipped"].items()) or "none"
    rows = [
        (
            "aligned from",
            f"{m['aligned_from'][:12]} ({m['loss_type']}, beta {m['beta']}, reference {m['reference']})",
        ),
        ("pairs", f"{m['train_pairs']:,} train, {m['held_out_pairs']:,} held out; skipped: {skipped}"),
        (
            "training loss",
            f"{m['initial_loss']:.4f} before the first step -> {m['train_loss']:.4f} at step {m['steps']}",
        ),
        (
            "held-out preference",
            f"loss {m['val_loss']:.4f}, accuracy {v['rewards/accuracies']:.1%}, margin "
            f"{v['rewards/margins']:+.3f} (chosen {v['rewards/chosen']:+.3f}, rejected {v['rewards/rejected']:+.3f})",
        ),
    ]
    return rows + format_safety(m.get("safety_before"), m.get("safety_after"))


DPO = Stage(
    name="align.dpo",
    kind="checkpoint",
    config=DPOConfig,
    run=run_dpo,
    inputs={"checkpoint": "checkpoint"},
    permissions=("train",),
    summary=dpo_summary,
    fingerprint=lambda config: data_fingerprint(config.data),
    description="preference-tune a checkpoint (DPO / IPO / hinge / robust) against its frozen self",
)
