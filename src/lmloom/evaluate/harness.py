"""lm-evaluation-harness interop: `lm_eval` evaluates lmloom checkpoints, as the model type `lmloom`.

    from lmloom.evaluate import harness            # registers the model type "lmloom"
    lm_eval.simple_evaluate(
        model="lmloom", model_args="store=~/.lmloom,model=1a2b3c,batch_size=8",
        tasks=["lmloom_stdlib_ppl", "lmloom_stdlib_mc"], task_manager=harness.task_manager(),
    )

or `lmloom evaluate harness MODEL --tasks ...`, or lm_eval's own command line through
`python -m lmloom.evaluate.harness --model lmloom --model_args ... --tasks ...` (lm_eval 0.4 has no plugin
discovery, so its `lm_eval` command cannot know the type unless this module is imported first; the
`-m` form imports it and adds our task folder to `--include_path`).

model_args: `model` (checkpoint id or a unique prefix; `pretrained` is accepted as its alias), `store`
(default `$LMLOOM_HOME` or ~/.lmloom), `batch_size` (sequences per forward pass; `auto` means 8),
`max_gen_toks` (default for generate_until, 256), `rolling_context` (see below), `device`, `seed`.
Opening the store goes through the same checks as the command line: the access policy must grant
`evaluate`, every file of the artifact is verified (hashes, signatures where required, decryption), the
weights are safetensors (no pickle), and the use is written to the audit log.

How requests are scored, as lm_eval expects of a causal LM:

- `loglikelihood(context, continuation)`: trailing whitespace of the context moves to the continuation
  (lm_eval's rule, so " word" is one token rather than " " + "word"); the whole text is encoded once
  and split where its tokens stop agreeing with the context's own encoding, so context + continuation
  tokens are always the tokenization of the whole text (lm_eval's split by the context's token count can
  leave out text when a token spans the boundary: "    sel" + "f.width" would score ".width"). An
  empty context conditions on <|eos|>, the document separator the models were trained with. Only
  the last `seq_len` + 1 tokens are kept; a continuation longer than `seq_len` is scored in pieces of
  `seq_len` tokens, each conditioned on the `seq_len` tokens before it (never silently cut).
  `is_greedy`: every continuation token is the argmax at its position.
- `loglikelihood_rolling(text)`: the sum of the log-probabilities of every token of the text, the first
  conditioned on <|eos|>, in windows of the model's `seq_len` (lm_eval's `get_rolling_token_windows`).
  `rolling_context` is the least context a later window carries: 1 (the default) gives disjoint windows,
  as lm_eval's Hugging Face model does, so the figures match an exported model evaluated with `hf`;
  `seq_len // 2` costs about twice the compute and conditions every token on at least half a window.
- `generate_until(context, gen_kwargs)`: our KV-cached decoding (`lmloom.serve.generate`), greedy unless
  `do_sample`; stops at <|eos|>, after `max_gen_toks` tokens, or at the first stop string of `until`,
  which is cut off. The context keeps its last `seq_len - max_gen_toks` tokens (lm_eval's rule).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmloom.errors import ConfigError, LmloomError

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
except ImportError as exc:  # lmloom works without it; only this module needs it
    raise LmloomError(
        f"evaluating with lm-evaluation-harness needs the lm-eval package ({exc}); pip install 'lmloom[eval]'"
    ) from None


MODEL_TYPE = "lmloom"
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p", "seed")
TEXT_ARGS = ("model", "pretrained", "store")  # model_args kept as written, never read as numbers


def parse_model_args(arg_string: str | None) -> dict[str, Any]:
    """`key=value,...` as lm_eval parses it, except the artifact id and the store path, which stay text:
    lm_eval reads a value that looks like a number as one, so an id prefix such as 0129655790 would
    lose its leading zero (and 12e4567890 would become 1.2e13)."""
    args = simple_parse_args_string(arg_string)
    for item in (arg_string or "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip() in TEXT_ARGS:
            args[key.strip()] = value.strip()
    return args


def tasks_dir() -> Path:
    from lmloom.evaluate.tasks import TASKS_DIR

    return TASKS_DIR


def task_manager(include_paths: Iterable[str | Path] = (), include_defaults: bool = False):
    """An lm_eval TaskManager that knows lmloom's tasks (and `include_paths`).

    Without lm_eval's built-in catalogue by default: indexing its thousands of YAML files takes seconds,
    and nearly all of those tasks download their data, which lmloom's own tasks never do.
    """
    from lm_eval.tasks import TaskManager

    return TaskManager(
        include_path=[str(tasks_dir()), *map(str, include_paths)], include_defaults=include_defaults
    )


def _batch_size(value: Any) -> int:
    if value is None or str(value).startswith("auto"):  # no memory probing: a fixed, predictable batch
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"batch_size = {value!r}: give a positive integer or `auto`") from None
    if size < 1:
        raise ConfigError(f"batch_size = {size}: must be at least 1")
    return size


def _device(name: str | None) -> torch.device:
    """The torch device; lm_eval's own command line asks for "cuda" unless told otherwise, so a CUDA
    device on a machine without one falls back to the CPU with a warning, as lm_eval's `hf` model does."""
    device = torch.device(name or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("device %s requested but CUDA is not available: using cpu", name)
        return torch.device("cpu")
    return device


def open_checkpoint(store: str | Path | None, model: str):
    """The verified checkpoint artifact `model` of the store at `store`, as the CLI would open it: the
    access policy must grant `evaluate`, and the use is audited."""
    from lmloom.artifacts.store import ArtifactStore, default_store_root
    from lmloom.security.context import store_security
    from lmloom.security.policy import Permission, resolve_access

    root = Path(store).expanduser() if store else default_store_root()
    if not (root / "artifacts").is_dir():  # ArtifactStore would create an empty store here
        raise LmloomError(f"no artifact store at {root} (model_args store=PATH, or $LMLOOM_HOME)")
    access = resolve_access(root)
    access.require(Permission.EVALUATE, action="`lm_eval --model lmloom`")
    artifact = ArtifactStore(root, security=store_security(root, access.principal)).open(str(model))
    if artifact.kind != "checkpoint":
        raise LmloomError(f"artifact {artifact.short_id} is a {artifact.kind}, not a checkpoint")
    if access.audit is not None:
        access.audit.append("evaluate.harness", access.principal, artifact=artifact.id, via="lm_eval")
    return artifact


@register_model(MODEL_TYPE)
class LmloomLM(TemplateLM):
    """An lmloom checkpoint as an lm_eval language model (see the module docstring)."""

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> LmloomLM:
        extra = {key: value for key, value in (additional_config or {}).items() if value is not None}
        return cls(**parse_model_args(arg_string), **extra)

    def __init__(
        self,
        model: str | None = None,
        store: str | None = None,
        *,
        artifact=None,
        pretrained: str | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_batch_size: int | None = None,  # lm_eval passes it for `auto`; we do not probe memory
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        rolling_context: int = 1,
        device: str | None = None,
        seed: int = 0,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            allowed = "model, store, batch_size, max_gen_toks, rolling_context, device, seed"
            raise ConfigError(f"unknown lmloom model_args {sorted(unknown)}; allowed: {allowed}")
        from lmloom.serve.loading import load_checkpoint_artifact

        if artifact is None:
            ref = model or pretrained
            if not ref:
                raise ConfigError("model_args needs model=CHECKPOINT_ID (a unique prefix is enough)")
            artifact = open_checkpoint(store, ref)
        self.artifact = artifact
        self.model, self.tokenizer = load_checkpoint_artifact(artifact)
        self._device = _device(device)
        self.model.to(self._device).eval()
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.rolling_context = int(rolling_context)
        if not 1 <= self.rolling_context <= self.max_length:
            raise ConfigError(f"rolling_context = {rolling_context}: must lie in [1, {self.max_length}]")
        self.seed = int(seed)

    # -- what TemplateLM needs ----------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # Training joins documents with <|eos|>, so "start of a document" is "after <|eos|>".
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.model.config.seq_len

    @property
    def tokenizer_name(self) -> str:
        return f"lmloom-{self.tokenizer.algorithm}-{self.artifact.short_id}"

    def get_model_info(self) -> dict[str, Any]:
        """Merged into lm_eval's results["config"]: which checkpoint produced the figures."""
        manifest = self.artifact.manifest
        return {
            "lmloom_checkpoint": self.artifact.id,
            "lmloom_stage": manifest.stage,
            "model_num_parameters": self.model.num_params(),
            "seq_len": self.max_length,
        }

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)  # lmloom tokenizers never add special tokens

    def tok_decode(self, tokens: Iterable[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        own = self.tok_encode(context)
        split = 0
        while split < min(len(own), len(whole)) and own[split] == whole[split]:
            split += 1
        # split == 0: the first token already reaches into the continuation; it starts the document
        return whole[:split] or [self.prefix_token_id], whole[split:]

    # -- scoring --------------------------------------------------------------------------------------
    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(sum of log-probs of the continuation tokens, all greedy) per (key, context_ids, continuation_ids).

        A continuation longer than `seq_len` is scored in pieces of `seq_len` tokens, each conditioned on
        the `seq_len` tokens before it, and summed: nothing is cut off.
        """
        pieces, owners = [], []
        for n, (_, context_ids, continuation_ids) in enumerate(requests):
            context_ids = list(context_ids) or [self.prefix_token_id]  # the first token needs a condition
            tokens, start = [*context_ids, *continuation_ids], len(context_ids)
            for k in range(0, max(len(continuation_ids), 1), self.max_length):
                end = start + min(k + self.max_length, len(continuation_ids))
                pieces.append(
                    (tokens[max(0, end - self.max_length - 1) : start + k], tokens[start + k : end])
                )
                owners.append(n)
        results = [(0.0, True)] * len(requests)
        for n, (score, greedy) in zip(owners, self._score_pieces(pieces), strict=True):
            results[n] = (results[n][0] + score, results[n][1] and greedy)
        for request, result in zip(requests, results, strict=True):
            if request[0] is not None:  # None: a rolling window, cached as part of its document
                self.cache_hook.add_partial("loglikelihood", request[0], result)
        return results

    def _score_pieces(self, pieces: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Score (context, continuation) pairs whose continuation fits in `seq_len`, `batch_size` at a time.

        Longest first, so a batch pads to its first row and rows of similar length share a batch; right
        padding cannot change the logits of earlier positions of a causal model.
        """
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pieces)
        order = sorted(range(len(pieces)), key=lambda i: -(len(pieces[i][0]) + len(pieces[i][1])))
        order = [i for i in order if pieces[i][1]]  # an empty continuation has log-probability 0
        for first in range(0, len(order), self.batch_size):
            rows = []
            for i in order[first : first + self.batch_size]:
                context_ids, continuation_ids = pieces[i]
                rows.append(
                    (i, [*context_ids, *continuation_ids][-(self.max_length + 1) : -1], continuation_ids)
                )
            batch = torch.full(
                (len(rows), max(len(inputs) for _, inputs, _ in rows)),
                self.tokenizer.pad_id,
                dtype=torch.long,
            )
            for r, (_, inputs, _) in enumerate(rows):
                batch[r, : len(inputs)] = torch.tensor(inputs)
            with torch.inference_mode():
                logits = self.model(batch.to(self._device))
                for r, (i, inputs, continuation_ids) in enumerate(rows):
                    n, end = len(continuation_ids), len(inputs)
                    # log_softmax of only the scored positions: [n, V], not the batch's [B, T, V]
                    logprobs = F.log_softmax(logits[r, end - n : end].float(), dim=-1)
                    target = torch.tensor(continuation_ids, device=logprobs.device)
                    score = float(logprobs.gather(-1, target[:, None]).sum())
                    results[i] = (score, bool((logprobs.argmax(dim=-1) == target).all()))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for n, request in enumerate(requests):
            (text,) = request.args
            for context_ids, predicted in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=self.rolling_context,
                ),
            ):
                windows.append((None, context_ids, predicted))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[n] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation -----------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return [self._generate_one(*request.args) for request in requests]

    def _generate_one(self, context: str, gen_kwargs: dict | None) -> str:
        from lmloom.serve.generate import generate_stream

        kwargs = dict(gen_kwargs or {})
        unknown = sorted(set(kwargs) - set(GEN_KWARGS))
        if unknown:
            raise ConfigError(
                f"unknown generation_kwargs {unknown} for lmloom; allowed: {', '.join(GEN_KWARGS)}"
            )
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [s for s in until if s]
        max_new = max(1, min(int(kwargs.get("max_gen_toks") or self.max_gen_toks), self.max_length - 1))
        sample = bool(kwargs.get("do_sample", False))
        prompt = (self.tok_encode(context) or [self.prefix_token_id])[-(self.max_length - max_new) :]
        tokens = generate_stream(
            self.model,
            prompt,
            max_new_tokens=max_new,
            temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
            top_k=kwargs.get("top_k"),
            top_p=kwargs.get("top_p"),
            seed=int(kwargs.get("seed", self.seed)),
            eos_id=self.tokenizer.eos_id,
        )
        ids: list[int] = []
        text = ""
        for token in tokens:
            if token == self.tokenizer.eos_id:
                break
            ids.append(token)
            text = self.tok_decode(ids)
            if until and any(stop in text for stop in until):
                break
        cut = min((text.find(stop) for stop in until if stop in text), default=len(text))
        text = text[:cut]
        self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return text


# -- running and reporting ---------------------------------------------------------------------------


class _CustomDatasetNotice(logging.Filter):
    """Drops lm_eval's notice that a `custom_dataset` task takes kwargs through `--metadata`: printed for
    each of our tasks on every run, and ours take none (see `tasks/__init__.py` for why they use it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def evaluate(
    artifact,
    tasks: Iterable[str],
    manager=None,
    *,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_fewshot: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """lm_eval's `simple_evaluate` on an already opened (and access-checked) checkpoint artifact."""
    import lm_eval

    lm = LmloomLM(artifact=artifact, batch_size=batch_size, device=device)
    task_logger = logging.getLogger("lm_eval.api.task")
    notice = _CustomDatasetNotice()
    task_logger.addFilter(notice)
    try:
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=manager or task_manager(),
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=False,
        )
    finally:
        task_logger.removeFilter(notice)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):  # lm_eval writes "N/A" where it has no stderr
        return None


def results_table(report: dict[str, Any]) -> list[tuple[str, str, float | None, float | None, int | None]]:
    """(task, metric, value, stderr, documents scored) for every metric in lm_eval's results; the
    filter is named only when it is not lm_eval's "none"."""
    rows = []
    for task, metrics in report["results"].items():
        scored = report.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr"):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            name = metric if filter_name == "none" else f"{metric} ({filter_name})"
            rows.append((task, name, _number(value), _number(stderr), scored))
    return rows


def format_row(row: tuple[str, str, float | None, float | None, int | None]) -> list[str]:
    task, metric, value, stderr, scored = row

    def show(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}" if abs(x) < 1e4 else f"{x:.4g}"

    return [task, metric, show(value), show(stderr), "" if scored is None else str(scored)]


def results_json(report: dict[str, Any]) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(report, indent=2, default=handle_non_serializable)


def main(argv: list[str] | None = None) -> None:
    """lm_eval's own command line with the `lmloom` model type registered and our tasks included."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--tasks" in argv and "--include_path" not in argv:  # a run, not `ls` or `validate`
        argv += ["--include_path", str(tasks_dir())]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
