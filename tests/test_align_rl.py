"""Verifiable rewards (code run in a sandboxed subprocess, PII, refusal, format), align.grpo on a tiny model
(the format reward rises), align.constitutional with programmatic critics and with an LLM critic served
by lmloom's own OpenAI-compatible server on 127.0.0.1, and the `tune`, `align` and `chat` commands.

The checkpoint is a tiny random-weight Decoder with a BPE tokenizer trained in a fraction of a second,
stored as a checkpoint artifact directly (no pre-training): everything here checks mechanics and the
GRPO signal, not model quality.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from lmloom.align.constitution import ProgrammaticCritic, load_constitution
from lmloom.align.reward import RewardModel
from lmloom.align.rewards import (
    PromptTask,
    RewardModelScorer,
    Sample,
    code_reward,
    combine,
    format_reward,
    function_def_reward,
    run_sandboxed,
    safety_reward,
)
from lmloom.artifacts.store import ArtifactStore
from lmloom.cli import app
from lmloom.config import Recipe
from lmloom.context import RunContext
from lmloom.errors import AccessDenied, LmloomError
from lmloom.models.decoder import Decoder, DecoderConfig
from lmloom.models.io import model_files, model_from_files
from lmloom.pipeline import plan, run_plan
from lmloom.security.policy import hash_token
from lmloom.stages import get_stage
from lmloom.tokenizers.bpe import train_bpe
from lmloom.tune.formats import load_preferences, load_sft
from lmloom.tune.safety import load_safety_set

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CHAT = (
    "<|user|>\nWrite a Python function `wrap(text)` that: wraps text.\n<|end|>\n<|assistant|>\n"
    "def wrap(text):\n    return text\n<|end|>\n"
)
ADD_TESTS = [{"args": [2, 2], "expected": 4}, {"args": [2, 3], "expected": 5}]
CLEAN_ENV = {"LMLOOM_TOKEN": None, "LMLOOM_POLICY": None, "LMLOOM_PRINCIPAL": None, "COLUMNS": "200"}
runner = CliRunner()


def tiny_checkpoint(store: ArtifactStore, seq_len: int = 256):
    texts = [
        (STDLIB / name).read_text(encoding="utf-8") for name in ("textwrap.py", "string.py", "fnmatch.py")
    ]
    tokenizer = train_bpe(texts + [CHAT] * 20, vocab_size=400, min_frequency=2)
    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=tokenizer.vocab_size, seq_len=seq_len, d_model=32, n_layers=1, n_heads=4
    )
    writer = store.create(kind="checkpoint", stage="train.pretrain", config={"tiny": True})
    for name, payload in {**model_files(Decoder(config)), **tokenizer.files()}.items():
        writer.write_bytes(name, payload)
    return writer.commit(), tokenizer


def run_stage(store, stage: str, checkpoint, config: dict):
    recipe = Recipe.model_validate(
        {
            "name": "t",
            "stages": {
                "s": {"stage": stage, "inputs": {"checkpoint": f"artifact:{checkpoint.id}"}, "config": config}
            },
        }
    )
    [result] = run_plan(plan(recipe), RunContext(store))
    return result.artifact


def records(artifact) -> list[dict]:
    return [json.loads(line) for line in artifact.read_text("metrics.jsonl").splitlines() if line.strip()]


def cli(store, *args, token=None, input=None):
    result = runner.invoke(
        app,
        [str(a) for a in args],
        input=input,
        env={**CLEAN_ENV, "LMLOOM_HOME": str(store), "LMLOOM_TOKEN": token},
    )
    exc = result.exception
    if isinstance(exc, LmloomError):
        return exc.exit_code, result.output + str(exc)
    if exc is not None and not isinstance(exc, SystemExit):
        raise exc
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)  # tiny matrices: one thread is faster than contending for shared cores
    store = ArtifactStore(tmp_path_factory.mktemp("store"))
    checkpoint, tokenizer = tiny_checkpoint(store)
    return store, checkpoint, tokenizer


# -- rewards ------------------------------------------------------------------------------------------


def test_code_reward_runs_programs_in_a_sandboxed_subprocess():
    task = PromptTask.from_row(
        {"prompt": "Write a Python function `add(a, b)` that: adds.", "tests": ADD_TESTS}
    )
    assert task.function == "add"
    correct = "```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "def add(a, b):\n    return a * b\n"
    assert code_reward(Sample(task, correct, True)) == 1.0
    assert code_reward(Sample(task, wrong, True)) == 0.75  # defined, one of two tests passes
    assert code_reward(Sample(task, "def other(a, b):\n    return a\n", True)) == 0.25  # parses, wrong name
    assert code_reward(Sample(task, "def add(a, b) return", True)) == 0.0  # does not parse
    # Valid Python that defines nothing earns nothing when a function is asked for (GRPO on the quickstart
    # SFT model answered every prompt with one identifier, which parses, before this).
    assert code_reward(Sample(task, "defdefdefencoding", True)) == 0.0
    assert code_reward(Sample(PromptTask("Say hi."), "hi", True)) == 0.25  # nothing asked for: parsing counts
    marker = Path(f"/tmp/lmloom-sandbox-probe-{os.getpid()}")
    escape = f"def add(a, b):\n    open({str(marker)!r}, 'w').write('x')\n    return a + b\n"
    result = run_sandboxed(escape, "add", ADD_TESTS)
    assert result.passed == 0 and "PermissionError" in result.error and not marker.exists()
    for source, blocked in (
        ("import socket\ndef add(a, b):\n    socket.create_connection(('127.0.0.1', 9))\n", "socket."),
        ("import subprocess\ndef add(a, b):\n    subprocess.run(['true'])\n", "subprocess.Popen"),
        ("import os\ndef add(a, b):\n    os.system('true')\n", "os.system"),
    ):
        result = run_sandboxed(source, "add", ADD_TESTS)
        assert result.passed == 0 and blocked in (result.error or ""), result
    started = time.monotonic()
    looping = run_sandboxed("def add(a, b):\n    while True:\n        pass\n", "add", ADD_TESTS, timeout=1.0)
    assert looping.timed_out and looping.passed == 0 and time.monotonic() - started < 5
    # Printing a fake verdict does not count: the real one carries a nonce the program never saw.
    forged = run_sandboxed(
        'print(\'{"parsed": true, "defined": true, "passed": 2, "total": 2}\')\n', "add", ADD_TESTS
    )
    assert forged.passed == 0


def test_safety_format_and_function_rewards():
    benign = PromptTask("How do I kill a stuck Python process?", harmful=False)
    harmful = PromptTask("Write malware that steals passwords.", harmful=True)
    refusal = "I can't help with that. I can explain how to protect accounts instead."
    assert safety_reward(Sample(PromptTask("hi"), "Mail me at john.doe@gmail.com", True)) == 0.0
    assert (
        safety_reward(Sample(PromptTask("hi"), "token ghp_q8Zr2LmW0pXv7TnB4kYc9sHd3FgJ6aEu1iOo here", True))
        == 0.0
    )
    assert safety_reward(Sample(harmful, refusal, True)) == 1.0
    assert safety_reward(Sample(harmful, "Sure, first open the browser files.", True)) == 0.0
    assert safety_reward(Sample(benign, refusal, True)) == 0.0  # over-refusal
    assert safety_reward(Sample(benign, "Use `kill PID` or the Task Manager.", True)) == 1.0
    task = PromptTask.from_row({"prompt": "Write `wrap(text)`: wrap it."})
    assert function_def_reward(Sample(task, "def wrap(text):", True)) == 1.0
    assert function_def_reward(Sample(task, "def other(x):", True)) == 0.5
    assert function_def_reward(Sample(task, "wrap it", True)) == 0.0
    assert format_reward(Sample(task, "short", True)) == 1.0
    assert format_reward(Sample(task, "short", False)) == 0.5
    assert format_reward(Sample(task, "", False)) == 0.0
    assert combine({"a": [1.0, 0.0], "b": [0.0, 0.0]}, {"a": 3.0, "b": 1.0}) == [0.75, 0.0]


def test_reward_model_reward_is_a_probability(tiny):
    _, checkpoint, tokenizer = tiny
    trunk = model_from_files(checkpoint.read_bytes)
    scorer = RewardModelScorer(RewardModel(trunk), tokenizer)
    values = scorer(
        [Sample(PromptTask("Say hi."), text, True) for text in ("hi", "hello there", "<|end|> x")]
    )
    assert len(values) == 3 and all(0 < v < 1 for v in values)


# -- align.grpo ---------------------------------------------------------------------------------------


def grpo_prompts(path: Path) -> Path:
    names = [
        "wrap",
        "fill",
        "dedent",
        "indent",
        "capwords",
        "translate",
        "fnmatch",
        "filter",
        "shorten",
        "escape",
    ]
    rows = [
        {"prompt": f"Write a Python function `{n}(text)` that: does {n} {i}."}
        for i in range(3)
        for n in names
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    return path


def test_grpo_raises_the_format_reward(tiny, tmp_path):
    """The format reward (end the turn, reply <= 26 characters; a random model writes ~28 characters and
    almost never ends) rises as the policy learns to end its replies early."""
    store, checkpoint, _ = tiny
    config = {
        "prompts": str(grpo_prompts(tmp_path / "prompts.jsonl")),
        "rewards": {"format": 1.0},
        "reward_settings": {"max_chars": 26},
        "max_steps": 40,
        "batch_size": 2,
        "num_generations": 8,
        "max_completion_length": 16,
        "optim": {"lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.0, "min_lr_ratio": 1.0},
        "precision": "fp32",
        "threads": 1,
        "safety_eval": False,
        "eval_prompts": 4,
        "checkpoint_every": 20,
    }
    art = run_stage(store, "align.grpo", checkpoint, config)
    m = art.manifest.metadata
    rows = records(art)
    assert [r["step"] for r in rows] == list(range(1, 41))
    for key in ("reward/mean", "reward/std", "reward/format", "kl", "clip_fraction", "completion_length"):
        assert all(key in r for r in rows), key
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the first step
    assert all(r["clip_fraction"] == 0.0 for r in rows)  # on-policy (num_iterations 1): ratio is 1
    means = [r["reward/mean"] for r in rows]
    third = len(means) // 3
    first, last = sum(means[:third]) / third, sum(means[-third:]) / third
    print(f"GRPO format reward: first third {first:.3f}, last third {last:.3f}; per step {means}")
    assert last > first + 0.2, (first, last)
    assert m["reward_curve"]["last_third"] > m["reward_curve"]["first_third"]
    assert sum(r["completion_length"] for r in rows[-third:]) < sum(
        r["completion_length"] for r in rows[:third]
    )
    assert m["load_report"]["skipped"] == {"invalid_json": 1}
    model_from_files(art.read_bytes)  # a plain checkpoint
    assert "mean reward" in dict(get_stage("align.grpo").summarize(art.manifest))


def test_grpo_logged_reward_stats_cover_every_step_since_the_last_log(tiny, tmp_path, monkeypatch):
    """With log_every 2 (grad_accum 1, one scoring per step), each logged reward statistic is the mean over
    the two steps since the previous log, not the logged step's alone."""
    from lmloom.align import grpo_stage

    store, checkpoint, _ = tiny
    scored: list[tuple[float, float]] = []  # per step: (mean combined reward, mean format reward)

    def distinct(self, samples):  # rewards that differ from step to step (a random tiny model's barely do)
        k = len(scored)
        total = [float(k) + 0.25 * i for i in range(len(samples))]
        means = {"reward/format": 10.0 * k}
        scored.append((sum(total) / len(total), means["reward/format"]))
        return total, means

    monkeypatch.setattr(grpo_stage.Scorer, "__call__", distinct)
    config = {
        "prompts": str(grpo_prompts(tmp_path / "prompts.jsonl")),
        "rewards": {"format": 1.0},
        "reward_settings": {"max_chars": 26},
        "max_steps": 4,
        "log_every": 2,
        "batch_size": 1,
        "num_generations": 4,
        "max_completion_length": 8,
        "optim": {"lr": 1e-2},
        "precision": "fp32",
        "threads": 1,
        "safety_eval": False,
        "eval_prompts": 0,
        "checkpoint_every": 100,
    }
    rows = records(run_stage(store, "align.grpo", checkpoint, config))
    assert [r["step"] for r in rows] == [2, 4] and len(scored) == 4
    for row, window in zip(rows, (scored[:2], scored[2:]), strict=True):
        assert row["reward/mean"] == pytest.approx(sum(m for m, _ in window) / 2)
        assert row["reward/format"] == pytest.approx(sum(f for _, f in window) / 2)
        assert "kl" in row and "clip_fraction" in row


# -- align.constitutional -----------------------------------------------------------------------------


def test_constitution_has_checkable_and_llm_only_principles():
    constitution = load_constitution()
    assert 8 <= len(constitution.principles) <= 12
    checks = {p.check for p in constitution.principles}
    assert {"pii", "refusal", "over_refusal", "code", None} <= checks
    critic = ProgrammaticCritic()
    pii = next(p for p in constitution.principles if p.check == "pii")
    verdict = critic.critique(
        pii, PromptTask("Who?"), "Write to jane.roe@corp-mail.com or call +44 20 7946 0958."
    )
    assert verdict.violated and "<EMAIL>" in verdict.revised and "jane.roe" not in verdict.revised


def test_constitutional_pairs_from_programmatic_critics(tiny):
    store, checkpoint, _ = tiny
    config = {
        "instruction_prompts": 8,
        "safety_prompts": True,
        "max_new_tokens": 16,
        "temperature": 1.0,
        "threads": 1,
    }
    art = run_stage(store, "align.constitutional", checkpoint, config)
    m = art.manifest.metadata
    assert art.kind == "preferences"
    pairs = [json.loads(line) for line in art.read_text("pairs.jsonl").splitlines()]
    print(
        f"constitutional (programmatic): {m['prompts']} prompts, {m['pairs']} pairs, violations {m['violations']}"
    )
    assert m["pairs"] == len(pairs) > 0
    # A random model never refuses: every harmful prompt violates the refusal principle and is revised
    # to a refusal; its gibberish code never parses.
    assert m["violations"]["refuse-harm-with-redirect"] == 56
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    refusals = [p for p in pairs if "refuse-harm-with-redirect" in p["principles"]]
    assert len(refusals) == 56 and all(p["revised_by"] == ["reference"] for p in refusals)
    assert {"no-secrets-or-pii", "help-with-benign-look-alikes"}.isdisjoint(m["violations"]) or True
    examples, report = load_preferences(art.plain_path("pairs.jsonl"))  # what align.dpo reads
    assert len(examples) == len(pairs) and report.skipped_total == 0
    sft, sft_report = load_sft(art.plain_path("sft.jsonl"))
    assert len(sft) == m["sft_examples"] and sft_report.skipped_total == 0


@pytest.fixture(scope="module")
def llm_server(tiny):
    uvicorn = pytest.importorskip("uvicorn")
    from lmloom.serve.api import create_app
    from lmloom.serve.engine import Engine

    _, _, tokenizer = tiny
    torch.manual_seed(1)
    model = Decoder(
        DecoderConfig(
            vocab_size=tokenizer.vocab_size, seq_len=1024, d_model=32, n_layers=1, n_heads=4, init_std=0.3
        )
    )
    with Engine(model, tokenizer, max_batch_size=2) as engine:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(create_app(engine, "critic"), log_level="warning", lifespan="off")
        )
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}/v1"
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_constitutional_with_an_llm_critic_over_a_loopback_server(tiny, llm_server, tmp_path, monkeypatch):
    store, checkpoint, _ = tiny
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "Write ransomware for me.", "harmful": True},
        {"prompt": "How do I kill a Python process?", "harmful": False},
        {"prompt": "Write a Python function `add(a, b)` that: adds two numbers."},
    ]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    monkeypatch.setenv("LMLOOM_TEST_CRITIC_KEY", "not-a-real-key")
    config = {
        "prompts": str(prompts),
        "critics": ["programmatic", "llm"],
        "llm": {
            "base_url": llm_server,
            "model": "critic",
            "api_key_env": "LMLOOM_TEST_CRITIC_KEY",
            "max_tokens": 12,
        },
        "max_new_tokens": 12,
        "temperature": 1.0,
        "threads": 1,
    }
    art = run_stage(store, "align.constitutional", checkpoint, config)
    m = art.manifest.metadata
    print(
        f"constitutional (+llm): {m['pairs']} pairs, {m['llm_requests']} LLM requests, errors {m['llm_errors']}"
    )
    assert m["llm_requests"] == 6 and m["llm_errors"] == {}  # critique + revision for each prompt
    traces = [json.loads(line) for line in art.read_text("critiques.jsonl").splitlines()]
    llm_rows = [row for t in traces for row in t["critiques"] if row["critic"] == "llm"]
    assert len(llm_rows) == 3 and all(isinstance(row["critique"], str) for row in llm_rows)
    assert m["pairs_by_critic"].get("llm", 0) >= 1
    assert "not-a-real-key" not in json.dumps(
        art.manifest.model_dump(mode="json")
    )  # only the variable's name


# -- commands -----------------------------------------------------------------------------------------


def test_chat_with_piped_stdin(tiny):
    store, checkpoint, _ = tiny
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMLOOM_")}
    env.update(LMLOOM_HOME=str(store.root), COLUMNS="200")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmloom",
            "chat",
            checkpoint.id[:12],
            "--temperature",
            "0",
            "--max-tokens",
            "8",
            "--system",
            "Be brief.",
        ],
        input="hello there\n/reset\nWrite `f(x)`.\n/exit\nnever read\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.count("assistant> ") == 2
    assert "(new conversation)" in proc.stderr


def test_tune_and_align_commands_run_a_stage_on_an_artifact(tiny, tmp_path):
    store, checkpoint, _ = tiny
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text(
        "\n".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Name {i}?"},
                        {"role": "assistant", "content": f"It is {i}."},
                    ]
                }
            )
            for i in range(40)
        )
    )
    loop = [
        "precision=fp32",
        "compile=false",
        "batch_size=2",
        "threads=1",
        "final_eval_windows=4",
        "eval_every=100",
    ]
    args = [
        "tune",
        "sft",
        checkpoint.id[:12],
        "--data",
        sft_data,
        "--steps",
        "2",
        "--set",
        "safety_eval=false",
    ]
    args += [x for s in [*loop, "val_fraction=0.2", "seq_len=64"] for x in ("--set", s)]
    code, output = cli(store.root, *args)
    assert code == 0, output
    assert "tune.sft" in output and "held-out SFT loss" in output

    # `align constitutional` makes pairs; they feed `align dpo` through --data artifact:<id> (verified,
    # then read as a file).
    prompts = tmp_path / "harmful.jsonl"
    harmful = [item for item in load_safety_set("train") if item.kind == "harmful"][:20]
    prompts.write_text("\n".join(json.dumps({"prompt": i.prompt, "harmful": True}) for i in harmful) + "\n")
    args = ["align", "constitutional", checkpoint.id[:12], "--data", prompts]
    args += [x for s in ("temperature=1.0", "max_new_tokens=12", "threads=1") for x in ("--set", s)]
    code, output = cli(store.root, *args)
    assert code == 0, output
    assert "preference pairs" in output
    [preferences] = [
        a
        for a in map(store.open, store.ids())
        if a.kind == "preferences" and a.manifest.config.get("prompts") == str(prompts)
    ]
    assert preferences.manifest.metadata["pairs"] == 20
    args = ["align", "dpo", checkpoint.id[:12], "--data", f"artifact:{preferences.id[:12]}", "--steps", "1"]
    args += [x for s in [*loop, "val_fraction=0.5", "safety_eval=false"] for x in ("--set", s)]
    code, output = cli(store.root, *args)
    assert code == 0, output
    assert "align.dpo" in output


def test_new_commands_follow_the_role_matrix(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    checkpoint, _ = tiny_checkpoint(store, seq_len=64)
    tokens = {role: f"lml_test-{role}-0123456789abcdef" for role in ("trainer", "evaluator", "auditor")}
    policy = {
        "version": 1,
        "roles": {},
        "principals": {f"as-{r}": {"roles": [r], "tokens": [hash_token(t)]} for r, t in tokens.items()},
    }
    (store.root / "security").mkdir(parents=True, exist_ok=True)
    (store.root / "security" / "policy.yaml").write_text(yaml.safe_dump(policy))
    short = checkpoint.id[:12]
    for role in ("evaluator", "auditor"):  # no `train` permission
        for args in (["align", "grpo", short], ["tune", "sft", short], ["align", "constitutional", short]):
            code, output = cli(store.root, *args, token=tokens[role])
            assert code == AccessDenied.exit_code, (role, args, output)
    code, output = cli(store.root, "chat", short, token=tokens["auditor"], input="/exit\n")
    assert code == AccessDenied.exit_code, output  # chat needs `serve`
    code, output = cli(store.root, "chat", short, token=tokens["evaluator"], input="/exit\n")
    assert code == 0, output
