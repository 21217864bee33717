"""The continuous-batching engine and the OpenAI-compatible API, over a real uvicorn server on 127.0.0.1.

A tiny random-weight Decoder (init_std 0.3: varied, confident greedy choices) and a BPE tokenizer trained
in a fraction of a second; the official `openai` client talks to the server; schemathesis fuzzes it.
"""

from __future__ import annotations

import socket
import sysconfig
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from lmloom.models.decoder import Decoder, DecoderConfig
from lmloom.serve.api import create_app
from lmloom.serve.engine import ContextLengthExceeded, Engine, SamplingParams
from lmloom.serve.generate import generate
from lmloom.tokenizers.bpe import train_bpe

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

MODEL = "lmloom-tiny"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
CHAT = "<|user|>\nhello\n<|end|>\n<|assistant|>\nhi there\n<|end|>\n"


def tiny_model(vocab_size: int, seq_len: int = 96) -> Decoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(
        vocab_size=vocab_size, seq_len=seq_len, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.3
    )
    return Decoder(cfg)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [(STDLIB / name).read_text(encoding="utf-8") for name in ("textwrap.py", "string.py")]
    return train_bpe(texts + [CHAT] * 20, vocab_size=320, min_frequency=2)


@pytest.fixture(scope="module")
def engine(tokenizer):
    with Engine(tiny_model(tokenizer.vocab_size), tokenizer, max_batch_size=4) as eng:
        yield eng


@pytest.fixture(scope="module")
def base_url(engine):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(engine, MODEL), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def client(base_url):
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=30) as c:
        yield c


# ---- the engine -------------------------------------------------------------------------------------------


def test_continuous_batching_equals_sequential_greedy():
    """More requests than slots, different prompt lengths and budgets: requests join and leave the batch
    between decode steps, and every one gets exactly the tokens of `generate` run alone."""
    model = tiny_model(97)
    prompts = [[3, 17, 42, 8, 61], [5], list(range(10, 40)), [7, 7, 9], list(range(60, 72)), [11, 12]]
    budgets = [12, 30, 6, 20, 9, 25]
    expected = [
        generate(model, p, max_new_tokens=n, temperature=0) for p, n in zip(prompts, budgets, strict=True)
    ]
    assert len({tuple(e) for e in expected}) == len(expected)
    done: dict[int, list[int]] = {}
    finished = threading.Event()

    def on_output(i, out):
        if out.finished:
            done[i] = out.token_ids
            if len(done) == len(prompts):
                finished.set()

    with Engine(model, max_batch_size=3) as eng:
        for i, (p, n) in enumerate(zip(prompts, budgets, strict=True)):
            eng.submit(p, SamplingParams(max_tokens=n, temperature=0), lambda out, i=i: on_output(i, out))
            if i == 3:
                time.sleep(0.02)  # the rest arrive while the first ones are decoding
        assert finished.wait(30)
        steps = eng.steps
    assert [done[i] for i in range(len(prompts))] == expected
    assert steps < sum(budgets) - len(budgets)  # decode steps were shared between requests


def test_seeded_sampling_matches_generate_and_is_independent_of_the_batch():
    model = tiny_model(97)
    sampling = dict(temperature=0.9, top_k=40, top_p=0.95)
    solo = generate(model, [4, 5, 6], max_new_tokens=15, seed=11, **sampling)
    with Engine(model, max_batch_size=4) as eng:
        outs = eng.generate(
            [[4, 5, 6], [1, 2], [4, 5, 6]],
            SamplingParams(max_tokens=15, seed=11, **sampling),
        )
        again = eng.generate([[4, 5, 6]], SamplingParams(max_tokens=15, seed=12, **sampling))
    assert outs[0].token_ids == solo == outs[2].token_ids
    assert again[0].token_ids != solo


def test_stop_ids_stop_strings_and_context_check(tokenizer):
    model = tiny_model(tokenizer.vocab_size)
    with Engine(model, tokenizer) as eng:
        (free,) = eng.generate([[40, 41]], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
        stop_id = free.token_ids[5]
        (cut,) = eng.generate([[40, 41]], SamplingParams(max_tokens=20, temperature=0, stop_ids=(stop_id,)))
        first = free.token_ids.index(stop_id)
        assert cut.token_ids == free.token_ids[: first + 1] and cut.finish_reason == "stop"
        assert cut.text == tokenizer.decode(free.token_ids[:first], skip_special_tokens=True)
        needle = next(free.text[i : i + 2] for i in range(4, len(free.text)) if free.text[i : i + 2].strip())
        (by_text,) = eng.generate(
            [[40, 41]], SamplingParams(max_tokens=20, temperature=0, stop=(needle,), ignore_eos=True)
        )
        assert by_text.finish_reason == "stop" and by_text.text == free.text[: free.text.find(needle)]
        streamed = "".join(
            o.delta
            for o in eng.stream(
                [40, 41], SamplingParams(max_tokens=20, temperature=0, stop=(needle,), ignore_eos=True)
            )
        )
        assert streamed == by_text.text  # a stop string is never streamed, not even in part
        with pytest.raises(ContextLengthExceeded, match="maximum context length is 96"):
            eng.submit([1] * 90, SamplingParams(max_tokens=7), lambda out: None)


def test_extreme_sampling_values_sample_finite_probabilities():
    # The fuzzer found them: 5e-324 divides logits to inf, and the softmax made nan of them.
    model = tiny_model(97)
    extremes = (
        dict(repetition_penalty=5e-324),
        dict(repetition_penalty=1e300),
        dict(temperature=5e-324),
        dict(temperature=5e-324, repetition_penalty=5e-324),
        dict(temperature=1e-40, repetition_penalty=1e300, frequency_penalty=2.0, top_p=1e-30, top_k=5),
    )
    with Engine(model, max_batch_size=2) as eng:
        for extreme in extremes:
            (out,) = eng.generate([[3, 4, 5, 3, 9]], SamplingParams(max_tokens=4, seed=1, **extreme))
            assert out.error is None and out.finish_reason == "length" and len(out.token_ids) == 4, extreme


def test_a_request_whose_sampling_fails_leaves_the_batch_running(monkeypatch):
    """The failing request ends with its error; the others in the engine are decoded as if alone."""
    model = tiny_model(97)
    expected = generate(model, [5, 6], max_new_tokens=8, temperature=0)
    with Engine(model, max_batch_size=3) as eng:
        real = eng._sample

        def sample(seq, logits):
            if seq.params.seed == 666:
                raise RuntimeError("sampling bug")
            return real(seq, logits)

        monkeypatch.setattr(eng, "_sample", sample)
        outs, finished = {}, threading.Event()

        def on_output(name, out):
            if out.finished:
                outs[name] = out
                if len(outs) == 2:
                    finished.set()

        bad = SamplingParams(max_tokens=8, temperature=0.8, seed=666)
        eng.submit([1, 2, 3], bad, lambda out: on_output("bad", out))
        eng.submit([5, 6], SamplingParams(max_tokens=8, temperature=0), lambda out: on_output("good", out))
        assert finished.wait(30)
    assert isinstance(outs["bad"].error, RuntimeError) and outs["bad"].finish_reason == "abort"
    assert outs["good"].error is None and outs["good"].token_ids == expected


# ---- the HTTP API through the official client -------------------------------------------------------------


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_and_its_stream_agree(client):
    args = dict(
        model=MODEL, prompt="def wrap(text):", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    done = client.completions.create(**args)
    (choice,) = done.choices
    assert choice.finish_reason == "length" and isinstance(choice.text, str)
    assert done.usage.completion_tokens == 12 and done.usage.prompt_tokens > 0
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_completion_and_its_stream_agree(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    done = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    (choice,) = done.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("length", "stop")
    assert "<|end|>" not in choice.message.content
    assert done.usage.prompt_tokens > 10
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.strip() == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_concurrent_requests_get_their_own_greedy_answers(client, base_url):
    prompts = ["import os", "class A:", "x = [", "def f(a, b):\n    return"]
    alone = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0).choices[0].text
        for p in prompts
    ]
    results: dict[int, str] = {}

    def ask(i):
        out = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=8, temperature=0)
        results[i] = out.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [results[i] for i in range(len(prompts))] == alone
    # n choices and a seed: reproducible, and the choices differ from each other
    a = client.completions.create(model=MODEL, prompt="import", max_tokens=10, n=3, seed=5)
    b = client.completions.create(model=MODEL, prompt="import", max_tokens=10, n=3, seed=5)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert len({c.text for c in a.choices}) > 1


def test_bad_requests_get_openai_errors(client, base_url):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="def f():", max_tokens=500)
    assert err.value.code == "context_length_exceeded" and "maximum context length is 96" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a <|end|> b"}])
    assert err.value.code == "marker_in_content"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    r = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": "x", "temperature": 7})
    assert r.status_code == 400
    assert (
        r.json()["error"]["param"] == "temperature" and r.json()["error"]["type"] == "invalid_request_error"
    )
    r = httpx.post(
        f"{base_url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "error" in r.json()
    for ids in ([5, -1], [10**30]):  # out of the vocabulary, echoed or not (the fuzzer found the echo)
        r = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": ids, "echo": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_client_disconnect_frees_the_slot(engine, base_url):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 80, "stream": True, "extra": 1, "ignore_eos": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    deadline = time.monotonic() + 5
    while engine.num_running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.num_running == 0


def test_health_and_metrics(client, base_url):
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}
    client.completions.create(model=MODEL, prompt="a", max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="a", max_tokens=1000)
    text = httpx.get(f"{base_url}/metrics").text
    for series in (
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        'lmloom:rejections_total{reason="context_length"}',
    ):
        assert series in text, series
    assert f'model_name="{MODEL}"' in text


# ---- fuzzing ----------------------------------------------------------------------------------------------


def test_fuzzed_requests_never_get_a_server_error(base_url):
    """Schemathesis generates requests from the app's OpenAPI schema (about 200 over its 6 operations,
    most of them completions and chat): whatever the body, never a 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    api = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    calls: dict[str, int] = {}
    for result in api.get_all_operations():
        operation = result.ok()
        many = operation.method.upper() == "POST"

        @given(case=operation.as_strategy())
        @settings(
            max_examples=90 if many else 10,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def call(case):
            response = case.call_and_validate(base_url=base_url, checks=[not_a_server_error], timeout=30)
            key = (case.operation.label, response.status_code)
            calls[key] = calls.get(key, 0) + 1

        call()
    assert len({label for label, _ in calls}) == 6 and sum(calls.values()) >= 150, calls
    # Generation ran, not only 400s (which endpoint's generated bodies pass validation varies with the
    # rest of the session's state, so at least one of the two).
    assert calls.get(("POST /v1/completions", 200), 0) + calls.get(("POST /v1/chat/completions", 200), 0), (
        calls
    )


def test_fuzzed_requests_through_the_gateway_never_get_a_server_error(base_url, tmp_path):
    """The same fuzzing against the security gateway in front of this API (rate limits out of the way):
    its validation, injection scan and output filter never turn a strange body into a 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from gateway_upstream import LoopbackServer
    from hypothesis import HealthCheck, given, settings

    from lmloom.serve.gateway import ApiKeyStore, GatewayConfig, create_gateway

    store = tmp_path / "store"
    _, api_key = ApiKeyStore.for_store(store).create()
    config = GatewayConfig(limits={"rpm": 1_000_000, "tpm": 10**12})
    schema = schemathesis.openapi.from_dict(httpx.get(f"{base_url}/openapi.json").json())
    calls: dict[tuple[str, int], int] = {}
    with LoopbackServer(create_gateway(base_url, config, store)) as gateway:
        for result in schema.get_all_operations():
            operation = result.ok()
            if operation.method.upper() != "POST":
                continue

            @given(case=operation.as_strategy())
            @settings(
                max_examples=60,
                deadline=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            def call(case):
                case.headers = {**(case.headers or {}), "Authorization": f"Bearer {api_key}"}
                response = case.call(base_url=gateway.url, timeout=30)
                assert response.status_code < 500, (case.body, response.text)
                key = (case.operation.label, response.status_code)
                calls[key] = calls.get(key, 0) + 1

            call()
    assert {label for label, _ in calls} == {"POST /v1/completions", "POST /v1/chat/completions"}
    assert sum(calls.values()) >= 100, calls
