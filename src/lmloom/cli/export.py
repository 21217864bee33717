"""`lmloom export hf|gguf|onnx ARTIFACT`: run one export stage on a checkpoint already in the store.

A one-stage recipe (`inputs: {checkpoint: artifact:<id>}`) through the pipeline, so the export is
cached by its stage key, audited, hashed and signed like every artifact a recipe makes.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from lmloom.cli.common import current_access, err, human_size, open_store, out, requires


class Format(str, Enum):
    hf = "hf"
    gguf = "gguf"
    onnx = "onnx"


class Quantize(str, Enum):
    none = "none"
    int8 = "int8"


@requires("export")
def export(
    fmt: Annotated[Format, typer.Argument(metavar="FORMAT", help="hf, gguf or onnx.")],
    artifact: Annotated[str, typer.Argument(help="Checkpoint artifact id (a unique prefix is enough).")],
    quantize: Annotated[
        Quantize | None, typer.Option("--quantize", help="onnx: also write an int8 dynamic-quantised model.")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="hf: float32|float16|bfloat16; gguf: f32|f16.")
    ] = None,
    shards: Annotated[
        str | None,
        typer.Option(
            "--shards", help="onnx: token shards artifact for the validation loss [default: lineage]."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Any other stage config value KEY=VALUE (YAML value). Repeatable."),
    ] = None,
    override_gates: Annotated[
        bool,
        typer.Option(
            "--override-gates",
            help="Export a checkpoint that has not passed the store's release gates (audited).",
        ),
    ] = False,
) -> None:
    """Export a checkpoint for deployment: a Hugging Face directory, a GGUF file or an ONNX graph with
    explicit past key/values (optionally int8). The result is a signed, verified artifact."""
    import yaml

    from lmloom.config import Recipe
    from lmloom.context import RunContext
    from lmloom.errors import ConfigError
    from lmloom.pipeline import ARTIFACT_REF, plan, run_plan

    config: dict = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            config[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:  # as `lmloom run --set`: not YAML, so the text itself (the config checks it)
            config[key.strip()] = value
    if quantize is not None:
        if fmt is not Format.onnx:
            raise ConfigError("--quantize applies to onnx exports only")
        config["quantize"] = quantize.value
    if dtype is not None:
        if fmt is Format.onnx:
            raise ConfigError(
                "--dtype applies to hf and gguf exports (onnx is float32, or int8 with --quantize)"
            )
        config["dtype"] = dtype
    store = open_store()
    from lmloom.evaluate.gates import check_release_gates

    check_release_gates(store, artifact, override_gates, current_access().principal, action="export")
    inputs = {"checkpoint": ARTIFACT_REF + store.resolve(artifact)}
    if shards is not None:
        if fmt is not Format.onnx:
            raise ConfigError("--shards applies to onnx exports only")
        inputs["shards"] = ARTIFACT_REF + store.resolve(shards)
    recipe = Recipe.model_validate(
        {
            "name": f"export-{fmt.value}",
            "description": f"export {artifact} as {fmt.value}",
            "stages": {fmt.value: {"stage": f"export.{fmt.value}", "inputs": inputs, "config": config}},
        }
    )
    steps = plan(recipe)
    ctx = RunContext(store, console=err, access=current_access())
    [result] = run_plan(steps, ctx)
    made = result.artifact
    status = "reused" if result.reused else "made"
    size = sum(entry.size for entry in made.manifest.files.values())
    out.print(
        f"{made.kind} {made.id} ({status}, {len(made.manifest.files)} files, {human_size(size)})",
        highlight=False,
    )
    for label, value in result.stage.summarize(made.manifest):
        out.print(f"  {label}: {value}", highlight=False)
    if made.manifest.metadata.get("comparison"):
        from lmloom.export.onnx_stage import comparison_lines

        for line in comparison_lines(made.manifest.metadata["comparison"]):
            out.print("  " + line, highlight=False, markup=False)
