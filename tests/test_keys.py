"""The keyring: KEK sources (env, 0600 file, provider plugins), DEK wrapping, rotation, and `lmloom keys`."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap

import pytest

from lmloom.artifacts.store import ArtifactStore
from lmloom.errors import IntegrityError, SecurityError
from lmloom.security.context import LmloomSecurity
from lmloom.security.keyring import (
    Keyring,
    LocalKek,
    generate_kek,
    kek_fingerprint,
    kek_from_env,
    read_kek_file,
    write_kek_file,
)

KEK_ENV = ("LMLOOM_KEK", "LMLOOM_KEK_FILE", "LMLOOM_KEK_PROVIDER")


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in (
        *KEK_ENV,
        "LMLOOM_NEW_KEK",
        "LMLOOM_NEW_KEK_FILE",
        "LMLOOM_NEW_KEK_PROVIDER",
        "LMLOOM_KEK_COMMAND",
    ):
        monkeypatch.delenv(name, raising=False)


# -- KEK sources -----------------------------------------------------------------------------------


def test_kek_id_is_a_stable_fingerprint_that_reveals_nothing():
    key = generate_kek()
    kek_id = kek_fingerprint(key)
    assert kek_id == kek_fingerprint(key) == LocalKek(key, "t").kek_id and kek_id.startswith("kek-")
    assert kek_id != kek_fingerprint(generate_kek())
    assert key.hex()[:8] not in kek_id and key.hex() not in repr(LocalKek(key, "t"))


def test_kek_from_env_file_or_nothing_first_match_wins(tmp_path, monkeypatch):
    assert kek_from_env() is None
    env_key, file_key = generate_kek(), generate_kek()
    write_kek_file(tmp_path / "kek", file_key)
    monkeypatch.setenv("LMLOOM_KEK_FILE", str(tmp_path / "kek"))
    assert kek_from_env().kek_id == kek_fingerprint(file_key)
    monkeypatch.setenv("LMLOOM_KEK", b64(env_key))
    assert kek_from_env().kek_id == kek_fingerprint(env_key)


def test_malformed_keks_are_refused_without_echoing_them(monkeypatch):
    for value in ("not base64 !!", b64(b"short"), b64(bytes(33))):
        monkeypatch.setenv("LMLOOM_KEK", value)
        with pytest.raises(SecurityError, match="LMLOOM_KEK") as info:
            kek_from_env()
        assert value not in str(info.value)


def test_key_files_must_be_owner_only(tmp_path):
    key = generate_kek()
    path = tmp_path / "kek"
    write_kek_file(path, key)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert read_kek_file(path).kek_id == kek_fingerprint(key)
    for mode in (0o644, 0o640, 0o604, 0o660):
        os.chmod(path, mode)
        with pytest.raises(
            SecurityError, match=rf"has mode {mode:04o}: it must be readable by its owner only.*chmod 600"
        ):
            read_kek_file(path)
    os.chmod(path, 0o400)
    assert read_kek_file(path).kek_id == kek_fingerprint(key)
    raw = tmp_path / "raw"
    raw.write_bytes(key)
    os.chmod(raw, 0o600)
    assert read_kek_file(raw).kek_id == kek_fingerprint(key)  # 32 raw bytes work too
    with pytest.raises(SecurityError, match="already exists"):
        write_kek_file(path)
    with pytest.raises(SecurityError, match="key file .*missing"):
        read_kek_file(tmp_path / "missing")


FAKE_KMS = textwrap.dedent(
    '''
    """A stand-in for a cloud KMS: wrap/unwrap happen "remotely"; the master key never leaves it."""
    import os
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from lmloom.errors import SecurityError

    CALLS = []

    class FakeKms:
        def __init__(self):
            self._master = bytes.fromhex(os.environ["FAKE_KMS_MASTER_HEX"])
            self.kek_id = "kms-" + os.environ.get("FAKE_KMS_KEY_NAME", "projects/x/keys/lmloom")

        def wrap(self, dek, context):
            CALLS.append("wrap")
            nonce = os.urandom(12)
            return nonce + AESGCM(self._master).encrypt(nonce, dek, context)

        def unwrap(self, wrapped, context):
            CALLS.append("unwrap")
            if os.environ.get("FAKE_KMS_DOWN"):
                raise ConnectionError("kms.example.com: timed out")
            try:
                return AESGCM(self._master).decrypt(wrapped[:12], wrapped[12:], context)
            except InvalidTag:
                raise SecurityError("KMS refused to decrypt") from None
    '''
)


@pytest.fixture
def fake_kms(tmp_path, monkeypatch):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "fake_kms.py").write_text(FAKE_KMS)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("FAKE_KMS_MASTER_HEX", generate_kek().hex())
    return folder


def test_a_kms_style_provider_wraps_and_unwraps_the_keys(tmp_path, monkeypatch, fake_kms):
    import fake_kms as plugin

    monkeypatch.setenv("LMLOOM_KEK_PROVIDER", "fake_kms:FakeKms")
    store_root = tmp_path / "store"
    kek = kek_from_env()
    assert kek.kek_id == "kms-projects/x/keys/lmloom"
    Keyring.for_store(store_root).init(kek)
    store = ArtifactStore(store_root, security=LmloomSecurity(store_root, "t"))
    out = store.create(kind="corpus", stage="t", config={}, encrypt=True)
    out.write_text("a.txt", "through the KMS")
    artifact_id = out.commit().id
    reader = ArtifactStore(store_root, security=LmloomSecurity(store_root, "t"))
    assert reader.open(artifact_id).read_text("a.txt") == "through the KMS"
    assert "wrap" in plugin.CALLS and "unwrap" in plugin.CALLS
    monkeypatch.setenv("FAKE_KMS_DOWN", "1")  # the KMS's own failure is one clear error, not a traceback
    with pytest.raises(SecurityError, match=r"unwrap failed \(ConnectionError: kms.example.com: timed out\)"):
        ArtifactStore(store_root, security=LmloomSecurity(store_root, "t")).open(artifact_id)
    monkeypatch.delenv("FAKE_KMS_DOWN")
    monkeypatch.setenv("FAKE_KMS_MASTER_HEX", generate_kek().hex())  # same key name, other key material
    with pytest.raises(SecurityError, match="could not be unwrapped with KEK kms-projects/x/keys/lmloom"):
        ArtifactStore(store_root, security=LmloomSecurity(store_root, "t")).open(artifact_id)
    monkeypatch.delenv("FAKE_KMS_MASTER_HEX")
    with pytest.raises(SecurityError, match=r"the provider failed to start \(KeyError"):
        kek_from_env()


def test_the_in_repo_command_provider_gets_the_kek_from_a_command(tmp_path, monkeypatch):
    key = generate_kek()
    script = tmp_path / "print_kek.py"
    script.write_text(f"print({b64(key)!r})\n")
    monkeypatch.setenv("LMLOOM_KEK_PROVIDER", "lmloom.security.keyring:CommandKekProvider")
    monkeypatch.setenv("LMLOOM_KEK_COMMAND", f"{sys.executable} {script}")
    assert kek_from_env().kek_id == kek_fingerprint(key)
    monkeypatch.setenv("LMLOOM_KEK_COMMAND", f"{sys.executable} -c 'raise SystemExit(3)'")
    with pytest.raises(SecurityError, match="exited with status 3"):
        kek_from_env()
    monkeypatch.setenv("LMLOOM_KEK_PROVIDER", "no_such_module_xyz:Thing")
    with pytest.raises(SecurityError, match="cannot load it"):
        kek_from_env()
    monkeypatch.setenv("LMLOOM_KEK_PROVIDER", "no-colon")
    with pytest.raises(SecurityError, match="expected 'package.module:Class'"):
        kek_from_env()


# -- keyring: wrapping, rotation, new data keys ----------------------------------------------------


def write_artifact(root, text):
    store = ArtifactStore(root, security=LmloomSecurity(root, "t"))
    out = store.create(kind="corpus", stage="t", config={}, encrypt=True)
    out.write_text("a.txt", text)
    return out.commit()


def read_artifact(root, artifact_id):
    return ArtifactStore(root, security=LmloomSecurity(root, "t")).open(artifact_id).read_text("a.txt")


def test_rotation_rewraps_without_touching_data_and_retires_the_old_kek(tmp_path, monkeypatch):
    old, new = generate_kek(), generate_kek()
    keyring = Keyring.for_store(tmp_path)
    first = keyring.init(LocalKek(old, "old"))
    assert (keyring.path.stat().st_mode & 0o777) == 0o600
    monkeypatch.setenv("LMLOOM_KEK", b64(old))
    before = write_artifact(tmp_path, "written before rotation")
    files_before = {p: p.read_bytes() for p in before.path.iterdir()}

    records = keyring.rotate(LocalKek(old, "old"), LocalKek(new, "new"))
    assert [r.id for r in records] == [first.id] and records[0].kek_id == kek_fingerprint(new)
    assert {p: p.read_bytes() for p in before.path.iterdir()} == files_before  # no data re-encrypted

    monkeypatch.setenv("LMLOOM_KEK", b64(new))
    assert read_artifact(tmp_path, before.id) == "written before rotation"
    monkeypatch.setenv("LMLOOM_KEK", b64(old))
    with pytest.raises(SecurityError, match="keyring was rotated to a new KEK") as info:
        read_artifact(tmp_path, before.id)
    assert kek_fingerprint(new) in str(info.value) and kek_fingerprint(old) in str(info.value)

    # A new data key: new artifacts use it, old ones keep reading with the retired one.
    monkeypatch.setenv("LMLOOM_KEK", b64(new))
    second = keyring.new_dek(LocalKek(new, "new"))
    after = write_artifact(tmp_path, "written with the new data key")
    assert after.manifest.encryption["dek"] == second.id != before.manifest.encryption["dek"]
    assert [(r.id, r.status) for r in keyring.records()] == [(first.id, "retired"), (second.id, "active")]
    assert read_artifact(tmp_path, before.id) == "written before rotation"
    assert read_artifact(tmp_path, after.id) == "written with the new data key"


def test_a_wrong_kek_cannot_rotate_and_a_tampered_keyring_is_refused(tmp_path):
    key = generate_kek()
    keyring = Keyring.for_store(tmp_path)
    keyring.init(LocalKek(key, "k"))
    with pytest.raises(SecurityError, match="the configured KEK is"):
        keyring.rotate(LocalKek(generate_kek(), "wrong"), LocalKek(generate_kek(), "new"))
    data = json.loads(keyring.path.read_text())
    wrapped = bytearray(base64.b64decode(data["keys"][0]["wrapped"]))
    wrapped[20] ^= 1
    data["keys"][0]["wrapped"] = b64(bytes(wrapped))
    keyring.path.write_text(json.dumps(data))
    with pytest.raises(SecurityError, match="could not be unwrapped .*altered"):
        keyring.active(LocalKek(key, "k"))
    keyring.path.write_text("{not json")
    with pytest.raises(IntegrityError, match="is damaged"):
        keyring.records()
    with pytest.raises(SecurityError, match="already exists"):
        keyring.init(LocalKek(key, "k"))


# -- the CLI ---------------------------------------------------------------------------------------


def lmloom(store, *args, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("LMLOOM_")}
    base.update(LMLOOM_HOME=str(store), COLUMNS="200", **env)
    return subprocess.run(
        [sys.executable, "-m", "lmloom", *args], env=base, capture_output=True, text=True, timeout=120
    )


def test_keys_cli_init_list_rotate_and_what_it_never_prints(tmp_path):
    store, home = tmp_path / "store", tmp_path / "home"
    missing = lmloom(store, "keys", "init")
    assert (
        missing.returncode == 4 and "LMLOOM_KEK_FILE" in missing.stderr and "Traceback" not in missing.stderr
    )
    inside = lmloom(store, "keys", "init", "--generate-kek-file", str(store / "kek"))
    assert inside.returncode == 4 and "inside the store" in inside.stderr

    init = lmloom(store, "keys", "init", "--generate-kek-file", str(home / "kek"))
    assert init.returncode == 0, init.stderr
    assert (home / "kek").stat().st_mode & 0o777 == 0o600
    assert f"LMLOOM_KEK_FILE={home / 'kek'}" in init.stdout
    again = lmloom(store, "keys", "init", "--generate-kek-file", str(home / "kek-2"))
    assert again.returncode == 4 and "already exists" in again.stderr and not (home / "kek-2").exists()

    listed = lmloom(store, "keys", "list", LMLOOM_KEK_FILE=str(home / "kek"))
    dek_id = json.loads((store / "security" / "keyring.json").read_text())["keys"][0]["id"]
    old_id = kek_fingerprint(base64.b64decode((home / "kek").read_text()))
    assert listed.returncode == 0 and dek_id in listed.stdout and "active" in listed.stdout
    assert f"configured KEK: {old_id} (matches the keyring)" in listed.stdout

    os.chmod(home / "kek", 0o644)
    loose = lmloom(store, "keys", "rotate", "--new-dek", LMLOOM_KEK_FILE=str(home / "kek"))
    assert loose.returncode == 4 and "chmod 600" in loose.stderr
    os.chmod(home / "kek", 0o600)

    nothing = lmloom(store, "keys", "rotate", LMLOOM_KEK_FILE=str(home / "kek"))
    assert nothing.returncode == 4 and "nothing to rotate" in nothing.stderr
    rotated = lmloom(
        store, "keys", "rotate", "--generate-kek-file", str(home / "kek-new"), "--new-dek",
        LMLOOM_KEK_FILE=str(home / "kek"),
    )  # fmt: skip
    assert rotated.returncode == 0, rotated.stderr
    new_id = kek_fingerprint(base64.b64decode((home / "kek-new").read_text()))
    assert f"KEK {old_id} -> {new_id}" in rotated.stdout
    stale = lmloom(store, "keys", "rotate", "--new-dek", LMLOOM_KEK_FILE=str(home / "kek"))
    assert stale.returncode == 4 and "rotated to a new KEK" in stale.stderr

    listed = lmloom(store, "keys", "list", LMLOOM_KEK=(home / "kek-new").read_text().strip())
    assert "retired" in listed.stdout and listed.stdout.count(new_id) == 3  # two keys + configured

    # Key material appears in no output, no audit entry and nowhere in the store.
    keys = [base64.b64decode((home / name).read_text()) for name in ("kek", "kek-new")]
    keys += [
        Keyring.for_store(store).unwrap(r.id, LocalKek(keys[1], "k"))
        for r in Keyring.for_store(store).records()
    ]
    outputs = "".join(p.stdout + p.stderr for p in (init, listed, rotated, stale, loose, nothing))
    stored = b"".join(p.read_bytes() for p in store.rglob("*") if p.is_file())
    for key in keys:
        for form in (key.hex(), b64(key), base64.urlsafe_b64encode(key).decode().rstrip("=")):
            assert form not in outputs and form.encode() not in stored
        assert key not in stored
    events = [json.loads(line)["event"] for line in (store / "audit.jsonl").read_text().splitlines()]
    assert events == ["keys.init", "keys.rotate", "keys.new_dek"]
