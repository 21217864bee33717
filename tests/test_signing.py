"""Artifact signatures: OpenSSF model signing v1.0 bundles, hybrid ML-DSA parts, trust and the
requirement to be signed — with real files, real keys and the `model-signing` package's own verifier."""

import base64
import json
import os
import shutil
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization

from lmloom.artifacts.manifest import Manifest
from lmloom.artifacts.store import ArtifactStore
from lmloom.errors import IntegrityError, LmloomError, SecurityError
from lmloom.security.context import LmloomSecurity
from lmloom.security.signing import (
    PQ_SUFFIX,
    SigningKey,
    default_key_path,
    set_required,
    statement,
)
from lmloom.security.trust import SignerKeys, TrustStore

ENV = ("LMLOOM_SIGNING_KEY", "LMLOOM_TRUST_DIR", "LMLOOM_REQUIRE_SIGNATURES", "LMLOOM_POLICY", "LMLOOM_TOKEN")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LMLOOM_PRINCIPAL", "tester")


def open_store(root):
    """A fresh store object, as each new process would build it from what is on disk."""
    return ArtifactStore(root, security=LmloomSecurity(root))


def make_artifact(root, files=None, kind="checkpoint"):
    store = open_store(root)
    writer = store.create(kind=kind, stage="test.stage", config={"lr": 0.1}, inputs={})
    files = files or {
        "model.safetensors": os.urandom(4096),
        "config.json": b'{"dim": 8}',
        "tokenizer/tokenizer.json": b"{}",
        "a.b": b"names sort as paths: a/.. before a.b",
    }
    for name, data in files.items():
        writer.write_bytes(name, data)
    return writer.commit()


def init_key(root, algorithm="ecdsa-p256", trust_as="local"):
    key = SigningKey.generate(algorithm)
    key.save(default_key_path(root))
    if trust_as:
        TrustStore(root / "security" / "trust").add(trust_as, key.public)
    return key


def flip_byte(path, offset=0):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def audit_events(root, event):
    lines = (root / "audit.jsonl").read_text().splitlines() if (root / "audit.jsonl").exists() else []
    return [e for e in map(json.loads, lines) if e["event"] == event]


# -- round trip ------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["ecdsa-p256", "ed25519", "hybrid"])
def test_new_artifacts_are_signed_and_verify(tmp_path, algorithm):
    key = init_key(tmp_path, algorithm)
    assert default_key_path(tmp_path).stat().st_mode & 0o777 == 0o600
    art = make_artifact(tmp_path)
    sidecars = sorted(p.name for p in (art.path / "signatures").iterdir())
    expected = [f"{key.public.key_id}.sig"] + (
        [f"{key.public.key_id}{PQ_SUFFIX}"] if algorithm == "hybrid" else []
    )
    assert sidecars == sorted(expected)

    store = open_store(tmp_path)
    opened = store.open(art.id)
    report = store.security.signing.report(opened)
    assert report.status == "trusted"
    assert report.describe().startswith(f"signed by local ({key.public.algorithm_name}")
    assert audit_events(tmp_path, "artifact.signed")[-1]["key_id"] == key.public.key_id

    bundle = json.loads(next((art.path / "signatures").glob("*.sig")).read_bytes())
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert bundle["verificationMaterial"]["publicKey"]["hint"] == key.public.hint
    assert bundle["dsseEnvelope"]["payloadType"] == "application/vnd.in-toto+json"
    payload = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    assert payload["predicateType"] == "https://model_signing/signature/v1.0"
    names = [r["name"] for r in payload["predicate"]["resources"]]
    assert set(names) == set(art.manifest.files) | {"manifest.json"}  # the manifest is covered


def test_a_stage_cannot_write_into_the_signatures_folder(tmp_path):
    store = open_store(tmp_path)
    writer = store.create(kind="corpus", stage="s", config={})
    writer.write_bytes("signatures/fake.sig", b"{}")
    with pytest.raises(LmloomError, match="reserved for signatures"):
        writer.commit()


# -- hybrid: both parts are needed -----------------------------------------------------------------
def _strip_pq(art):
    next((art.path / "signatures").glob(f"*{PQ_SUFFIX}")).unlink()


def _corrupt_pq(art):
    path = next((art.path / "signatures").glob(f"*{PQ_SUFFIX}"))
    part = json.loads(path.read_bytes())
    sig = bytearray(base64.b64decode(part["sig"]))
    sig[10] ^= 0x01
    part["sig"] = base64.b64encode(bytes(sig)).decode()
    path.write_text(json.dumps(part))


def _corrupt_classical(art):
    path = next((art.path / "signatures").glob("*.sig"))
    bundle = json.loads(path.read_bytes())
    sig = bytearray(base64.b64decode(bundle["dsseEnvelope"]["signatures"][0]["sig"]))
    sig[-1] ^= 0x01
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    path.write_text(json.dumps(bundle))


def _pq_from_another_artifact(art):
    other = make_artifact(art.path.parent.parent, {"x.bin": b"another artifact"})
    name = next((other.path / "signatures").glob(f"*{PQ_SUFFIX}")).name
    shutil.copy(other.path / "signatures" / name, art.path / "signatures" / name)


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        (_strip_pq, "ML-DSA-65 part .* is missing"),
        (_corrupt_pq, "ML-DSA-65 part .* does not verify"),
        (_corrupt_classical, "does not verify with local's hybrid key"),
        (_pq_from_another_artifact, "belongs to another key or statement"),
    ],
)
def test_hybrid_signature_needs_both_parts(tmp_path, attack, reason):
    init_key(tmp_path, "hybrid")
    art = make_artifact(tmp_path)
    open_store(tmp_path).open(art.id)
    attack(art)
    with pytest.raises(SecurityError, match=rf"artifact {art.short_id} \(checkpoint\): .*{reason}"):
        open_store(tmp_path).open(art.id)  # refused even without the requirement: it is bad
    assert audit_events(tmp_path, "security.read_refused")[-1]["artifact"] == art.id


# -- the requirement -------------------------------------------------------------------------------
def test_required_signatures_refuse_unsigned_and_wrong_signer_and_audit_each(tmp_path, monkeypatch):
    unsigned = make_artifact(tmp_path, {"u.bin": b"made before any key"})
    # Signed by a key that is not in the trust store (e.g. copied in from elsewhere).
    stranger = init_key(tmp_path, trust_as=None)
    foreign = make_artifact(tmp_path, {"f.bin": b"signed by a stranger"})
    default_key_path(tmp_path).unlink()
    trusted_key = init_key(tmp_path)
    trusted = make_artifact(tmp_path, {"t.bin": b"signed by a trusted key"})
    assert stranger.public.key_id != trusted_key.public.key_id

    # Without the requirement, all three are readable (the stranger is merely untrusted).
    store = open_store(tmp_path)
    for art in (unsigned, foreign, trusted):
        store.open(art.id)
    assert store.security.signing.report(store.open(foreign.id)).status == "untrusted"

    set_required(tmp_path, True)
    store = open_store(tmp_path)
    with pytest.raises(SecurityError, match=rf"artifact {unsigned.short_id} \(checkpoint\) is unsigned"):
        store.open(unsigned.id)
    with pytest.raises(
        SecurityError, match=rf"{foreign.short_id} .*not in the trust store \({stranger.public.key_id}\)"
    ):
        store.open(foreign.id)
    assert store.open(trusted.id).id == trusted.id

    refused = audit_events(tmp_path, "security.read_refused")
    assert [e["artifact"] for e in refused] == [unsigned.id, foreign.id]
    assert all(e["error"] == "SecurityError" and e["principal"] == "tester" for e in refused)

    # The environment variable turns the requirement on as well.
    set_required(tmp_path, False)
    monkeypatch.setenv("LMLOOM_REQUIRE_SIGNATURES", "1")
    with pytest.raises(SecurityError, match="unsigned"):
        open_store(tmp_path).open(unsigned.id)
    assert len(audit_events(tmp_path, "security.read_refused")) == 3


def test_trust_dir_from_environment(tmp_path, monkeypatch):
    key = init_key(tmp_path, trust_as=None)
    art = make_artifact(tmp_path)
    monkeypatch.setenv("LMLOOM_REQUIRE_SIGNATURES", "yes")
    with pytest.raises(SecurityError, match="not in the trust store"):
        open_store(tmp_path).open(art.id)
    elsewhere = tmp_path / "admin-trust"
    TrustStore(elsewhere).add("release", key.public)
    monkeypatch.setenv("LMLOOM_TRUST_DIR", str(elsewhere))
    store = open_store(tmp_path)
    assert store.security.signing.report(store.open(art.id)).describe().startswith("signed by release")


# -- tampering after signing -----------------------------------------------------------------------
def test_tampered_file_or_manifest_after_signing_is_refused(tmp_path):
    init_key(tmp_path)
    art = make_artifact(tmp_path)
    flip_byte(art.path / "config.json")
    with pytest.raises(IntegrityError, match="config.json"):
        open_store(tmp_path).open(art.id)
    flip_byte(art.path / "config.json")

    # An attacker edits the manifest and republishes it under its new id, signature and all.
    edited = Manifest.model_validate(art.manifest.to_json_dict() | {"config": {"lr": 10.0}})
    moved = tmp_path / "artifacts" / edited.id
    shutil.copytree(art.path, moved)
    (moved / "manifest.json").write_bytes(edited.canonical_bytes())
    with pytest.raises(
        SecurityError, match=rf"{edited.id[:12]} .*file manifest.json differs from what was signed"
    ):
        open_store(tmp_path).open(edited.id)


def test_edited_statement_or_stray_file_in_signatures_is_refused(tmp_path):
    init_key(tmp_path)
    art = make_artifact(tmp_path)
    sig_path = next((art.path / "signatures").glob("*.sig"))
    original = sig_path.read_bytes()

    bundle = json.loads(original)
    stmt = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    stmt["predicate"]["resources"][0]["digest"] = "0" * 64
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(stmt).encode()).decode()
    sig_path.write_text(json.dumps(bundle))
    with pytest.raises(SecurityError, match="does not verify"):
        open_store(tmp_path).open(art.id)

    sig_path.write_bytes(original)
    (art.path / "signatures" / "notes.txt").write_text("smuggled")
    with pytest.raises(SecurityError, match="signatures/notes.txt is bad: unexpected file"):
        open_store(tmp_path).open(art.id)


def test_signing_key_with_loose_permissions_is_refused(tmp_path):
    init_key(tmp_path)
    default_key_path(tmp_path).chmod(0o644)
    with pytest.raises(SecurityError, match=r"readable by others .*chmod 600") as info:
        make_artifact(tmp_path)
    assert "PRIVATE" not in str(info.value)


# -- interop with the model-signing package --------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["ecdsa-p256", "hybrid"])
def test_model_signing_package_verifies_lmloom_signatures(tmp_path, algorithm):
    from google.protobuf import json_format
    from model_signing import hashing, verifying
    from model_signing._signing import signing as ms_signing

    key = init_key(tmp_path, algorithm)
    art = make_artifact(tmp_path)
    sig = next((art.path / "signatures").glob("*.sig"))
    public = tmp_path / "security" / "signing" / "signing-key.pub.pem"  # hybrid: classical key first

    verifying.Config().use_elliptic_key_verifier(public_key=public).verify(art.path, sig)

    # Our statement is the one the package builds for the same folder.
    theirs = ms_signing.Payload(hashing.Config().set_ignored_paths(paths=["signatures"]).hash(art.path))
    ours = statement(art)
    their_json = json.loads(json_format.MessageToJson(theirs.statement.pb))
    assert their_json["subject"] == ours["subject"]
    assert their_json["predicate"]["resources"] == ours["predicate"]["resources"]

    flip_byte(art.path / "model.safetensors", 100)
    with pytest.raises(ValueError, match="model.safetensors"):
        verifying.Config().use_elliptic_key_verifier(public_key=public).verify(art.path, sig)
    flip_byte(art.path / "model.safetensors", 100)

    # ... and with the package's command line, as a user would run it.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "model_signing",
            "verify",
            "key",
            str(art.path),
            "--signature",
            str(sig),
            "--public_key",
            str(public),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "Verification succeeded" in proc.stdout, proc.stdout + proc.stderr
    assert key.public.key_id in sig.name


def test_lmloom_accepts_a_signature_made_by_the_model_signing_package(tmp_path):
    from model_signing import hashing, signing

    key = SigningKey.generate("ecdsa-p256")
    private = tmp_path / "ms-key.pem"
    private.write_bytes(key.private_pem())
    art = make_artifact(tmp_path)  # no lmloom key: unsigned
    (art.path / "signatures").mkdir()
    signing.Config().use_elliptic_key_signer(private_key=private).set_hashing_config(
        hashing.Config().set_ignored_paths(paths=["signatures"])
    ).sign(art.path, art.path / "signatures" / "vendor.sig")

    set_required(tmp_path, True)
    with pytest.raises(SecurityError, match="not in the trust store"):
        open_store(tmp_path).open(art.id)
    TrustStore(tmp_path / "security" / "trust").add("vendor", key.public)
    store = open_store(tmp_path)
    assert store.security.signing.report(store.open(art.id)).describe().startswith("signed by vendor")


# -- the command line ------------------------------------------------------------------------------
def lmloom(store, *args, check=None, env=None):
    full_env = {**os.environ, "LMLOOM_HOME": str(store), "COLUMNS": "250", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "lmloom", *args], capture_output=True, text=True, env=full_env
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    if check is not None:
        assert proc.returncode == check, proc.stdout + proc.stderr
    return proc


def test_cli_sign_verify_trust_and_require(tmp_path):
    store = tmp_path / "store"
    art = make_artifact(store)  # made before any key: unsigned
    outputs = []

    def run(*args, check):
        proc = lmloom(store, *args, check=check)
        outputs.append(proc.stdout + proc.stderr)
        return proc

    assert "unsigned" in run("artifacts", "verify", check=0).stdout
    run("signing", "require", "on", check=0)
    proc = run("artifacts", "verify", art.short_id, check=4)
    assert f"artifact {art.short_id} (checkpoint) is unsigned" in proc.stdout

    init = run("signing", "init", "--algorithm", "hybrid", check=0).stdout
    assert "hybrid (ecdsa-p256 + ml-dsa-65)" in init and "trusted as:  local" in init
    assert init.count("BEGIN PUBLIC KEY") == 2 and "PRIVATE" not in init
    assert "pass --force to replace it" in run("signing", "init", check=4).stderr
    assert "--trust-as NAME" in run("signing", "init", "--force", check=4).stderr  # "local" is taken
    run("artifacts", "sign", art.short_id, check=0)
    proc = run("artifacts", "verify", check=0)
    assert (
        "signed by local (hybrid (ecdsa-p256 + ml-dsa-65)" in proc.stdout
        and "1 artifacts verified" in proc.stdout
    )

    assert "local" in run("trust", "list", check=0).stdout
    run("trust", "remove", "local", check=0)
    proc = run("artifacts", "verify", check=4)
    assert "not in the trust store" in proc.stdout
    public = store / "security" / "signing" / "signing-key.pub.pem"
    run("trust", "add", "release", str(public), check=0)
    assert "signed by release" in run("artifacts", "verify", check=0).stdout

    # Handing `trust add` the private key is refused without echoing it.
    proc = run("trust", "add", "oops", str(store / "security" / "signing" / "signing-key.pem"), check=4)
    assert "holds a PRIVATE key" in proc.stderr
    shown = run("signing", "show", check=0).stdout
    assert "signatures required: yes" in shown and "hybrid (ecdsa-p256 + ml-dsa-65), key id" in shown

    # New artifacts made by the CLI's store are signed automatically.
    signed_later = make_artifact(store, {"later.bin": b"after init"})
    assert (signed_later.path / "signatures").is_dir()

    # The private key's bytes appear nowhere but in the key file: not in the store, logs or output.
    key = SigningKey.load(store / "security" / "signing" / "signing-key.pem")
    secrets = _secret_forms(key)
    for path in store.rglob("*"):
        if path.is_file() and path.name != "signing-key.pem":
            data = path.read_bytes()
            assert not any(s in data for s in secrets), path
    for text in outputs:
        assert not any(s in text.encode() for s in secrets)
    events = {e["event"] for e in map(json.loads, (store / "audit.jsonl").read_text().splitlines())}
    assert {
        "signing.key_created",
        "artifact.signed",
        "trust.added",
        "trust.removed",
        "security.read_refused",
    } <= events


def _secret_forms(key):
    """Every form in which the private key could leak: PEM body lines, DER, raw scalar / seed, hex."""
    forms = set()
    for part in (key.classical, key.pq):
        der = part.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        forms |= {der, der.hex().encode(), base64.b64encode(der)}
    scalar = key.classical.private_numbers().private_value.to_bytes(32, "big")
    seed = key.pq.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    for raw in (scalar, seed):
        forms |= {raw, raw.hex().encode(), base64.b64encode(raw)}
    return forms


def test_signer_keys_parse_errors_are_clear(tmp_path):
    with pytest.raises(SecurityError, match="no PEM public key"):
        SignerKeys.from_pem(b"garbage", "key.pem")
    key = SigningKey.generate("hybrid")
    assert SignerKeys.from_pem(key.public.to_pem(), "k").algorithm == "hybrid"
    with pytest.raises(SecurityError, match="PRIVATE") as info:
        SignerKeys.from_pem(key.private_pem(), "k.pem")
    assert key.private_pem().decode()[40:80] not in str(info.value)


def data_only_recipe(tmp_path):
    """A one-stage recipe (data.prepare over eight JSONL documents) in tmp_path."""
    source = tmp_path / "data.jsonl"
    source.write_text(
        "".join(json.dumps({"text": f"document {i} has enough words to be kept"}) + "\n" for i in range(8))
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: data-only\nstages:\n  corpus:\n    stage: data.prepare\n    config:\n"
        f"      sources: [{{type: jsonl, path: {source}}}]\n      min_chars: 20\n"
    )
    return recipe


def test_a_pipeline_run_signs_every_artifact_it_makes(tmp_path):
    store, recipe = tmp_path / "store", data_only_recipe(tmp_path)
    lmloom(store, "signing", "init", check=0)
    lmloom(store, "signing", "require", "on", check=0)
    lmloom(store, "run", str(recipe), check=0)
    lmloom(store, "run", str(recipe), check=0)  # the re-run reuses the signed artifact
    proc = lmloom(store, "artifacts", "verify", check=0)
    assert "corpus" in proc.stdout and "signed by local (ecdsa-p256" in proc.stdout
    signed = [json.loads(line) for line in (store / "audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in signed].count("artifact.signed") == 1


def test_a_broken_signing_key_stops_a_run_before_any_stage(tmp_path):
    """A key others may read is refused when the run starts, not after a stage has done its work."""
    store, recipe = tmp_path / "store", data_only_recipe(tmp_path)
    lmloom(store, "signing", "init", check=0)
    default_key_path(store).chmod(0o644)
    proc = lmloom(store, "run", str(recipe), check=4)
    assert "readable by others" in proc.stderr
    assert not list((store / "artifacts").iterdir())  # nothing was made
    assert "documents kept" not in proc.stdout  # the stage never ran
