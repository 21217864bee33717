"""`align.constitutional`: AI-labelled preference pairs by critique-and-revise against a constitution.

For each prompt (the standard-library "write a function" instructions and the safety set's harmful and
benign prompts, or a prompts JSONL like `align.grpo`'s) the input model answers (chat template, greedy
or seeded sampling). Then:

1. the programmatic critic checks every applicable principle that has a checkable form, in
   constitution order, each on the answer as revised so far (PII/secret redaction, refusal of harmful
   prompts, no refusal of benign ones, code that parses and defines the function);
2. with `critics: [..., llm]`, `llm.rounds` times: a principle is drawn (seeded) from those that apply
   and the LLM critic at `llm.base_url` writes a critique and a revision of the current answer.

When the final answer differs from the original, the prompt gives a pair: chosen = revised, rejected =
original. Output, an artifact of kind `preferences`:

    pairs.jsonl      {"prompt", "chosen", "rejected", "principles", "critics", "revised_by", "id"}: the
                     preference format `align.dpo` / `align.reward` read (`data: PATH`; the CLI resolves
                     `--data artifact:<id>` of a preferences artifact to this file)
    sft.jsonl        {"messages": [user, assistant = revised]} for every revised answer (`tune.sft` data)
    critiques.jsonl  every prompt's original answer, each critique and revision, in order

An LLM critic's endpoint sees the prompts and the answers. Its failures (down, context too long) are
counted per prompt and skipped, never fatal unless every request fails.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from typing import Any, Literal

import torch
from pydantic import Field

from lmloom.align.constitution import (
    Constitution,
    LLMCritic,
    LLMCriticConfig,
    LLMCriticError,
    ProgrammaticCritic,
    constitution_text,
    load_constitution,
)
from lmloom.align.grpo_stage import EncodedTask, encode_tasks, load_prompt_tasks, sample_group
from lmloom.align.rewards import PromptTask
from lmloom.artifacts.manifest import Manifest
from lmloom.config import StrictConfig
from lmloom.errors import ConfigError, DataError, LmloomError
from lmloom.models.io import model_from_files, refuse_adapter_only
from lmloom.stages import Stage
from lmloom.tokenizers.base import EOS_ID
from lmloom.tokenizers.loading import load_tokenizer
from lmloom.tune.chat import escape_markers, reply_text
from lmloom.tune.safety import load_safety_set
from lmloom.tune.stage import BUILTIN, builtin_instructions, data_fingerprint

PAIRS_FILE, SFT_FILE, CRITIQUES_FILE = "pairs.jsonl", "sft.jsonl", "critiques.jsonl"


class ConstitutionalConfig(StrictConfig):
    seed: int = Field(1337, description="seeds the prompt sample, the sampling and the principle draws")
    prompts: str = Field(BUILTIN, description="'builtin' (instructions + safety prompts) or a prompts JSONL")
    instruction_prompts: int = Field(64, ge=0, description="builtin: write-a-function instructions drawn")
    safety_prompts: bool = Field(True, description="builtin: the safety set's train prompts")
    max_prompts: int | None = Field(None, ge=1, description="at most this many prompts in all")
    constitution: str = Field("builtin", description="'builtin' or a constitution YAML file")
    critics: list[Literal["programmatic", "llm"]] = Field(
        default_factory=lambda: ["programmatic"], min_length=1, description="programmatic and/or llm"
    )
    llm: LLMCriticConfig | None = Field(None, description="the OpenAI-compatible endpoint of the llm critic")
    max_new_tokens: int = Field(64, ge=1, description="length of the model's original answers")
    temperature: float = Field(0.0, ge=0, description="0 = greedy answers")
    threads: int | None = Field(None, ge=1)


def constitutional_tasks(config: ConstitutionalConfig) -> tuple[list[PromptTask], str]:
    if config.prompts != BUILTIN:
        tasks, report = load_prompt_tasks(config.prompts)
        source = report.summary().replace("\n", "; ")
    else:
        rng = random.Random(config.seed)
        instructions = [i for i in builtin_instructions().train if i.kind == "write_function"]
        chosen = rng.sample(instructions, min(config.instruction_prompts, len(instructions)))
        tasks = [
            PromptTask.from_row({"prompt": i.prompt, "reference": i.response, "id": i.id}) for i in chosen
        ]
        if config.safety_prompts:
            tasks += [
                PromptTask(s.prompt, harmful=s.kind == "harmful", reference=s.response, id=s.id)
                for s in load_safety_set("train")
            ]
        source = f"builtin: {len(chosen)} instructions" + (
            ", safety train prompts" if config.safety_prompts else ""
        )
    if config.max_prompts is not None:
        tasks = tasks[: config.max_prompts]
    return tasks, source


def critique_and_revise(
    task: PromptTask,
    original: str,
    constitution: Constitution,
    programmatic: ProgrammaticCritic | None,
    llm: LLMCritic | None,
    rounds: int,
    rng: random.Random,
    errors: Counter,
) -> tuple[str, list[dict[str, Any]]]:
    """(the revised answer, the trace of critiques); the answer is unchanged when nothing applied."""
    current = original
    trace: list[dict[str, Any]] = []
    applicable = constitution.applicable(task)
    if programmatic is not None:
        for principle in applicable:
            if not programmatic.can_judge(principle):
                continue
            verdict = programmatic.critique(principle, task, current)
            row = {
                "principle": verdict.principle,
                "critic": verdict.critic,
                "violated": verdict.violated,
                "critique": verdict.reason,
            }
            if verdict.violated and verdict.revised and verdict.revised != current:
                current = verdict.revised
                row.update(revised=current, revised_by=verdict.revised_by)
            trace.append(row)
    if llm is not None and applicable:
        for _ in range(rounds):
            principle = rng.choice(applicable)
            try:
                verdict = llm.critique(principle, task, current)
            except LLMCriticError as exc:
                errors[exc.reason] += 1
                trace.append({"principle": principle.id, "critic": "llm", "error": str(exc)[:300]})
                continue
            row = {"principle": principle.id, "critic": "llm", "critique": verdict.reason}
            if verdict.revised and verdict.revised != current:
                current = verdict.revised
                row.update(revised=current, revised_by="llm")
            trace.append(row)
    return current, trace


def run(config: ConstitutionalConfig, inputs, ctx, out) -> None:
    checkpoint = inputs["checkpoint"]
    if config.threads:
        torch.set_num_threads(config.threads)
    if "llm" in config.critics and config.llm is None:
        raise ConfigError(f"stages.{ctx.step}.config.llm: the llm critic needs llm.base_url and llm.model")
    torch.manual_seed(config.seed)
    constitution = load_constitution(config.constitution)
    tokenizer = load_tokenizer(checkpoint)
    refuse_adapter_only(checkpoint)
    model = model_from_files(checkpoint.read_bytes).eval()
    tasks, source = constitutional_tasks(config)
    skipped: Counter = Counter()
    encoded: list[EncodedTask] = encode_tasks(
        tokenizer, tasks, model.config.seq_len - config.max_new_tokens, skipped
    )
    if not encoded:
        raise DataError(f"stages.{ctx.step}: no prompt fits the model's context ({source}; {dict(skipped)})")
    programmatic = ProgrammaticCritic() if "programmatic" in config.critics else None
    llm = LLMCritic(config.llm) if "llm" in config.critics and config.llm is not None else None
    if llm is not None:
        ctx.log(
            f"LLM critic: {config.llm.model} at {config.llm.base_url} (prompts and answers are sent there)"
        )
    rng = random.Random(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    pairs, sft, traces = [], [], []
    violations: Counter = Counter()
    revised_by: Counter = Counter()
    llm_errors: Counter = Counter()
    try:
        with ctx.progress(len(encoded), "critique and revise") as bar:
            for i, item in enumerate(encoded):
                [(ids, _)] = sample_group(
                    model,
                    tokenizer,
                    item.ids,
                    1,
                    config.max_new_tokens,
                    temperature=config.temperature,
                    generator=generator,
                )
                original = escape_markers(reply_text(tokenizer.decode([t for t in ids if t != EOS_ID]))[0])
                revised, trace = critique_and_revise(
                    item.task,
                    original,
                    constitution,
                    programmatic,
                    llm,
                    config.llm.rounds if config.llm else 0,
                    rng,
                    llm_errors,
                )
                for row in trace:
                    if row.get("violated"):
                        violations[row["principle"]] += 1
                    if "revised_by" in row:
                        revised_by[row["revised_by"]] += 1
                traces.append(
                    {
                        "id": item.task.id,
                        "prompt": item.task.prompt,
                        "original": original,
                        "final": revised,
                        "critiques": trace,
                    }
                )
                changed = [row for row in trace if "revised" in row]
                if revised.strip() and revised != original:
                    sft.append(
                        {
                            "messages": [
                                {"role": "user", "content": item.task.prompt},
                                {"role": "assistant", "content": revised},
                            ],
                            "id": item.task.id,
                        }
                    )
                    if original.strip():
                        pairs.append(
                            {
                                "prompt": item.task.prompt,
                                "chosen": revised,
                                "rejected": original,
                                "principles": [row["principle"] for row in changed],
                                "critics": sorted({row["critic"] for row in changed}),
                                "revised_by": sorted({row["revised_by"] for row in changed}),
                                "id": item.task.id,
                            }
                        )
                    else:
                        skipped["empty_original"] += 1
                bar.update(i + 1)
    finally:
        if llm is not None:
            llm.close()
    if (
        llm is not None
        and llm.requests
        and sum(llm_errors.values()) * 2 >= llm.requests
        and not any("llm" in p["critics"] for p in pairs)
    ):
        raise LmloomError(
            f"every LLM critic request to {config.llm.base_url} failed ({dict(llm_errors)}); see critiques"
        )

    def jsonl(rows: list[dict]) -> bytes:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()

    out.write_bytes(PAIRS_FILE, jsonl(pairs))
    out.write_bytes(SFT_FILE, jsonl(sft))
    out.write_bytes(CRITIQUES_FILE, jsonl(traces))
    out.metadata.update(
        prompts=len(encoded),
        source=source,
        prompts_skipped=dict(sorted(skipped.items())),
        pairs=len(pairs),
        sft_examples=len(sft),
        violations=dict(sorted(violations.items())),
        revised_by=dict(sorted(revised_by.items())),
        pairs_by_critic=dict(sorted(Counter(c for p in pairs for c in p["critics"]).items())),
        llm_requests=llm.requests if llm is not None else 0,
        llm_errors=dict(sorted(llm_errors.items())),
        critics=list(config.critics),
        llm_endpoint={"base_url": config.llm.base_url, "model": config.llm.model}
        if llm is not None
        else None,
        constitution=[p.id for p in constitution.principles],
        answered_by=checkpoint.id,
        files={"pairs": PAIRS_FILE, "sft": SFT_FILE, "critiques": CRITIQUES_FILE},
    )
    ctx.log(
        f"done: {len(pairs)} preference pairs from {len(encoded)} prompts; violations "
        + (", ".join(f"{k} {v}" for k, v in sorted(violations.items())) or "none")
    )


def summary(manifest: Manifest) -> list[tuple[str, str]]:
    m = manifest.metadata
    rows = [
        ("answered by", f"{m['answered_by'][:12]}; critics: {', '.join(m['critics'])}"),
        ("prompts", f"{m['prompts']:,} ({m['source']})"),
        ("violations found", ", ".join(f"{k} {v}" for k, v in m["violations"].items()) or "none"),
        (
            "preference pairs",
            f"{m['pairs']:,} (revised by "
            + (", ".join(f"{k} {v}" for k, v in m["revised_by"].items()) or "-")
            + ")",
        ),
        ("SFT examples", f"{m['sft_examples']:,} revised answers in {SFT_FILE}"),
    ]
    if m.get("llm_endpoint"):
        errors = ", ".join(f"{k} {v}" for k, v in m["llm_errors"].items()) or "none"
        rows.append(
            (
                "LLM critic",
                f"{m['llm_requests']} requests to {m['llm_endpoint']['base_url']}; errors {errors}",
            )
        )
    return rows


CONSTITUTIONAL = Stage(
    name="align.constitutional",
    kind="preferences",
    config=ConstitutionalConfig,
    run=run,
    inputs={"checkpoint": "checkpoint"},
    permissions=("train",),
    summary=summary,
    fingerprint=lambda config: [
        data_fingerprint(config.prompts),
        hashlib.sha256(constitution_text(config.constitution)[0].encode()).hexdigest(),
    ],
    description="critique-and-revise against a constitution (programmatic and LLM critics) -> preference pairs",
)
