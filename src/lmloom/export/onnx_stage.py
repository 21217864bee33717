"""`export.onnx`: checkpoint -> an ONNX decoder with explicit past key/values (`onnx-model` artifact),
optionally with an int8 dynamic-quantised copy, and a comparison of what each format costs and gives.

Before anything is published the export is run in onnxruntime and checked against our own model:
logits of a prefill and of `check_decode_steps` decode steps (each feeding back the presents) must
agree within `tolerance` (max |difference|, float32), else the stage fails and publishes nothing. With
`quantize: int8`, `onnxruntime.quantization.quantize_dynamic` quantises every MatMul/Gather weight to
int8 (per tensor, activations quantised on the fly) into `model.int8.onnx`, and its validation loss
must stay within `int8_max_loss_increase` (relative) of the float32 graph's.

The comparison (metadata `comparison`, printed in the stage summary): file size, tokens/s of greedy
decoding (batch 1, KV-cached; ours eager float32 vs onnxruntime float32 vs int8) and the validation
loss on the checkpoint's validation shards (the `shards` input, else the shards the checkpoint was
trained on, found by its lineage).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from lmloom.artifacts.manifest import Manifest
from lmloom.config import StrictConfig
from lmloom.errors import LmloomError
from lmloom.export.common import SHARDS, copy_tokenizer_files, load_checkpoint, scratch_dir, validation_shards
from lmloom.export.onnx_model import (
    OrtDecoder,
    eager_greedy,
    export_onnx,
    past_names,
    present_names,
    tokens_per_second,
)
from lmloom.models.io import WEIGHTS
from lmloom.stages import Stage
from lmloom.tokenizers.loader import validation_batches
from lmloom.tokenizers.shards import TokenShards

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"


class OnnxExportConfig(StrictConfig):
    exporter: Literal["dynamo", "torchscript"] = Field(
        "dynamo", description="torch.onnx exporter: dynamo (torch.export) or the legacy torchscript tracer"
    )
    opset: int = Field(18, ge=14, le=23)
    quantize: Literal["none", "int8"] = Field(
        "none", description="int8: also write an int8 dynamic-quantised model"
    )
    tolerance: float = Field(1e-4, gt=0, description="max |logit difference|, onnxruntime fp32 vs ours")
    check_decode_steps: int = Field(4, ge=0, description="decode steps checked after the prefill")
    int8_max_loss_increase: float = Field(
        0.05, ge=0, description="int8 validation loss may exceed the fp32 graph's by this fraction"
    )
    eval_windows: int = Field(32, ge=0, description="validation windows for the loss column (0: skip)")
    eval_batch_size: int = Field(8, ge=1)
    bench_prompt_tokens: int = Field(16, ge=1, description="greedy-decoding benchmark: prompt length")
    bench_new_tokens: int = Field(32, ge=1, description="greedy-decoding benchmark: tokens generated")
    threads: int | None = Field(
        None, ge=1, description="CPU threads for torch and onnxruntime (default: theirs)"
    )


def run(config: OnnxExportConfig, inputs, ctx, out) -> None:
    checkpoint = inputs["checkpoint"]
    model, tokenizer = load_checkpoint(checkpoint)
    cfg = model.config
    if config.threads:
        torch.set_num_threads(config.threads)
    ctx.log(f"exporting with the {config.exporter} exporter (opset {config.opset})")
    graph = export_onnx(model, config.exporter, config.opset)
    fp32 = OrtDecoder.load(graph, model, config.threads)

    shards = validation_shards(checkpoint, inputs, ctx)
    val = TokenShards(shards, "val") if shards is not None and config.eval_windows else None
    prompt = _prompt(val, cfg, config)
    max_diff = _check_parity(model, fp32, prompt, config.check_decode_steps)
    if not max_diff <= config.tolerance:
        raise LmloomError(
            f"ONNX export does not reproduce the model: max |logit difference| {max_diff:.3g} > tolerance "
            f"{config.tolerance:g} (prefill + {config.check_decode_steps} decode steps); nothing published"
        )
    ctx.log(
        f"onnxruntime fp32 matches the model: max |logit difference| {max_diff:.2e} <= {config.tolerance:g}"
    )

    formats = {"pytorch eager fp32": None, "onnxruntime fp32": fp32}
    files = {
        "pytorch eager fp32": (WEIGHTS, checkpoint.size(WEIGHTS)),
        "onnxruntime fp32": (ONNX_FILE, len(graph)),
    }
    quantized = None
    if config.quantize == "int8":
        quantized = _quantize_int8(graph, ctx)
        formats["onnxruntime int8"] = OrtDecoder.load(quantized, model, config.threads)
        files["onnxruntime int8"] = (INT8_FILE, len(quantized))

    rows = []
    n_new = min(config.bench_new_tokens, cfg.seq_len - len(prompt))
    reference_tokens = None
    for label, runner in formats.items():
        if runner is None:
            speed, tokens = tokens_per_second(lambda p, n: eager_greedy(model, p, n), prompt, n_new)
            reference_tokens = tokens
        else:
            speed, tokens = tokens_per_second(runner.greedy, prompt, n_new)
        loss = _val_loss(model if runner is None else runner, val, cfg.seq_len, config) if val else None
        file_name, size = files[label]
        same = sum(a == b for a, b in zip(tokens, reference_tokens or [], strict=False))
        rows.append(
            {
                "format": label,
                "file": file_name,
                "file_bytes": size,
                "tokens_per_s": round(speed, 1),
                "val_loss": None if loss is None else round(loss, 6),
                "greedy_tokens_equal_to_eager": f"{same}/{len(tokens)}",
            }
        )
    int8_change = None
    if quantized is not None and rows[1]["val_loss"] is not None:
        int8_change = rows[2]["val_loss"] / rows[1]["val_loss"] - 1
        if int8_change > config.int8_max_loss_increase:
            raise LmloomError(
                f"int8 model's validation loss {rows[2]['val_loss']:.4f} is {100 * int8_change:.2f}% above the "
                f"fp32 graph's {rows[1]['val_loss']:.4f} (allowed {100 * config.int8_max_loss_increase:g}%); "
                "nothing published"
            )

    out.write_bytes(ONNX_FILE, graph)
    if quantized is not None:
        out.write_bytes(INT8_FILE, quantized)
    tokenizer_files = copy_tokenizer_files(checkpoint, tokenizer, out)
    out.metadata.update(
        format="onnx",
        exporter=config.exporter,
        opset=config.opset,
        quantize=config.quantize,
        inputs=["input_ids", "attention_mask", "position_ids", *past_names(cfg.n_layers)],
        outputs=["logits", *present_names(cfg.n_layers)],
        kv_shape="[batch, kv_heads, past_sequence, head_dim]",
        tolerance=config.tolerance,
        max_abs_logit_diff=max_diff,
        int8_max_loss_increase=config.int8_max_loss_increase if quantized is not None else None,
        int8_val_loss_change=None if int8_change is None else round(int8_change, 6),
        comparison=rows,
        eval_windows=config.eval_windows if val else 0,
        val_shards=shards.id if val else None,
        bench={
            "prompt_tokens": len(prompt),
            "new_tokens": n_new,
            "batch": 1,
            "threads": torch.get_num_threads(),
        },
        parameters=model.num_params(),
        model=cfg.model_dump(mode="json"),
        tokenizer=checkpoint.manifest.metadata.get("tokenizer"),
        tokenizer_files=tokenizer_files,
        checkpoint=checkpoint.id,
    )
    for line in comparison_lines(rows):
        ctx.log(line)


def _prompt(val: TokenShards | None, cfg, config: OnnxExportConfig) -> list[int]:
    """The benchmark and parity prompt: the start of the validation split, else seeded random ids."""
    n = max(1, min(config.bench_prompt_tokens, cfg.seq_len - max(config.check_decode_steps, 1) - 1))
    if val is not None and len(val) >= n:
        return [int(t) for t in val.tokens(0, n)]
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab_size, (n,), generator=generator).tolist()


@torch.no_grad()
def _check_parity(model, runner: OrtDecoder, prompt: list[int], steps: int) -> float:
    """Max |logit difference| over a prefill (batch 2: the prompt and its reverse) and decode steps."""
    ids = torch.tensor([prompt, prompt[::-1]])
    steps = min(steps, model.config.seq_len - ids.shape[1])
    cache = model.new_kv_cache(2, ids.shape[1] + steps)
    ours = model(ids, kv_cache=cache, start_pos=0)
    theirs, past = runner.step(ids.numpy(), runner.empty_past(2))
    worst = float(np.abs(theirs - ours.numpy()).max())
    pos = ids.shape[1]
    for _ in range(steps):
        nxt = ours[:, -1:].argmax(-1)
        ours = model(nxt, kv_cache=cache, start_pos=pos)
        theirs, past = runner.step(nxt.numpy(), past)
        worst = max(worst, float(np.abs(theirs - ours.numpy()).max()))
        pos += 1
    return worst if math.isfinite(worst) else float("inf")


@torch.no_grad()
def _val_loss(model_or_runner, val: TokenShards, seq_len: int, config: OnnxExportConfig) -> float:
    total, count = 0.0, 0
    for x, y in validation_batches(val, seq_len, config.eval_batch_size, config.eval_windows):
        if isinstance(model_or_runner, OrtDecoder):
            batch_total, n = model_or_runner.loss(x, y)
        else:
            n = int((y != -100).sum())
            batch_total = float(model_or_runner(x, y)) * n
        total += batch_total
        count += n
    return total / max(count, 1)


def _quantize_int8(graph: bytes, ctx) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root_logger = logging.getLogger()
    level = root_logger.level
    with scratch_dir(ctx) as tmp:
        source, target = tmp / "fp32.onnx", tmp / "int8.onnx"
        source.write_bytes(graph)
        root_logger.setLevel(logging.ERROR)  # its "consider pre-processing" advice, logged at the root
        try:
            quantize_dynamic(source, target, weight_type=QuantType.QInt8)
        finally:
            root_logger.setLevel(level)
        return target.read_bytes()


def comparison_lines(rows: list[dict]) -> list[str]:
    lines = [f"{'format':<22} {'file':<18} {'size':>12} {'tokens/s':>10} {'val loss':>9}"]
    for r in rows:
        loss = "-" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        lines.append(
            f"{r['format']:<22} {r['file']:<18} {r['file_bytes']:>12,} {r['tokens_per_s']:>10,.1f} {loss:>9}"
        )
    return lines


def summary(manifest: Manifest) -> list[tuple[str, str]]:
    m = manifest.metadata
    rows = [("ONNX export", f"{m['exporter']} exporter, opset {m['opset']}, past key/values explicit")]
    rows.append(
        ("ONNX parity", f"max |logit diff| {m['max_abs_logit_diff']:.2e} (tolerance {m['tolerance']:g})")
    )
    for r in m["comparison"]:
        loss = "-" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        rows.append(
            (
                r["format"],
                f"{r['file_bytes']:,} bytes, {r['tokens_per_s']:,.1f} tokens/s greedy, val loss {loss}",
            )
        )
    if m.get("int8_val_loss_change") is not None:
        rows.append(
            (
                "int8 loss change",
                f"{100 * m['int8_val_loss_change']:+.2f}% (allowed {100 * m['int8_max_loss_increase']:g}%)",
            )
        )
    return rows


ONNX = Stage(
    name="export.onnx",
    kind="onnx-model",
    config=OnnxExportConfig,
    run=run,
    inputs={"checkpoint": "checkpoint"},
    optional_inputs={SHARDS: "shards"},
    permissions=("export",),
    launch_fields=("threads",),
    summary=summary,
    description="export a checkpoint to ONNX with explicit past key/values (optionally int8), checked in onnxruntime",
)
