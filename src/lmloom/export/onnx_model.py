"""The decoder as an ONNX graph with explicit past key/values, and an onnxruntime runner for it.

`DecoderWithPast` recomputes our `Decoder` from its weights with nothing but tensor ops: no `KVCache`
object, no custom autograd functions, no oneDNN fast paths cross the export boundary. Its interface is
the one Hugging Face Optimum / onnxruntime-genai use for decoder-only models:

    inputs   input_ids [B, T] int64, attention_mask [B, P + T] int64 (1 = a real token, 0 = padding),
             position_ids [B, T] int64, past_key_values.{i}.key / .value [B, kv_heads, P, head_dim] float32
    outputs  logits [B, T, vocab] float32, present.{i}.key / .value [B, kv_heads, P + T, head_dim]

P = 0 (past tensors with an empty third axis) is a prefill; each decode step feeds back the presents.
Weights are stored transposed ([in, out]) so every projection is a `MatMul` against an initializer,
which is what `onnxruntime.quantization.quantize_dynamic` quantises. The tied LM head is therefore a
second (transposed) copy of the embedding in the file: the graph is larger than model.safetensors by
one vocab x d_model matrix.
"""

from __future__ import annotations

import io
import re
import time
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmloom.models.decoder import Decoder

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"


def past_names(n_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def present_names(n_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (2i, 2i+1) of the last dim, as `decoder._rotate` does (real form)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


class DecoderWithPast(nn.Module):
    """`Decoder` forward with past key/values in and present key/values out, as plain tensors."""

    def __init__(self, model: Decoder):
        super().__init__()
        cfg = self.config = model.config
        self.H, self.Hkv, self.D = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        state = {k: v.detach().float() for k, v in model.state_dict().items()}

        def buf(name: str, tensor: torch.Tensor) -> None:
            self.register_buffer(name.replace(".", "_"), tensor.contiguous())

        buf("embed", state["tok_emb.weight"])
        head = state["tok_emb.weight"] if cfg.tie_embeddings else state["lm_head.weight"]
        buf("head_t", head.t())
        buf("norm", state["norm.weight"])
        buf("rope_cos", model.rope_cos.float())
        buf("rope_sin", model.rope_sin.float())
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            buf(f"l{i}.attn_norm", state[p + "attn_norm.weight"])
            if not cfg.parallel:
                buf(f"l{i}.mlp_norm", state[p + "mlp_norm.weight"])
            for ours, short in (("attn.qkv", "qkv"), ("attn.proj", "proj"), ("mlp.gate", "gate"),
                                ("mlp.up", "up"), ("mlp.down", "down")):  # fmt: skip
                buf(f"l{i}.{short}_t", state[p + ours + ".weight"].t())

    def _w(self, i: int, name: str) -> torch.Tensor:
        return getattr(self, f"l{i}_{name}")

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: list[torch.Tensor],
    ) -> tuple[torch.Tensor, ...]:
        cfg, H, Hkv, D = self.config, self.H, self.Hkv, self.D
        B, T = input_ids.shape
        S = attention_mask.shape[1]  # P + T
        x = F.embedding(input_ids, self.embed)  # a Gather (quantisable), not a GatherND
        cos = F.embedding(position_ids, self.rope_cos).unsqueeze(2)  # [B, T, 1, D/2]
        sin = F.embedding(position_ids, self.rope_sin).unsqueeze(2)
        # Query t sits at slot S - T + t: it sees every unpadded key slot up to its own.
        key_slot = torch.arange(S, device=input_ids.device)
        query_slot = torch.arange(T, device=input_ids.device) + (S - T)
        allowed = (key_slot[None, :] <= query_slot[:, None])[None, None] & (
            attention_mask[:, None, None, :] > 0
        )
        bias = torch.zeros(allowed.shape, dtype=x.dtype).masked_fill(~allowed, torch.finfo(x.dtype).min)
        presents: list[torch.Tensor] = []
        for i in range(cfg.n_layers):
            h = _rms_norm(x, self._w(i, "attn_norm"), cfg.norm_eps)
            qkv = (h @ self._w(i, "qkv_t")).unflatten(-1, (H + 2 * Hkv, D))  # [B, T, heads, D]
            qk = _rotate_pairs(qkv[:, :, : H + Hkv], cos, sin)
            q = qk[:, :, :H].transpose(1, 2)
            k = torch.cat([past_key_values[2 * i], qk[:, :, H:].transpose(1, 2)], dim=2)
            v = torch.cat([past_key_values[2 * i + 1], qkv[:, :, H + Hkv :].transpose(1, 2)], dim=2)
            presents += [k, v]
            if H != Hkv:  # grouped-query: key/value head j serves query heads j*g .. j*g + g - 1
                g = H // Hkv
                k = k[:, :, None].expand(B, Hkv, g, S, D).reshape(B, H, S, D)
                v = v[:, :, None].expand(B, Hkv, g, S, D).reshape(B, H, S, D)
            scores = (q @ k.transpose(-1, -2)) * (D**-0.5) + bias
            y = torch.softmax(scores, dim=-1) @ v
            attended = y.transpose(1, 2).reshape(B, T, H * D) @ self._w(i, "proj_t")
            if cfg.parallel:
                x = x + attended + self._mlp(i, h)
            else:
                x = x + attended
                x = x + self._mlp(i, _rms_norm(x, self._w(i, "mlp_norm"), cfg.norm_eps))
        logits = _rms_norm(x, self.norm, cfg.norm_eps) @ self.head_t
        return (logits, *presents)

    def _mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        gate = h @ self._w(i, "gate_t")
        return (F.silu(gate) * (h @ self._w(i, "up_t"))) @ self._w(i, "down_t")

    def example_inputs(self, batch: int = 2, seq: int = 3, past: int = 4):
        cfg = self.config
        ids = torch.randint(0, cfg.vocab_size, (batch, seq))
        mask = torch.ones(batch, past + seq, dtype=torch.int64)
        pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
        kv = [torch.randn(batch, self.Hkv, past, self.D) for _ in range(2 * cfg.n_layers)]
        return ids, mask, pos, kv


Exporter = Literal["dynamo", "torchscript"]


def export_onnx(model: Decoder, exporter: Exporter = "dynamo", opset: int = 18) -> bytes:
    """The serialized ONNX model (one file, weights inside: models over 2 GB are not supported).

    dynamo: torch.export + onnxscript (the supported exporter; slow to start, ~10-30 s on a small CPU);
    torchscript: the legacy tracer (deprecated by PyTorch, kept as a fast fallback). Both give the same
    inputs and outputs, with named dynamic axes batch, sequence, past_sequence, total_sequence.
    """
    wrapper = DecoderWithPast(model).eval()
    n = model.config.n_layers
    args = wrapper.example_inputs()
    inputs = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(n)]
    outputs = [LOGITS, *present_names(n)]
    axes: dict[str, dict[int, str]] = {
        INPUT_IDS: {0: "batch", 1: "sequence"},
        ATTENTION_MASK: {0: "batch", 1: "total_sequence"},
        POSITION_IDS: {0: "batch", 1: "sequence"},
        LOGITS: {0: "batch", 1: "sequence"},
    }
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in past_names(n)})
    axes.update({name: {0: "batch", 2: "total_sequence"} for name in present_names(n)})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer notes
        if exporter == "torchscript":
            buffer = io.BytesIO()
            torch.onnx.export(
                wrapper, args, buffer, dynamo=False, input_names=inputs, output_names=outputs,
                dynamic_axes=axes, opset_version=opset, do_constant_folding=True,
            )  # fmt: skip
            return buffer.getvalue()
        auto = torch.export.Dim.AUTO  # the exporter derives how dims relate (total = past + sequence)
        dynamic = {
            "input_ids": {0: auto, 1: auto},
            "attention_mask": {0: auto, 1: auto},
            "position_ids": {0: auto, 1: auto},
            "past_key_values": [{0: auto, 2: auto} for _ in range(2 * n)],
        }
        program = torch.onnx.export(
            wrapper, args, dynamo=True, dynamic_shapes=dynamic, input_names=inputs,
            output_names=outputs, opset_version=opset, external_data=False, optimize=True, verbose=False,
        )  # fmt: skip
    proto = program.model_proto  # type: ignore[union-attr]
    _name_dynamic_axes(proto, axes)
    return proto.SerializeToString()


def _name_dynamic_axes(proto, axes: dict[str, dict[int, str]]) -> None:
    """Replace torch.export's symbol names (s43, s70 + s85, ...) by ours wherever they appear."""
    rename: dict[str, str] = {}
    for value in proto.graph.input:
        for axis, name in axes.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            if dim.dim_param:
                rename.setdefault(dim.dim_param, name)
    for value in proto.graph.output:  # presents: past + sequence under whatever symbols
        for axis, name in axes.get(value.name, {}).items():
            value.type.tensor_type.shape.dim[axis].dim_param = name
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, rename)) + r")\b") if rename else None
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param and pattern is not None:
                dim.dim_param = pattern.sub(lambda m: rename[m.group(1)], dim.dim_param)


@dataclass
class OrtDecoder:
    """Runs an exported graph in onnxruntime: prefill, decode steps, greedy decoding, validation loss."""

    session: object  # onnxruntime.InferenceSession
    n_layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def load(cls, model_bytes: bytes, model: Decoder, threads: int | None = None) -> OrtDecoder:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        cfg = model.config
        return cls(session, cfg.n_layers, cfg.kv_heads, cfg.head_dim)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [np.zeros(shape, np.float32) for _ in range(2 * self.n_layers)]

    def step(
        self, ids: np.ndarray, past: list[np.ndarray], mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """(logits [B, T, V], presents) for ids [B, T] after `past` (positions continue from it)."""
        B, T = ids.shape
        P = past[0].shape[2]
        if mask is None:
            mask = np.ones((B, P + T), np.int64)
        pos = np.broadcast_to(np.arange(P, P + T, dtype=np.int64), (B, T)).copy()
        feeds = {INPUT_IDS: ids.astype(np.int64), ATTENTION_MASK: mask, POSITION_IDS: pos}
        feeds.update(zip(past_names(self.n_layers), past, strict=True))
        logits, *presents = self.session.run(None, feeds)  # type: ignore[attr-defined]
        return logits, presents

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        logits, past = self.step(np.array([prompt]), self.empty_past(1))
        tokens = []
        for _ in range(max_new_tokens):
            token = int(logits[0, -1].argmax())
            tokens.append(token)
            if len(tokens) == max_new_tokens:
                break
            logits, past = self.step(np.array([[token]]), past)
        return tokens

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        """(sum of token cross-entropies, token count) of one batch of windows, without a past."""
        logits, _ = self.step(x.numpy(), self.empty_past(x.shape[0]))
        logits = torch.from_numpy(logits).float()
        total = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
        return float(total), int((y != -100).sum())


@torch.no_grad()
def eager_greedy(model: Decoder, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Our own KV-cached greedy decoding (eager fp32), the reference for speed and tokens."""
    cache = model.new_kv_cache(1, len(prompt) + max_new_tokens)
    logits = model(torch.tensor([prompt]), kv_cache=cache, start_pos=0)
    pos, tokens = len(prompt), []
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        tokens.append(token)
        if len(tokens) == max_new_tokens:
            break
        logits = model(torch.tensor([[token]]), kv_cache=cache, start_pos=pos)
        pos += 1
    return tokens


def tokens_per_second(
    decode, prompt: list[int], max_new_tokens: int, repeats: int = 2
) -> tuple[float, list[int]]:
    """Best of `repeats` timed runs of `decode(prompt, n)` (after one warm-up): new tokens per second."""
    tokens = decode(prompt, min(4, max_new_tokens))  # warm-up: allocations, lazy init
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = decode(prompt, max_new_tokens)
        best = min(best, time.perf_counter() - start)
    return max_new_tokens / best, tokens
