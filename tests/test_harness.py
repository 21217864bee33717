"""lm-evaluation-harness interop: `lm_eval` evaluates an lmloom checkpoint on lmloom's own local tasks
(data inside the package, sockets blocked), and the adapter's numbers are the model's own log-probabilities
computed by hand here.

The checkpoint is a random-weight Decoder (init_std 0.3: varied, confident predictions) with a BPE
tokenizer trained in a fraction of a second, committed to a tmp store as a `checkpoint` artifact; its
seq_len of 64 makes the longer task documents span several rolling windows.
"""

from __future__ import annotations

import importlib
import json
import math
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from lmloom.artifacts.store import ArtifactStore
from lmloom.cli import app
from lmloom.errors import LmloomError
from lmloom.models.decoder import Decoder, DecoderConfig
from lmloom.models.io import model_files
from lmloom.security.audit import AuditLog
from lmloom.security.context import store_security
from lmloom.serve.generate import generate
from lmloom.tokenizers.bpe import train_bpe

lm_eval = pytest.importorskip("lm_eval")  # the `eval` extra (in `dev`)
from lm_eval.api.instance import Instance  # noqa: E402

from lmloom.evaluate import harness  # noqa: E402  (registers the model type "lmloom")
from lmloom.evaluate.tasks import build  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
ENV = {"LMLOOM_TOKEN": None, "LMLOOM_POLICY": None, "LMLOOM_PRINCIPAL": None, "COLUMNS": "200"}
SEQ_LEN = 64
runner = CliRunner()
torch.set_num_threads(1)  # the shared CPUs thrash with more threads than free cores


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness") / "store"
    store = ArtifactStore(root, security=store_security(root))
    texts = [(STDLIB / name).read_text(encoding="utf-8") for name in ("textwrap.py", "string.py")]
    tokenizer = train_bpe(texts, vocab_size=300, min_frequency=2)
    torch.manual_seed(0)
    cfg = DecoderConfig(
        vocab_size=tokenizer.vocab_size, seq_len=SEQ_LEN, d_model=32, n_layers=1, n_heads=2, init_std=0.3
    )
    model = Decoder(cfg).eval()
    out = store.create(
        kind="checkpoint", stage="train.pretrain", config={"test": "harness"}, principal="test"
    )
    for name, data in {**model_files(model), **tokenizer.files()}.items():
        out.write_bytes(name, data)
    artifact = out.commit()
    lm = harness.LmloomLM(artifact=artifact, batch_size=2)  # small batches: several, with padding
    return {"root": root, "artifact": artifact, "model": model, "tokenizer": tokenizer, "lm": lm}


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def requests(kind: str, *args: tuple) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] next-token log-probabilities of one unpadded sequence."""
    with torch.no_grad():
        return F.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


def by_hand(model, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
    lp = logprobs(model, context_ids + continuation_ids)[len(context_ids) - 1 : -1]
    target = torch.tensor(continuation_ids)
    return float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())


def test_task_files_are_what_the_builder_makes():
    made = build.build()
    for path, text in made.items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.name}: run python -m lmloom.evaluate.tasks.build"
        )
    mc = [json.loads(line) for line in made[build.MC_FILE].splitlines()]
    assert len(mc) >= 30 and all(len(item["choices"]) == 4 for item in mc)
    assert all(len({c.strip() for c in item["choices"]}) == 4 for item in mc)  # no duplicate choice
    assert {item["label"] for item in mc} == {0, 1, 2, 3}


def test_an_artifact_id_that_looks_like_a_number_stays_text():
    # lm_eval's own parser makes 0129655790 the int 129655790 (a CI run drew such an id) and 12e4567890 a float.
    args = harness.parse_model_args("model=0129655790,store=/tmp/0123,batch_size=4")
    assert args == {"model": "0129655790", "store": "/tmp/0123", "batch_size": 4}
    assert harness.parse_model_args("pretrained=12e4567890")["pretrained"] == "12e4567890"


def test_lm_eval_runs_both_local_tasks_on_a_checkpoint(tiny, no_network):
    root, artifact = tiny["root"], tiny["artifact"]
    results = lm_eval.simple_evaluate(
        model="lmloom",
        model_args=f"store={root},model={artifact.id[:10]},batch_size=4",
        tasks=["lmloom_stdlib_ppl", "lmloom_stdlib_mc"],
        task_manager=harness.task_manager(),
        limit=6,
        log_samples=False,
    )
    ppl, mc = results["results"]["lmloom_stdlib_ppl"], results["results"]["lmloom_stdlib_mc"]
    for name in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert math.isfinite(ppl[name]) and ppl[name] > 0, name
    assert ppl["bits_per_byte,none"] == pytest.approx(math.log2(ppl["byte_perplexity,none"]))
    for name in ("acc,none", "acc_norm,none"):
        assert 0 <= mc[name] <= 1 and math.isfinite(mc[f"{name[:-5]}_stderr,none"]), name
    assert results["n-samples"]["lmloom_stdlib_mc"]["effective"] == 6
    assert results["config"]["lmloom_checkpoint"] == artifact.id  # which model made the figures
    opened = [e for e in AuditLog(root / "audit.jsonl").entries() if e["event"] == "evaluate.harness"]
    assert opened and opened[-1]["artifact"] == artifact.id


def test_loglikelihood_is_the_models_own_log_probability(tiny):
    lm, model, tok = tiny["lm"], tiny["model"], tiny["tokenizer"]
    context = "def chunked(iterable, size):\n    "  # the trailing spaces move to the continuation
    pairs = [
        (context, "return list(iterable)"),
        ("import o", "s"),
        ("class Template:\n    delimiter = '$'\n", "    idpattern = r'(?a:[_a-z][_a-z0-9]*)'"),
    ]
    got = lm.loglikelihood(requests("loglikelihood", *pairs), disable_tqdm=True)
    for (ctx, cont), (score, greedy) in zip(pairs, got, strict=True):
        stripped = ctx.rstrip()
        ctx_ids, whole = tok.encode(stripped), tok.encode(ctx + cont)
        assert whole[: len(ctx_ids)] == ctx_ids  # a clean boundary, so the split is unambiguous
        want, want_greedy = by_hand(model, ctx_ids, whole[len(ctx_ids) :])
        assert score == pytest.approx(want, abs=1e-5) and greedy == want_greedy

    # is_greedy: the model's own argmax continuation is greedy (one whose text re-encodes to the same
    # tokens: a random model often prefers tokens the tokenizer would never produce for that text)
    for line in filter(str.strip, build.read_source()[0].text.splitlines()):
        ctx_ids = tok.encode(line.rstrip())
        new = generate(model, ctx_ids, max_new_tokens=2, temperature=0.0)
        cont = tok.decode(new)
        if tok.encode(line.rstrip() + cont) == ctx_ids + new and not cont.isspace():
            break
    else:
        pytest.fail("no line whose greedy continuation round-trips through the tokenizer")
    [(score, greedy)] = lm.loglikelihood(requests("loglikelihood", (line.rstrip(), cont)))
    assert greedy and score == pytest.approx(by_hand(model, ctx_ids, new)[0], abs=1e-5)

    # a continuation longer than seq_len: pieces of seq_len tokens, each with a full window before it
    context, long = "import os", "\n\n" + build.read_source()[1].text
    [(score, _)] = lm.loglikelihood(requests("loglikelihood", (context, long)))
    full, start = tok.encode(context + long), len(tok.encode(context))
    assert full[:start] == tok.encode(context) and len(full) - start > 2 * SEQ_LEN
    want = 0.0
    for k in range(0, len(full) - start, SEQ_LEN):
        end = min(start + k + SEQ_LEN, len(full))
        low = max(0, end - SEQ_LEN - 1)
        lp = logprobs(model, full[low : end - 1])  # position q - 1 - low predicts token q
        want += sum(float(lp[q - 1 - low, full[q]]) for q in range(start + k, end))
    assert score == pytest.approx(want, abs=1e-4)

    # an empty context conditions on <|eos|>, the document separator of training
    [(score, _)] = lm.loglikelihood(requests("loglikelihood", ("", "import os")))
    assert score == pytest.approx(by_hand(model, [tok.eos_id], tok.encode("import os"))[0], abs=1e-5)


def test_a_token_across_the_boundary_is_scored_not_dropped(tiny):
    lm, tok = tiny["lm"], tiny["tokenizer"]
    context, continuation = "    sel", "f.width"  # "self" is one token: it spans the boundary
    assert tok.encode(context + continuation)[: len(tok.encode(context))] != tok.encode(context)
    context_ids, continuation_ids = lm._encode_pair(context, continuation)
    assert context_ids + continuation_ids == tok.encode(context + continuation)
    assert tok.decode(continuation_ids).endswith(continuation)
    # lm_eval's split by the context's token count would score ".width" without the "f"
    _, theirs = lm_eval.api.model.TemplateLM._encode_pair(lm, context, continuation)
    assert tok.decode(theirs) == ".width"


def test_loglikelihood_rolling_sums_every_token_of_the_text(tiny):
    lm, model, tok = tiny["lm"], tiny["model"], tiny["tokenizer"]
    short = "import os\nprint(os.getcwd())\n"
    ids = tok.encode(short)
    assert len(ids) < SEQ_LEN
    lp = logprobs(model, [tok.eos_id, *ids[:-1]])
    want = float(lp.gather(-1, torch.tensor(ids)[:, None]).sum())
    long = build.read_source()[0].text * 2  # several windows of SEQ_LEN tokens, the last one partial
    [got_short, got_long] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (short,), (long,)))
    assert got_short == pytest.approx(want, abs=1e-5)

    # disjoint windows (lm_eval's scheme with context 1); the last, partial one gets a full context
    tokens = tok.encode(long)
    full, total = [tok.eos_id, *tokens], 0.0
    assert len(tokens) > 2 * SEQ_LEN and len(tokens) % SEQ_LEN
    for start in range(0, len(tokens), SEQ_LEN):
        end = min(start + SEQ_LEN, len(tokens))
        low = max(0, end - SEQ_LEN)
        lp = logprobs(model, full[low:end])
        total += sum(float(lp[p - low, tokens[p]]) for p in range(start, end))
    assert got_long == pytest.approx(total, abs=1e-4)


def test_generate_until_is_greedy_kv_cached_decoding_cut_at_the_stop_string(tiny):
    lm, model, tok = tiny["lm"], tiny["model"], tiny["tokenizer"]
    context = "def chunked(iterable, size):\n"
    new = generate(model, tok.encode(context), max_new_tokens=24, temperature=0.0, eos_id=tok.eos_id)
    text = tok.decode([t for t in new if t != tok.eos_id])
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    [cut, whole] = lm.generate_until(
        requests(
            "generate_until",
            (context, {"until": [stop], "max_gen_toks": 24, "do_sample": False}),
            (context, {"until": ["\x00never"], "max_gen_toks": 24}),
        )
    )
    assert cut == text[: text.find(stop)] and whole == text
    with pytest.raises(LmloomError, match="unknown generation_kwargs"):
        lm.generate_until(requests("generate_until", (context, {"num_beams": 4})))


def test_figures_match_lm_evals_hf_model_on_the_exported_checkpoint(tiny, tmp_path, no_network):
    """The same scores as lm_eval's own `hf` model gives the Hugging Face export of the checkpoint (with
    <|eos|> as its prefix token, as lmloom's models are trained): the adapter follows lm_eval's rules."""
    pytest.importorskip("transformers")
    from lm_eval.models.huggingface import HFLM

    from lmloom.models.hf_llama import export_hf_dir

    tok = tiny["tokenizer"]
    export_hf_dir(
        tiny["model"], tmp_path, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id
    )
    for name, data in tok.files().items():
        (tmp_path / name).write_bytes(data)
    hf = HFLM(
        pretrained=str(tmp_path), device="cpu", batch_size=4, prefix_token_id=tok.eos_id, dtype="float32"
    )
    docs = [(doc.text,) for doc in build.read_source()[:4]]  # several windows each
    ours = tiny["lm"].loglikelihood_rolling(requests("loglikelihood_rolling", *docs))
    theirs = hf.loglikelihood_rolling(requests("loglikelihood_rolling", *docs), disable_tqdm=True)
    assert ours == pytest.approx(theirs, abs=1e-3)
    items = [json.loads(line) for line in build.MC_FILE.read_text().splitlines()[:3]]
    pairs = [(item["context"], choice) for item in items for choice in item["choices"]]
    ours = tiny["lm"].loglikelihood(requests("loglikelihood", *pairs), disable_tqdm=True)
    theirs = hf.loglikelihood(requests("loglikelihood", *pairs), disable_tqdm=True)
    assert [s for s, _ in ours] == pytest.approx([s for s, _ in theirs], abs=1e-3)
    assert [g for _, g in ours] == [g for _, g in theirs]


def cli(root: Path, *args):
    result = runner.invoke(app, [str(a) for a in args], env={**ENV, "LMLOOM_HOME": str(root)})
    exc = result.exception
    if isinstance(exc, LmloomError):
        return exc.exit_code, result.output + str(exc)
    if exc is not None and not isinstance(exc, SystemExit):
        raise exc
    return result.exit_code, result.output


def test_cli_prints_the_table_writes_json_and_audits(tiny, tmp_path, no_network):
    root, artifact = tiny["root"], tiny["artifact"]
    report = tmp_path / "lm_eval.json"
    code, output = cli(
        root, "evaluate", "harness", artifact.short_id, "--limit", "3", "--threads", "1", "--json", report
    )
    assert code == 0, output
    assert "lmloom_stdlib_mc" in output and "acc_norm" in output and "bits_per_byte" in output
    results = json.loads(report.read_text())["results"]
    assert math.isfinite(results["lmloom_stdlib_ppl"]["byte_perplexity,none"])
    [entry] = [e for e in AuditLog(root / "audit.jsonl").entries() if e.get("tasks")]
    assert entry["event"] == "evaluate.harness" and entry["artifact"] == artifact.id
    assert 0 <= entry["metrics"]["lmloom_stdlib_mc/acc"] <= 1

    code, output = cli(root, "evaluate", "harness", artifact.short_id, "--tasks", "hellaswag")
    assert code == 2 and "unknown task 'hellaswag'" in output and "--lm-eval-tasks" in output


def test_lmloom_works_without_lm_eval(monkeypatch):
    for name in ("lm_eval", "lm_eval.api", "lm_eval.api.model"):
        monkeypatch.setitem(sys.modules, name, None)  # `import lm_eval...` now raises ImportError
    monkeypatch.delitem(sys.modules, "lmloom.evaluate.harness")
    with pytest.raises(LmloomError, match=r"pip install 'lmloom\[eval\]'"):
        importlib.import_module("lmloom.evaluate.harness")
    probe = "import sys, lmloom.cli, lmloom.evaluate.tasks; assert 'lm_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", probe], check=True)
