"""`train.objective`: pre-train a GPT-2, Llama, BERT or T5 model with its objective — causal LM, prefix
LM, masked LM or span corruption, or a weighted mixture of causal and prefix LM — and save it in Hugging
Face format.

The training loop is the same one `train.pretrain` uses: it sees (inputs, targets) pairs and a model
called as `model(inputs, targets) -> loss`. Here the pairs come from the objective (a seeded transform
of the loader's windows, the generator drawn from (seed, first sample), so resume stays exact) and
the model is a thin wrapper that turns them into the architecture's own call:

    gpt  + clm        GPT(inputs, targets)
    gpt  + prefix_lm  GPT(inputs, targets, attention_mask): the prefix is read off the targets (they
                      are IGNORE_INDEX up to the last prefix position)
    llama + clm / prefix_lm   the same calls on `Decoder` (models/decoder.py, any DecoderConfig field
                      under `model:`); exported as LlamaForCausalLM, so a PaLM-style `parallel: true`
                      block is refused when the config is validated, before any training
    bert + mlm        cross-entropy of Encoder.mlm_logits(inputs) against targets
    t5   + span       T5(inputs, shift_right(targets), padding mask, targets)

Tokens the objective needs beyond the tokenizer's vocabulary get ids after it: BERT's mask token is
id V, T5's 100 sentinels are V .. V + 99 (<extra_id_0> = V + 99, as T5 counts down). The artifact
holds config.json + model.safetensors that `transformers` loads (GPT2LMHeadModel, BertForMaskedLM,
T5ForConditionalGeneration, LlamaForCausalLM), the tokenizer files and the metrics.

Mixture of objectives (decoders only): `objectives: {clm: 1.0, prefix_lm: 1.0}` instead of `objective:`.
Each micro-batch draws its task from the weights with the same seeded per-batch generator that then
draws the objective's own randomness, so the task of a batch is a pure function of (seed, first sample)
and resume stays exact. `MixtureLoss` scores each batch with its task's loss and keeps per-task running
sums in buffers (saved with the checkpoint); the loader's `describe()` reads them into the metrics log
as `loss/<task>` and `task_share/<task>` (share of micro-batches), averaged since the last logged
step. Validation during training scores each validation batch under a task drawn the same way; the
metadata holds every task's own validation loss (`task_val_loss`) and the run's task shares.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, model_validator

from lmloom.artifacts.manifest import Manifest
from lmloom.errors import ConfigError
from lmloom.monitor.metrics import JsonlMetrics
from lmloom.objectives import (
    IGNORE_INDEX,
    MaskedLMConfig,
    SpanCorruptionConfig,
    causal_lm,
    masked_lm,
    prefix_lm,
    span_corruption,
)
from lmloom.objectives.prefix import prefix_lm_attention_mask
from lmloom.stages import Stage
from lmloom.tokenizers.base import ALL_TOKENIZER_FILES, BOS_ID, EOS_ID, PAD_ID
from lmloom.tokenizers.loader import WindowLoader, _gather, check_windows
from lmloom.tokenizers.loading import load_tokenizer
from lmloom.tokenizers.shards import TokenShards
from lmloom.train.checkpoint import CheckpointCodecs
from lmloom.train.curriculum import _mix
from lmloom.train.optim import build_optimizer
from lmloom.train.stage import check_encoded_with
from lmloom.train.trainer import LoopConfig, evaluate, train_loop

PAIRS = {"gpt": ("clm", "prefix_lm"), "llama": ("clm", "prefix_lm"), "bert": ("mlm",), "t5": ("span",)}
MIXTURE = "mixture"  # the `objective` of a config that sets `objectives`
N_SENTINELS = 100
PLANNING_VOCAB = 32000  # stands in for the tokenizer's vocabulary when a config is checked before a run
HF_CLASS = {
    "gpt": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "bert": "BertForMaskedLM",
    "t5": "T5ForConditionalGeneration",
}


class ObjectiveTrainConfig(LoopConfig):
    architecture: Literal["gpt", "llama", "bert", "t5"] = "gpt"
    objective: Literal["clm", "prefix_lm", "mlm", "span", "mixture"] = Field(
        "clm", description="the training objective; 'mixture' (set by itself) when `objectives` is given"
    )
    objectives: dict[str, float] | None = Field(
        None,
        description="instead of `objective`: a weighted mixture of the decoder objectives, e.g. "
        "{clm: 1.0, prefix_lm: 1.0}; each micro-batch draws its task from the weights",
    )
    preset: str = Field("tiny", description="the architecture's named preset (see its config class)")
    model: dict[str, Any] = Field(default_factory=dict, description="overrides of the preset's fields")
    seq_len: int = Field(128, ge=8, description="tokens per training window")
    seed: int = Field(
        1337, ge=0, description="seeds initialisation, the data order and the objective's draws"
    )
    compile: bool = Field(False, description="torch.compile the model for training")

    @model_validator(mode="before")
    @classmethod
    def _mixture_objective(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("objectives") is not None:
            if data.get("objective", MIXTURE) != MIXTURE:
                raise ValueError(
                    f"objective {data['objective']!r} and objectives are alternatives: set one of them "
                    "(or objective: mixture, which goes with objectives)"
                )
            data = {**data, "objective": MIXTURE}
        return data

    @model_validator(mode="after")
    def _pair(self) -> ObjectiveTrainConfig:
        takes = ", ".join(PAIRS[self.architecture])
        if self.objective == MIXTURE:
            if not self.objectives:
                raise ValueError("objective 'mixture' needs objectives: {name: weight, ...}")
            if self.architecture not in ("gpt", "llama"):
                raise ValueError(
                    f"a mixture of objectives needs a decoder architecture (gpt or llama), "
                    f"not {self.architecture!r}"
                )
            for name, weight in self.objectives.items():
                if name not in PAIRS[self.architecture]:
                    raise ValueError(
                        f"objectives: {name!r} does not fit architecture {self.architecture!r}; it takes {takes}"
                    )
                if not (math.isfinite(weight) and weight > 0):
                    raise ValueError(
                        f"objectives: the weight of {name!r} must be a positive number, got {weight}"
                    )
        elif self.objective not in PAIRS[self.architecture]:
            raise ValueError(
                f"objective {self.objective!r} does not fit architecture {self.architecture!r}; it takes {takes}"
            )
        if self.architecture == "llama" and self.model.get("parallel"):
            # Refused before any training: the Llama export could not hold it.
            raise ValueError(
                "model.parallel: a parallel (PaLM-style) block has no Hugging Face Llama equivalent, and "
                "train.objective saves LlamaForCausalLM; use parallel: false (or train.pretrain, which "
                "saves lmloom's own format)"
            )
        # Every architecture's preset and `model` overrides, when the recipe is planned: an unknown
        # preset or key would otherwise surface after the data had loaded, as pydantic's own report.
        try:
            model_config(self, vocab=PLANNING_VOCAB)
        except ValidationError as exc:
            raise ValueError(f"model: {_first_line(exc)}") from None
        except (ValueError, TypeError) as exc:  # an unknown preset (its message names it)
            raise ValueError(_first_line(exc)) from None
        return self

    @property
    def tasks(self) -> dict[str, float]:
        """Task -> normalised weight: the mixture's, or the single objective with weight 1."""
        if self.objective != MIXTURE:
            return {self.objective: 1.0}
        total = sum(self.objectives.values())
        return {name: weight / total for name, weight in self.objectives.items()}

    @property
    def label(self) -> str:
        if self.objective != MIXTURE:
            return self.objective
        return " + ".join(f"{name} {weight:.2f}" for name, weight in self.tasks.items())


def _first_line(exc: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(
            ": ".join(filter(None, (".".join(map(str, e["loc"])), _message(e)))) for e in exc.errors()
        )
    return str(exc).splitlines()[0]


def _message(error: dict) -> str:
    if error["type"] == "extra_forbidden":
        return f"unknown key (value {error['input']!r})"
    if error["type"] == "value_error":
        return str(error["ctx"]["error"])  # without pydantic's "Value error, " prefix
    return error["msg"]


# -- the models, wrapped to the loop's model(inputs, targets) -> loss -----------------------------------


def causal_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return model(inputs, targets)


def prefix_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    ignored = (targets == IGNORE_INDEX).int()
    leading = ignored.cumprod(dim=1).sum(dim=1)  # IGNORE targets before the first scored one
    mask = prefix_lm_attention_mask(leading + 1, inputs.shape[1])
    return model(inputs, targets, attention_mask=mask)


DECODER_LOSSES = {"clm": causal_loss, "prefix_lm": prefix_loss}


class CausalLoss(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return causal_loss(self.model, inputs, targets)


class PrefixLoss(CausalLoss):
    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return prefix_loss(self.model, inputs, targets)


class MixtureLoss(torch.nn.Module):
    """A decoder under a mixture of objectives: each batch is scored with the loss of `task`, which the
    loader sets when it hands the batch out. Training batches add to per-task running sums, kept in
    buffers so that a checkpoint carries them and a resumed run logs what the uninterrupted one does."""

    def __init__(self, model: torch.nn.Module, tasks: list[str]):
        super().__init__()
        self.model = model
        self.tasks = list(tasks)
        self.task = self.tasks[0]
        self.register_buffer("task_loss_sum", torch.zeros(len(tasks), dtype=torch.float64))
        self.register_buffer("task_batches", torch.zeros(len(tasks), dtype=torch.float64))

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = DECODER_LOSSES[self.task](self.model, inputs, targets)
        if self.training and torch.is_grad_enabled():
            i = self.tasks.index(self.task)
            self.task_loss_sum[i] += loss.detach().double()
            self.task_batches[i] += 1
        return loss

    @torch.no_grad()
    def window(self) -> dict[str, float]:
        """`loss/<task>` (mean over the task's micro-batches) and `task_share/<task>` since the last call;
        then the sums start again."""
        total = float(self.task_batches.sum())
        out: dict[str, float] = {}
        for i, name in enumerate(self.tasks):
            n = float(self.task_batches[i])
            if n:
                out[f"loss/{name}"] = float(self.task_loss_sum[i]) / n
            if total:
                out[f"task_share/{name}"] = round(n / total, 4)
        self.task_loss_sum.zero_()
        self.task_batches.zero_()
        return out


class MaskedLoss(CausalLoss):
    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model.mlm_logits(inputs)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


class SpanLoss(CausalLoss):
    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        decoder_inputs = self.model.shift_right(targets)
        padding = (inputs != self.model.config.pad_id).long()
        return self.model(inputs, decoder_inputs, attention_mask=padding, targets=targets)


def model_config(config: ObjectiveTrainConfig, vocab: int):
    """The architecture's config: its preset, this run's vocabulary and length, the `model` overrides."""
    overrides = dict(config.model)
    if config.architecture == "gpt":
        from lmloom.models.gpt import GPTConfig

        return GPTConfig.preset(
            config.preset, **{"vocab_size": vocab, "seq_len": config.seq_len, **overrides}
        )
    if config.architecture == "llama":
        from lmloom.models.decoder import DecoderConfig

        return DecoderConfig.preset(
            config.preset, **{"vocab_size": vocab, "seq_len": config.seq_len, **overrides}
        )
    if config.architecture == "bert":
        from lmloom.models.encoder import EncoderConfig

        # masked LM corrupts whole windows (seq_len + 1 tokens): no shift, so one more position
        return EncoderConfig.preset(
            config.preset,
            **{
                "vocab_size": vocab + 1,
                "max_positions": config.seq_len + 1,
                "pad_token_id": PAD_ID,
                **overrides,
            },
        )
    from lmloom.models.encoder_decoder import T5Config

    return T5Config.preset(
        config.preset,
        **{
            "vocab_size": vocab + N_SENTINELS,
            "pad_id": PAD_ID,
            "decoder_start_token_id": PAD_ID,
            **overrides,
        },
    )


def build_model(config: ObjectiveTrainConfig, vocab: int) -> tuple[torch.nn.Module, torch.nn.Module, int]:
    """(the model, its loss wrapper, the model's vocabulary size)."""
    cfg = model_config(config, vocab)
    if config.architecture == "gpt":
        from lmloom.models.gpt import GPT

        model = GPT(cfg)
        return model, _decoder_loss(config, model), vocab
    if config.architecture == "llama":
        from lmloom.models.decoder import Decoder

        model = Decoder(cfg)
        return model, _decoder_loss(config, model), vocab
    if config.architecture == "bert":
        from lmloom.models.encoder import Encoder

        model = Encoder(cfg)
        return model, MaskedLoss(model), vocab + 1
    from lmloom.models.encoder_decoder import T5

    model = T5(cfg)
    return model, SpanLoss(model), vocab + N_SENTINELS


def _decoder_loss(config: ObjectiveTrainConfig, model: torch.nn.Module) -> torch.nn.Module:
    if config.objective == MIXTURE:
        return MixtureLoss(model, list(config.tasks))
    return (PrefixLoss if config.objective == "prefix_lm" else CausalLoss)(model)


def objective_transform(config: ObjectiveTrainConfig, vocab: int, objective: str | None = None):
    """windows [B, T + 1], generator -> (inputs, targets) of the configured (or the given) objective."""
    objective = config.objective if objective is None else objective
    if objective == MIXTURE:
        raise ValueError("a mixture has one transform per task: objective_transform(config, vocab, task)")
    if objective == "clm":
        return lambda windows, gen: _pair(causal_lm(windows, gen))
    if objective == "prefix_lm":
        return lambda windows, gen: _pair(prefix_lm(windows, gen))
    if objective == "mlm":
        mlm = MaskedLMConfig(
            mask_token_id=vocab,
            vocab_size=vocab + 1,
            special_ids=frozenset({BOS_ID, EOS_ID, PAD_ID}),
            pad_id=PAD_ID,
        )
        return lambda windows, gen: _pair(masked_lm(windows, mlm, gen))
    span = SpanCorruptionConfig(
        first_sentinel_id=vocab + N_SENTINELS - 1,
        n_sentinels=N_SENTINELS,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        decoder_start_id=PAD_ID,
    )
    return lambda windows, gen: _pair(span_corruption(windows, span, gen))


def _pair(batch) -> tuple[torch.Tensor, torch.Tensor]:
    return batch.input_ids, batch.targets


def _generator(seed: int, index: int) -> torch.Generator:
    with np.errstate(over="ignore"):
        value = int(_mix(np.array([seed * 1_000_003 + index], dtype=np.uint64))[0]) & (2**63 - 1)
    return torch.Generator().manual_seed(value)


class ObjectiveLoader:
    """The window loader's samples, transformed by the objective with a per-batch seeded generator."""

    def __init__(self, base: WindowLoader, transform, seed: int):
        self.base, self.transform, self.seed = base, transform, seed

    def batch(self, start_sample: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base.batch(start_sample, batch_size)
        windows = torch.cat([x, y[:, -1:]], dim=1)
        return self.transform(windows, _generator(self.seed, start_sample))


class MixtureLoader:
    """Like `ObjectiveLoader`, but each micro-batch first draws its task from the weights with the
    batch's seeded generator, then that task's transform draws from the same generator. The draw is
    announced to the `MixtureLoss` (the loop scores a batch right after it takes it)."""

    def __init__(
        self,
        base: WindowLoader,
        transforms: dict,
        tasks: dict[str, float],
        seed: int,
        loss: MixtureLoss,
    ):
        self.base, self.transforms, self.seed, self.loss = base, transforms, seed, loss
        self.names = list(tasks)
        self.bounds = torch.tensor(list(tasks.values()), dtype=torch.float64).cumsum(0)
        self.bounds[-1] = 1.0

    def draw(self, gen: torch.Generator) -> str:
        """The task of a batch: one uniform draw from its generator against the cumulative weights."""
        u = torch.rand((), generator=gen, dtype=torch.float64)
        return self.names[int(torch.searchsorted(self.bounds, u, right=True))]

    def task_of(self, start_sample: int) -> str:
        return self.draw(_generator(self.seed, start_sample))

    def batch(self, start_sample: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base.batch(start_sample, batch_size)
        windows = torch.cat([x, y[:, -1:]], dim=1)
        gen = _generator(self.seed, start_sample)
        task = self.draw(gen)
        self.loss.task = task
        return self.transforms[task](windows, gen)

    def describe(self, step: int) -> dict[str, float]:
        """Per-task mean loss and task share since the last call (`train_loop` calls it on logged steps)."""
        return self.loss.window()


def mixture_val_batches(
    shards: TokenShards, seq_len: int, batch_size: int, limit: int, loader: MixtureLoader, seed: int
):
    """Validation windows, each batch under a task drawn as in training (from seed + 1)."""
    n_windows = min(check_windows(shards, seq_len), limit)
    for first in range(0, n_windows, batch_size):
        x, y = _gather(shards, np.arange(first, min(first + batch_size, n_windows)), seq_len)
        gen = _generator(seed + 1, first)
        task = loader.draw(gen)
        loader.loss.task = task
        yield loader.transforms[task](torch.cat([x, y[:, -1:]], dim=1), gen)


def objective_val_batches(
    shards: TokenShards, seq_len: int, batch_size: int, limit: int, transform, seed: int
):
    n_windows = min(check_windows(shards, seq_len), limit)
    for first in range(0, n_windows, batch_size):
        x, y = _gather(shards, np.arange(first, min(first + batch_size, n_windows)), seq_len)
        yield transform(torch.cat([x, y[:, -1:]], dim=1), _generator(seed + 1, first))


def run(config: ObjectiveTrainConfig, inputs, ctx, out) -> None:
    shards_art, tok_art = inputs["shards"], inputs["tokenizer"]
    check_encoded_with(shards_art, tok_art, f"stages.{ctx.step}.inputs")
    vocab = load_tokenizer(tok_art).vocab_size
    torch.manual_seed(config.seed)
    try:
        model, loss_model, model_vocab = build_model(config, vocab)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"stages.{ctx.step}.config: {_first_line(exc)}") from None
    train = TokenShards(shards_art, "train")
    val = TokenShards(shards_art, "val")
    check_windows(val, config.seq_len)  # too short for one window: fail now, not after training
    windows = WindowLoader(train, config.seq_len, seed=config.seed)
    transforms = {task: objective_transform(config, vocab, task) for task in config.tasks}
    if config.objective == MIXTURE:
        data = MixtureLoader(windows, transforms, config.tasks, config.seed, loss_model)

        def val_batches(limit):
            return mixture_val_batches(val, config.seq_len, config.batch_size, limit, data, config.seed)
    else:
        transform = transforms[config.objective]
        data = ObjectiveLoader(windows, transform, config.seed)

        def val_batches(limit):
            return objective_val_batches(
                val, config.seq_len, config.batch_size, limit, transform, config.seed
            )

    optimizer = build_optimizer(model, config.optim)
    n_params = sum(p.numel() for p in model.parameters())
    ctx.log(
        f"{config.architecture} ({config.preset}, {n_params:,} parameters, vocabulary {model_vocab:,}) with "
        f"{config.label}; {config.max_steps} steps of {config.batch_size} x {config.grad_accum} windows of "
        f"{config.seq_len} tokens"
    )
    metrics = JsonlMetrics(ctx.work_dir / "metrics.jsonl")
    scratch_codecs = CheckpointCodecs.from_store_security(ctx.store.security) if ctx.encrypt else None
    quiet = ctx.console.is_terminal
    with ctx.progress(config.max_steps, f"pre-training ({config.objective})") as bar:
        result = train_loop(
            loss_model,
            optimizer,
            data,
            val_batches,
            config,
            config.seq_len,
            ctx.work_dir / "checkpoints",
            metrics,
            progress=bar,
            log=(lambda _msg: None) if quiet else ctx.log,
            checkpoint_codecs=scratch_codecs,
        )
    mixture = {}
    if config.objective == MIXTURE:
        mixture = _mixture_metadata(config, data, val)
        ctx.log(
            "per-task validation loss: "
            + ", ".join(f"{name} {loss:.4f}" for name, loss in mixture["task_val_loss"].items())
        )
    with tempfile.TemporaryDirectory(dir=ctx.work_dir) as tmp:
        _export(config.architecture, model, Path(tmp))
        for path in sorted(Path(tmp).iterdir()):
            out.write_bytes(path.name, path.read_bytes())
    for name in ALL_TOKENIZER_FILES:  # none of them is called config.json or model.safetensors
        if tok_art.has(name):
            out.copy_from(tok_art, name)
    out.write_bytes("metrics.jsonl", metrics.path.read_bytes())
    out.metadata.update(
        architecture=config.architecture,
        objective=config.objective,
        parameters=n_params,
        vocabulary=model_vocab,
        steps=result.state.step,
        tokens=result.state.tokens,
        train_loss=result.train_loss,
        val_loss=result.val_loss,
        tokens_per_s=round(result.tokens_per_s, 1),
        seconds=round(result.seconds, 1),
        tokenizer=tok_art.id,
        hf_class=HF_CLASS[config.architecture],
        **mixture,
    )
    ctx.log(f"done: train loss {result.train_loss:.4f}, val loss {result.val_loss:.4f}")


def _mixture_metadata(config: ObjectiveTrainConfig, data: MixtureLoader, val: TokenShards) -> dict[str, Any]:
    """The weights, the share of micro-batches each task drew over the run, and each task's own
    validation loss over final_eval_windows."""
    loss_model = data.loss
    counts = dict.fromkeys(data.names, 0)
    for micro in range(config.max_steps * config.grad_accum):
        counts[data.task_of(micro * config.batch_size)] += 1
    total = sum(counts.values())
    task_val = {}
    for name, transform in data.transforms.items():
        loss_model.task = name
        task_val[name] = evaluate(
            loss_model,
            objective_val_batches(
                val, config.seq_len, config.batch_size, config.final_eval_windows, transform, config.seed
            ),
            config.precision,
        )
    return {
        "objectives": {name: round(weight, 6) for name, weight in config.tasks.items()},
        "task_share": {name: round(n / total, 4) for name, n in counts.items()},
        "task_val_loss": task_val,
    }


def _export(architecture: str, model: torch.nn.Module, path: Path) -> None:
    if architecture == "gpt":
        from lmloom.models.hf_gpt2 import export_hf_dir
    elif architecture == "llama":
        from lmloom.models.hf_llama import export_hf_dir
    elif architecture == "bert":
        from lmloom.models.hf_bert import export_hf_dir
    else:
        from lmloom.models.hf_t5 import export_hf_dir
    export_hf_dir(model, path)


def summary(manifest: Manifest) -> list[tuple[str, str]]:
    m = manifest.metadata
    objective = m["objective"]
    if "objectives" in m:
        objective = " + ".join(f"{name} {weight:.2f}" for name, weight in m["objectives"].items())
    rows = [
        ("model", f"{m['architecture']} with {objective}, {m['parameters']:,} parameters"),
        ("training steps", f"{m['steps']:,} ({m['tokens']:,} tokens)"),
        (
            "train / validation loss",
            f"{m['train_loss']:.4f} / {m['val_loss']:.4f} (ppl {math.exp(min(m['val_loss'], 50)):.1f})",
        ),
        ("format", f"Hugging Face {m['hf_class']} (config.json + model.safetensors)"),
    ]
    if "task_val_loss" in m:
        rows.insert(
            3,
            (
                "per-task validation loss",
                ", ".join(
                    f"{name} {loss:.4f} ({m['task_share'][name]:.0%} of batches)"
                    for name, loss in m["task_val_loss"].items()
                ),
            ),
        )
    return rows


OBJECTIVE = Stage(
    name="train.objective",
    kind="hf-model",
    config=ObjectiveTrainConfig,
    run=run,
    inputs={"shards": "shards", "tokenizer": "tokenizer"},
    permissions=("train",),
    summary=summary,
    description="pre-train GPT-2 or Llama (causal or prefix LM, or a mixture of both), BERT (masked LM) or T5 "
    "(span corruption); Hugging Face output",
)
