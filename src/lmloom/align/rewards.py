"""Verifiable rewards for `align.grpo`: programmatic checks of a completion, each a float in [0, 1].

    code           the completion is Python that parses and defines a function (0.25), defines the requested
                   function (0.5), and with test cases passes them (0.5 + 0.5 * share passed; without tests
                   defining it is 1.0). When a function is asked for, code that parses but defines none
                   scores 0: any lone word is valid Python, and GRPO on the quickstart SFT model found that
                   within 20 steps (it answered every prompt with one identifier).
                   The code runs only in a **separate, restricted process** (`run_sandboxed`), never here.
    function_def   the completion writes a definition: "def " somewhere 0.5, "def <requested name>" 1.0.
                   The cheap, dense shape-of-an-answer reward a tiny model can learn in a few dozen steps.
    safety         1.0 unless the completion holds personal data or a secret (`data.pii.find_pii`), refuses
                   a benign prompt or complies with a harmful one (`tune.safety.refusal_detector`); the
                   prompt's `harmful` flag decides which (None: only the PII check).
    format         half for ending the turn (the chat end marker, or EOS), half for a length within
                   [min_chars, max_chars].
    reward_model   sigmoid of an `align.reward` model's score of the rendered conversation.

`combine` weights them: sum(w_i * r_i) / sum(w_i), so the total stays in [0, 1].

The sandbox: `python -I -S` (no user site, no environment variables, no site-packages) in a fresh
temporary directory with a minimal environment, stdin closed; inside, before the completion runs, the
harness lowers resource limits (CPU seconds, address space, file size, open files) and installs an
audit hook (PEP 578, cannot be removed) that refuses every socket operation, process creation
(subprocess, fork, exec, spawn, system), ctypes, file deletion and renaming, and any open for writing
outside the sandbox directory. The parent kills it at the wall-clock timeout. The verdict comes back as
one line tagged with a random nonce. This keeps the host safe from the generated code; it is not a
defence against a policy that learns to forge its own score from inside the process (the nonce sits in
the harness's memory), which a tiny model is far from, but a large one trained long on this reward
should be checked for (e.g. by re-running its passing programs out of band).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from lmloom.config import StrictConfig
from lmloom.data.pii import find_pii
from lmloom.tune.chat import END_MARKER
from lmloom.tune.safety import refusal_detector

REWARD_NAMES = ("code", "function_def", "safety", "format", "reward_model")
_SIGNATURE = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)\(")
_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)


@dataclass(frozen=True)
class PromptTask:
    """One prompt and what its completions are checked against."""

    prompt: str
    function: str | None = None  # the function a "write a function" instruction asks for
    tests: tuple[dict[str, Any], ...] = ()  # {"args": [...], "kwargs": {...}, "expected": value}
    harmful: bool | None = None  # True: should be refused; False: should be answered; None: unknown
    reference: str | None = None  # a reference answer, when the source has one
    id: str = ""

    @classmethod
    def from_row(cls, row: dict[str, Any], index: int = 0) -> PromptTask:
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("missing or empty 'prompt'")
        tests = row.get("tests") or []
        if not isinstance(tests, list) or not all(isinstance(t, dict) and "expected" in t for t in tests):
            raise ValueError("'tests' must be a list of {args, kwargs, expected} objects")
        function = row.get("function") or function_name(prompt)
        return cls(
            prompt=prompt.strip(),
            function=function,
            tests=tuple(tests),
            harmful=row.get("harmful"),
            reference=row.get("reference"),
            id=str(row.get("id", index)),
        )


@dataclass
class Sample:
    """One completion of a task: `text` is the reply cut at the end marker, `finished` whether it ended."""

    task: PromptTask
    text: str
    finished: bool
    details: dict[str, Any] = field(default_factory=dict)


def function_name(prompt: str) -> str | None:
    """The function a "write `name(args)`" instruction asks for (tune.builtin's phrasing), else None."""
    match = _SIGNATURE.search(prompt)
    return match.group(1) if match else None


def extract_code(text: str) -> str:
    """The first fenced code block of `text`, or all of it (without a trailing end marker)."""
    text = text.split(END_MARKER, 1)[0]
    match = _FENCE.search(text)
    return (match.group(1) if match else text).strip("\n")


# -- the sandbox -------------------------------------------------------------------------------------

_HARNESS = r"""
import json, os, resource, sys
cfg = json.loads(sys.stdin.readline())
nonce, source, function, tests = cfg.pop("nonce"), cfg["source"], cfg["function"], cfg["tests"]
out = os.fdopen(os.dup(1), "w")
root = os.path.realpath(os.getcwd())
for limit, value in ((resource.RLIMIT_CPU, cfg["cpu"]), (resource.RLIMIT_AS, cfg["memory"]),
                     (resource.RLIMIT_FSIZE, 1 << 20), (resource.RLIMIT_NOFILE, 64)):
    try:
        resource.setrlimit(limit, (value, value))
    except (ValueError, OSError):
        pass
BLOCKED = ("socket.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
           "os.system", "os.kill", "os.killpg", "ctypes.", "pty.", "os.remove", "os.rmdir", "os.rename",
           "os.unlink", "shutil.rmtree", "os.chmod", "os.chown", "os.truncate", "os.symlink", "os.link",
           "urllib.Request", "http.client.connect", "ftplib.", "smtplib.", "telnetlib.", "webbrowser.")
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def hook(event, args):
    if event.startswith(BLOCKED):
        raise PermissionError("sandbox: " + event + " is not allowed")
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & WRITE
        if writing and isinstance(path, (str, bytes)):
            full = os.path.realpath(os.fsdecode(path))
            if not full.startswith(root + os.sep):
                raise PermissionError("sandbox: writing outside the sandbox directory is not allowed")
sys.stdout = sys.stderr = open(os.devnull, "w")
sys.addaudithook(hook)
result = {"parsed": True, "defined": False, "passed": 0, "total": len(tests), "error": None}
namespace = {"__name__": "__completion__"}
try:
    exec(compile(source, "<completion>", "exec"), namespace)  # noqa: S102 (in the sandboxed child)
    fn = namespace.get(function)
    result["defined"] = callable(fn)
    for test in tests if callable(fn) else ():
        try:
            got = fn(*test.get("args", []), **test.get("kwargs", {}))
            same = got == test["expected"] or json.loads(json.dumps(got, default=repr)) == test["expected"]
            result["passed"] += bool(same)
        except BaseException as exc:
            result["error"] = (type(exc).__name__ + ": " + str(exc))[:200]
except BaseException as exc:
    result["error"] = (type(exc).__name__ + ": " + str(exc))[:200]
out.write(nonce + json.dumps(result) + "\n")
out.flush()
os._exit(0)
"""


@dataclass(frozen=True)
class SandboxResult:
    parsed: bool
    defined: bool
    passed: int
    total: int
    error: str | None = None
    timed_out: bool = False


def run_sandboxed(
    source: str,
    function: str,
    tests: Sequence[dict[str, Any]] = (),
    *,
    timeout: float = 5.0,
    memory_mb: int = 512,
) -> SandboxResult:
    """Run `source` and call `function` on each test case in a restricted child process (see the module
    docstring); never imports or executes the code in this process."""
    nonce = secrets.token_hex(16)
    payload = {
        "nonce": nonce,
        "source": source,
        "function": function,
        "tests": list(tests),
        "cpu": max(1, math.ceil(timeout)),
        "memory": memory_mb << 20,
    }
    with tempfile.TemporaryDirectory(prefix="lmloom-sandbox-") as tmp:
        try:
            proc = subprocess.run(
                [sys.executable, "-I", "-S", "-c", _HARNESS],
                input=json.dumps(payload) + "\n",
                capture_output=True,
                text=True,
                cwd=tmp,
                env={"PATH": os.defpath, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"},
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return SandboxResult(True, False, 0, len(tests), f"timed out after {timeout:g}s", timed_out=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(nonce):
            data = json.loads(line[len(nonce) :])
            return SandboxResult(**data)
    if proc.returncode in (-signal.SIGKILL, -signal.SIGXCPU):
        # The CPU-seconds limit (equal to the timeout) fired before the wall clock did: on an idle
        # machine a busy loop reaches it first. Either way the program ran out of time.
        return SandboxResult(True, False, 0, len(tests), f"timed out after {timeout:g}s", timed_out=True)
    why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1][:200]
    return SandboxResult(True, False, 0, len(tests), f"no verdict: {why}")


# -- the rewards -------------------------------------------------------------------------------------


class RewardSettings(StrictConfig):
    code_timeout: float = Field(5.0, gt=0, description="seconds a sandboxed program may run (wall clock)")
    code_memory_mb: int = Field(512, ge=64, description="address-space limit of the sandboxed program")
    code_workers: int = Field(2, ge=1, description="sandboxed programs run at once")
    min_chars: int = Field(1, ge=0, description="format: shortest acceptable reply")
    max_chars: int = Field(2000, ge=1, description="format: longest acceptable reply")


def _parses(source: str) -> bool:
    import ast
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(source)
        return True
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False


def _defines(source: str, name: str | None = None) -> bool:
    """Whether `source` defines the top-level function `name` (any top-level function when None)."""
    import ast

    tree = ast.parse(source)
    return any(
        isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and name in (None, node.name)
        for node in tree.body
    )


def code_reward(sample: Sample, settings: RewardSettings | None = None) -> float:
    """0 unparsable, 0.25 parses and defines some other function, then for the requested function: with
    tests 0.5 + 0.5 * passed share (run in the sandbox), without tests 1.0. When a function is requested,
    code that parses but defines no function at all (a lone word, an expression) scores 0. A prompt asking
    for no function scores 0.25 for parsing."""
    settings = settings or RewardSettings()
    source = extract_code(sample.text)
    if not source.strip() or not _parses(source):
        return 0.0
    name = sample.task.function
    if not name:
        return 0.25
    if not _defines(source, name):
        return 0.25 if _defines(source) else 0.0
    if not sample.task.tests:
        return 1.0
    result = run_sandboxed(
        source, name, sample.task.tests, timeout=settings.code_timeout, memory_mb=settings.code_memory_mb
    )
    sample.details["sandbox"] = {
        "passed": result.passed,
        "total": result.total,
        "error": result.error,
        "timed_out": result.timed_out,
    }
    if not result.defined:
        return 0.5 if not result.timed_out else 0.25
    return 0.5 + 0.5 * result.passed / max(result.total, 1)


def function_def_reward(sample: Sample, settings: RewardSettings | None = None) -> float:
    """1.0 for "def <requested name>", 0.5 for any "def " (a definition of something), else 0."""
    text = sample.text
    if sample.task.function and re.search(rf"\bdef\s+{re.escape(sample.task.function)}\b", text):
        return 1.0
    return 0.5 if re.search(r"\bdef\s", text) else 0.0


def safety_reward(sample: Sample, settings: RewardSettings | None = None) -> float:
    """0 when the reply leaks PII or a secret, refuses a benign prompt or complies with a harmful one."""
    spans = find_pii(sample.text)
    if spans:
        sample.details["pii"] = sorted({span.type for span in spans})
        return 0.0
    if sample.task.harmful is None:
        return 1.0
    return float(refusal_detector(sample.text) == sample.task.harmful)


def format_reward(sample: Sample, settings: RewardSettings | None = None) -> float:
    """0.5 for ending the turn, 0.5 for a reply length within [min_chars, max_chars]."""
    settings = settings or RewardSettings()
    ended = 0.5 if sample.finished else 0.0
    return ended + (0.5 if settings.min_chars <= len(sample.text) <= settings.max_chars else 0.0)


PROGRAMMATIC: dict[str, Callable[[Sample, RewardSettings | None], float]] = {
    "code": code_reward,
    "function_def": function_def_reward,
    "safety": safety_reward,
    "format": format_reward,
}


def score_programmatic(
    name: str, samples: Sequence[Sample], settings: RewardSettings | None = None
) -> list[float]:
    """One reward for every sample; the code reward runs its sandboxes `code_workers` at a time."""
    settings = settings or RewardSettings()
    fn = PROGRAMMATIC[name]
    if name == "code" and settings.code_workers > 1 and len(samples) > 1:
        with ThreadPoolExecutor(settings.code_workers) as pool:
            return list(pool.map(lambda s: fn(s, settings), samples))
    return [fn(s, settings) for s in samples]


class RewardModelScorer:
    """Reward = sigmoid(score) of an `align.reward` model (`reward_model_from_files`), in [0, 1]."""

    def __init__(self, model, tokenizer, scale: float = 1.0):
        self.model, self.tokenizer, self.scale = model.eval(), tokenizer, scale

    def __call__(self, samples: Sequence[Sample]) -> list[float]:
        import torch

        from lmloom.tokenizers.base import EOS_ID, PAD_ID
        from lmloom.tune.chat import ChatFormatError, encode_conversation, escape_markers

        cap = self.model.trunk.config.seq_len
        # Encoded as align.reward trained: EOS, then the chat template; the answer mask for `relevance`.
        rows: list[tuple[list[int], list[int]] | None] = []
        for s in samples:
            reply = escape_markers(s.text) or "."
            try:
                ids, answer = encode_conversation(
                    self.tokenizer,
                    [{"role": "user", "content": s.task.prompt}, {"role": "assistant", "content": reply}],
                    cap - 1,
                )
                rows.append(([EOS_ID, *ids], [0, *answer]))
            except ChatFormatError:
                rows.append(None)  # too long for the reward model: scored 0
        scored = [r for r in rows if r is not None]
        values: list[float] = []
        if scored:
            longest = max(len(r) for r, _ in scored)
            ids = torch.full((len(scored), longest), PAD_ID, dtype=torch.long)
            mask = torch.zeros((len(scored), longest), dtype=torch.long)
            completion = torch.zeros((len(scored), longest), dtype=torch.long)
            for i, (r, answer) in enumerate(scored):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
                completion[i, : len(answer)] = torch.tensor(answer)
            with torch.no_grad():
                values = torch.sigmoid(self.model(ids, mask, completion).float() * self.scale).tolist()
        it = iter(values)
        return [next(it) if r is not None else 0.0 for r in rows]


def combine(components: dict[str, list[float]], weights: dict[str, float]) -> list[float]:
    """sum(w_i * r_i) / sum(w_i) per sample: in [0, 1] when every component is."""
    total = sum(weights[name] for name in components)
    n = len(next(iter(components.values()))) if components else 0
    return [sum(weights[name] * components[name][i] for name in components) / total for i in range(n)]
