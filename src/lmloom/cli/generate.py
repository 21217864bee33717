"""`lmloom generate`: continue a prompt with a trained checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from lmloom.cli.common import open_store, out, requires
from lmloom.errors import LmloomError

DEFAULT_MAX_TOKENS = 128


@requires("serve")
def generate(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint artifact id (a unique prefix is enough).")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")] = "",
    max_tokens: Annotated[
        int | None,
        typer.Option(min=1, help="Maximum new tokens [default: 128, or what the model's context leaves]."),
    ] = None,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy decoding.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(min=1, help="Keep the k most likely tokens.")] = 50,
    top_p: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = 0.95,
    seed: Annotated[
        int | None, typer.Option(min=-(2**63), max=2**64 - 1, help="Seed for reproducible sampling.")
    ] = None,
) -> None:
    """Continue a prompt with a trained checkpoint (KV-cached decoding), streaming the text."""
    from lmloom.serve.generate import generate_stream
    from lmloom.serve.loading import load_checkpoint_artifact

    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # a byte the terminal's locale could not decode (surrogate-escaped)
        bad = prompt[exc.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"U+{ord(bad):04X}"
        raise typer.BadParameter(
            f"not valid UTF-8 text ({byte} at character {exc.start})", param_hint="--prompt"
        ) from None
    artifact = open_store().open(checkpoint)
    model, tokenizer = load_checkpoint_artifact(artifact)
    # Training joins documents with <|eos|>, so an empty prompt starts from it: "a new document".
    prompt_ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    if max_tokens is None:  # not asked for: as many as fit (an explicit number too large is an error)
        max_tokens = max(1, min(DEFAULT_MAX_TOKENS, model.config.seq_len - len(prompt_ids)))
    try:
        tokens = generate_stream(
            model,
            prompt_ids,
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            eos_id=tokenizer.eos_id,
        )
    except ValueError as exc:  # e.g. prompt + max tokens longer than the model's context
        raise LmloomError(str(exc)) from None
    out.print(prompt, style="bold", end="", highlight=False, markup=False)
    ids: list[int] = []
    shown = ""
    for token in tokens:
        if token == tokenizer.eos_id:
            break
        ids.append(token)
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.print(text[len(shown) :], end="", highlight=False, markup=False)
            shown = text
    out.print()
