"""`lmloom tune sft|lora|prefix`, `lmloom align reward|dpo|grpo|constitutional` and `lmloom chat`.

The tune and align commands run one stage on an existing checkpoint artifact: they build a one-stage
recipe with `inputs: {checkpoint: "artifact:<id>"}` and run it exactly as `lmloom run` runs a recipe
(the stage's permission is checked before it starts, finished runs are reused by stage key, an
interrupted one resumes, everything is audited), then print the same summary.

`--data artifact:<id>` may name a `preferences` artifact of `align.constitutional`: preference stages
read its `pairs.jsonl`, `tune sft` its `sft.jsonl` (the artifact is opened, so its hashes are verified
first; an encrypted one cannot be passed as a path and is refused).
"""

from __future__ import annotations

from typing import Annotated

import typer

from lmloom.cli.common import current_access, err, open_store, out, requires
from lmloom.errors import ConfigError, LmloomError

tune_app = typer.Typer(
    help="Fine-tune a checkpoint artifact: full SFT, LoRA or prefix tuning (one stage of `lmloom run`).",
    no_args_is_help=True,
)
align_app = typer.Typer(
    help="Align a checkpoint artifact: reward model, DPO, GRPO, constitutional critique-and-revise.",
    no_args_is_help=True,
)

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="A stage config value KEY=VALUE (e.g. optim.lr=1e-4, batch_size=8); YAML values. Repeatable.",
    ),
]
DataOption = Annotated[
    str | None,
    typer.Option("--data", help="'builtin', a data file, or artifact:ID of a preferences artifact."),
]
StepsOption = Annotated[int | None, typer.Option("--steps", min=1, help="Optimizer steps (max_steps).")]
CheckpointArg = Annotated[str, typer.Argument(help="Checkpoint artifact id (a unique prefix is enough).")]

_DATA_FILE = {"tune.sft": "sft.jsonl"}  # a preferences artifact's file each stage reads; default pairs


def _resolve_data(store, stage: str, data: str) -> str:
    if not data.startswith("artifact:"):
        return data
    artifact = store.open(data[len("artifact:") :])  # verified
    if artifact.kind != "preferences":
        raise ConfigError(
            f"--data {data}: artifact {artifact.short_id} is a {artifact.kind}, not preferences"
        )
    name = _DATA_FILE.get(stage, "pairs.jsonl")
    path = artifact.plain_path(name)
    if path is None:
        raise ConfigError(f"--data {data}: {name} is encrypted at rest and cannot be read as a file path")
    return str(path)


def run_one_stage(
    stage: str,
    checkpoint: str,
    *,
    config: dict | None = None,
    overrides: list[str] | None = None,
    data: str | None = None,
    steps: int | None = None,
    extra_inputs: dict[str, str] | None = None,
) -> None:
    """Run `stage` on the checkpoint artifact as a one-step recipe, like `lmloom run`, and print its summary."""
    from lmloom.cli.run import _print_run_summary
    from lmloom.config import Recipe, apply_override, format_validation_error
    from lmloom.context import RunContext
    from lmloom.pipeline import plan, run_plan

    store = open_store()
    step = stage.split(".")[-1]
    inputs = {"checkpoint": f"artifact:{store.resolve(checkpoint)}"}
    for role, ref in (extra_inputs or {}).items():
        inputs[role] = f"artifact:{store.resolve(ref)}"
    stage_config = dict(config or {})
    if data is not None:
        key = "prompts" if stage in ("align.grpo", "align.constitutional") else "data"
        stage_config[key] = _resolve_data(store, stage, data)
    if steps is not None:
        stage_config["max_steps"] = steps
    raw = {
        "name": f"{stage}-on-{checkpoint[:12]}",
        "description": f"{stage} on artifact {checkpoint}",
        "stages": {step: {"stage": stage, "inputs": inputs, "config": stage_config}},
    }
    for override in overrides or []:
        key, sep, value = override.partition("=")
        top = key.split(".")[0]
        apply_override(raw, override if top in Recipe.model_fields else f"{step}.{key}{sep}{value}")
    try:
        from pydantic import ValidationError

        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "", Recipe)) from None
    steps_planned = plan(recipe)
    ctx = RunContext(store, console=err, access=current_access())
    err.print(f"[bold]lmloom {stage.replace('.', ' ')}[/bold] on {checkpoint}", highlight=False)
    try:
        results = run_plan(steps_planned, ctx)
    except KeyboardInterrupt:
        err.print("\n[yellow]interrupted[/yellow]: run the same command again to resume where it stopped")
        raise typer.Exit(130) from None
    _print_run_summary(results, store.root)


def _tune(method: str):
    @requires()  # identify the principal; the stage checks its own permission (train) before it runs
    def command(
        checkpoint: CheckpointArg,
        data: DataOption = None,
        steps: StepsOption = None,
        set_: SetOption = None,
    ) -> None:
        run_one_stage(
            "tune.sft",
            checkpoint,
            config={"method": {"sft": "full"}.get(method, method)},
            data=data,
            steps=steps,
            overrides=set_,
        )

    command.__name__ = f"tune_{method}"
    command.__doc__ = {
        "sft": "Supervised fine-tuning of every weight on chat data (tune.sft, method full).",
        "lora": "LoRA fine-tuning, merged into the saved weights (tune.sft, method lora).",
        "prefix": "Prefix tuning; the prefix is stored as PEFT adapter files (tune.sft, method prefix).",
    }[method]
    return command


for _method in ("sft", "lora", "prefix"):
    tune_app.command(_method)(_tune(_method))


def _align(name: str, stage: str, doc: str):
    if name == "grpo":

        @requires()
        def command(
            checkpoint: CheckpointArg,
            data: Annotated[
                str | None,
                typer.Option("--data", help="'builtin' or a prompts JSONL (prompt, function, tests)."),
            ] = None,
            steps: StepsOption = None,
            reward_model: Annotated[
                str | None, typer.Option("--reward-model", help="An align.reward artifact to score with too.")
            ] = None,
            set_: SetOption = None,
        ) -> None:
            extra = {"reward_model": reward_model} if reward_model else None
            run_one_stage(stage, checkpoint, data=data, steps=steps, overrides=set_, extra_inputs=extra)

    elif name == "constitutional":

        @requires()
        def command(
            checkpoint: CheckpointArg,
            data: Annotated[str | None, typer.Option("--data", help="'builtin' or a prompts JSONL.")] = None,
            llm_base_url: Annotated[
                str | None, typer.Option("--llm-base-url", help="Add an OpenAI-compatible LLM critic.")
            ] = None,
            llm_model: Annotated[str | None, typer.Option("--llm-model", help="Its model name.")] = None,
            llm_api_key_env: Annotated[
                str | None,
                typer.Option("--llm-api-key-env", help="Environment variable holding its API key."),
            ] = None,
            set_: SetOption = None,
        ) -> None:
            config: dict = {}
            if llm_base_url:
                if not llm_model:
                    raise ConfigError("--llm-base-url needs --llm-model")
                config["critics"] = ["programmatic", "llm"]
                config["llm"] = {"base_url": llm_base_url, "model": llm_model, "api_key_env": llm_api_key_env}
            run_one_stage(stage, checkpoint, config=config, data=data, overrides=set_)

    else:

        @requires()
        def command(
            checkpoint: CheckpointArg,
            data: DataOption = None,
            steps: StepsOption = None,
            set_: SetOption = None,
        ) -> None:
            run_one_stage(stage, checkpoint, data=data, steps=steps, overrides=set_)

    command.__name__ = f"align_{name}"
    command.__doc__ = doc
    return command


for _name, _stage, _doc in (
    ("reward", "align.reward", "Train a Bradley-Terry reward model on preference pairs (align.reward)."),
    (
        "dpo",
        "align.dpo",
        "Preference-tune with DPO / IPO / hinge / robust against the frozen input (align.dpo).",
    ),
    (
        "grpo",
        "align.grpo",
        "GRPO against verifiable rewards: sandboxed code tests, safety, format (align.grpo).",
    ),
    (
        "constitutional",
        "align.constitutional",
        "Critique-and-revise against the constitution -> preference pairs + SFT data (align.constitutional).",
    ),
):
    align_app.command(_name)(_align(_name, _stage, _doc))


# -- lmloom chat -------------------------------------------------------------------------------------


@requires("serve")
def chat(
    checkpoint: CheckpointArg,
    system: Annotated[
        str | None, typer.Option("--system", help="A system message for the conversation.")
    ] = None,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy decoding.")] = 0.7,
    max_tokens: Annotated[int, typer.Option(min=1, help="Maximum new tokens per reply.")] = 256,
    top_p: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = 0.95,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
) -> None:
    """Chat with a checkpoint in the terminal: one line per message, replies streamed.

    `/reset` starts a new conversation, `/exit` (or end of input) leaves. Reads stdin, so
    `printf 'hello\\n/exit\\n' | lmloom chat ID` works too. Older turns are dropped when the
    conversation outgrows the model's context.
    """
    import sys

    from lmloom.serve.generate import generate_stream
    from lmloom.serve.loading import load_checkpoint_artifact
    from lmloom.tune.chat import END_MARKER, ChatFormatError, encode_prompt, escape_markers

    artifact = open_store().open(checkpoint)
    model, tokenizer = load_checkpoint_artifact(artifact)
    interactive = sys.stdin.isatty()
    seq_len = model.config.seq_len
    head = [{"role": "system", "content": escape_markers(system)}] if system else []
    history: list[dict[str, str]] = []
    err.print(
        f"chatting with {artifact.short_id} (context {seq_len} tokens); /reset starts over, /exit leaves",
        highlight=False,
    )
    turn_seed = seed
    while True:
        if interactive:
            out.print("[bold]you>[/bold] ", end="")
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            err.print("(new conversation)")
            continue
        history.append({"role": "user", "content": escape_markers(text)})
        ids = None
        while history:
            try:
                ids = [tokenizer.eos_id, *encode_prompt(tokenizer, head + history)]
            except ChatFormatError as exc:
                raise LmloomError(f"cannot render the conversation: {exc}") from None
            if len(ids) + 1 <= seq_len:
                break
            ids = None
            history = history[2:] if len(history) > 1 else []  # drop the oldest exchange
        if ids is None:
            err.print(f"[red]that message does not fit in the model's context of {seq_len} tokens[/red]")
            continue
        budget = min(max_tokens, seq_len - len(ids))
        stream = generate_stream(
            model,
            ids,
            max_new_tokens=budget,
            temperature=temperature,
            top_p=top_p,
            seed=turn_seed,
            eos_id=tokenizer.eos_id,
        )
        if turn_seed is not None:
            turn_seed += 1
        out.print("[bold]assistant>[/bold] " if interactive else "assistant> ", end="", highlight=False)
        reply_ids: list[int] = []
        shown = 0
        reply = ""
        for token in stream:
            if token == tokenizer.eos_id:
                break
            reply_ids.append(token)
            decoded = tokenizer.decode(reply_ids)
            cut = decoded.find(END_MARKER)
            if cut >= 0:
                reply = decoded[:cut]
                break
            reply = decoded
            # Hold back what could still become the end marker, and an incomplete character.
            safe = len(decoded)
            for k in range(min(len(END_MARKER), len(decoded)), 0, -1):
                if END_MARKER.startswith(decoded[-k:]):
                    safe = len(decoded) - k
                    break
            if decoded.endswith("\ufffd"):
                safe = min(safe, len(decoded) - 1)
            if safe > shown:
                out.print(decoded[shown:safe], end="", highlight=False, markup=False)
                shown = safe
        reply = reply.rstrip()
        if len(reply) > shown:
            out.print(reply[shown:], end="", highlight=False, markup=False)
        out.print()
        content = escape_markers(reply).strip() or "..."
        history.append({"role": "assistant", "content": content})
