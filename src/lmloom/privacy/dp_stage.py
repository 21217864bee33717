"""`train.dp_pretrain`: token shards + tokenizer -> a checkpoint trained with DP-SGD (Opacus).

The same training loop as `train.pretrain` (`train_loop`: schedule, validation, checkpoints, exact resume)
with a runner whose steps are DP-SGD steps: Poisson-sampled batches of windows (a pure function of the
seed and the step), per-sample gradients clipped to `dp.max_grad_norm`, Gaussian noise, and an accountant
whose epsilon is logged every `log_every` steps and recorded with delta, the noise multiplier, the sample
rate and the steps in the artifact's metadata.

What the guarantee covers: the weights, and figures computed from them on held-out data (validation
loss). The training loss and gradient norm of each step are computed on private data without noise: they
stay out of the artifact unless `dp.release_train_stats` is set. The stability guard (which rolls back on
a loss spike, a data-dependent decision) is off, and features whose choices depend on the data
(curriculum) or that need whole-model passes across ranks (torchrun) are not offered here.
"""

from __future__ import annotations

import json
import math

import torch
from pydantic import Field, model_validator

from lmloom.artifacts.manifest import Manifest
from lmloom.errors import ConfigError
from lmloom.models.decoder import Decoder
from lmloom.models.io import model_files
from lmloom.monitor.metrics import JsonlMetrics
from lmloom.privacy.dp import DPConfig, PrivateTraining, WindowDataset, forward_backward, make_private
from lmloom.stages import Stage
from lmloom.tokenizers.base import ALL_TOKENIZER_FILES
from lmloom.tokenizers.loader import validation_batches
from lmloom.tokenizers.shards import TokenShards
from lmloom.train.checkpoint import CheckpointCodecs
from lmloom.train.guards import StabilityGuard
from lmloom.train.optim import build_optimizer
from lmloom.train.runners import LocalRunner
from lmloom.train.stage import ModelShape, check_encoded_with, decoder_config
from lmloom.train.trainer import LoopConfig, train_loop

# Per-step figures computed on private training data without noise.
PRIVATE_METRICS = ("loss", "grad_norm", "update_ratio")


class DPPretrainConfig(LoopConfig):
    seed: int = Field(1337, description="seeds initialisation, Poisson sampling and the noise")
    model: ModelShape = ModelShape()
    threads: int | None = Field(None, ge=1, description="CPU threads (default: torch's choice)")
    dp: DPConfig = Field(default_factory=lambda: DPConfig(target_epsilon=8.0), description="DP-SGD")
    # DP-SGD runs eager fp32 with one (Poisson) batch per step and no data-dependent rollbacks.
    precision: str = Field("fp32", description="fp32 only (per-sample gradients in full precision)")
    compile: bool = Field(False, description="off: Opacus' hooks do not run under torch.compile")
    guard: StabilityGuard = Field(
        default_factory=lambda: StabilityGuard(enabled=False),
        description="off: a rollback decided by the training loss would be a release DP does not cover",
    )

    @model_validator(mode="after")
    def _check_dp_compatible(self) -> DPPretrainConfig:
        problems = []
        if self.precision != "fp32":
            problems.append(f"precision = {self.precision} (DP-SGD runs fp32)")
        if self.compile:
            problems.append("compile = true (Opacus' hooks need eager mode)")
        if self.grad_accum != 1:
            problems.append("grad_accum > 1 (a step is one Poisson batch; raise batch_size instead)")
        if self.guard.enabled:
            problems.append("guard.enabled (its rollbacks depend on the private training loss)")
        if self.seq_len_warmup.steps or self.batch_size_ramp.steps:
            problems.append("seq_len_warmup / batch_size_ramp (the accountant assumes one sample rate)")
        if problems:
            raise ValueError("not supported with DP-SGD: " + "; ".join(problems))
        return self


class DPRunner(LocalRunner):
    """One process, DP-SGD: Opacus computes per-sample gradients in backward and the DPOptimizer clips and
    noises them in `optimizer.step()`; a resume puts the accountant back at the checkpoint's step."""

    def __init__(self, checkpoint_dir, codecs, private: PrivateTraining):
        super().__init__(checkpoint_dir, codecs)
        self.private = private

    def forward_backward(self, step_model, x, y, precision: str, scale: float, scaler=None) -> torch.Tensor:
        return torch.tensor(forward_backward(step_model, x, y))

    def clip(self, model, max_norm: float) -> float:
        # The per-sample clipping happens in the DPOptimizer; this is the plain batch gradient's norm (a
        # private figure, logged but left out of the artifact unless release_train_stats).
        return super().clip(model, math.inf)

    def load(self, path, model, optimizer):
        state = super().load(path, model, optimizer)
        self.private.set_steps_taken(state.step)
        return state


def run(config: DPPretrainConfig, inputs, ctx, out) -> None:
    shards_art, tok_art = inputs["shards"], inputs["tokenizer"]
    check_encoded_with(shards_art, tok_art, f"stages.{ctx.step}.inputs")
    if config.threads:
        torch.set_num_threads(config.threads)
    model_cfg = decoder_config(config.model, tok_art)
    seq_len = model_cfg.seq_len

    torch.manual_seed(config.seed)
    model = Decoder(model_cfg)
    optimizer = build_optimizer(model, config.optim)
    train = TokenShards(shards_art, "train")
    val = TokenShards(shards_art, "val")
    try:
        dataset = WindowDataset(train, seq_len)
    except ValueError as exc:
        raise ConfigError(f"stages.{ctx.step}: {exc}") from None

    every = config.log_every
    private: PrivateTraining | None = None

    def describe(step: int) -> dict:  # step = the 0-based step just taken, one that train_loop logs
        done = step + 1
        eps = private.epsilon(done)
        if done % every == 0:
            ctx.log(f"step {done}: epsilon {eps:.3f} (delta {private.delta:.2e})")
        return {"epsilon": eps}

    try:
        private = make_private(
            model,
            optimizer,
            dataset,
            config.dp,
            batch_size=config.batch_size,
            steps=config.max_steps,
            seed=config.seed,
            describe=describe,
        )
    except ValueError as exc:  # e.g. Opacus cannot reach the target epsilon
        raise ConfigError(f"stages.{ctx.step}.config.dp: {exc}") from None
    planned = private.report()
    ctx.log(
        f"{model.num_params():,} parameters; DP-SGD over {private.n_examples:,} windows of {seq_len + 1} tokens: "
        f"q = {private.sample_rate:.4g} (expected batch {private.expected_batch_size:.1f}), noise multiplier "
        f"{private.noise_multiplier:.4f}, C = {config.dp.max_grad_norm}, {config.max_steps} steps -> "
        f"epsilon {planned['epsilon']:.3f} at delta {private.delta:.2e} ({config.dp.accountant})"
    )

    def val_batches(limit: int):
        return validation_batches(val, seq_len, config.batch_size, max_windows=limit)

    metrics = JsonlMetrics(ctx.work_dir / "metrics.jsonl")
    codecs = CheckpointCodecs.from_store_security(ctx.store.security) if ctx.encrypt else None
    runner = DPRunner(ctx.work_dir / "checkpoints", codecs, private)
    quiet = ctx.console.is_terminal
    with ctx.progress(config.max_steps, "DP pretraining") as bar:
        result = train_loop(
            private.module,
            private.optimizer,
            private.batches,
            val_batches,
            config,
            seq_len,
            ctx.work_dir / "checkpoints",
            metrics,
            progress=bar,
            log=(lambda _msg: None) if quiet else ctx.log,
            runner=runner,
        )
    steps = result.state.step
    private.set_steps_taken(steps)  # the engine's accountant, as stepped by the optimizer (and resume)
    epsilon = private.spent()
    final_val = result.val_loss

    for name, data in model_files(model).items():
        out.write_bytes(name, data)
    for name in ALL_TOKENIZER_FILES:
        if tok_art.has(name):
            out.copy_from(tok_art, name)
    out.write_bytes("metrics.jsonl", _released_metrics(metrics, config.dp.release_train_stats))
    dp_facts = private.report() | {"epsilon": epsilon, "steps": steps}
    out.metadata.update(
        parameters=model.num_params(),
        model=model_cfg.model_dump(mode="json"),
        steps=steps,
        tokens=result.state.tokens,
        val_loss=final_val,
        val_ppl=math.exp(final_val) if final_val is not None else None,
        tokens_per_s=round(result.tokens_per_s, 1),
        seconds=round(result.seconds, 1),
        resumed_from_step=result.resumed_from,
        precision=config.precision,
        compiled=False,
        tokenizer=tok_art.id,
        processes=1,
        dp=dp_facts,
        privacy_unit=f"one window of {seq_len + 1} tokens",
    )
    if config.dp.release_train_stats:
        out.metadata.update(train_loss=result.train_loss)
    ctx.log(
        f"done: val loss {final_val:.4f} (ppl {math.exp(final_val):.1f}); (epsilon {epsilon:.3f}, "
        f"delta {private.delta:.2e})-DP after {steps} steps, noise multiplier {private.noise_multiplier:.4f}"
    )


def _released_metrics(metrics: JsonlMetrics, release_train_stats: bool) -> bytes:
    lines = []
    for record in metrics.records():
        if not release_train_stats:
            record = {k: v for k, v in record.items() if k not in PRIVATE_METRICS}
        lines.append(json.dumps(record, sort_keys=True))
    return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""


def summary(manifest: Manifest) -> list[tuple[str, str]]:
    m = manifest.metadata
    dp = m["dp"]
    return [
        ("parameters", f"{m['parameters']:,}"),
        ("training steps", f"{m['steps']:,} ({m['tokens']:,} tokens expected)"),
        (
            "privacy",
            f"({dp['epsilon']:.3f}, {dp['delta']:.2e})-DP per {m['privacy_unit']} ({dp['accountant']})",
        ),
        (
            "DP-SGD",
            f"noise multiplier {dp['noise_multiplier']:.4f}, clip {dp['max_grad_norm']}, q {dp['sample_rate']:.4g} "
            f"of {dp['n_examples']:,} windows",
        ),
        ("validation loss", f"{m['val_loss']:.4f}"),
        ("validation perplexity", f"{m['val_ppl']:.2f}"),
        ("training throughput", f"{m['tokens_per_s']:,.0f} tokens/s (fp32)"),
    ]


DP_PRETRAIN = Stage(
    name="train.dp_pretrain",
    kind="checkpoint",
    config=DPPretrainConfig,
    run=run,
    inputs={"shards": "shards", "tokenizer": "tokenizer"},
    launch_fields=("threads",),
    permissions=("train",),
    summary=summary,
    description="pre-train a decoder with DP-SGD (Opacus): per-sample clipping, noise, epsilon accounting",
)
