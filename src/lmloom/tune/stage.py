"""`tune.sft`: supervised fine-tuning of a checkpoint on conversations -> a checkpoint artifact.

Data: `data: builtin` is the instruction set made from the standard library (`build_instruction_set`,
no download; its held-out split is by module), or a path to an Alpaca / messages JSON(L) file
(`load_sft`: malformed rows are counted per reason and skipped; a seeded hash holds out `val_fraction`
of the rows). `safety_mix` mixes in the built-in safety set's *train* items (harmful prompts -> refusal
targets, look-alike benign prompts -> helpful answers) as that expected share of the training
conversations, repeating the 112 items as often as needed.

Training: every conversation is encoded with the chat template (loss mask on assistant tokens only),
preceded by EOS and packed whole into windows of `seq_len + 1` tokens (`pack`); `sft_batch` shifts a
window into inputs and targets with every non-assistant target ignored. The windows are drawn in a
seeded order that is a pure function of the sample index, so the shared `train_loop` resumes exactly.

Measured and recorded: the held-out SFT loss before and after, and the safety figures before and after
on the safety set's *held-out* items: refusal rate on harmful prompts and over-refusal rate on benign
ones, from greedy replies (chat template, cut at `<|end|>`) judged by `refusal_detector`.

Methods: `full` trains every weight; `lora` and `prefix` use `lmloom.tune.lora` / `lmloom.tune.prefix`
(LoRA is merged into the saved weights, so the checkpoint loads like any other; both also store their
PEFT adapter files next to the model files).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import random
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError, model_validator

from lmloom.artifacts.manifest import Manifest
from lmloom.config import format_validation_error, validate_config
from lmloom.errors import ConfigError, DataError
from lmloom.models.decoder import Decoder
from lmloom.models.io import model_files, model_from_files, refuse_adapter_only
from lmloom.monitor.metrics import JsonlMetrics
from lmloom.serve.generate import generate_stream
from lmloom.stages import Stage
from lmloom.tokenizers.base import ALL_TOKENIZER_FILES, EOS_ID, TextTokenizer
from lmloom.tokenizers.loading import load_tokenizer
from lmloom.train.checkpoint import CheckpointCodecs
from lmloom.train.optim import OptimConfig, build_optimizer
from lmloom.train.trainer import LoopConfig, evaluate, train_loop
from lmloom.tune.builtin import InstructionSet, build_instruction_set
from lmloom.tune.chat import END_MARKER, ChatFormatError, encode_conversation, encode_prompt, reply_text
from lmloom.tune.formats import LoadReport, load_sft
from lmloom.tune.packing import pack, sft_batch, window_tensors
from lmloom.tune.safety import SafetyItem, load_safety_set, refusal_detector, safety_scores

BUILTIN = "builtin"
SAFETY_REPLIES = "safety_replies.json"


class SFTConfig(LoopConfig):
    seed: int = Field(1337, description="seeds the held-out split of a file, the mix and the window order")
    data: str = Field(
        BUILTIN, description="'builtin' (the standard-library instruction set) or an Alpaca / messages file"
    )
    data_format: Literal["auto", "alpaca", "messages"] = Field("auto", description="format of a data file")
    max_examples: int | None = Field(
        None, ge=1, description="keep a seeded sample of this many training conversations (before the mix)"
    )
    val_fraction: float = Field(0.05, gt=0, lt=1, description="data file: share of rows held out")
    val_examples: int = Field(
        256, ge=1, description="held-out conversations for the validation loss, at most"
    )
    safety_mix: float = Field(
        0.0, ge=0, lt=1, description="expected share of training conversations from the built-in safety set"
    )
    method: Literal["full", "lora", "prefix"] = Field("full", description="which weights train")
    lora: dict[str, Any] = Field(default_factory=dict, description="method lora: LoraSettings fields")
    prefix: dict[str, Any] = Field(default_factory=dict, description="method prefix: PrefixSettings fields")
    seq_len: int | None = Field(
        None, ge=8, description="packing window (tokens per training sequence); default the model's seq_len"
    )
    safety_eval: bool = Field(True, description="measure refusal / over-refusal before and after")
    safety_max_new_tokens: int = Field(48, ge=1, description="greedy reply length for the safety figures")
    threads: int | None = Field(None, ge=1, description="CPU threads (default: torch's choice)")
    max_steps: int = Field(200, ge=1)
    eval_every: int = Field(100, ge=1)
    optim: OptimConfig = OptimConfig(lr=1e-3, warmup_steps=20)

    @model_validator(mode="after")
    def _adapter_blocks(self) -> SFTConfig:
        """Check the lora / prefix blocks when the recipe is planned, not after the checkpoint has loaded
        and the safety figures have run (the blocks are plain dicts to keep the stage key as it was)."""
        from lmloom.tune.lora import LoraSettings
        from lmloom.tune.prefix import PrefixSettings

        for name, settings in (("lora", LoraSettings), ("prefix", PrefixSettings)):
            try:
                settings.model_validate(getattr(self, name))
            except ValidationError as exc:
                raise ValueError(format_validation_error(exc, name, settings).replace("\n", "; ")) from None
        return self


# -- data -------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def builtin_instructions(seed: int = 0) -> InstructionSet:
    """The standard-library instruction set (cached: SFT and the preference pairs read the same one)."""
    return build_instruction_set(seed=seed)


def unit_hash(seed: int, key: str) -> float:
    """A seeded, stable number in [0, 1) for `key` (held-out splits that survive reordering)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def sft_conversations(config: SFTConfig) -> tuple[list[list], list[list], LoadReport, dict]:
    """(train conversations, held-out conversations, load report, facts about the source)."""
    if config.data == BUILTIN:
        instructions = builtin_instructions()
        train = [item.messages() for item in instructions.train]
        held_out = [item.messages() for item in instructions.held_out]
        report = LoadReport("builtin:stdlib-instructions", "messages", rows=len(train) + len(held_out))
        report.kept = report.rows
        return train, held_out, report, {"instruction_set": instructions.stats}
    examples, report = load_sft(config.data, config.data_format)
    train, held_out = [], []
    for example in examples:
        turns = [m.as_dict() for m in example.messages]
        key = "\0".join(f"{t['role']}:{t['content']}" for t in turns)
        (held_out if unit_hash(config.seed, key) < config.val_fraction else train).append(turns)
    if not train:
        raise DataError(f"{config.data}: all {len(examples)} valid rows fell into the held-out split")
    return train, held_out, report, {}


def mix_safety(conversations: list, share: float, seed: int) -> tuple[list, int]:
    """The conversations plus safety train items as `share` of the result, shuffled (seeded)."""
    rng = random.Random(seed)
    extra: list = []
    if share > 0:
        safety = [item.messages() for item in load_safety_set("train")]
        wanted = round(share / (1 - share) * len(conversations))
        while len(extra) < wanted:
            cycle = list(safety)
            rng.shuffle(cycle)
            extra += cycle
        extra = extra[:wanted]
    mixed = conversations + extra
    rng.shuffle(mixed)
    return mixed, len(extra)


def encode_all(
    tokenizer: TextTokenizer, conversations: Sequence[list], max_len: int, skipped: Counter | None = None
) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) per conversation; one over `max_len` tokens is skipped (counted by reason)."""
    encoded = []
    for turns in conversations:
        try:
            encoded.append(encode_conversation(tokenizer, turns, max_len))
        except ChatFormatError as exc:
            if skipped is not None:
                skipped[exc.reason] += 1
    return encoded


class PackedBatches:
    """Packed windows in a seeded order per epoch; sample i is a pure function of i (exact resume)."""

    def __init__(self, windows: dict[str, torch.Tensor], seed: int):
        batch = sft_batch(windows["input_ids"], windows["loss_mask"])
        self.inputs, self.targets = batch.input_ids, batch.targets
        self.n = self.inputs.shape[0]
        self.seed = seed

    @functools.lru_cache(maxsize=4)  # noqa: B019 (a handful of instances, each alive for one stage)
    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def batch(self, start_sample: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [
            int(self._order(s // self.n)[s % self.n]) for s in range(start_sample, start_sample + batch_size)
        ]
        return self.inputs[rows], self.targets[rows]

    def in_order(self, batch_size: int, limit: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        end = min(limit, self.n)
        for s in range(0, end, batch_size):
            yield self.inputs[s : min(s + batch_size, end)], self.targets[s : min(s + batch_size, end)]


# -- safety figures ----------------------------------------------------------------------------------


def _greedy_no_cache(model, prompt: list[int], max_new_tokens: int) -> Iterator[int]:
    """Greedy decoding by re-running the whole sequence (models without a KV cache, e.g. adapters)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids]))
            token = int(logits[0, -1].argmax())
            ids.append(token)
            yield token


def chat_replies(
    model, tokenizer: TextTokenizer, prompts: Sequence[str], max_new_tokens: int
) -> list[tuple[str, bool]]:
    """Greedy replies to single-turn prompts in the chat template: (reply cut at <|end|>, finished)."""
    was_training = model.training
    model.eval()
    seq_len = getattr(getattr(model, "config", None), "seq_len", None) or 1 << 30
    replies = []
    for prompt in prompts:
        ids = [EOS_ID, *encode_prompt(tokenizer, [{"role": "user", "content": prompt}])]
        budget = min(max_new_tokens, seq_len - len(ids))
        if budget <= 0:
            replies.append(("", False))
            continue
        if hasattr(model, "new_kv_cache"):
            stream = generate_stream(model, ids, max_new_tokens=budget, temperature=0.0)
        else:
            stream = _greedy_no_cache(model, ids, budget)
        out: list[int] = []
        for token in stream:
            if token == tokenizer.eos_id:
                break
            out.append(token)
            if END_MARKER in tokenizer.decode(out):  # the marker is several tokens
                break
        replies.append(reply_text(tokenizer.decode(out)))
    model.train(was_training)
    return replies


def safety_figures(
    model, tokenizer: TextTokenizer, max_new_tokens: int
) -> tuple[dict[str, float | int], list[dict[str, Any]]]:
    """Refusal rate on the held-out harmful prompts, over-refusal rate on the held-out benign ones,
    and each (id, kind, reply, refused)."""
    items: list[SafetyItem] = load_safety_set("held_out")
    replies = chat_replies(model, tokenizer, [item.prompt for item in items], max_new_tokens)
    texts = [text for text, _ in replies]
    scores = safety_scores(items, texts, refusal_detector)
    scores["finished"] = sum(done for _, done in replies) / max(len(replies), 1)
    rows = [
        {"id": item.id, "kind": item.kind, "reply": text, "refused": refusal_detector(text)}
        for item, text in zip(items, texts, strict=True)
    ]
    return scores, rows


def format_safety(before: dict | None, after: dict | None) -> list[tuple[str, str]]:
    if not before or not after:
        return []
    return [
        (
            "refusal rate, held-out harmful",
            f"{before['refusal_rate']:.0%} -> {after['refusal_rate']:.0%} (of {after['harmful']})",
        ),
        (
            "over-refusal rate, held-out benign",
            f"{before['over_refusal_rate']:.0%} -> {after['over_refusal_rate']:.0%} (of {after['benign']})",
        ),
    ]


# -- methods ---------------------------------------------------------------------------------------


def _read_dir(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


def plain_decoder(model: torch.nn.Module) -> Decoder:
    """A plain `Decoder` with the (merged) base weights of a LoRA-injected one: no adapter tensors left."""
    state = {
        name.replace(".base_layer.", "."): tensor
        for name, tensor in model.state_dict().items()
        if ".lora_" not in name
    }
    plain = Decoder(model.config)
    plain.load_state_dict(state)
    return plain


@contextlib.contextmanager
def _settings_for(where: str) -> Iterator[None]:
    """Settings the model cannot take (a block past its depth, a prefix as long as its context) are
    the recipe's mistake: one line naming the block, not a traceback."""
    try:
        yield
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def adapt_model(
    config: SFTConfig, model: Decoder, step: str
) -> tuple[torch.nn.Module, Callable[[], tuple[Decoder, dict[str, bytes]]]]:
    """(the module to train, finish) for the method; finish() -> (a plain Decoder, PEFT adapter files).

    The dispatch point for the adapter methods: `lmloom.tune.lora` / `lmloom.tune.prefix` own them.
    """
    if config.method == "full":
        return model, lambda: (model, {})
    where = f"stages.{step}.config.{config.method}"
    if config.method == "lora":
        from lmloom.tune.lora import LoraSettings, apply_lora, merge_lora, save_peft_adapter

        settings = validate_config(LoraSettings, config.lora, where)
        with _settings_for(where):
            apply_lora(model, settings)  # in place: the base frozen, only the adapters train

        def finish_lora() -> tuple[Decoder, dict[str, bytes]]:
            with tempfile.TemporaryDirectory() as tmp:
                files = _read_dir(save_peft_adapter(model, settings, tmp))
            merge_lora(model)
            return plain_decoder(model), files

        return model, finish_lora
    from lmloom.tune.prefix import PrefixSettings, PrefixTuned, save_peft_prefix

    settings = validate_config(PrefixSettings, config.prefix, where)
    with _settings_for(where):
        tuned = PrefixTuned(model, settings)

    def finish_prefix() -> tuple[Decoder, dict[str, bytes]]:
        with tempfile.TemporaryDirectory() as tmp:
            files = _read_dir(save_peft_prefix(tuned, tmp))
        return model, files  # the base weights are unchanged: the prefix lives in the adapter files

    return tuned, finish_prefix


# -- the stage --------------------------------------------------------------------------------------


def open_checkpoint(config, checkpoint):
    """(tokenizer, model in train mode) of the input checkpoint, after applying the stage's `threads`
    and `seed`: how every fine-tuning and alignment stage starts."""
    refuse_adapter_only(checkpoint)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    return load_tokenizer(checkpoint), model_from_files(checkpoint.read_bytes).train()


def run(config: SFTConfig, inputs, ctx, out) -> None:
    checkpoint = inputs["checkpoint"]
    tokenizer, base = open_checkpoint(config, checkpoint)
    before, rows_before = (
        safety_figures(base, tokenizer, config.safety_max_new_tokens) if config.safety_eval else (None, [])
    )
    model, finish = adapt_model(config, base, ctx.step)
    room = model.config.seq_len  # a prefix takes positions of the context
    seq_len = config.seq_len or room
    if seq_len > room:
        raise ConfigError(f"stages.{ctx.step}.config.seq_len = {seq_len}: longer than the model's {room}")

    train_turns, held_turns, report, source_facts = sft_conversations(config)
    if config.max_examples is not None and len(train_turns) > config.max_examples:
        rng = random.Random(config.seed)
        train_turns = rng.sample(train_turns, config.max_examples)
    mixed, n_safety = mix_safety(train_turns, config.safety_mix, config.seed)
    too_long: Counter = Counter()  # conversations (data or safety) that do not fit in one window
    train_encoded = encode_all(tokenizer, mixed, seq_len, too_long)
    held_encoded = encode_all(tokenizer, held_turns[: config.val_examples], seq_len, too_long)
    if not train_encoded:
        raise DataError(f"stages.{ctx.step}: no training conversation fits in seq_len {seq_len}")
    if not held_encoded:
        raise DataError(f"stages.{ctx.step}: no held-out conversation to validate on ({config.data})")
    ctx.log(report.summary().replace("\n", "; "))
    if too_long:
        ctx.log(f"{too_long.total():,} conversations longer than {seq_len} tokens skipped")
    train_windows, train_stats = pack(train_encoded, seq_len + 1)
    val_windows, _ = pack(held_encoded, seq_len + 1)
    data = PackedBatches(window_tensors(train_windows), config.seed)
    val = PackedBatches(window_tensors(val_windows), config.seed)

    def val_batches(limit: int):
        return val.in_order(config.batch_size, limit)

    val_before = evaluate(base, val_batches(config.final_eval_windows), config.precision)
    optimizer = build_optimizer(model, config.optim)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ctx.log(
        f"fine-tuning {checkpoint.short_id} ({config.method}, {trainable:,} trainable parameters): "
        f"{len(train_encoded):,} conversations ({n_safety:,} from the safety set) in {data.n:,} windows of "
        f"{seq_len} tokens ({train_stats.padding_fraction:.1%} padding, {train_stats.loss_tokens:,} "
        f"assistant tokens); {config.max_steps} steps = "
        f"{config.max_steps * config.batch_size * config.grad_accum / data.n:.2f} epochs; held-out loss "
        f"before {val_before:.4f}"
        + (
            f"; refusal {before['refusal_rate']:.0%}, over-refusal {before['over_refusal_rate']:.0%}"
            if before
            else ""
        )
    )
    metrics = JsonlMetrics(ctx.work_dir / "metrics.jsonl")
    scratch_codecs = CheckpointCodecs.from_store_security(ctx.store.security) if ctx.encrypt else None
    quiet = ctx.console.is_terminal
    with ctx.progress(config.max_steps, "supervised fine-tuning") as bar:
        result = train_loop(
            model,
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
        )
    model.eval()
    after, rows_after = (  # with the adapters as trained (a prefix only exists in the wrapper)
        safety_figures(model, tokenizer, config.safety_max_new_tokens) if config.safety_eval else (None, [])
    )
    tuned, adapter_files = finish()

    for name, payload in model_files(tuned).items():
        out.write_bytes(name, payload)
    for name, payload in adapter_files.items():
        out.write_bytes(name, payload)
    for name in ALL_TOKENIZER_FILES:
        if checkpoint.has(name):
            out.copy_from(checkpoint, name)
    out.write_bytes("metrics.jsonl", metrics.path.read_bytes())
    if config.safety_eval:  # the replies are text: a file (encrypted with the run), not metadata
        out.write_json(SAFETY_REPLIES, {"before": rows_before, "after": rows_after})
    out.metadata.update(
        parameters=tuned.num_params(),
        trainable_parameters=trainable,
        method=config.method,
        adapter_files=sorted(adapter_files),
        adapter_only=config.method == "prefix",  # model files = the base; the prefix is in the adapter
        model=tuned.config.model_dump(mode="json"),
        steps=result.state.step,
        tokens=result.state.tokens,
        train_loss=result.train_loss,
        val_loss_before=val_before,
        val_loss=result.val_loss,
        val_ppl=math.exp(min(result.val_loss, 50)),
        data=config.data,
        load_report={
            "source": report.source,
            "rows": report.rows,
            "kept": report.kept,
            "skipped": dict(sorted(report.skipped.items())),
        },
        too_long_skipped=too_long.total(),
        train_conversations=len(train_encoded),
        safety_conversations=n_safety,
        held_out_conversations=len(held_encoded),
        windows=data.n,
        loss_tokens=train_stats.loss_tokens,
        padding_fraction=round(train_stats.padding_fraction, 4),
        safety_before=before,
        safety_after=after,
        tuned_from=checkpoint.id,
        tokens_per_s=round(result.tokens_per_s, 1),
        seconds=round(result.seconds, 1),
        resumed_from_step=result.resumed_from,
        precision=config.precision,
        compiled=config.compile,
        tokenizer=checkpoint.manifest.metadata.get("tokenizer"),
        **source_facts,
    )
    ctx.log(
        f"done: held-out loss {val_before:.4f} -> {result.val_loss:.4f}"
        + (
            f"; refusal {before['refusal_rate']:.0%} -> {after['refusal_rate']:.0%}, over-refusal "
            f"{before['over_refusal_rate']:.0%} -> {after['over_refusal_rate']:.0%}"
            if before and after
            else ""
        )
    )


def fingerprint(config: SFTConfig) -> Any:
    """What the stage reads outside the store: the data file, or the standard library."""
    return data_fingerprint(config.data)


def data_fingerprint(data: str) -> str:
    from lmloom.data.sources import StdlibSource, source_fingerprint

    if data == BUILTIN:
        return source_fingerprint(StdlibSource())
    path = Path(data)
    if not path.is_file():
        return f"missing:{path}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def summary(manifest: Manifest) -> list[tuple[str, str]]:
    m = manifest.metadata
    report = m["load_report"]
    skipped = ", ".join(f"{k} {v}" for k, v in report["skipped"].items()) or "none"
    rows = [
        (
            "fine-tuned from",
            f"{m['tuned_from'][:12]} ({m['method']}, {m['trainable_parameters']:,} trainable)",
        ),
        (
            "SFT data",
            f"{m['train_conversations']:,} conversations ({m['safety_conversations']:,} safety), "
            f"{m['held_out_conversations']:,} held out; skipped: {skipped}",
        ),
        ("training steps", f"{m['steps']:,} ({m['loss_tokens']:,} assistant tokens in the packed set)"),
        ("held-out SFT loss", f"{m['val_loss_before']:.4f} -> {m['val_loss']:.4f}"),
    ]
    return rows + format_safety(m.get("safety_before"), m.get("safety_after"))


SFT = Stage(
    name="tune.sft",
    kind="checkpoint",
    config=SFTConfig,
    run=run,
    inputs={"checkpoint": "checkpoint"},
    permissions=("train",),
    summary=summary,
    fingerprint=fingerprint,
    description="supervised fine-tuning on chat conversations (+ safety mix); refusal rates before/after",
)
