"""Bad input to serving, generation, evaluation and sweeps: an HTTP 4xx with a JSON error body naming the
field (never a 500), or one `error:` line (never a traceback), and nothing run before it is refused.

Real components: the lmloom API (engine + FastAPI app) and the security gateway in front of it, each a
uvicorn server on 127.0.0.1; the CLI in-process; a tiny random-weight checkpoint whose context (48
tokens) is shorter than the defaults that used to assume a big one.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
import yaml
from gateway_upstream import LoopbackServer
from typer.testing import CliRunner

from lmloom.artifacts.store import ArtifactStore
from lmloom.cli import app as cli_app
from lmloom.errors import ConfigError, LmloomError
from lmloom.evaluate.gates import load_gates_file
from lmloom.models.decoder import Decoder, DecoderConfig
from lmloom.models.io import model_files
from lmloom.security.context import store_security
from lmloom.serve.api import create_app
from lmloom.serve.engine import Engine
from lmloom.serve.gateway import ApiKeyStore, GatewayConfig, create_gateway
from lmloom.serve.gateway.keys import parse_duration
from lmloom.tokenizers.bpe import train_bpe

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SEQ_LEN = 48
MODEL = "tiny"
ENV = {"LMLOOM_TOKEN": None, "LMLOOM_POLICY": None, "LMLOOM_PRINCIPAL": None, "COLUMNS": "200"}
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [(STDLIB / name).read_text(encoding="utf-8") for name in ("textwrap.py", "string.py")]
    return train_bpe(texts, vocab_size=300, min_frequency=2)


def tiny_model(vocab_size: int) -> Decoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(
        vocab_size=vocab_size, seq_len=SEQ_LEN, d_model=32, n_layers=1, n_heads=2, init_std=0.3
    )
    return Decoder(cfg)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tokenizer):
    """A store with one short-context checkpoint; returns (root, checkpoint id)."""
    root = tmp_path_factory.mktemp("bad") / "store"
    st = ArtifactStore(root, security=store_security(root))
    out = st.create(kind="checkpoint", stage="train.pretrain", config={"test": 1}, principal="test")
    for name, data in {**model_files(tiny_model(tokenizer.vocab_size)), **tokenizer.files()}.items():
        out.write_bytes(name, data)
    return root, out.commit().id


@pytest.fixture(scope="module")
def servers(store, tokenizer):
    """The API on its own, and the gateway in front of it (the upstream in-process, as `lmloom serve`)."""
    root, _ = store
    key = ApiKeyStore.for_store(root).create(name="t", rpm=10_000, tpm=10**7)[1]
    with Engine(tiny_model(tokenizer.vocab_size), tokenizer, max_batch_size=4) as engine:
        api = create_app(engine, MODEL)
        gateway = create_gateway(api, GatewayConfig(), root)
        with LoopbackServer(api) as direct, LoopbackServer(gateway) as gw:
            yield {"api": direct.url, "gateway": gw.url, "key": key, "engine": engine}


def cli(root: Path, *args):
    """(exit code, output) of an in-process `lmloom` command; a traceback-worthy exception fails the test."""
    result = CliRunner().invoke(cli_app, [str(a) for a in args], env={**ENV, "LMLOOM_HOME": str(root)})
    exc = result.exception
    if isinstance(exc, LmloomError):
        return exc.exit_code, result.output + str(exc)
    if exc is not None and not isinstance(exc, SystemExit):
        raise exc
    return result.exit_code, result.output


def api_post(servers, path, content, headers=None):
    return httpx.post(servers["api"] + path, content=content, headers=headers or {}, timeout=30)


def gw_post(servers, path, content, headers=None):
    headers = {"Authorization": f"Bearer {servers['key']}", **(headers or {})}
    return httpx.post(servers["gateway"] + path, content=content, headers=headers, timeout=30)


JSON = {"content-type": "application/json"}


# ---- the API ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", '{"model": "tiny", "prompt": "\\ud800", "max_tokens": 2}', "prompt"),
        ("/v1/completions", '{"model": "tiny", "prompt": ["a", "x\\udfff"], "max_tokens": 2}', "prompt.1"),
        (
            "/v1/chat/completions",
            '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',
            "messages.0.content",
        ),
        ("/v1/completions", '{"model": "\\ud800", "prompt": "a", "max_tokens": 2}', "model"),
    ],
)
def test_api_lone_surrogate_is_a_400_naming_the_field(servers, path, body, param):
    r = api_post(servers, path, body.encode(), JSON)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    ok = api_post(
        servers, "/v1/completions", b'{"model": "tiny", "prompt": "\\ud83d\\ude00", "max_tokens": 2}', JSON
    )
    assert ok.status_code == 200  # a surrogate *pair* is an emoji, and fine


def test_api_malformed_json_names_no_field(servers):
    r = api_post(servers, "/v1/completions", b'{"model":', JSON)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] is None and error["code"] == "invalid_json" and "not valid JSON" in error["message"]


def test_api_body_that_is_not_a_json_object_says_so(servers):
    body = b'{"model": "tiny", "prompt": "a", "max_tokens": 2}'
    for content, headers in ((body, {"content-type": "text/plain"}), (b"[1, 2]", JSON)):
        r = api_post(servers, "/v1/completions", content, headers)
        assert r.status_code == 400
        assert "JSON object" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 2, "stop": [1]}, "stop"),
        ("/v1/completions", {"model": MODEL, "prompt": ["a", 5], "max_tokens": 2}, "prompt"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": None}]},
            "messages.0.content",
        ),
    ],
)
def test_api_union_field_errors_name_the_field_not_the_type(servers, path, body, param):
    r = httpx.post(servers["api"] + path, json=body, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param, r.text


# ---- the gateway in front of it -----------------------------------------------------------------------


def test_gateway_lone_surrogate_is_a_400_not_a_500(servers):
    for path, body, param in (
        ("/v1/completions", '{"model": "tiny", "prompt": "\\ud800", "max_tokens": 2}', "prompt"),
        (
            "/v1/chat/completions",
            '{"model": "tiny", "messages": [{"role": "user", "content": "a\\udfff"}], "max_tokens": 2}',
            "messages.0.content",
        ),
    ):
        r = gw_post(servers, path, body.encode(), JSON)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
    r = gw_post(
        servers, "/v1/completions", b'{"model": "tiny", "prompt": "\\ud83d\\ude00", "max_tokens": 2}', JSON
    )
    assert r.status_code == 200, r.text


def test_gateway_forwards_the_body_it_validated_as_json(servers):
    body = b'{"model": "tiny", "prompt": "a", "max_tokens": 2}'
    r = gw_post(servers, "/v1/completions", body, {"content-type": "text/plain"})
    assert r.status_code == 200, r.text


def test_gateway_default_max_tokens_fits_a_short_context(servers):
    """No max_tokens: the gateway's default (512) bounds the reply; it is not a demand that a 48-token
    model must refuse."""
    r = gw_post(
        servers, "/v1/completions", b'{"model": "tiny", "prompt": "def f(", "ignore_eos": true}', JSON
    )
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == SEQ_LEN
    chat = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}'
    assert gw_post(servers, "/v1/chat/completions", chat, JSON).status_code == 200
    # a client's own max_tokens stays a demand, even with the gateway's header forged
    body = b'{"model": "tiny", "prompt": "def f(", "max_tokens": 100}'
    r = gw_post(servers, "/v1/completions", body, {**JSON, "x-lmloom-max-tokens-default": "1"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_gateway_union_field_errors_name_the_field(servers):
    body = b'{"model": "tiny", "prompt": "a", "max_tokens": 2, "stop": [1]}'
    r = gw_post(servers, "/v1/completions", body, JSON)
    assert r.status_code == 422 and r.json()["error"]["param"] == "stop", r.text


def test_gateway_model_route_keeps_to_the_key_scope(servers, store):
    root, _ = store
    other = ApiKeyStore.for_store(root).create(name="other", models=["other"])[1]
    headers = {"Authorization": f"Bearer {other}"}
    assert httpx.get(servers["gateway"] + "/v1/models", headers=headers).json()["data"] == []
    r = httpx.get(servers["gateway"] + f"/v1/models/{MODEL}", headers=headers)
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    mine = {"Authorization": f"Bearer {servers['key']}"}
    assert httpx.get(servers["gateway"] + f"/v1/models/{MODEL}", headers=mine).json()["id"] == MODEL


def test_gateway_named_route_with_a_trailing_slash_is_served_not_redirected_upstream(servers):
    mine = {"Authorization": f"Bearer {servers['key']}"}
    r = httpx.get(servers["gateway"] + f"/v1/models/{MODEL}/", headers=mine)
    assert r.status_code == 200 and r.json()["id"] == MODEL  # not a 307 to http://upstream/...
    body = b'{"model": "tiny", "prompt": "a", "max_tokens": 2}'
    assert gw_post(servers, "/v1/completions/", body, JSON).status_code == 200


def test_key_lifetime_past_the_calendar_is_one_error():
    for text in ("99999999d", "9999999999999999999999w"):
        with pytest.raises(ConfigError, match="too far in the future"):
            parse_duration(text)
    assert parse_duration("30d").days == 30


def test_serve_upstream_url_without_a_host_is_refused_before_listening(store, monkeypatch):
    root, _ = store
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(app))
    for url in ("http://", "https:///v1", "http://h:99999"):
        code, output = cli(root, "serve", "--upstream", url)
        assert code == 2 and "--upstream" in output, output
    assert not started


# ---- generate -----------------------------------------------------------------------------------------


def test_generate_without_max_tokens_fits_a_short_context(store):
    root, ckpt = store
    code, output = cli(root, "generate", ckpt[:12], "--prompt", "def f(", "--seed", "1")
    assert code == 0, output
    code, output = cli(root, "generate", ckpt[:12], "--prompt", "def f(", "--max-tokens", "100")
    assert code == 1 and "exceeds the model's seq_len" in output  # asked for: still an error


def test_generate_seed_out_of_range_is_a_usage_error(store):
    root, ckpt = store
    code, output = cli(root, "generate", ckpt[:12], "--prompt", "a", "--seed", str(10**30))
    assert code == 2 and "--seed" in output, output


def test_generate_prompt_that_is_not_utf8_is_a_usage_error(store):
    root, ckpt = store
    # a byte the locale cannot decode reaches Python as a surrogate escape (os.fsdecode of b"ab\xffc")
    code, output = cli(root, "generate", ckpt[:12], "--prompt", "ab\udcffc", "--max-tokens", "2")
    assert code == 2 and "--prompt" in output and "0xff" in output, output


def test_serve_help_teaches_the_config_file(store):
    root, _ = store
    code, output = cli(root, "serve", "--help")
    assert code == 0 and "default_max_tokens" in output and "validation:" in output


# ---- evaluate -----------------------------------------------------------------------------------------


def test_bias_probes_longer_than_the_context_are_one_error(store):
    root, ckpt = store
    code, output = cli(root, "evaluate", "bias", ckpt[:12], "--max-new-tokens", "1")
    assert code == 1 and "do not fit this model's context" in output, output


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- 1\n", "expected a mapping"),
        ("checks: {robustness_max_drop: true}\n", "expected a number"),
        ("checks: {bias_max_gap: [\n", "not valid YAML at line"),
    ],
)
def test_gates_config_of_the_wrong_shape_is_one_error(tmp_path, text, message):
    path = tmp_path / "gates.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_gates_file(path)


def test_evaluate_json_path_is_checked_before_the_evaluation(store, tmp_path):
    root, ckpt = store
    for path in (tmp_path, tmp_path / "missing" / "r.json"):
        code, output = cli(root, "evaluate", "robustness", ckpt[:12], "--max-windows", "1", "--json", path)
        assert code == 2 and "--json" in output, output
    assert not (tmp_path / "missing").exists()


def test_harness_device_and_include_path_are_checked(store, tmp_path):
    pytest.importorskip("lm_eval")
    root, ckpt = store
    for args in (["--device", "foo"], ["--device", "mps"], ["--include-path", tmp_path / "nowhere"]):
        code, output = cli(root, "evaluate", "harness", ckpt[:12], "--limit", "1", *args)
        assert code == 2 and args[0] in output, output


def test_gates_help_names_the_store_file(store):
    root, _ = store
    code, output = cli(root, "evaluate", "gates", "--help")
    assert code == 0 and "STORE/gates.yaml" in output


# ---- sweep --------------------------------------------------------------------------------------------

SWEEP_RECIPE = """
name: tiny
stages:
  corpus:
    stage: data.prepare
    config:
      sources: [{{type: text-dir, path: {corpus}, patterns: ["*.py"]}}]
      val_fraction: 0.2
      executor: {{workers: 1}}
  tokenizer: {{stage: tokenizer.train, inputs: {{corpus: corpus}}, config: {{vocab_size: 300}}}}
  shards: {{stage: tokenizer.encode, inputs: {{corpus: corpus, tokenizer: tokenizer}}}}
  pretrain:
    stage: train.pretrain
    inputs: {{shards: shards, tokenizer: tokenizer}}
    config:
      model: {{seq_len: 32, d_model: 32, n_layers: 1, n_heads: 2}}
      batch_size: 2
      max_steps: 2
      precision: fp32
      compile: false
      eval_every: 2
      eval_windows: 2
      final_eval_windows: 2
      checkpoint_every: 2
      log_every: 1
"""


def sweep_recipe(tmp_path) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("textwrap.py", "shlex.py"):
        (corpus / name).write_text((STDLIB / name).read_text(encoding="utf-8"), encoding="utf-8")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(SWEEP_RECIPE.format(corpus=corpus))
    return recipe


@pytest.mark.parametrize(
    ("param", "value", "message"),
    [
        ({"type": "float", "low": 1e-3, "high": 1e-2}, 5, "outside the range"),
        ({"type": "int", "low": 0, "high": 40, "step": 10}, 50, "outside the range"),
        ({"type": "categorical", "choices": [1e-3, 1e-2]}, 3e-3, "not one of the choices"),
    ],
)
def test_sweep_enqueued_value_outside_its_param_is_refused(tmp_path, param, value, message):
    from lmloom.config import load_recipe
    from lmloom.sweep import SweepSpace, check_space

    key = "pretrain.optim.warmup_steps" if param["type"] == "int" else "pretrain.optim.lr"
    space = SweepSpace.model_validate({"params": {key: param}, "enqueue": [{key: value}]})
    with pytest.raises(ConfigError, match=f"enqueue\\[0\\].{key} = .*{message}"):
        check_space(load_recipe(str(sweep_recipe(tmp_path))), space, "space")


def test_sweep_with_a_metric_the_step_never_records_stops_after_one_trial(tmp_path):
    pytest.importorskip("optuna")
    recipe = sweep_recipe(tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "objective": {"metric": "accuracy"},
                "trials": 3,
                "params": {"pretrain.optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2}},
            }
        )
    )
    root = tmp_path / "store"
    code, output = cli(root, "sweep", recipe, "--space", space, "--study", "s")
    assert code == 2 and "objective.metric = 'accuracy'" in output and "val_loss" in output, output
    made = ArtifactStore(root, security=store_security(root))
    assert [made.read_manifest(i).kind for i in made.ids()].count("checkpoint") == 1  # not one per trial
