"""`serve.samples`: generate a few continuations from a checkpoint, so every run ends with text to read."""

from __future__ import annotations

from pydantic import Field

from lmloom.artifacts.manifest import Manifest
from lmloom.config import StrictConfig
from lmloom.errors import ConfigError
from lmloom.serve.generate import generate
from lmloom.serve.loading import load_checkpoint_artifact
from lmloom.stages import Stage


class SamplesConfig(StrictConfig):
    prompts: list[str] = Field(
        default=["def fibonacci(n):\n", "import os\n\n", 'class Stack:\n    """', "The with statement"],
        min_length=1,
    )
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.8, ge=0)
    top_k: int | None = Field(50, ge=1)
    top_p: float | None = Field(0.95, gt=0, le=1)
    seed: int = 0


def run(config: SamplesConfig, inputs, ctx, out) -> None:
    model, tokenizer = load_checkpoint_artifact(inputs["checkpoint"])
    samples = []
    with ctx.progress(len(config.prompts), "sampling") as bar:
        for i, prompt in enumerate(config.prompts):
            try:
                ids = generate(
                    model,
                    tokenizer.encode(prompt) or [tokenizer.eos_id],
                    max_new_tokens=config.max_new_tokens,
                    temperature=config.temperature,
                    top_k=config.top_k,
                    top_p=config.top_p,
                    seed=config.seed + i,
                    eos_id=tokenizer.eos_id,
                )
            except ValueError as exc:
                raise ConfigError(f"stages.{ctx.step}.config.prompts[{i}]: {exc}") from None
            if ids and ids[-1] == tokenizer.eos_id:
                ids = ids[:-1]  # the end-of-document marker is not text
            samples.append({"prompt": prompt, "completion": tokenizer.decode(ids), "tokens": len(ids)})
            bar.advance()
    out.write_json("samples.json", samples)
    # Counts only: the text stays in samples.json, which is encrypted when the run is.
    out.metadata.update(samples=len(samples), tokens=sum(s["tokens"] for s in samples))


def summary(manifest: Manifest) -> list[tuple[str, str]]:
    m = manifest.metadata
    return [("samples", f"{m['samples']} generated ({m['tokens']} tokens), printed below")]


SAMPLES = Stage(
    name="serve.samples",
    kind="samples",
    config=SamplesConfig,
    run=run,
    inputs={"checkpoint": "checkpoint"},
    permissions=("serve",),
    summary=summary,
    description="generate sample continuations of fixed prompts from a checkpoint",
)
