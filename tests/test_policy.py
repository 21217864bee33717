"""Access control: each role can do exactly what the policy grants, and every denial is audited.

The role matrix calls the real `lmloom` command in-process (typer's CliRunner) so the check each
command and stage makes is the one a user meets; a few subprocess runs pin the exit code and the
one-line message.
"""

import os
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from lmloom.artifacts.store import ArtifactStore
from lmloom.cli import app
from lmloom.config import Recipe
from lmloom.context import RunContext
from lmloom.errors import AccessDenied, ConfigError, LmloomError, SecurityError
from lmloom.pipeline import run_recipe
from lmloom.security.audit import AuditLog
from lmloom.security.identity import os_user
from lmloom.security.policy import BUILTIN_ROLES, PERMISSIONS, hash_token, load_policy, resolve_access
from lmloom.stages import get_stage, stage_names

ROLES = list(BUILTIN_ROLES)
TOKENS = {role: f"lml_test-token-for-{role}-0123456789abcdef" for role in ROLES}
CLEAN_ENV = {"LMLOOM_TOKEN": None, "LMLOOM_POLICY": None, "LMLOOM_PRINCIPAL": None, "COLUMNS": "200"}
runner = CliRunner()


def cli(store, *args, token=None, **env):
    """Run `lmloom ARGS` in-process; returns (exit code as `main()` would give it, output)."""
    result = runner.invoke(
        app,
        [str(a) for a in args],
        env={**CLEAN_ENV, "LMLOOM_HOME": str(store), "LMLOOM_TOKEN": token, **env},
    )
    exc = result.exception
    if isinstance(exc, LmloomError):
        return exc.exit_code, result.output + str(exc)
    if exc is not None and not isinstance(exc, SystemExit):
        raise exc
    return result.exit_code, result.output


def lmloom(store, *args, **env):
    """Run `lmloom ARGS` as a user does: a subprocess."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LMLOOM_")}
    full_env.update({"LMLOOM_HOME": str(store), "COLUMNS": "200", **env})
    proc = subprocess.run(
        [sys.executable, "-m", "lmloom", *map(str, args)], capture_output=True, text=True, env=full_env
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def write_recipe(folder, name, stages):
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "stages": stages}))
    return path


def denials(store):
    return [e for e in AuditLog(store / "audit.jsonl").entries() if e["event"] == "security.denied"]


def write_policy(store, principals, roles=None):
    path = store / "security" / "policy.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"version": 1, "roles": roles or {}, "principals": principals}))
    return path


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(8):
        (folder / f"doc{i}.txt").write_text(
            f"Document {i}: the quick brown fox jumps over the lazy dog. " * 4
        )
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store whose policy binds each built-in role to a token principal `as-<role>`, holding a corpus."""
    tmp = tmp_path_factory.mktemp("roles")
    store = tmp / "store"
    docs = tmp / "docs"
    docs.mkdir()
    for i in range(8):
        (docs / f"doc{i}.txt").write_text(f"Document {i}: the quick brown fox jumps over the lazy dog. " * 4)
    write_policy(
        store, {f"as-{role}": {"roles": [role], "tokens": [hash_token(TOKENS[role])]} for role in ROLES}
    )
    source = {"sources": [{"type": "text-dir", "path": str(docs)}], "min_chars": 20, "val_fraction": 0.2}
    data = write_recipe(tmp, "data", {"corpus": {"stage": "data.prepare", "config": source}})
    code, output = cli(store, "run", data, token=TOKENS["admin"])
    assert code == 0, output
    [corpus] = ArtifactStore(store).ids()
    ref = f"artifact:{corpus}"
    recipes = {
        "data": data,
        "tokenizer": write_recipe(
            tmp,
            "tokenizer",
            {"tok": {"stage": "tokenizer.train", "inputs": {"corpus": ref}, "config": {"vocab_size": 300}}},
        ),
        # Wired to the corpus on purpose: an allowed run gets past the access check and stops at the
        # kind check (exit 2) without training anything; a denied one stops at the check (exit 5).
        "pretrain": write_recipe(
            tmp, "pretrain", {"pt": {"stage": "train.pretrain", "inputs": {"shards": ref, "tokenizer": ref}}}
        ),
        "samples": write_recipe(
            tmp, "samples", {"s": {"stage": "serve.samples", "inputs": {"checkpoint": ref}}}
        ),
    }
    return store, corpus, recipes


# action -> (arguments, permissions it needs, the built-in roles that may do it)
def actions(corpus, recipes):
    short = corpus[:12]
    return {
        "run data.prepare": (["run", recipes["data"]], {"read-raw-data", "write-corpus"}, {"data-steward"}),
        "run tokenizer.train": (["run", recipes["tokenizer"]], {"write-corpus"}, {"data-steward"}),
        "run train.pretrain": (["run", recipes["pretrain"]], {"train"}, {"trainer"}),
        "run serve.samples": (["run", recipes["samples"]], {"serve"}, {"trainer", "evaluator", "deployer"}),
        "generate": (
            ["generate", short, "--max-tokens", "2"],
            {"serve"},
            {"trainer", "evaluator", "deployer"},
        ),
        "artifacts ls": (["artifacts", "ls"], {"read-artifacts"}, set(ROLES)),
        "artifacts show": (["artifacts", "show", short], {"read-artifacts"}, set(ROLES)),
        "artifacts verify": (["artifacts", "verify", short], {"read-artifacts"}, set(ROLES)),
        "artifacts lineage": (["artifacts", "lineage", short], {"read-artifacts"}, set(ROLES)),
        "audit show": (["audit", "show"], {"read-audit"}, {"auditor"}),
        "audit verify": (["audit", "verify"], {"read-audit"}, {"auditor"}),
        "policy show": (["policy", "show"], {"read-audit"}, {"auditor"}),
        "policy token": (["policy", "token", "x", "--print-only"], {"manage-policy"}, set()),
        "policy whoami": (["policy", "whoami"], set(), set(ROLES)),
    }


@pytest.mark.parametrize("role", ROLES)
def test_role_matrix(world, role):
    store, corpus, recipes = world
    policy = load_policy(store / "security" / "policy.yaml")
    principal = f"as-{role}"
    for action, (args, needs, pinned) in actions(corpus, recipes).items():
        granted = needs <= policy.permissions_of([role])
        # the built-in defaults, pinned down: admin may do everything
        assert granted == (role in pinned or role == "admin"), (role, action)

        before = len(denials(store))
        code, output = cli(store, *args, token=TOKENS[role])
        new = denials(store)[before:]
        if granted:
            assert code != AccessDenied.exit_code and not new, (role, action, output)
        else:
            assert code == AccessDenied.exit_code, (role, action, code, output)
            assert f"access denied: {principal} (roles: {role}) lacks permission" in output
            assert len(new) == 1, (role, action, new)
            assert new[0]["principal"] == principal and new[0]["permission"] in needs
            assert set(new[0].get("missing", [new[0]["permission"]])) == needs - policy.permissions_of([role])
    assert AuditLog(store / "audit.jsonl").verify().ok


def test_denial_names_who_what_and_the_roles_that_grant_it_then_exits_5(tmp_path, docs):
    store = tmp_path / "store"
    write_policy(store, {"bot": {"roles": ["auditor"], "tokens": [hash_token("lml_bot")]}})
    recipe = write_recipe(
        tmp_path,
        "d",
        {
            "corpus": {
                "stage": "data.prepare",
                "config": {"sources": [{"type": "text-dir", "path": str(docs)}]},
            }
        },
    )
    proc = lmloom(store, "run", recipe, LMLOOM_TOKEN="lml_bot")
    assert proc.returncode == 5
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: access denied: bot (roles: auditor) lacks permissions 'read-raw-data', 'write-corpus' for "
        "stage data.prepare; roles that grant them: data-steward, admin"
    )
    assert ArtifactStore(store).ids() == []  # nothing ran
    [denied] = denials(store)
    assert denied["action"] == "stage data.prepare" and denied["step"] == "corpus"
    assert denied["missing"] == ["read-raw-data", "write-corpus"]

    proc = lmloom(store, "artifacts", "ls")  # the OS user is not in the policy: it holds nothing
    assert proc.returncode == 5
    assert f"@{os.uname().nodename} (not in the access policy " in proc.stderr
    assert "lacks permission 'read-artifacts' for `artifacts ls`" in proc.stderr


def test_os_user_principal_and_what_manifests_and_audit_record(tmp_path, docs):
    store = tmp_path / "store"
    write_policy(store, {os_user(): {"roles": ["data-steward"]}}, roles={"reviewer": ["read-audit"]})
    recipe = Recipe.model_validate(
        {
            "name": "t",
            "stages": {
                "corpus": {
                    "stage": "data.prepare",
                    "config": {"sources": [{"type": "text-dir", "path": str(docs)}]},
                }
            },
        }
    )
    [result] = run_recipe(recipe, RunContext(ArtifactStore(store)))  # the library path checks too
    assert result.artifact.manifest.principal == os_user()  # the policy's principal, not user@host
    assert {e["principal"] for e in AuditLog(store / "audit.jsonl").entries()} == {os_user()}

    code, output = cli(store, "audit", "show")
    assert code == 5 and "roles that grant it: auditor, admin, reviewer" in output
    with pytest.raises(AccessDenied, match="the caller names 'someone-else'"):
        RunContext(ArtifactStore(store), principal="someone-else")  # a label cannot claim an identity
    assert cli(store, "artifacts", "ls", LMLOOM_PRINCIPAL="admin")[0] == 5


def test_unknown_token_is_refused_never_the_os_user(tmp_path):
    store = tmp_path / "store"
    write_policy(
        store,
        {os_user(): {"roles": ["admin"]}, "bot": {"roles": ["admin"], "tokens": [hash_token("lml_good")]}},
    )
    assert cli(store, "artifacts", "ls")[0] == 0  # the OS user is admin...
    proc = lmloom(store, "artifacts", "ls", LMLOOM_TOKEN="lml_wrong")  # ...but a bad token is no fallback
    assert proc.returncode == 5
    assert proc.stderr.strip() == (
        f"error: LMLOOM_TOKEN is not a token of any principal in the access policy {store}/security/policy.yaml"
    )
    [failed] = [e for e in AuditLog(store / "audit.jsonl").entries() if e["event"] == "security.auth_failed"]
    assert failed["reason"] == "unknown token" and failed["token_id"] == hash_token("lml_wrong")[7:19]
    assert "lml_wrong" not in (store / "audit.jsonl").read_text()
    assert resolve_access(store, token="lml_good").principal == "bot"  # e.g. a server's request header

    lone = tmp_path / "no-policy"  # a token where there is no policy to check it: refused, not ignored
    code, output = cli(lone, "artifacts", "ls", token="lml_good")
    assert code == 5 and "LMLOOM_TOKEN is set but there is no access policy" in output


def test_minted_token_is_stored_only_as_its_hash(tmp_path):
    store = tmp_path / "store"
    assert cli(store, "policy", "init", "--admin", os_user())[0] == 0
    code, output = cli(store, "policy", "token", "ci-bot", "--role", "trainer")
    assert code == 0
    token = output.strip().splitlines()[-1]
    assert token.startswith("lml_") and len(token) > 40
    policy_text = (store / "security" / "policy.yaml").read_text()
    assert token not in policy_text and hash_token(token) in policy_text
    for path in store.rglob("*"):
        assert not path.is_file() or token.encode() not in path.read_bytes(), path
    code, output = cli(store, "policy", "whoami", token=token)
    assert code == 0 and "ci-bot" in output and "roles: trainer" in output
    assert "train" in output.split("permissions:")[1]
    minted = [e for e in AuditLog(store / "audit.jsonl").entries() if e["event"] == "security.token_minted"]
    assert minted[0]["for_principal"] == "ci-bot" and minted[0]["token_id"] == hash_token(token)[7:19]
    # a second token for the same principal is added beside the first; both work
    second = cli(store, "policy", "token", "ci-bot")[1].strip().splitlines()[-1]
    assert (
        cli(store, "policy", "whoami", token=second)[0] == cli(store, "policy", "whoami", token=token)[0] == 0
    )
    code, output = cli(store, "policy", "token", "ci-bot", token=token)  # a trainer cannot mint
    assert code == 5 and "'manage-policy'" in output


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "principals: {bob: {roles: [trainr]}}",
            "principals.bob.roles.0 = 'trainr': unknown role; roles: data-steward",
        ),
        ("roles: {reviewer: [read-audit, reed]}", "roles.reviewer.1 = 'reed': Input should be"),
        (
            "principals: {bob: {roles: [admin], tokens: [abc]}}",
            "principals.bob.tokens.0 = 'abc': String should match",
        ),
        ("principal: {}", "principal: unknown key (value {}); allowed: principals, roles, version"),
        ("principals: {bob: {role: [admin]}}", "principals.bob.role: unknown key"),
        ("version: 2", "version = 2: Input should be 1"),
        ("principals: [bob", "not valid YAML at line 1"),
    ],
)
def test_malformed_policy_names_the_key(tmp_path, text, message):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    lines = str(caught.value).splitlines()  # one line per problem, each naming the file and the key
    assert all(line.startswith(f"policy {path}: ") for line in lines)
    assert any(message in line for line in lines), lines


def test_malformed_policy_is_one_line_exit_2_and_nothing_runs(tmp_path):
    store = tmp_path / "store"
    write_policy(store, {"bob": {"roles": ["trainr"]}})
    proc = lmloom(store, "artifacts", "ls")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: policy {store}/security/policy.yaml: principals.bob.roles.0 = 'trainr': unknown role; "
        "roles: data-steward, trainer, evaluator, deployer, auditor, admin"
    ]


def test_policy_that_cannot_be_trusted_or_found_fails_closed(tmp_path):
    store = tmp_path / "store"
    path = write_policy(store, {os_user(): {"roles": ["admin"]}})
    path.chmod(0o666)
    with pytest.raises(SecurityError, match="writable by every user"):
        load_policy(path)
    code, output = cli(store, "artifacts", "ls", LMLOOM_POLICY=str(tmp_path / "typo.yaml"))
    assert code == 2 and "LMLOOM_POLICY=" in output and "no such policy file" in output


def test_single_user_mode_is_stated_once_by_commands_that_act(tmp_path, docs):
    store = tmp_path / "store"
    recipe = write_recipe(
        tmp_path,
        "d",
        {
            "corpus": {
                "stage": "data.prepare",
                "config": {"sources": [{"type": "text-dir", "path": str(docs)}]},
            }
        },
    )
    proc = lmloom(store, "run", recipe)
    assert proc.returncode == 0, proc.stderr
    notice = "no access policy: single-user mode (all actions allowed for "
    assert proc.stderr.count(notice) == 1
    assert f"{notice}{os_user()}@" in proc.stderr
    assert notice not in lmloom(store, "artifacts", "ls").stderr  # inspecting is not acting


def test_every_command_and_stage_declares_known_permissions():
    def commands(typer_app, prefix=""):
        for info in typer_app.registered_commands:
            yield f"{prefix}{info.name or info.callback.__name__}", info.callback
        for group in typer_app.registered_groups:
            yield from commands(group.typer_instance, f"{prefix}{group.name} ")

    found = dict(commands(app))
    assert {"run", "generate", "artifacts ls", "audit show", "policy token"} <= found.keys()
    for name, callback in found.items():
        assert hasattr(callback, "permissions"), f"`lmloom {name}` does not declare @requires(...) or @public"
        assert set(callback.permissions or ()) <= PERMISSIONS.keys(), name
    for name in stage_names():
        stage = get_stage(name)
        assert stage.permissions and set(stage.permissions) <= PERMISSIONS.keys(), name


def test_policy_show_lists_roles_and_principals(world):
    store, _, _ = world
    code, output = cli(store, "policy", "show", token=TOKENS["auditor"])
    assert code == 0
    assert "data-steward" in output and "read-raw-data, write-corpus, read-artifacts" in output
    assert "as-trainer" in output and f"token ({hash_token(TOKENS['trainer'])[7:19]})" in output
    assert TOKENS["trainer"] not in output
