"""`train.pretrain`: token shards + tokenizer -> a checkpoint artifact (weights, config, tokenizer, metrics).

Further inputs: more token shards (tasks of a multi-task mixture, by role name), and `reference`, a
trained checkpoint with the same tokenizer whose per-window loss orders a `curriculum.by: reference`.

Under torchrun (`torchrun --nproc_per_node N -m lmloom run RECIPE`) the stage runs on every rank with
`parallel:` degrees (DDP, FSDP2, tensor and pipeline parallelism; `parallel.py`) and sharded DCP
checkpoints (`dist_checkpoint.py`); rank 0 gathers the whole model and writes the artifact. How a run
is launched is not part of what it computes: `parallel`, `threads`, `async_checkpoints` and `monitor` stay out of
the stage key, so a run interrupted under one launch resumes under another (a DCP checkpoint saved by
N ranks loads on M, torchrun with one process included).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import Field, create_model, field_validator, model_validator

from lmloom import distributed
from lmloom.artifacts.manifest import Manifest
from lmloom.errors import ConfigError
from lmloom.models.decoder import Decoder, DecoderConfig
from lmloom.models.io import model_files, model_from_files, refuse_adapter_only
from lmloom.monitor.sinks import MonitorConfig, open_sinks
from lmloom.stages import Stage
from lmloom.tokenizers.base import ALL_TOKENIZER_FILES
from lmloom.tokenizers.loader import WindowLoader, check_windows, validation_batches
from lmloom.tokenizers.loading import load_tokenizer
from lmloom.tokenizers.shards import TokenShards
from lmloom.train import parallel as par
from lmloom.train.checkpoint import CheckpointCodecs
from lmloom.train.curriculum import (
    CurriculumConfig,
    CurriculumLoader,
    reference_difficulty,
    unigram_difficulty,
)
from lmloom.train.multitask import MultiTaskLoader
from lmloom.train.optim import build_optimizer
from lmloom.train.progressive import DepthGrowth, batch_size_at, depth_at, depth_sizes
from lmloom.train.runners import ParallelRunner
from lmloom.train.trainer import LoopConfig, evaluate, train_loop

REFERENCE = "reference"  # the input role of a curriculum's reference model

# The model shape as a recipe gives it: DecoderConfig with the vocabulary taken from the tokenizer and
# defaults small enough to train on a laptop CPU (the quickstart's model); any key can be overridden.
ModelShape = create_model(
    "ModelShape",
    __base__=DecoderConfig,
    vocab_size=(int | None, Field(None, ge=1, description="None = the tokenizer's vocabulary size")),
    seq_len=(int, Field(256, ge=1, description="context length of training windows and of the model")),
    d_model=(int, Field(256, ge=1)),
    n_layers=(int, Field(4, ge=1)),
    n_heads=(int, Field(4, ge=1)),
)


class PretrainConfig(LoopConfig):
    seed: int = Field(1337, ge=0, description="seeds initialisation and the data order")
    model: ModelShape = ModelShape()
    threads: int | None = Field(None, ge=1, description="CPU threads (default: torch's choice)")
    task_weights: dict[str, float] = Field(
        default_factory=dict,
        description="multi-task: weight of each shards input by role (default 1 each), e.g. {shards: 3, code: 1}",
    )
    curriculum: CurriculumConfig = Field(
        default_factory=CurriculumConfig, description="easy windows first, by a difficulty score and pacing"
    )
    depth_growth: DepthGrowth = Field(
        default_factory=DepthGrowth,
        description="progressive training: start with fewer layers, stack copies on top at the given steps",
    )
    parallel: par.ParallelConfig = Field(
        default_factory=par.ParallelConfig,
        description="under torchrun: data (dp_replicate/dp_shard), tensor (tp) and pipeline (pp) degrees",
    )
    async_checkpoints: bool = Field(
        False, description="under torchrun: write DCP checkpoints in the background"
    )
    monitor: MonitorConfig = Field(
        default_factory=MonitorConfig, description="TensorBoard, a Prometheus endpoint, resource sampling"
    )

    @field_validator("task_weights")
    @classmethod
    def _weights_not_negative(cls, value: dict[str, float]) -> dict[str, float]:
        negative = sorted(role for role, weight in value.items() if weight < 0)
        if negative:  # the mixture draws sample shares from the weights
            raise ValueError(f"weights must be >= 0; negative for {', '.join(negative)}")
        return value

    @model_validator(mode="after")
    def _check_seq_len_warmup(self) -> PretrainConfig:
        warmup = self.seq_len_warmup  # seq_len_at ignores a warmup that does not grow: say so instead
        if warmup.steps and warmup.start >= self.model.seq_len:
            raise ValueError(
                f"seq_len_warmup.start = {warmup.start} is not below model.seq_len = {self.model.seq_len}, "
                "so there is nothing to warm up; lower start or leave seq_len_warmup out"
            )
        return self

    @model_validator(mode="after")
    def _check_depth_growth(self) -> PretrainConfig:
        growth = self.depth_growth
        if growth.enabled:
            depth_sizes(self.model.n_layers, growth)  # raises (naming the depths) if it cannot reach them
            if growth.at_steps[-1] >= self.max_steps:
                raise ValueError(f"depth_growth.at_steps {growth.at_steps}: all must be below max_steps")
        return self


def check_encoded_with(shards_art, tok_art, where: str) -> None:
    """Refuse token shards that were encoded with another tokenizer than the one given beside them."""
    if shards_art.manifest.inputs.get("tokenizer") != tok_art.id:
        raise ConfigError(
            f"{where}: shards {shards_art.short_id} were not encoded with tokenizer {tok_art.short_id}"
        )


def decoder_config(model: ModelShape, tok_art, where: str = "model") -> DecoderConfig:
    """The decoder's shape with the tokenizer's vocabulary filled in (or checked: it may be larger);
    `where` is the shape's key in the recipe, for the error."""
    vocab = load_tokenizer(tok_art).vocab_size  # loads (and so checks) the tokenizer before training
    shape = model.model_dump()
    shape["vocab_size"] = shape["vocab_size"] or vocab
    if shape["vocab_size"] < vocab:
        raise ConfigError(
            f"{where}.vocab_size = {shape['vocab_size']}: smaller than the tokenizer's {vocab} "
            f"(tokenizer {tok_art.short_id}); leave it out to use the tokenizer's"
        )
    return DecoderConfig.model_validate(shape)


def run(config: PretrainConfig, inputs, ctx, out) -> None:
    shards_art, tok_art = inputs["shards"], inputs["tokenizer"]
    check_encoded_with(shards_art, tok_art, f"stages.{ctx.step}.inputs")
    if config.threads:
        torch.set_num_threads(config.threads)
    model_cfg = decoder_config(config.model, tok_art, f"stages.{ctx.step}.config.model")

    launch = distributed.world()
    if launch.launched:
        _check_launchable(config, inputs, ctx, launch, model_cfg)
    elif config.parallel.world_size > 1:
        raise ConfigError(
            f"stages.{ctx.step}.config.parallel asks for {config.parallel.world_size} processes; launch with "
            f"torchrun --nproc_per_node {config.parallel.world_size} -m lmloom run ..."
        )

    torch.manual_seed(config.seed)
    # With depth growth the run starts shallow; the loop stacks layers up to model_cfg.n_layers.
    start_layers = depth_at(0, model_cfg.n_layers, config.depth_growth)
    model = Decoder(model_cfg.model_copy(update={"n_layers": start_layers}))
    runner, trained = None, model  # trained: what the loop steps (the parallelized model under torchrun)
    if launch.launched:
        trained, runner = _parallelize(model, config, ctx, model_cfg)
    elif config.parallel.activation_checkpointing:
        par.apply_activation_checkpointing(model.layers)
    optimizer = build_optimizer(trained, config.optim)
    seq_len = model_cfg.seq_len
    train = TokenShards(shards_art, "train")
    val = TokenShards(shards_art, "val")
    check_windows(val, seq_len)  # a validation split too short for one window fails now, not after training
    data = WindowLoader(train, seq_len, seed=config.seed)
    tasks = _task_shards(config, inputs, tok_art, ctx.step)
    if len(tasks) > 1:
        if config.curriculum.by != "none":
            raise ConfigError(
                f"stages.{ctx.step}.config: curriculum and a multi-task mixture cannot be combined yet"
            )
        loaders = {
            role: WindowLoader(TokenShards(art, "train"), seq_len, seed=config.seed + k)
            for k, (role, art) in enumerate(tasks.items())
        }
        weights = {role: config.task_weights.get(role, 1.0) for role in tasks}
        data = MultiTaskLoader(loaders, weights, config.seed, config.batch_size * config.grad_accum)
    reference = _reference_model(config, inputs, tok_art, ctx.step)
    if config.curriculum.by != "none":
        if config.curriculum.by == "unigram":
            difficulty = unigram_difficulty(train, seq_len, data.n_windows)
        else:
            with ctx.progress(data.n_windows, "scoring windows by the reference", unit="window") as bar:
                difficulty = reference_difficulty(
                    reference,
                    train,
                    seq_len,
                    data.n_windows,
                    config.curriculum.reference_batch_size,
                    config.precision,
                    bar.advance,
                )
            ctx.log(
                f"reference {inputs[REFERENCE].short_id}: window loss p10 / median / p90 "
                + " / ".join(f"{q:.3f}" for q in np.quantile(difficulty, [0.1, 0.5, 0.9]))
            )
        samples_per_step = [
            batch_size_at(step, config.batch_size, config.batch_size_ramp) * config.grad_accum
            for step in range(config.curriculum.steps or config.max_steps)
        ]
        data = CurriculumLoader(data, difficulty, config.curriculum, samples_per_step, config.max_steps)
    tokens_per_step = config.batch_size * config.grad_accum * seq_len
    ctx.log(
        f"{model.num_params():,} parameters; {tokens_per_step:,} tokens per step "
        f"({config.batch_size} sequences x {config.grad_accum} accumulation x {seq_len} tokens); "
        f"{config.max_steps} steps = {config.max_steps * tokens_per_step / max(train.n_tokens, 1):.2f} epochs "
        f"of {train.n_tokens:,} tokens; precision {config.precision}, compile {config.compile}"
    )
    if config.batch_size_ramp.steps:
        ramp = config.batch_size_ramp
        ctx.log(f"batch-size ramp: micro-batch {ramp.start} -> {config.batch_size} over {ramp.steps} steps")
    if config.depth_growth.enabled:
        sizes = depth_sizes(model_cfg.n_layers, config.depth_growth)
        ctx.log(
            f"depth growth: {' -> '.join(map(str, sizes))} layers at steps "
            f"{', '.join(map(str, config.depth_growth.at_steps))} (stacking)"
        )

    def val_batches(limit: int):
        return validation_batches(val, seq_len, config.batch_size, max_windows=limit)

    # Every rank logs (to its own file); rank 0's is the run's.
    metrics = open_sinks(
        config.monitor,
        ctx.work_dir / ("metrics.jsonl" if launch.is_main else f"metrics.rank{launch.rank}.jsonl"),
        store_root=ctx.store.root,
        step_name=ctx.step,
        main=launch.is_main,
        console_log=ctx.log,
        observers=getattr(ctx, "observers", ()),
    )
    # An encrypted run keeps its scratch checkpoints encrypted too (same keys as its artifacts).
    scratch_codecs = CheckpointCodecs.from_store_security(ctx.store.security) if ctx.encrypt else None
    quiet = ctx.console.is_terminal  # the bar shows progress; log lines are for logs and CI
    with metrics, ctx.progress(config.max_steps, "pretraining") as bar:  # closed however it ends
        result = train_loop(
            trained,
            optimizer,
            data,
            val_batches,
            config,
            seq_len,
            ctx.work_dir / "checkpoints",
            metrics,
            progress=bar,
            log=(lambda _msg: None) if quiet else ctx.log,
            checkpoint_codecs=scratch_codecs,
            depth_growth=config.depth_growth,
            n_layers=model_cfg.n_layers,
            runner=runner,
        )
    if runner is not None:  # gather the whole model on rank 0, which writes the artifact
        full = runner.full_state(trained)
        if not launch.is_main:
            return  # the pipeline discards what the other ranks would write
        model = Decoder(model_cfg)
        model.load_state_dict(full)
    else:
        model = result.model  # a new, deeper one when the depth grew
    final_val = result.val_loss
    task_val = {}
    if len(tasks) > 1:  # per-task validation loss of the final model
        for role, art in tasks.items():
            batches = validation_batches(
                TokenShards(art, "val"), seq_len, config.batch_size, config.final_eval_windows
            )
            task_val[role] = evaluate(model, batches, config.precision)
        ctx.log(
            "per-task validation loss: " + ", ".join(f"{role} {loss:.4f}" for role, loss in task_val.items())
        )
    unigram = shards_art.manifest.metadata.get("unigram_val_nats")

    for name, data in model_files(model).items():
        out.write_bytes(name, data)
    for name in ALL_TOKENIZER_FILES:  # whichever the tokenizer's format has
        if tok_art.has(name):
            out.copy_from(tok_art, name)
    out.write_bytes("metrics.jsonl", metrics.path.read_bytes())
    if (ctx.work_dir / "resources.jsonl").exists():  # the resource sampler's, for the run report
        out.write_bytes("resources.jsonl", (ctx.work_dir / "resources.jsonl").read_bytes())
    out.metadata.update(
        parameters=model.num_params(),
        model=model_cfg.model_dump(mode="json"),
        steps=result.state.step,
        tokens=result.state.tokens,
        train_loss=result.train_loss,
        val_loss=final_val,
        val_ppl=math.exp(final_val),
        unigram_val_ppl=math.exp(unigram) if unigram is not None else None,
        tokens_per_s=round(result.tokens_per_s, 1),
        seconds=round(result.seconds, 1),
        resumed_from_step=result.resumed_from,
        precision=config.precision,
        compiled=config.compile,
        tokenizer=tok_art.id,
        processes=launch.size,
    )
    if task_val:
        out.metadata.update(task_val_loss=task_val, task_weights=weights)
    if reference is not None:
        out.metadata.update(curriculum_reference=inputs[REFERENCE].id)
    ctx.log(
        f"done: train loss {result.train_loss:.4f}, val loss {final_val:.4f} "
        f"(ppl {math.exp(final_val):.1f}), {result.tokens_per_s:,.0f} tok/s"
    )


def _check_launchable(config: PretrainConfig, inputs, ctx, launch, model_cfg) -> None:
    """What a torchrun launch of this stage cannot do (yet), said before anything is built."""
    where = f"stages.{ctx.step}.config"
    try:
        config.parallel.check(launch.size, model_cfg)
    except ValueError as exc:
        raise ConfigError(f"{where}.parallel: {exc}") from None
    unsupported = [
        name
        for name, used in (
            ("curriculum", config.curriculum.by != "none"),
            ("depth_growth", config.depth_growth.enabled),
            ("a multi-task mixture", len([r for r in inputs if r not in ("tokenizer", REFERENCE)]) > 1),
            ("batch_size_ramp", config.batch_size_ramp.steps > 0),
            ("encryption at rest of checkpoints", ctx.encrypt),
        )
        if used
    ]
    if unsupported:
        raise ConfigError(f"{where}: not supported under torchrun yet: {', '.join(unsupported)}")
    dp = config.parallel.dp_replicate * config.parallel.dp_shard
    if config.batch_size % dp:
        raise ConfigError(
            f"{where}.batch_size = {config.batch_size} does not split over {dp} data-parallel ranks"
        )
    if config.parallel.pp > 1 and (config.batch_size // dp) % config.parallel.microbatches:
        raise ConfigError(
            f"{where}: each rank's {config.batch_size // dp} sequences do not split into "
            f"{config.parallel.microbatches} pipeline micro-batches"
        )


def _parallelize(model: Decoder, config: PretrainConfig, ctx, model_cfg):
    """(the parallelized model, its runner). Blocks are compiled before sharding, as FSDP2 wants."""
    import torch.distributed as dist

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    mesh = par.build_mesh(config.parallel, dist.get_world_size(), device)
    if config.compile:
        for block in model.layers:
            block.compile()
    trained = par.parallelize(model, config.parallel, mesh)
    runner = ParallelRunner(
        trained, config.parallel, mesh, ctx.work_dir / "dcp", model_cfg, async_save=config.async_checkpoints
    )
    p = config.parallel
    ctx.log(
        f"{dist.get_world_size()} processes: dp_replicate {p.dp_replicate} x dp_shard {p.dp_shard} x tp {p.tp} "
        f"x pp {p.pp}" + (f" ({p.pp_schedule}, {p.microbatches} micro-batches)" if p.pp > 1 else "")
    )
    return trained, runner


def _reference_model(config: PretrainConfig, inputs, tok_art, step: str) -> Decoder | None:
    """The curriculum's reference model: a trained checkpoint input with this run's tokenizer."""
    wanted = config.curriculum.by == "reference"
    if REFERENCE not in inputs:
        if wanted:
            raise ConfigError(
                f"stages.{step}.config.curriculum.by = reference needs an input `{REFERENCE}`: a trained "
                f"checkpoint with the same tokenizer, e.g. inputs: {{{REFERENCE}: <a train.pretrain step>}}"
            )
        return None
    art = inputs[REFERENCE]
    if not wanted:
        raise ConfigError(
            f"stages.{step}.inputs.{REFERENCE}: a reference model is only used by curriculum.by = reference "
            f"(this run has curriculum.by = {config.curriculum.by})"
        )
    if art.kind != "checkpoint":
        raise ConfigError(
            f"stages.{step}.inputs.{REFERENCE}: artifact {art.short_id} is a {art.kind}, not a checkpoint"
        )
    used = art.manifest.metadata.get("tokenizer")
    if used != tok_art.id:
        raise ConfigError(
            f"stages.{step}.inputs.{REFERENCE}: checkpoint {art.short_id} was trained with tokenizer "
            f"{str(used)[:12]}, this run uses {tok_art.short_id}; a reference must share the tokenizer"
        )
    refuse_adapter_only(art)
    return model_from_files(art.read_bytes).eval()


def _task_shards(config: PretrainConfig, inputs, tok_art, step: str) -> dict:
    """The shards inputs by role (the main `shards` first), each checked against the tokenizer."""
    tasks = {"shards": inputs["shards"]}
    tasks.update(
        {role: art for role, art in inputs.items() if role not in ("shards", "tokenizer", REFERENCE)}
    )
    for role, art in tasks.items():
        check_encoded_with(art, tok_art, f"stages.{step}.inputs.{role}")
        check_windows(TokenShards(art, "val"), config.model.seq_len)  # each task is validated at the end
    unknown = sorted(set(config.task_weights) - set(tasks))
    if unknown:
        raise ConfigError(
            f"stages.{step}.config.task_weights: no shards input named {', '.join(unknown)}; inputs: {', '.join(tasks)}"
        )
    if len(tasks) > 1 and not any(config.task_weights.get(role, 1.0) > 0 for role in tasks):
        raise ConfigError(  # each sample's task is drawn by weight / sum(weights)
            f"stages.{step}.config.task_weights: every task has weight 0; give at least one a positive weight"
        )
    return tasks


def summary(manifest: Manifest) -> list[tuple[str, str]]:
    m = manifest.metadata
    rows = [
        ("parameters", f"{m['parameters']:,}"),
        ("training steps", f"{m['steps']:,} ({m['tokens']:,} tokens)"),
        ("train loss", f"{m['train_loss']:.4f}"),
        ("validation loss", f"{m['val_loss']:.4f}"),
        ("validation perplexity", f"{m['val_ppl']:.2f}"),
    ]
    if m.get("unigram_val_ppl"):
        rows.append(("unigram baseline perplexity", f"{m['unigram_val_ppl']:.2f}"))
    for role, loss in (m.get("task_val_loss") or {}).items():
        rows.append((f"validation loss, task {role}", f"{loss:.4f} (weight {m['task_weights'][role]:g})"))
    rows.append(("training throughput", f"{m['tokens_per_s']:,.0f} tokens/s ({m['precision']})"))
    return rows


PRETRAIN = Stage(
    name="train.pretrain",
    kind="checkpoint",
    config=PretrainConfig,
    run=run,
    inputs={"shards": "shards", "tokenizer": "tokenizer"},
    extra_inputs="shards",  # further shards = further tasks of a multi-task mixture
    optional_inputs={REFERENCE: "checkpoint"},  # the reference model of curriculum.by = reference
    distributed=True,  # runs on every rank of a torchrun launch
    launch_fields=("parallel", "threads", "async_checkpoints", "monitor"),
    permissions=("train",),
    summary=summary,
    description="pre-train a decoder-only transformer on token shards (resumable)",
)
