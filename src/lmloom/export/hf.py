"""`export.hf`: checkpoint -> a Hugging Face Llama directory (`hf-model` artifact).

config.json + model.safetensors + the tokenizer files, which `transformers.LlamaForCausalLM.from_pretrained`
and `PreTrainedTokenizerFast.from_pretrained` load from a directory holding the artifact's files. The
conversion is `hf_llama`'s (`hf_config_dict`, `to_hf_state_dict`, as `export_hf_dir` uses them), written
through the artifact writer instead of to a path so the store's codec can encrypt it.
"""

from __future__ import annotations

import json
from typing import Literal

import torch
from pydantic import Field
from safetensors.torch import save as save_safetensors

from lmloom.artifacts.manifest import Manifest
from lmloom.config import StrictConfig
from lmloom.errors import ConfigError
from lmloom.export.common import copy_tokenizer_files, load_checkpoint
from lmloom.models.hf_dir import HF_CONFIG, HF_WEIGHTS
from lmloom.models.hf_llama import hf_config_dict, to_hf_state_dict
from lmloom.stages import Stage
from lmloom.tune.chat import CHAT_TEMPLATE

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class HfExportConfig(StrictConfig):
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="weight dtype in the file"
    )


def run(config: HfExportConfig, inputs, ctx, out) -> None:
    checkpoint = inputs["checkpoint"]
    model, tokenizer = load_checkpoint(checkpoint)
    cfg = model.config
    try:
        fields = hf_config_dict(
            cfg,
            bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
            dtype=config.dtype,  # transformers >= 4.56
            torch_dtype=config.dtype,  # older transformers
        )
    except ValueError as exc:  # e.g. a parallel block
        raise ConfigError(f"stages.{ctx.step}: {exc}") from None
    state = to_hf_state_dict({k: v.detach() for k, v in model.state_dict().items()}, cfg)
    dtype = DTYPES[config.dtype]
    tensors = {name: t.to(dtype).contiguous() for name, t in state.items()}
    out.write_bytes(HF_CONFIG, (json.dumps(fields, indent=2) + "\n").encode("utf-8"))
    # metadata "pt": transformers checks it to know the tensors were saved from PyTorch.
    out.write_bytes(HF_WEIGHTS, save_safetensors(tensors, metadata={"format": "pt"}))
    # The chat template the model was fine-tuned with, so `apply_chat_template` prompts it the same way.
    tokenizer_files = copy_tokenizer_files(checkpoint, tokenizer, out, {"chat_template": CHAT_TEMPLATE})
    out.metadata.update(
        format="huggingface",
        architecture="LlamaForCausalLM",
        dtype=config.dtype,
        parameters=model.num_params(),
        model=cfg.model_dump(mode="json"),
        tokenizer=checkpoint.manifest.metadata.get("tokenizer"),
        tokenizer_files=tokenizer_files,
        checkpoint=checkpoint.id,
    )
    ctx.log(
        f"Hugging Face Llama directory: {len(tensors)} tensors ({config.dtype}), {', '.join(tokenizer_files)}"
    )


def summary(manifest: Manifest) -> list[tuple[str, str]]:
    m = manifest.metadata
    return [("Hugging Face export", f"LlamaForCausalLM, {m['parameters']:,} parameters, {m['dtype']}")]


HF = Stage(
    name="export.hf",
    kind="hf-model",
    config=HfExportConfig,
    run=run,
    inputs={"checkpoint": "checkpoint"},
    permissions=("export",),
    summary=summary,
    description="export a checkpoint as a Hugging Face Llama directory (config.json, safetensors, tokenizer)",
)
