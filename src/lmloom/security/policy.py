"""Access control: which principal may do what, from a YAML policy file.

The policy is `$LMLOOM_POLICY`, else `<store>/security/policy.yaml`. Without one lmloom runs in
single-user mode: every action is allowed and the principal is only a label (`user@host`).

    version: 1
    roles:                          # optional: replace a built-in role or add one
      reviewer: [read-artifacts, read-audit]
    principals:
      alice: {roles: [data-steward, trainer]}             # the OS user alice, on any host
      bob@gpu-01: {roles: [trainer]}                       # the OS user bob, on host gpu-01 only
      ci-bot: {roles: [trainer], tokens: ["sha256:9f2c..."]}  # only with LMLOOM_TOKEN

Who is acting: with `LMLOOM_TOKEN` set, the principal whose `tokens` hold the token's sha256 (an
unknown token is refused, never replaced by the OS user); else the OS user of the process (from the
uid, not from $USER), matched as `user@host` first, then `user`. Principals with tokens are reachable
only by token. An OS user the policy does not name holds no permission.

Tokens are 256-bit random secrets, so a plain sha256 is enough to store them: a slow, salted hash
(scrypt, argon2) protects guessable passwords, but nobody can enumerate 2^256 candidates, and an
unsalted hash lets a token be found without trying every entry's salt.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError

from lmloom.config import StrictConfig, format_validation_error
from lmloom.errors import AccessDenied, ConfigError, IntegrityError, SecurityError
from lmloom.security.audit import AuditLog
from lmloom.security.identity import ENV_PRINCIPAL, current_principal, os_host, os_user

ENV_POLICY = "LMLOOM_POLICY"
ENV_TOKEN = "LMLOOM_TOKEN"  # noqa: S105 (a variable name, not a secret)
POLICY_FILE = Path("security") / "policy.yaml"
TOKEN_PREFIX = "lml_"  # noqa: S105
ALL = "*"  # a role holding "*" holds every permission, including ones added later


class Permission:
    """The permissions an action can need (plain strings, so a policy file names them as they are)."""

    READ_RAW_DATA = "read-raw-data"
    WRITE_CORPUS = "write-corpus"
    TRAIN = "train"
    EVALUATE = "evaluate"
    EXPORT = "export"
    SERVE = "serve"
    READ_ARTIFACTS = "read-artifacts"
    SIGN = "sign"
    READ_AUDIT = "read-audit"
    MANAGE_KEYS = "manage-keys"
    MANAGE_POLICY = "manage-policy"


PERMISSIONS: dict[str, str] = {
    Permission.READ_RAW_DATA: "read source data from outside the store (data.prepare)",
    Permission.WRITE_CORPUS: "make corpus, tokenizer and token-shard artifacts",
    Permission.TRAIN: "pre-train, fine-tune and align models",
    Permission.EVALUATE: "run evaluations and release gates",
    Permission.EXPORT: "export models to other formats",
    Permission.SERVE: "generate text with a model (generate, serve.samples, the API)",
    Permission.READ_ARTIFACTS: "list, show, verify artifacts and their lineage",
    Permission.SIGN: "sign artifacts",
    Permission.READ_AUDIT: "read and verify the audit log, review the access policy",
    Permission.MANAGE_KEYS: "create, rotate and list keys; manage the signers' trust store",
    Permission.MANAGE_POLICY: "change the access policy and mint tokens",
}
# Inspecting needs no start-up notice; everything else "acts".
READ_ONLY = frozenset({Permission.READ_ARTIFACTS, Permission.READ_AUDIT})

P = Permission
BUILTIN_ROLES: dict[str, frozenset[str]] = {
    "data-steward": frozenset({P.READ_RAW_DATA, P.WRITE_CORPUS, P.READ_ARTIFACTS}),
    "trainer": frozenset({P.TRAIN, P.EVALUATE, P.SERVE, P.READ_ARTIFACTS}),
    "evaluator": frozenset({P.EVALUATE, P.SERVE, P.READ_ARTIFACTS}),
    "deployer": frozenset({P.EXPORT, P.SERVE, P.SIGN, P.READ_ARTIFACTS}),
    "auditor": frozenset({P.READ_AUDIT, P.READ_ARTIFACTS}),
    "admin": frozenset({ALL}),
}

PermissionName = Literal[
    "*",
    "read-raw-data",
    "write-corpus",
    "train",
    "evaluate",
    "export",
    "serve",
    "read-artifacts",
    "sign",
    "read-audit",
    "manage-keys",
    "manage-policy",
]
assert set(PermissionName.__args__) == {ALL, *PERMISSIONS}  # type: ignore[attr-defined]
TokenHash = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]


class PrincipalSpec(StrictConfig):
    roles: list[str]
    tokens: list[TokenHash] = Field(default=[], description="sha256:<hex> of each LMLOOM_TOKEN")


class PolicySpec(StrictConfig):
    version: Literal[1] = 1
    roles: dict[str, list[PermissionName]] = {}
    principals: dict[str, PrincipalSpec] = {}


# -- tokens --------------------------------------------------------------------------------------


def mint_token() -> str:
    """A new API token: 256 random bits, URL-safe, recognisable by its prefix."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_id(token: str) -> str:
    """A short, non-secret name for a token (its hash prefix), for audit entries and listings."""
    return hash_token(token)[7:19]


# -- the policy ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    path: Path
    roles: dict[str, frozenset[str]]
    principals: dict[str, PrincipalSpec]

    def permissions_of(self, roles: Iterable[str]) -> frozenset[str]:
        granted: set[str] = set()
        for role in roles:
            granted |= self.roles.get(role, frozenset())
        return frozenset(PERMISSIONS) if ALL in granted else frozenset(granted)

    def roles_granting(self, permissions: Iterable[str]) -> list[str]:
        wanted = set(permissions)
        return [role for role in self.roles if wanted <= self.permissions_of([role])]

    def principal_for_token(self, token: str) -> str | None:
        digest = hash_token(token)
        found = None
        for name, spec in self.principals.items():
            for stored in spec.tokens:
                if hmac.compare_digest(stored, digest):  # constant time: no hint how close a guess was
                    found = name
        return found

    def principal_for_os_user(self, user: str, host: str) -> str | None:
        for name in (f"{user}@{host}", user):
            spec = self.principals.get(name)
            if spec is not None and not spec.tokens:
                return name
        return None


def policy_path(store_root: Path) -> Path | None:
    """The policy file in force: $LMLOOM_POLICY (which must exist), else the store's, else None."""
    named = os.environ.get(ENV_POLICY)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            # Fail closed: a mistyped path must not silently turn access control off.
            raise ConfigError(f"{ENV_POLICY}={named}: no such policy file")
        return path
    path = Path(store_root) / POLICY_FILE
    return path if path.exists() else None


def load_policy(path: Path) -> Policy:
    path = Path(path)
    mode = path.stat().st_mode
    if mode & stat.S_IWOTH:
        raise SecurityError(
            f"policy {path} is writable by every user (mode {stat.filemode(mode)}); run `chmod o-w {path}`"
        )
    return parse_policy(_read_yaml(path), path)


def parse_policy(raw: Any, path: Path) -> Policy:
    """Validate a policy's parsed YAML; errors name the file and the key, one line each."""
    try:
        spec = PolicySpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_in_policy(path, format_validation_error(exc, "", PolicySpec))) from None
    roles = {**BUILTIN_ROLES, **{name: frozenset(perms) for name, perms in spec.roles.items()}}
    problems = []
    seen_tokens: dict[str, str] = {}
    for name, principal in spec.principals.items():
        if not name.strip() or any(c.isspace() for c in name):
            problems.append(f"principals.{name!r}: a principal name cannot be empty or contain spaces")
        for i, role in enumerate(principal.roles):
            if role not in roles:
                problems.append(
                    f"principals.{name}.roles.{i} = {role!r}: unknown role; roles: {', '.join(roles)}"
                )
        for i, digest in enumerate(principal.tokens):
            if digest in seen_tokens:
                problems.append(
                    f"principals.{name}.tokens.{i}: the same token is already {seen_tokens[digest]}'s"
                )
            seen_tokens[digest] = name
    if problems:
        raise ConfigError(_in_policy(path, "\n".join(problems)))
    return Policy(path, roles, dict(spec.principals))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML keeps the last of two equal keys without a word; in a policy that hides who holds what
    (`alice: {roles: [auditor]}` above, `alice: {roles: [admin]}` further down), so it is refused."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable: construct_mapping reports it
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (each may appear once)", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _read_yaml(path: Path) -> Any:
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"policy {path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"policy {path}: cannot be read ({exc})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"policy {path}: expected a mapping with 'roles' and 'principals' at the top")
    return raw


def _in_policy(path: Path, lines: str) -> str:
    return "\n".join(f"policy {path}: {line}" for line in lines.splitlines())


# -- who is acting, and what they may do ---------------------------------------------------------


@dataclass
class Access:
    """The acting principal and the policy that governs it (None: single-user mode, all allowed).

    `require` is the one check every command and stage goes through; a denial is audited as a
    `security.denied` entry before `AccessDenied` is raised.
    """

    principal: str
    policy: Policy | None = None
    roles: tuple[str, ...] = ()
    via: str = "single-user"  # "token", "os-user" or "single-user"
    audit: AuditLog | None = None
    notice: Callable[[str], None] | None = None  # told once that single-user mode is in force
    _noticed: bool = field(default=False, repr=False)

    @property
    def single_user(self) -> bool:
        return self.policy is None

    @property
    def permissions(self) -> frozenset[str]:
        if self.policy is None:
            return frozenset(PERMISSIONS)
        return self.policy.permissions_of(self.roles)

    def allows(self, permission: str) -> bool:
        _check_known([permission])
        return permission in self.permissions

    def require(self, *permissions: str, action: str, **context: Any) -> None:
        """Raise `AccessDenied` (audited) unless the principal holds every one of `permissions`."""
        _check_known(permissions)
        if self.policy is None:
            if self.notice and not self._noticed and not set(permissions) <= READ_ONLY:
                self._noticed = True
                self.notice(single_user_notice(self.principal))
            return
        missing = [p for p in permissions if p not in self.permissions]
        if not missing:
            return
        message = self._denial_message(missing, action)
        fields = {"action": action, "permission": missing[0], **context}
        if len(missing) > 1:
            fields["missing"] = missing
        error = AccessDenied(message)
        _audit(self.audit, "security.denied", self.principal, error, roles=list(self.roles), **fields)
        raise error

    def _denial_message(self, missing: list[str], action: str) -> str:
        assert self.policy is not None
        if self.via == "os-user" and not self.roles and self.principal not in self.policy.principals:
            who = f"{self.principal} (not in the access policy {self.policy.path})"
        else:
            who = f"{self.principal} (roles: {', '.join(self.roles) or 'none'})"
        needs = ", ".join(repr(p) for p in missing)
        plural = "s" if len(missing) > 1 else ""
        granting = self.policy.roles_granting(missing)
        grant = (
            f"roles that grant {'them' if plural else 'it'}: {', '.join(granting)}"
            if granting
            else "no role grants that"
        )
        return f"access denied: {who} lacks permission{plural} {needs} for {action}; {grant}"


def single_user_notice(principal: str) -> str:
    return f"no access policy: single-user mode (all actions allowed for {principal})"


def resolve_access(
    store_root: Path,
    *,
    token: str | None = None,
    claimed: str | None = None,
    notice: Callable[[str], None] | None = None,
) -> Access:
    """Who is acting on the store at `store_root`, under which policy.

    `token`: an API token presented some other way than `$LMLOOM_TOKEN` (e.g. a server's request
    header); it takes the environment's place. `claimed` is a principal named by the caller (a
    library user, a test): a label in single-user mode; under a policy it is refused unless it is the
    principal the policy identifies anyway, as is `$LMLOOM_PRINCIPAL`.
    """
    from lmloom.security.context import store_audit_log  # signs head checkpoints when it can

    audit = store_audit_log(Path(store_root))
    token = token or os.environ.get(ENV_TOKEN) or None
    path = policy_path(store_root)
    if path is None:
        if token:
            _refuse(
                audit,
                f"{ENV_TOKEN} is set but there is no access policy to check it against "
                f"({Path(store_root) / POLICY_FILE} or ${ENV_POLICY}); unset it to work in single-user mode",
                reason="token without policy",
                token_id=token_id(token),
            )
        principal = claimed or current_principal()
        return Access(principal, audit=audit, notice=notice)

    policy = load_policy(path)
    if token:
        name = policy.principal_for_token(token)
        if name is None:
            _refuse(
                audit,
                f"{ENV_TOKEN} is not a token of any principal in the access policy {path}",
                reason="unknown token",
                token_id=token_id(token),
            )
        via = "token"
    else:
        user, host = os_user(), os_host()
        name = policy.principal_for_os_user(user, host) or f"{user}@{host}"
        via = "os-user"
    assert name is not None
    for source, value in ((f"${ENV_PRINCIPAL}", os.environ.get(ENV_PRINCIPAL)), ("the caller", claimed)):
        if value and value != name:
            _refuse(
                audit,
                f"{source} names {value!r}, but under the access policy {path} the acting principal is "
                f"{name!r}; identify with {ENV_TOKEN} instead",
                reason="claimed principal",
                claimed=value,
                identified=name,
            )
    spec = policy.principals.get(name)
    roles = tuple(spec.roles) if spec else ()
    return Access(name, policy, roles, via, audit, notice)


def _refuse(audit: AuditLog, message: str, **fields: Any) -> None:
    error = AccessDenied(message)
    _audit(audit, "security.auth_failed", "unauthenticated", error, os_user=current_principal(), **fields)
    raise error


def _audit(audit: AuditLog | None, event: str, principal: str, error: Exception, **fields: Any) -> None:
    if audit is None:
        return
    try:
        audit.append(event, principal, **fields)
    except (IntegrityError, OSError) as audit_error:  # the refusal itself still stands
        error.add_note(f"(and it could not be audited: {audit_error})")


def _check_known(permissions: Iterable[str]) -> None:
    unknown = [p for p in permissions if p not in PERMISSIONS]
    if unknown:  # a programming error, not a user's: fail loudly
        raise ValueError(f"unknown permission(s) {unknown}; known: {', '.join(PERMISSIONS)}")


# -- writing a policy (for `lmloom policy init | token`) ------------------------------------------

STARTER_POLICY = """\
# lmloom access policy (`lmloom policy show` lists the roles and what they grant).
# Principals: an OS user as `user` (any host) or `user@host`; a principal with `tokens` is reachable
# only with LMLOOM_TOKEN (`lmloom policy token NAME --role ROLE` mints one and adds its hash here).
# Built-in roles: data-steward, trainer, evaluator, deployer, auditor, admin. A role under `roles:`
# replaces the built-in one of the same name or adds a new one, e.g.  reviewer: [read-artifacts, read-audit]
version: 1
roles: {{}}
principals:
  {admin}: {{roles: [admin]}}
"""


def write_starter_policy(path: Path, admin: str) -> None:
    from lmloom.artifacts.atomic import write_text_atomic

    text = STARTER_POLICY.format(admin=json.dumps(admin))  # quoted: a name is never YAML syntax
    parse_policy(yaml.safe_load(text), path)  # it must load, or the admin just locked everyone out
    write_text_atomic(path, text)
    path.chmod(0o644)  # no secrets in it (tokens are hashed); every user of the store must read it


def add_token(path: Path, principal: str, roles: list[str], token: str) -> None:
    """Add `token`'s hash to `principal` (created with `roles` when new); rewrites the YAML file.

    Under a lock beside the file: two `policy token` at once would otherwise both read the old file
    and the second rename would drop the first token, though it was printed as added.
    """
    lock_path = path.with_name(f".{path.name}.lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _add_token(path, principal, roles, token)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _add_token(path: Path, principal: str, roles: list[str], token: str) -> None:
    from lmloom.artifacts.atomic import write_text_atomic

    raw = _read_yaml(path)
    principals = raw.setdefault("principals", {}) or {}
    raw["principals"] = principals
    entry = principals.get(principal)
    if entry is None:
        if not roles:
            raise ConfigError(f"principal {principal!r} is new: give its role(s) with --role")
        entry = principals[principal] = {"roles": list(roles)}
    elif roles and list(roles) != list(entry.get("roles", [])):
        raise ConfigError(
            f"principal {principal!r} already has roles {entry.get('roles')}; edit {path} to change them"
        )
    elif not entry.get("tokens"):
        raise ConfigError(
            f"principal {principal!r} is an OS user in {path}; a token principal needs a name of its own "
            f"(e.g. {principal}-api)"
        )
    entry.setdefault("tokens", []).append(hash_token(token))
    text = yaml.safe_dump(raw, sort_keys=False, default_flow_style=None, allow_unicode=True)
    parse_policy(yaml.safe_load(text), path)  # never write a policy that does not load
    mode = stat.S_IMODE(path.stat().st_mode)
    write_text_atomic(path, text)
    path.chmod(mode)
