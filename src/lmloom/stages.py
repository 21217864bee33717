"""The stage contract and the registry of every stage lmloom ships.

A stage is a plain function `run(config, inputs, ctx, out)`: it reads verified input artifacts
(`artifact.open(name)`, `read_bytes`, ...), writes files through `out.open(name)` / `out.write_bytes`
(never by path: the store's codec may encrypt them) and facts into `out.metadata`. The pipeline owns everything around it:
caching by stage key, the staging directory and atomic publish, and the audit entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

from lmloom.artifacts.manifest import Manifest
from lmloom.config import StrictConfig
from lmloom.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str  # kind of the artifact it makes
    config: type[StrictConfig]
    run: Callable[..., None]
    inputs: dict[str, str]  # role -> required artifact kind
    # What the acting principal must hold to run or reuse it (lmloom.security.policy.Permission);
    # required, so a new stage cannot forget it and be open to everyone.
    permissions: tuple[str, ...]
    version: int = 1  # bump when the same config and inputs would now produce different output
    summary: Callable[[Manifest], list[tuple[str, str]]] | None = None
    description: str = ""
    # What the stage reads from outside the store (files, an installation), digested, so that an
    # edited source file under an unchanged config gives a new stage key instead of a stale reuse.
    fingerprint: Callable[[Any], Any] | None = None
    # The kind of any further inputs, under role names the recipe chooses (None: no others allowed),
    # e.g. train.pretrain's extra token shards, one per task of a multi-task mixture.
    extra_inputs: str | None = None
    # Inputs a recipe may give or leave out, role -> kind (e.g. train.pretrain's curriculum `reference`).
    optional_inputs: dict[str, str] = field(default_factory=dict)
    # Runs on every rank of a torchrun launch (training); any other stage runs on rank 0 alone.
    distributed: bool = False
    # Config fields that say how to run, not what to compute (process counts, threads): left out of the
    # stage key, so a run interrupted under one launch resumes under another.
    launch_fields: tuple[str, ...] = ()

    def input_kind(self, role: str) -> str | None:
        """The artifact kind an input under this role must be (None: the stage takes no such input)."""
        return self.inputs.get(role) or self.optional_inputs.get(role) or self.extra_inputs

    def summarize(self, manifest: Manifest) -> list[tuple[str, str]]:
        return self.summary(manifest) if self.summary else []


# Imported lazily so `lmloom audit verify` does not pay for importing torch.
_REGISTRY = {
    "data.prepare": "lmloom.data.stage:PREPARE",
    "data.score": "lmloom.data.lm_score:SCORE",
    "tokenizer.train": "lmloom.tokenizers.stage:TRAIN",
    "tokenizer.encode": "lmloom.tokenizers.stage:ENCODE",
    "train.pretrain": "lmloom.train.stage:PRETRAIN",
    "train.continue": "lmloom.train.continual:CONTINUE",
    "train.objective": "lmloom.train.objective_stage:OBJECTIVE",
    "train.dp_pretrain": "lmloom.privacy.dp_stage:DP_PRETRAIN",
    "serve.samples": "lmloom.serve.stage:SAMPLES",
    "tune.sft": "lmloom.tune.stage:SFT",
    "align.reward": "lmloom.align.stage:REWARD",
    "align.dpo": "lmloom.align.stage:DPO",
    "evaluate.gates": "lmloom.evaluate.gates:GATES",
    "align.grpo": "lmloom.align.grpo_stage:GRPO",
    "align.constitutional": "lmloom.align.constitutional_stage:CONSTITUTIONAL",
    "export.hf": "lmloom.export.hf:HF",
    "export.gguf": "lmloom.export.gguf_file:GGUF",
    "export.onnx": "lmloom.export.onnx_stage:ONNX",
}


def stage_names() -> list[str]:
    return sorted(_REGISTRY)


def get_stage(name: str) -> Stage:
    target = _REGISTRY.get(name)
    if target is None:
        raise ConfigError(f"unknown stage {name!r}; available: {', '.join(stage_names())}")
    module, attr = target.split(":")
    return getattr(import_module(module), attr)


def stage_for_manifest(manifest: Manifest) -> Stage | None:
    return get_stage(manifest.stage) if manifest.stage in _REGISTRY else None


def config_dict(config: StrictConfig) -> dict[str, Any]:
    return config.model_dump(mode="json")
