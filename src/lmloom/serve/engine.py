"""An inference engine with continuous batching over a `Decoder` and its tokenizer.

Requests (prompt ids + `SamplingParams`) are queued from any thread; one background thread runs the loop

    admit   waiting requests take a free batch slot (lowest first) as soon as one is free
    prefill their prompts, one request at a time, at most `prefill_chunk` prompt tokens per iteration
            (a longer prompt is split into chunks over several iterations, so decoding never stalls long)
    decode  ONE forward for every sequence in the running batch: one new token each
    emit    each request's callback gets the token and its text delta; finished requests leave the
            batch at once and their slot is reused by the next waiting request

**Slot KV cache.** `Decoder`'s `KVCache` writes every row of a batch at one `start_pos`, but the rows of a
continuous batch sit at different positions. The engine therefore keeps its own cache, one preallocated
row per slot ([slots, kv_heads, seq_len + 1, head_dim] per layer), and runs the model's own modules
(`tok_emb`, each `Block`, `norm`, the tied head) with a cache object whose `update` writes each row at that
row's position (`index_put`) and returns a view of the first `n` rows up to the longest position. Each row
gets its own RoPE angles (the cos/sin tables indexed by its position broadcast over the batch) and a
boolean attention mask [n, 1, 1, L] that hides the keys past its own position. So a decode step is one
batched matmul per weight for all active sequences, and nothing is copied or padded per step beyond
that mask. Rows inside [0, n) that are not decoding (free, or a prompt still prefilling) ride along as
idle rows: they read position 0 and write a scratch column (index seq_len) that nothing reads. Slots are
taken lowest first, so under load the batch stays dense.

Prefill uses the same modules with a one-row view of the slot's cache at the request's start position, so
with the prompt in one chunk its numerics are those of `generate`'s prefill; greedy decoding gives the
same tokens as `lmloom.serve.generate.generate` one request at a time (a test pins this, fp32).

**Sampling** follows `generate`: temperature 0 is greedy, otherwise HF's order (logit bias, repetition /
frequency / presence penalties, temperature, top-k, top-p) from a per-request `torch.Generator` seeded with
`seed`, so a seeded request is reproducible whatever else shares its batch (up to floating-point
differences between batch shapes, which are far below what flips a sample in practice).

**Stops.** A token in `stop_ids` (and the tokenizer's EOS unless `ignore_eos`) ends a request; its text is
not part of the output. Stop strings are searched in the decoded text; the text is cut before the
earliest match. Streamed text holds back a tail that could still become a stop string and an incomplete
UTF-8 character, so a stop string is never streamed.

Callbacks run on the engine thread; `stream` (blocking) and `astream` (asyncio) wrap them in queues.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmloom.errors import LmloomError
from lmloom.serve.generate import filter_logits, scale_logits
from lmloom.serve.metrics import ServingMetrics

log = logging.getLogger(__name__)

FINISH_STOP, FINISH_LENGTH, FINISH_ABORT = "stop", "length", "abort"
_MIN_TOP_P = 1e-30


class InvalidRequest(LmloomError, ValueError):
    """A request the engine refuses before any work; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class ContextLengthExceeded(InvalidRequest):
    def __init__(self, message: str):
        super().__init__(message, param="max_tokens", code="context_length_exceeded")


class EngineOverloaded(LmloomError):
    """The waiting queue is full; the caller should retry later."""


class EngineStopped(LmloomError):
    """The engine is not running (never started, stopped, or its loop failed)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0  # HF/CTRL: seen tokens' logits divided (>0) or multiplied (<0) by it
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every generated token's logit
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the generated text
    logit_bias: Mapping[int, float] | None = None
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain(self) -> bool:
        """No logit processing: a greedy row can take the batch's argmax."""
        return (
            self.repetition_penalty == 1
            and not self.presence_penalty
            and not self.frequency_penalty
            and not self.logit_bias
        )

    def check(self, vocab_size: int) -> None:
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {self.max_tokens}", "max_tokens")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise InvalidRequest(
                f"temperature must be a finite number >= 0, got {self.temperature}", "temperature"
            )
        if self.top_k is not None and self.top_k < 1:
            raise InvalidRequest(f"top_k must be >= 1, got {self.top_k}", "top_k")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise InvalidRequest(
                f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}",
                "repetition_penalty",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise InvalidRequest(f"{name} must be finite", name)
        for token, bias in (self.logit_bias or {}).items():
            if not 0 <= token < vocab_size or not math.isfinite(bias):
                raise InvalidRequest(
                    f"logit_bias: token {token} not in [0, {vocab_size}) or bias not finite", "logit_bias"
                )
        if any(not 0 <= t < vocab_size for t in self.stop_ids):
            raise InvalidRequest(f"stop token ids must lie in [0, {vocab_size})", "stop_token_ids")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop sequences must not be empty", "stop")


@dataclass
class RequestOutput:
    """One step of one request: the new token(s) and text delta; on the last one, the totals."""

    request_id: str
    new_token_ids: list[int]
    delta: str
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_ids: list[int] | None = None  # all generated ids, on the finished output only
    text: str | None = None  # the whole generated text, on the finished output only
    error: BaseException | None = None  # set when the engine failed this request


Callback = Callable[[RequestOutput], None]


@dataclass(eq=False)
class _Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    callback: Callback
    stop_ids: frozenset[int]
    generator: torch.Generator
    arrival: float
    slot: int = -1
    prefilled: int = 0
    admitted: float = 0.0
    last_token_at: float = 0.0
    tokens: list[int] = field(default_factory=list)
    sent_chars: int = 0
    done: bool = False


class _RowCache:
    """The cache of one slot, as `Attention` sees a batch-1 `KVCache` (prefill)."""

    def __init__(self, cache: _SlotCache, slot: int):
        self.cache, self.slot = cache, slot

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        end = start_pos + k.shape[2]
        rows = slice(self.slot, self.slot + 1)
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys[rows, :, start_pos:end] = k
        values[rows, :, start_pos:end] = v
        return keys[rows, :, :end], values[rows, :, :end]


class _BatchCache:
    """Rows [0, n) of the slot cache, each written at its own position (decode, one token per row)."""

    def __init__(self, cache: _SlotCache, write_pos: torch.Tensor, length: int):
        self.cache, self.write_pos, self.length = cache, write_pos, length
        self.rows = torch.arange(write_pos.shape[0], device=write_pos.device)

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        n = self.rows.shape[0]
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys[self.rows, :, self.write_pos] = k[:, :, 0]
        values[self.rows, :, self.write_pos] = v[:, :, 0]
        return keys[:n, :, : self.length], values[:n, :, : self.length]


class _SlotCache:
    def __init__(self, model, slots: int, dtype: torch.dtype, device: torch.device):
        cfg = model.config
        self.max_len = cfg.seq_len
        # One extra position: the scratch column idle rows write to.
        shape = (slots, cfg.kv_heads, cfg.seq_len + 1, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]


class Engine:
    """Continuous-batching generation over a `Decoder` (see the module docstring).

    `tokenizer` may be None: then there is no text (deltas are empty) and stop strings are refused.
    Use as a context manager, or call `start()` / `stop()`.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        max_batch_size: int = 16,
        max_waiting: int = 1024,
        prefill_chunk: int = 512,
        model_name: str = "lmloom",
        metrics: ServingMetrics | None = None,
    ):
        if max_batch_size < 1 or prefill_chunk < 1:
            raise ValueError("max_batch_size and prefill_chunk must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        cfg = model.config
        self.max_len, self.vocab_size = cfg.seq_len, cfg.vocab_size
        self.max_batch_size, self.max_waiting, self.prefill_chunk = max_batch_size, max_waiting, prefill_chunk
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self.metrics = metrics or ServingMetrics(model_name)
        weight = model.tok_emb.weight
        self.device = weight.device
        self._cache = _SlotCache(model, max_batch_size, weight.dtype, weight.device)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[_Sequence] = deque()
        self._prefilling: deque[_Sequence] = deque()
        self._running: dict[int, _Sequence] = {}
        self._free_slots = list(range(max_batch_size))
        self._pending = 0  # submitted, not yet admitted (read by submitters for the overload check)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failure: BaseException | None = None
        self.steps = 0  # decode forwards run (for tests and benchmarks)

    # ---- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> Engine:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="lmloom-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        if self._thread is not None:
            self._inbox.put(("stop", None))
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def num_waiting(self) -> int:
        return self._pending

    @property
    def num_running(self) -> int:
        return len(self._running) + len(self._prefilling)

    # ---- submitting ------------------------------------------------------------------------------------

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise `InvalidRequest` / `ContextLengthExceeded` for a request the engine cannot serve."""
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty; generation needs at least one token", "prompt")
        if any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise InvalidRequest(f"prompt token ids must lie in [0, {self.vocab_size})", "prompt")
        params.check(self.vocab_size)
        if params.stop and self.tokenizer is None:
            raise InvalidRequest("stop strings need a tokenizer", "stop")
        if len(prompt_ids) + params.max_tokens > self.max_len:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_len} tokens. However, you requested "
                f"{len(prompt_ids) + params.max_tokens} tokens ({len(prompt_ids)} in the prompt, "
                f"{params.max_tokens} for the completion). Please reduce the prompt or max_tokens."
            )

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        callback: Callback,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; `callback` gets its `RequestOutput`s on the engine thread. Returns its id."""
        prompt = [int(t) for t in prompt_ids]
        self.check_request(prompt, params)
        if not self.is_running:
            raise EngineStopped("the engine is not running") from self._failure
        with self._lock:
            if self._pending >= self.max_waiting:
                raise EngineOverloaded(f"{self._pending} requests are already waiting; retry later")
            self._pending += 1
        generator = torch.Generator(device=self.device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        stop_ids = set(params.stop_ids)
        if self.eos_id is not None and not params.ignore_eos:
            stop_ids.add(self.eos_id)
        seq = _Sequence(
            request_id=request_id or uuid.uuid4().hex,
            prompt=prompt,
            params=params,
            callback=callback,
            stop_ids=frozenset(stop_ids),
            generator=generator,
            arrival=time.perf_counter(),
        )
        self._inbox.put(("add", seq))
        return seq.request_id

    def abort(self, request_id: str) -> None:
        """Drop a request (e.g. its client went away); its slot is freed at the next iteration."""
        self._inbox.put(("abort", request_id))

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[RequestOutput]:
        """Blocking iterator over a request's outputs; the last has `finished=True`."""
        outputs: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        request_id = self.submit(prompt_ids, params, outputs.put)

        def iterate() -> Iterator[RequestOutput]:
            finished = False
            try:
                while not finished:
                    out = outputs.get()
                    if out.error is not None:
                        raise EngineStopped(str(out.error)) from out.error
                    finished = out.finished
                    yield out
            finally:
                if not finished:
                    self.abort(request_id)

        return iterate()

    async def astream(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Async iterator over a request's outputs (see `submit_async` for several at once)."""
        outputs: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()
        (request_id,) = self.submit_async([(prompt_ids, params)], outputs)
        finished = False
        try:
            while not finished:
                _, out = await outputs.get()
                if out.error is not None:
                    raise EngineStopped(str(out.error)) from out.error
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def submit_async(
        self, requests: Sequence[tuple[Sequence[int], SamplingParams]], outputs: asyncio.Queue
    ) -> list[str]:
        """Submit several requests from a running event loop; `(index, RequestOutput)` pairs arrive in
        `outputs`. All are checked before any is queued; on a later failure the queued ones are aborted."""
        loop = asyncio.get_running_loop()
        for prompt_ids, params in requests:
            self.check_request(prompt_ids, params)
        ids: list[str] = []
        try:
            for index, (prompt_ids, params) in enumerate(requests):

                def deliver(out: RequestOutput, index: int = index) -> None:
                    loop.call_soon_threadsafe(outputs.put_nowait, (index, out))

                ids.append(self.submit(prompt_ids, params, deliver))
        except BaseException:
            for request_id in ids:
                self.abort(request_id)
            raise
        return ids

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[RequestOutput]:
        """Submit all prompts at once and wait: the finished output of each, in order."""
        if not prompts:
            return []
        done: list[RequestOutput | None] = [None] * len(prompts)
        all_done = threading.Event()
        remaining = itertools.count(len(prompts) - 1, -1)

        def on_output(out: RequestOutput, i: int) -> None:
            if out.finished:
                done[i] = out
                if next(remaining) == 0:
                    all_done.set()

        for i, prompt in enumerate(prompts):
            self.submit(prompt, params, lambda out, i=i: on_output(out, i))
        all_done.wait()
        for out in done:
            if out is not None and out.error is not None:
                raise EngineStopped(str(out.error)) from out.error
        return done  # type: ignore[return-value]

    # ---- the loop --------------------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        with torch.inference_mode():
            while not self._stopping:
                idle = not (self._waiting or self._prefilling or self._running)
                self._drain_inbox(block=idle)
                if self._stopping:
                    break
                try:
                    self._step()
                except Exception as exc:  # a bug or an out-of-memory: fail the active requests, keep serving
                    log.exception("engine step failed")
                    self._fail_all(exc, waiting_too=False)
        self._fail_all(EngineStopped("the engine was stopped"), waiting_too=True)

    def _drain_inbox(self, block: bool) -> None:
        while True:
            try:
                kind, item = self._inbox.get(block=block, timeout=None)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                self._waiting.append(item)
            elif kind == "abort":
                self._abort(item)
            elif kind == "stop":
                self._stopping = True
                return

    def _abort(self, request_id: str) -> None:
        for seq in itertools.chain(self._waiting, self._prefilling, self._running.values()):
            if seq.request_id == request_id and not seq.done:
                self._finish(seq, FINISH_ABORT, [], "")
                return

    def _fail_all(self, exc: BaseException, waiting_too: bool) -> None:
        groups = [self._prefilling, list(self._running.values())]
        if waiting_too:
            groups.append(self._waiting)
        for seq in list(itertools.chain(*groups)):
            if not seq.done:
                self._finish(seq, FINISH_ABORT, [], "", error=exc)
        self._cleanup()

    def _step(self) -> None:
        self._cleanup()
        while self._waiting and self._free_slots:  # admit
            seq = self._waiting.popleft()
            with self._lock:
                self._pending -= 1
            if seq.done:
                continue
            seq.slot = heapq.heappop(self._free_slots)
            seq.admitted = time.perf_counter()
            self._prefilling.append(seq)
        budget = self.prefill_chunk
        while self._prefilling and budget > 0:
            seq = self._prefilling[0]
            n = min(len(seq.prompt) - seq.prefilled, budget)
            logits = self._prefill(seq, n)
            budget -= n
            if seq.prefilled == len(seq.prompt):
                self._prefilling.popleft()
                self.metrics.prompt_tokens(len(seq.prompt))
                self._running[seq.slot] = seq
                self._accept([seq], logits[None])
        self._cleanup()  # a sequence its first token finished (or whose sampling failed) has no decode step
        if self._running:
            self._decode()
        self._cleanup()
        self.metrics.set_queue_sizes(self.num_running, self._pending)

    def _cleanup(self) -> None:
        """Release the slots of finished sequences."""
        for queue_ in (self._waiting, self._prefilling):
            if any(s.done for s in queue_):
                kept = [s for s in queue_ if not s.done]
                if queue_ is self._waiting:
                    with self._lock:
                        self._pending -= len(queue_) - len(kept)
                queue_.clear()
                queue_.extend(kept)
        for slot, seq in list(self._running.items()):
            if seq.done:
                del self._running[slot]
        used = {s.slot for s in self._prefilling} | set(self._running)
        taken = set(range(self.max_batch_size)) - set(self._free_slots)
        for slot in taken - used:
            heapq.heappush(self._free_slots, slot)

    # ---- model calls -----------------------------------------------------------------------------------

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        model = self.model
        return F.linear(model.norm(x), model.head_weight).float()

    def _prefill(self, seq: _Sequence, n: int) -> torch.Tensor:
        """Run prompt tokens [prefilled, prefilled + n) into the slot's cache; logits of the last [V]."""
        model, start = self.model, seq.prefilled
        idx = torch.tensor([seq.prompt[start : start + n]], dtype=torch.long, device=self.device)
        cos = model.rope_cos[start : start + n, None].float()
        sin = model.rope_sin[start : start + n, None].float()
        cache = _RowCache(self._cache, seq.slot)
        x = model.tok_emb(idx)
        for layer in model.layers:
            x = layer(x, cos, sin, None, cache, start, None)
        seq.prefilled += n
        return self._head(x[0, -1:])[0]

    def _decode(self) -> None:
        """One forward for rows [0, n): every running sequence feeds its last token."""
        n = max(self._running) + 1
        tokens, pos, write = [0] * n, [0] * n, [self.max_len] * n
        for slot, seq in self._running.items():
            tokens[slot] = seq.tokens[-1]
            pos[slot] = write[slot] = len(seq.prompt) + len(seq.tokens) - 1
        device, model = self.device, self.model
        tokens_t = torch.tensor(tokens, dtype=torch.long, device=device)
        pos_t = torch.tensor(pos, dtype=torch.long, device=device)
        length = max(pos) + 1
        mask = (torch.arange(length, device=device)[None, :] <= pos_t[:, None])[:, None, None, :]
        cos = model.rope_cos[pos_t][:, None, None, :].float()
        sin = model.rope_sin[pos_t][:, None, None, :].float()
        cache = _BatchCache(self._cache, torch.tensor(write, dtype=torch.long, device=device), length)
        x = model.tok_emb(tokens_t[:, None])
        for layer in model.layers:
            x = layer(x, cos, sin, None, cache, 0, mask)
        slots = sorted(self._running)
        rows = torch.tensor(slots, dtype=torch.long, device=device)
        logits = self._head(x[rows, 0])
        self.steps += 1
        self._accept([self._running[s] for s in slots], logits)

    # ---- sampling and output ---------------------------------------------------------------------------

    def _accept(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Sample one token for each sequence from its row of logits [len(seqs), V], then emit it."""
        if all(s.params.greedy and s.params.plain for s in seqs):
            for seq, token in zip(seqs, logits.argmax(dim=-1).tolist(), strict=True):
                self._emit(seq, token)
            return
        for seq, row in zip(seqs, logits, strict=True):
            try:
                token = self._sample(seq, row)
            except Exception as exc:  # a sampling bug fails its own request, not the whole batch
                log.exception("sampling failed for request %s", seq.request_id)
                self._finish(seq, FINISH_ABORT, [], "", error=exc)
                continue
            self._emit(seq, token)

    def _sample(self, seq: _Sequence, logits: torch.Tensor) -> int:
        p = seq.params
        # Python floats become the logits' float32 in these ops: 5e-324 would be 0 there, 1e300 inf.
        tiny, big = torch.finfo(logits.dtype).tiny, torch.finfo(logits.dtype).max
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
            logits[ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
        if p.repetition_penalty != 1:
            seen = torch.tensor(seq.prompt + seq.tokens, dtype=torch.long, device=logits.device).unique()
            picked = logits[seen]
            penalty = min(
                max(p.repetition_penalty, tiny), big
            )  # a float32 0 or inf would make 0 / 0, 0 * inf
            logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.tokens:
            counts = torch.bincount(
                torch.tensor(seq.tokens, device=logits.device), minlength=logits.shape[-1]
            ).to(logits.dtype)
            logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        if p.greedy:
            return int(logits.argmax())
        # A top_p below float32's range would round to 0 in filter_logits' comparison and drop every token.
        top_p = None if p.top_p is None else max(p.top_p, _MIN_TOP_P)
        filtered = filter_logits(scale_logits(logits, p.temperature), p.top_k, top_p)
        if not torch.isfinite(filtered).any():  # nothing left (cannot happen with valid params): greedy
            return int(logits.argmax())
        return int(torch.multinomial(filtered.softmax(dim=-1), 1, generator=seq.generator))

    def _emit(self, seq: _Sequence, token: int) -> None:
        now = time.perf_counter()
        if not seq.tokens:
            self.metrics.first_token(now - seq.arrival, seq.admitted - seq.arrival)
        else:
            self.metrics.next_token(now - seq.last_token_at)
        seq.last_token_at = now
        seq.tokens.append(token)
        p = seq.params
        reason = None
        if token in seq.stop_ids:
            reason = FINISH_STOP
        elif len(seq.tokens) >= p.max_tokens:
            reason = FINISH_LENGTH
        text_ids = seq.tokens[:-1] if reason == FINISH_STOP else seq.tokens
        if self.tokenizer is None:
            text, hold = "", 0
        else:
            text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], FINISH_STOP
            hold = 0 if reason else _held_back(text, p.stop)
        delta = text[seq.sent_chars : len(text) - hold]
        if reason:
            self._finish(seq, reason, [token], delta, text=text)
        else:
            if delta:
                seq.sent_chars += len(delta)
            self._call(seq, RequestOutput(seq.request_id, [token], delta, completion_tokens=len(seq.tokens)))

    def _finish(
        self,
        seq: _Sequence,
        reason: str,
        new_ids: list[int],
        delta: str,
        text: str | None = None,
        error: BaseException | None = None,
    ) -> None:
        seq.done = True
        if text is None and self.tokenizer is not None and reason != FINISH_ABORT:
            text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        self.metrics.finished(reason, time.perf_counter() - seq.arrival)
        out = RequestOutput(
            seq.request_id,
            new_ids,
            delta,
            finished=True,
            finish_reason=reason,
            prompt_tokens=len(seq.prompt),
            completion_tokens=len(seq.tokens),
            token_ids=list(seq.tokens),
            text=text if text is not None else "",
            error=error,
        )
        self._call(seq, out)

    @staticmethod
    def _call(seq: _Sequence, out: RequestOutput) -> None:
        try:
            seq.callback(out)
        except Exception:  # a closed event loop or a broken consumer: drop the request, not the engine
            log.warning("output callback of request %s failed; aborting it", seq.request_id, exc_info=True)
            seq.done = True


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters to keep back: an incomplete UTF-8 sequence (decoded as U+FFFD) or
    the start of a stop string."""
    hold = 0
    while hold < len(text) and text[len(text) - 1 - hold] == "\ufffd" and hold < 3:
        hold += 1
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold
