"""Bias and robustness reports on a tiny checkpoint, and the release gates that serve enforces when the
store's gates.yaml requires them: a failing model is refused, the override is audited, a passing report
lets the model through, and a tampered report counts for nothing.

The checkpoint is a random-weight Decoder (init_std 0.3: varied, confident greedy choices) with a BPE
tokenizer trained in a fraction of a second, committed to the store as a `checkpoint` artifact.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
import uvicorn
import yaml
from typer.testing import CliRunner

import lmloom.serve.gateway as gateway_module
from lmloom.artifacts.store import ArtifactStore
from lmloom.cli import app
from lmloom.cli import serve as serve_cli
from lmloom.errors import LmloomError, SecurityError
from lmloom.evaluate.bias import bias_report, load_probes, sentiment_score
from lmloom.evaluate.gates import POLICY_FILE, GatesNotPassed, require_passing_gates
from lmloom.evaluate.robustness import PERTURBATIONS, builtin_heldout, make_perturbations, robustness_report
from lmloom.models.decoder import Decoder, DecoderConfig
from lmloom.models.io import model_files
from lmloom.security.audit import AuditLog
from lmloom.security.context import store_audit_log, store_security
from lmloom.tokenizers.bpe import train_bpe

STDLIB = Path(sysconfig.get_paths()["stdlib"])
ENV = {"LMLOOM_TOKEN": None, "LMLOOM_POLICY": None, "LMLOOM_PRINCIPAL": None, "COLUMNS": "200"}
runner = CliRunner()
torch.set_num_threads(1)  # the shared CPUs thrash with more threads than free cores


def make_checkpoint(store: ArtifactStore, stage: str = "train.pretrain", seed: int = 0):
    texts = [(STDLIB / name).read_text(encoding="utf-8") for name in ("textwrap.py", "string.py")]
    tokenizer = train_bpe([*texts, *builtin_heldout()], vocab_size=300, min_frequency=2)
    torch.manual_seed(seed)
    cfg = DecoderConfig(
        vocab_size=tokenizer.vocab_size, seq_len=128, d_model=32, n_layers=1, n_heads=2, init_std=0.3
    )
    model = Decoder(cfg)
    out = store.create(kind="checkpoint", stage=stage, config={"test": seed}, principal="test")
    for name, data in {**model_files(model), **tokenizer.files()}.items():
        out.write_bytes(name, data)
    out.metadata.update(val_ppl=150.0, unigram_val_ppl=300.0)
    return out.commit(), model, tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gates") / "store"
    store = ArtifactStore(root, security=store_security(root))
    artifact, model, tokenizer = make_checkpoint(store)
    return {"root": root, "store": store, "artifact": artifact, "model": model, "tokenizer": tokenizer}


def cli(root: Path, *args):
    result = runner.invoke(app, [str(a) for a in args], env={**ENV, "LMLOOM_HOME": str(root)})
    exc = result.exception
    if isinstance(exc, LmloomError):
        return exc.exit_code, result.output + str(exc)
    if exc is not None and not isinstance(exc, SystemExit):
        raise exc
    return result.exit_code, result.output


def events(root: Path, name: str) -> list[dict]:
    return [e for e in AuditLog(root / "audit.jsonl").entries() if e["event"] == name]


def write_policy(root: Path, required: bool = True, **checks) -> None:
    base = {"bias_max_gap": None, "robustness_max_drop": None, "refusal_rate_min": None}
    text = {
        "required": required,
        "checks": {**base, **checks},
        "bias_max_new_tokens": 4,
        "robustness_max_windows": 8,
    }
    (root / POLICY_FILE).write_text(yaml.safe_dump(text))


@pytest.fixture
def no_server(monkeypatch):
    """`lmloom serve` up to the point where it would listen: the engine and uvicorn are stubbed out."""
    calls = []
    monkeypatch.setattr(serve_cli, "_in_process_app", lambda opened, name: ("app", opened.id))
    monkeypatch.setattr(gateway_module, "create_gateway", lambda target, settings, root: target)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(app))
    return calls


# ---- reports --------------------------------------------------------------------------------------------


def test_bias_report_has_every_attribute_and_is_deterministic(tiny):
    first = bias_report(tiny["model"], tiny["tokenizer"], max_new_tokens=4)
    again = bias_report(tiny["model"], tiny["tokenizer"], max_new_tokens=4)
    assert first == again
    probes = load_probes()
    assert set(first["attributes"]) == {"gender", "religion", "nationality", "age", "disability"}
    for name, figures in first["attributes"].items():
        assert len(figures["templates"]) == len(probes.templates) >= 8
        assert figures["logprob_max_gap"] >= figures["logprob_mean_abs_gap"] > 0  # a random model is not fair
        assert set(figures["templates"][0]["logprob"]) == set(probes.attributes[name])
    assert first["logprob_max_gap"] == max(a["logprob_max_gap"] for a in first["attributes"].values())
    assert sentiment_score("kind and helpful") == 1.0 and sentiment_score("lazy, rude") == -1.0
    assert sentiment_score("the table") == 0.0 and sentiment_score("kind but rude") == 0.0


def test_robustness_report_covers_every_perturbation_and_is_deterministic(tiny):
    docs = builtin_heldout()
    first = robustness_report(tiny["model"], tiny["tokenizer"], docs, seq_len=64, max_windows=8)
    assert first == robustness_report(tiny["model"], tiny["tokenizer"], docs, seq_len=64, max_windows=8)
    assert set(first["perturbations"]) == set(PERTURBATIONS)
    assert 0 <= first["clean"]["accuracy"] <= 1 and first["clean"]["loss"] > 0
    for p in first["perturbations"].values():
        assert p["loss_increase"] == pytest.approx(p["loss"] - first["clean"]["loss"])
    assert first["max_drop"] == max(p["accuracy_drop"] for p in first["perturbations"].values())
    perturb = make_perturbations(seed=0)
    text = "The quick brown fox jumps over the lazy dog because it is fast."
    assert perturb["typos"](text, 0) == make_perturbations(seed=0)["typos"](text, 0) != text
    assert perturb["casing"](text, 0) == text.upper()
    assert perturb["paraphrase"](text, 0).endswith("since it's quick.")
    assert perturb["adversarial_suffix"](text, 0).startswith(text) and len(
        perturb["adversarial_suffix"](text, 0)
    ) > len(text)
    chat = robustness_report(
        tiny["model"], tiny["tokenizer"], docs[:2], chat=True, seq_len=64, max_windows=2, max_new_tokens=4
    )
    assert set(chat["refusal"]["perturbed"]) == set(PERTURBATIONS) and 0 <= chat["refusal"]["clean"] <= 1


def test_cli_reports_print_tables_and_write_json(tiny, tmp_path):
    short = tiny["artifact"].short_id
    code, output = cli(
        tiny["root"], "evaluate", "bias", short, "--max-new-tokens", "2", "--json", tmp_path / "b.json"
    )
    assert code == 0, output
    assert "disability" in output and "log-lik max gap" in output
    assert set(json.loads((tmp_path / "b.json").read_text())["attributes"]) >= {"gender", "age"}
    code, output = cli(tiny["root"], "evaluate", "robustness", short, "--max-windows", "4")
    assert code == 0, output
    assert "adversarial_suffix" in output and "built-in" in output
    assert events(tiny["root"], "evaluate.bias") and events(tiny["root"], "evaluate.robustness")


# ---- gates and their enforcement ---------------------------------------------------------------------------


def test_without_a_gates_policy_nothing_is_enforced(tmp_path):
    root = tmp_path / "store"
    store = ArtifactStore(root, security=store_security(root))
    artifact, _, _ = make_checkpoint(store, seed=1)
    assert require_passing_gates(store, artifact, False, "me", store_audit_log(root)) is None
    write_policy(root, required=False, bias_max_gap=0.0)
    assert require_passing_gates(store, artifact, False, "me", store_audit_log(root)) is None


def test_failing_model_is_refused_by_serve_and_the_override_is_audited(tmp_path, no_server):
    root = tmp_path / "store"
    store = ArtifactStore(root, security=store_security(root))
    artifact, _, _ = make_checkpoint(store, seed=2)
    write_policy(root, bias_max_gap=1e-6, ppl_improvement_min=1.5)  # no model is that fair
    code, output = cli(root, "evaluate", "gates", artifact.short_id)
    assert code == 1, output
    assert "bias_max_gap" in output and "FAIL" in output and "NOT PASSED" in output
    [report_id] = [i for i in store.ids() if store.read_manifest(i).kind == "gate-report"]
    report = store.open(report_id)
    assert report.manifest.inputs == {"checkpoint": artifact.id}
    checks = {c["check"]: c for c in report.read_json("gate-report.json")["checks"]}
    assert checks["bias_max_gap"]["status"] == "fail" and checks["ppl_improvement_min"]["status"] == "pass"
    assert checks["ppl_improvement_min"]["value"] == pytest.approx(2.0)

    code, output = cli(root, "serve", artifact.short_id)
    assert code == GatesNotPassed.exit_code == SecurityError.exit_code, output
    assert (
        "has not passed the release gates" in output
        and "bias_max_gap" in output
        and "--override-gates" in output
    )
    assert no_server == []
    assert events(root, "gate.refused")[-1]["artifact"] == artifact.id

    code, output = cli(root, "serve", artifact.short_id, "--override-gates")
    assert code == 0, output
    assert no_server == [("app", artifact.id)]
    [override] = events(root, "gate.override")
    assert (
        override["artifact"] == artifact.id
        and override["action"] == "serve"
        and "bias_max_gap" in override["reason"]
    )
    assert AuditLog(root / "audit.jsonl").verify().ok


def test_passing_report_lets_the_model_through_but_a_tampered_one_does_not(tmp_path, no_server):
    root = tmp_path / "store"
    store = ArtifactStore(root, security=store_security(root))
    artifact, _, _ = make_checkpoint(store, seed=3)
    code, output = cli(root, "serve", artifact.short_id)  # no policy: served as before gates existed
    assert code == 0 and no_server == [("app", artifact.id)]
    no_server.clear()
    write_policy(root, bias_max_gap=50.0, robustness_max_drop=1.0)
    code, output = cli(root, "serve", artifact.short_id)
    assert code == 4 and "no gate report of it exists" in output

    code, output = cli(root, "evaluate", "gates", artifact.short_id)
    assert code == 0 and "PASSED" in output, output
    code, output = cli(root, "serve", artifact.short_id)
    assert code == 0, output
    assert no_server == [("app", artifact.id)]
    [passed] = events(root, "gate.passed")
    report_id = passed["report"]

    write_policy(
        root, bias_max_gap=1e-6, robustness_max_drop=1.0
    )  # a stricter policy: the old report is not enough
    code, output = cli(root, "serve", artifact.short_id)
    assert code == 4 and "the policy requires 1e-06" in output

    write_policy(root, bias_max_gap=50.0, robustness_max_drop=1.0)
    path = store.artifact_dir(report_id) / "gate-report.json"
    forged = json.loads(path.read_text())
    forged["checks"][0]["threshold"] = 1e-9  # pretend it met a stricter bar
    path.write_text(json.dumps(forged))
    code, output = cli(root, "serve", artifact.short_id)
    assert code == 4, output
    # refused by the store's verification (size or sha256 against the manifest), reported and audited
    assert (
        f"report {report_id[:12]} refused: artifact {report_id[:12]} (gate-report): file gate-report.json"
        in output
    )
    assert events(root, "security.read_refused")[-1]["artifact"] == report_id
    assert len(no_server) == 1
