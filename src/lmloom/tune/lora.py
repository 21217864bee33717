"""LoRA on our `Decoder` through PEFT's injection API, saved and loaded as a PEFT adapter for HF Llama.

`apply_lora` hands a `peft.LoraConfig` naming OUR modules (`qkv`, `proj`, `gate`, `up`, `down`) to
`peft.inject_adapter_in_model`: PEFT's own `lora.Linear` wraps each target (no LoRA layer is written
here) and everything but the adapters is frozen. `merge_lora` / `unmerge_lora` call the PEFT layers'
`merge` / `unmerge`.

The adapter files are PEFT's (`adapter_config.json` + `adapter_model.safetensors`) in Hugging Face Llama
names, so `peft.PeftModel.from_pretrained(llama, directory)` loads them on the model that
`lmloom.models.hf_llama` exports from the same base weights:

- ours -> HF modules: `attn.qkv` -> `self_attn.q_proj` / `k_proj` / `v_proj`, `attn.proj` ->
  `self_attn.o_proj`, `mlp.gate` / `up` / `down` -> `mlp.gate_proj` / `up_proj` / `down_proj`.
- The fused qkv adapter maps exactly: its update is dW = s * B @ A with B's rows laid out as qkv's
  ([H*D q | Hkv*D k | Hkv*D v]), so q_proj, k_proj and v_proj each get lora_A = A (three copies) and
  lora_B = their row block of B. The q and k blocks are permuted from our RoPE "pairs" layout to HF's
  "halves" layout exactly as `hf_llama` permutes the base weights (dW's rows follow its rows).
- The inverse, `load_peft_adapter`, needs one shared A for q, k and v (a fused projection has one
  input-side factor): an adapter whose q/k/v ranks or A matrices differ is refused; a missing one of the
  three (the common q_proj + v_proj choice) becomes a zero block of B.

Scaling is PEFT's alpha / rank on both sides, so no factor is folded into the saved tensors.
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator
from safetensors.torch import load_file, save_file
from torch import nn

from lmloom.config import StrictConfig
from lmloom.models.hf_llama import _halves_to_pairs, _pairs_to_halves

ADAPTER = "default"  # PEFT's adapter name; one adapter per model here
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Our module name -> (parent inside a block, HF module names inside the HF layer).
TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "qkv": ("attn", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "proj": ("attn", ("self_attn.o_proj",)),
    "gate": ("mlp", ("mlp.gate_proj",)),
    "up": ("mlp", ("mlp.up_proj",)),
    "down": ("mlp", ("mlp.down_proj",)),
}
_HF_TO_OURS = {hf: ours for ours, (_, hfs) in TARGETS.items() for hf in hfs}
_HF_PREFIX = "base_model.model.model.layers.{}."
_HF_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.((?:self_attn|mlp)\.\w+)\.lora_([AB])\.weight$"
)


class LoraSettings(StrictConfig):
    """Low-rank adapters (Hu et al. 2021) on the decoder's linear layers, named by our module names."""

    rank: int = Field(8, ge=1, description="r, the rank of each update B @ A")
    alpha: float = Field(16.0, gt=0, description="the update is scaled by alpha / rank")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="dropout on the adapter's input (PEFT's lora_dropout)"
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["qkv", "proj", "gate", "up", "down"],
        description=f"which linear layers of each block get an adapter; any of {sorted(TARGETS)}",
    )
    layers_to_transform: list[int] | None = Field(None, description="block indices to adapt; None = all")
    seed: int = Field(0, description="seeds the draw of the A matrices (B starts at zero)")

    @field_validator("target_modules")
    @classmethod
    def _known_targets(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"target_modules is empty; choose from {sorted(TARGETS)}")
        unknown = [name for name in value if name not in TARGETS]
        if unknown:
            raise ValueError(
                f"unknown target_modules {unknown}; the decoder's linear layers are {sorted(TARGETS)}"
            )
        if len(set(value)) != len(value):
            raise ValueError(f"target_modules lists a module twice: {value}")
        return value

    @field_validator("layers_to_transform")
    @classmethod
    def _layer_indices(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            if not value:
                raise ValueError("layers_to_transform is empty; use None for every layer")
            if any(i < 0 for i in value) or len(set(value)) != len(value):
                raise ValueError(f"layers_to_transform must be distinct indices >= 0, got {value}")
        return value

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> PEFT LoRA layer wrapping it, for every adapted module of `model`."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject PEFT LoRA layers into `model` in place (and return it); only the adapters stay trainable.

    A is drawn as PEFT draws it (Kaiming-uniform) but from `settings.seed`, B starts at zero, so the model's
    function is unchanged until training moves B. (Adapter dropout, when set, draws from torch's global RNG
    inside PEFT's layers.) Refuses a model that already has LoRA layers.
    """
    import peft

    if _lora_layers(model):
        raise ValueError("the model already has LoRA layers; apply_lora adds one adapter to a plain model")
    n_layers = len(model.layers)
    layers = settings.layers_to_transform
    if layers is not None and max(layers) >= n_layers:
        raise ValueError(f"layers_to_transform {layers} names a block past the model's {n_layers} blocks")
    config = peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        layers_to_transform=list(layers) if layers is not None else None,
        layers_pattern="layers" if layers is not None else None,
        bias="none",
    )
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    # PEFT drew A from the global RNG; redraw it (same Kaiming-uniform as PEFT's default) from the seed.
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.no_grad():
        for layer in _lora_layers(model).values():
            a = layer.lora_A[ADAPTER].weight
            a.copy_(nn.init.kaiming_uniform_(torch.empty(a.shape), a=math.sqrt(5), generator=generator))
    expected = len(settings.target_modules) * (n_layers if layers is None else len(layers))
    if len(_lora_layers(model)) != expected:  # PEFT matched more or fewer modules than we asked for
        raise RuntimeError(f"PEFT injected {len(_lora_layers(model))} LoRA layers, expected {expected}")
    return model


def merge_lora(model: nn.Module) -> None:
    """Add each adapter's update into its base weight (PEFT's `merge`): inference at base-model cost."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to merge")
    for layer in layers.values():
        if not layer.merged:
            layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Subtract the merged updates again (PEFT's `unmerge`); the base weights return to within rounding."""
    for layer in _lora_layers(model).values():
        if layer.merged:
            layer.unmerge()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors in our names, e.g. `layers.0.attn.qkv.lora_A.weight` (detached, not cloned)."""
    marker = f".{ADAPTER}."
    return {
        name.replace(marker, "."): tensor.detach()
        for name, tensor in model.state_dict().items()
        if ".lora_A." in name or ".lora_B." in name
    }


def _adapted(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """(layer index, our target name, PEFT layer) for every adapted module, in model order."""
    out = []
    for name, module in _lora_layers(model).items():
        match = re.fullmatch(r"layers\.(\d+)\.(attn|mlp)\.(\w+)", name)
        if match is None or match.group(3) not in TARGETS:
            raise ValueError(f"LoRA layer at {name!r} is not one of the decoder's targets {sorted(TARGETS)}")
        out.append((int(match.group(1)), match.group(3), module))
    return out


def _peft_config(settings: LoraSettings, hf_targets: list[str], base_model_name_or_path: str | None):
    import peft

    layers = settings.layers_to_transform
    return peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=hf_targets,
        layers_to_transform=list(layers) if layers is not None else None,
        layers_pattern="layers" if layers is not None else None,
        bias="none",
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_adapter_files(
    directory: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    """adapter_config.json + adapter_model.safetensors (contiguous tensors, format=pt), each written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _write_atomic(directory / ADAPTER_CONFIG, lambda p: Path(p).write_text(text, encoding="utf-8"))
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _write_atomic(directory / ADAPTER_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))


def to_peft_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's adapters as `PeftModel` expects them on an HF Llama: HF names, q/k rows in halves layout."""
    cfg = model.config
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = {}
    for i, target, layer in _adapted(model):
        a, b = layer.lora_A[ADAPTER].weight.detach(), layer.lora_B[ADAPTER].weight.detach()
        prefix = _HF_PREFIX.format(i)
        if target == "qkv":
            bq, bk, bv = b.split([q_rows, kv_rows, kv_rows], dim=0)
            blocks = (_pairs_to_halves(bq, cfg.n_heads), _pairs_to_halves(bk, cfg.kv_heads), bv)
            for hf_name, block in zip(TARGETS["qkv"][1], blocks, strict=True):
                out[f"{prefix}{hf_name}.lora_A.weight"] = a.clone()
                out[f"{prefix}{hf_name}.lora_B.weight"] = block.contiguous()
        else:
            (hf_name,) = TARGETS[target][1]
            out[f"{prefix}{hf_name}.lora_A.weight"] = a.clone()
            out[f"{prefix}{hf_name}.lora_B.weight"] = b.clone()
    return out


def save_peft_adapter(
    model: nn.Module,
    settings: LoraSettings,
    directory: str | Path,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the model's adapters as a PEFT LoRA adapter for the HF Llama export of the same base model.

    `base_model_name_or_path` is recorded in adapter_config.json (PEFT uses it to find the base model).
    """
    adapted = _adapted(model)
    if not adapted:
        raise ValueError("the model has no LoRA layers to save")
    for i, target, layer in adapted:
        rank = layer.r[ADAPTER]
        if rank != settings.rank or layer.scaling[ADAPTER] != settings.scaling:
            raise ValueError(
                f"layers.{i} {target}: rank {rank}, scaling {layer.scaling[ADAPTER]} do not match settings "
                f"(rank {settings.rank}, alpha/rank {settings.scaling})"
            )
    if any(layer.merged for _, _, layer in adapted):
        raise ValueError("the adapters are merged into the base weights; call unmerge_lora before saving")
    hf_targets = sorted({hf.rsplit(".", 1)[1] for _, target, _ in adapted for hf in TARGETS[target][1]})
    config = _peft_config(settings, hf_targets, base_model_name_or_path).to_dict()
    directory = Path(directory)
    write_adapter_files(directory, _jsonable(config), to_peft_tensors(model))
    return directory


def _jsonable(value: Any) -> Any:
    """PeftConfig.to_dict() holds sets and enums; JSON gets sorted lists and plain strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _check_adapter_config(config: dict[str, Any], where: Path) -> None:
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type={config.get('peft_type')!r} (expected 'LORA')")
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if config.get(flag):
            problems.append(f"{flag}=True (not supported)")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} (only 'none'; the decoder has no biases)")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if config.get(pattern):
            problems.append(f"{pattern}={config[pattern]} (one rank and alpha for every module is supported)")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']} (only LoRA weights are loaded)")
    if problems:
        raise ValueError(f"cannot load the LoRA adapter in {where}: " + "; ".join(problems))


def load_peft_adapter(model: nn.Module, directory: str | Path) -> LoraSettings:
    """Inject LoRA into a plain `model` and load a PEFT adapter saved for its HF Llama export (the inverse
    of `save_peft_adapter`); returns the settings read from adapter_config.json and the weights.

    q_proj, k_proj and v_proj become one fused qkv adapter, which needs them to share one A (same rank, equal
    tensors, as `save_peft_adapter` writes them); otherwise the adapter is refused with an error.
    """
    directory = Path(directory)
    config = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    _check_adapter_config(config, directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (only adapter_model.safetensors is read, never pickle)")
    tensors = load_file(weights)
    cfg = model.config
    rank, alpha = int(config["r"]), float(config["lora_alpha"])

    # layer -> HF module name -> {"A": tensor, "B": tensor}
    found: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        match = _HF_KEY.match(key)
        if match is None or match.group(2) not in _HF_TO_OURS:
            raise ValueError(f"{weights}: tensor {key!r} is not a LoRA weight of a Llama linear layer")
        i, hf_name, ab = int(match.group(1)), match.group(2), match.group(3)
        if i >= cfg.n_layers:
            raise ValueError(f"{weights}: {key!r} names layer {i}, the model has {cfg.n_layers}")
        found.setdefault(i, {}).setdefault(hf_name, {})[ab] = tensor
    if not found:
        raise ValueError(f"{weights} holds no LoRA weights")

    ours: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for i, modules in sorted(found.items()):
        for hf_name, pair in modules.items():
            if set(pair) != {"A", "B"}:
                raise ValueError(f"{weights}: layer {i} {hf_name} has lora_{''.join(pair)} only")
            if pair["A"].shape[0] != rank or pair["B"].shape[1] != rank:
                raise ValueError(
                    f"{weights}: layer {i} {hf_name} has rank {pair['A'].shape[0]}/{pair['B'].shape[1]}, "
                    f"adapter_config.json says r={rank}"
                )
        qkv = [hf for hf in TARGETS["qkv"][1] if hf in modules]
        if qkv:
            ours[(i, "qkv")] = _fuse_qkv(modules, qkv, i, cfg, weights)
        for hf_name, pair in modules.items():
            if hf_name not in TARGETS["qkv"][1]:
                ours[(i, _HF_TO_OURS[hf_name])] = (pair["A"], pair["B"])

    targets = sorted({target for _, target in ours}, key=list(TARGETS).index)
    layers = sorted({i for i, _ in ours})
    per_layer = {i: {t for j, t in ours if j == i} for i in layers}
    if any(per_layer[i] != set(targets) for i in layers):
        raise ValueError(
            f"{weights}: layers adapt different modules {per_layer}; one set for all is supported"
        )
    settings = LoraSettings(
        rank=rank,
        alpha=alpha,
        dropout=float(config.get("lora_dropout", 0.0)),
        target_modules=targets,
        layers_to_transform=None if layers == list(range(cfg.n_layers)) else layers,
    )
    apply_lora(model, settings)
    modules = {(i, target): layer for i, target, layer in _adapted(model)}
    with torch.no_grad():
        for key, (a, b) in ours.items():
            layer = modules[key]
            for param, value, what in (
                (layer.lora_A[ADAPTER].weight, a, "A"),
                (layer.lora_B[ADAPTER].weight, b, "B"),
            ):
                if param.shape != value.shape:
                    raise ValueError(
                        f"{weights}: layer {key[0]} {key[1]} lora_{what} has shape {tuple(value.shape)}, "
                        f"the model needs {tuple(param.shape)}"
                    )
                param.copy_(value)
    return settings


def _fuse_qkv(modules, present: list[str], i: int, cfg, weights: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One (A, B) for our fused qkv from HF q/k/v adapters that share A; a missing one is a zero B block."""
    a = modules[present[0]]["A"]
    for hf_name in present[1:]:
        other = modules[hf_name]["A"]
        if other.shape != a.shape or not torch.equal(other, a):
            raise ValueError(
                f"{weights}: layer {i} {present[0]} and {hf_name} have different LoRA A matrices "
                f"(shapes {tuple(a.shape)} and {tuple(other.shape)}); the decoder's fused qkv projection needs "
                "one A shared by q, k and v, so this adapter cannot be loaded exactly"
            )
    rows = {"q_proj": cfg.n_heads * cfg.head_dim, "k_proj": cfg.kv_heads * cfg.head_dim}
    heads = {"q_proj": cfg.n_heads, "k_proj": cfg.kv_heads}
    blocks = []
    for hf_name in TARGETS["qkv"][1]:
        short = hf_name.rsplit(".", 1)[1]
        n_rows = rows.get(short, cfg.kv_heads * cfg.head_dim)
        if hf_name not in modules:
            blocks.append(a.new_zeros(n_rows, a.shape[0]))
            continue
        b = modules[hf_name]["B"]
        if b.shape[0] != n_rows:
            raise ValueError(
                f"{weights}: layer {i} {hf_name} lora_B has {b.shape[0]} rows, the model needs {n_rows}"
            )
        blocks.append(_halves_to_pairs(b, heads[short]) if short in heads else b)
    return a, torch.cat(blocks, dim=0)
