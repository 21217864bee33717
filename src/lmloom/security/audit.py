"""A tamper-evident, append-only audit log.

Each JSONL entry carries its sequence number, the hash of the entry before it and its own hash, so
editing, deleting or reordering any entry breaks the chain at that entry. Cutting entries off the end
leaves a valid chain, so a separate head file records the last sequence number and hash: a log shorter
than its head was truncated.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from lmloom.artifacts.atomic import write_text_atomic
from lmloom.artifacts.hashing import canonical_json, sha256_bytes
from lmloom.errors import IntegrityError

GENESIS = "0" * 64


def entry_hash(entry: dict[str, Any]) -> str:
    return sha256_bytes(canonical_json({k: v for k, v in entry.items() if k != "hash"}))


@dataclass(frozen=True)
class AuditProblem:
    line: int  # 1-based line in the file; 0 when the problem is the head file
    seq: int | None
    reason: str

    def __str__(self) -> str:
        entry = f"entry {self.seq}" if self.seq is not None else "entry ?"
        return f"{entry} (line {self.line}): {self.reason}" if self.line else self.reason


@dataclass(frozen=True)
class AuditReport:
    entries: int
    problem: AuditProblem | None

    @property
    def ok(self) -> bool:
        return self.problem is None


class HeadSigner(Protocol):
    """Signs the chain head; in lmloom, the store's artifact-signing key (see security.context)."""

    def sign_head(self, payload: bytes) -> dict[str, Any] | None:
        """A JSON-able signature record over `payload`, or None when the key is not usable by this
        process (the next append by someone who can use it brings the checkpoint up to date)."""


class HeadVerifier(Protocol):
    required: bool  # a signed checkpoint must exist once the log has entries

    def check_head(self, payload: bytes, record: dict[str, Any]) -> str | None:
        """None when `record` is a valid signature over `payload` by a trusted key, else why not."""


def head_payload(seq: int, entry_hash_: str) -> bytes:
    return canonical_json({"log": "lmloom.audit.head/v1", "seq": seq, "hash": entry_hash_})


class AuditLog:
    """The hash-chained log. With a `signer`, every append also writes a signed checkpoint of the head
    (`audit.head.sig.json`), so cutting entries off the end and rewriting the unsigned head file is
    detectable down to the last signed entry; a `verifier` checks that checkpoint."""

    def __init__(self, path: Path, signer: HeadSigner | None = None, verifier: HeadVerifier | None = None):
        self.path = Path(path)
        self.head_path = self.path.with_suffix(".head.json")
        self.signed_head_path = self.path.with_suffix(".head.sig.json")
        self.lock_path = self.path.with_suffix(".lock")
        self.signer = signer
        self.verifier = verifier

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # Several processes (pipeline, torchrun ranks, the server) may append at once.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @contextmanager
    def _read_locked(self) -> Iterator[None]:
        # Shared with other readers, exclusive of `append`, which writes the entry and then the head:
        # a reader between the two would see a head ahead of the log and report it truncated.
        try:
            lock = open(self.lock_path, "rb")
        except OSError:  # no lock file yet (nothing was ever appended), or not ours to open
            yield
            return
        with lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def append(self, event: str, principal: str, **fields: Any) -> dict[str, Any]:
        """Append one entry chained to the current last entry; refuses to extend a broken tail."""
        with self._locked():
            seq, prev = self._tail()
            entry = {
                "seq": seq + 1,
                "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "principal": principal,
                "event": event,
                **fields,
                "prev": prev,
            }
            entry["hash"] = entry_hash(entry)
            line = json.dumps(entry, ensure_ascii=False, sort_keys=False) + "\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode("utf-8"))  # one write: an entry is never interleaved
                os.fsync(fd)
            finally:
                os.close(fd)
            write_text_atomic(self.head_path, json.dumps({"seq": entry["seq"], "hash": entry["hash"]}))
            record = self.signer.sign_head(head_payload(entry["seq"], entry["hash"])) if self.signer else None
            if record is not None:
                signed = {"seq": entry["seq"], "hash": entry["hash"], "signature": record}
                write_text_atomic(self.signed_head_path, json.dumps(signed))
            return entry

    def _tail(self) -> tuple[int, str]:
        """(seq, hash) of the last entry, or (-1, GENESIS) for an empty log."""
        last = _last_line(self.path)
        if last is None:
            if self.head_path.exists():
                raise IntegrityError(
                    f"audit log {self.path} is empty but its head records entries (truncated)"
                )
            return -1, GENESIS
        try:
            entry = json.loads(last)
            if entry_hash(entry) != entry["hash"]:
                raise ValueError("hash mismatch")
            return int(entry["seq"]), entry["hash"]
        except (ValueError, KeyError, TypeError):
            raise IntegrityError(
                f"audit log {self.path}: the last entry is damaged; run `lmloom audit verify`"
            ) from None

    def entries(self) -> Iterator[dict[str, Any]]:
        """Parsed entries in file order (unverified: use `verify` to check them).

        A line that is not a JSON object (edited or corrupted) comes as a placeholder entry, event
        `audit.damaged` with its line number, so that readers still see every other entry.
        """
        if not self.path.exists():
            return
        try:
            handle = open(self.path, encoding="utf-8", errors="replace")
        except OSError as exc:
            raise IntegrityError(f"audit log {self.path} cannot be read ({exc.strerror or exc})") from None
        with handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:
                    entry = None
                if not isinstance(entry, dict):
                    entry = {
                        "seq": None,
                        "event": "audit.damaged",
                        "line": line_no,
                        "detail": f"line {line_no} is not a valid entry (edited or corrupted); "
                        "run `lmloom audit verify`",
                    }
                yield entry

    def verify(self) -> AuditReport:
        with self._read_locked():  # never between an append's entry and its head
            return self._verify()

    def _verify(self) -> AuditReport:
        hashes: list[str] = []  # of every entry, to check the signed checkpoint against
        expected_prev = GENESIS
        if self.path.exists():
            try:
                handle = open(self.path, "rb")
            except OSError as exc:
                return AuditReport(
                    0, AuditProblem(0, None, f"the log cannot be read ({exc.strerror or exc})")
                )
            with handle:
                for line_no, raw in enumerate(handle, start=1):
                    problem = _check_line(raw, line_no, len(hashes), expected_prev)
                    if problem:
                        return AuditReport(len(hashes), problem)
                    expected_prev = json.loads(raw)["hash"]
                    hashes.append(expected_prev)
        problem = self._check_head(len(hashes), expected_prev) or self._check_signed_head(hashes)
        return AuditReport(len(hashes), problem)

    def signed_through(self) -> int | None:
        """The sequence number of the last signed checkpoint, if any (unverified)."""
        try:
            return int(json.loads(self.signed_head_path.read_text())["seq"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _check_signed_head(self, hashes: list[str]) -> AuditProblem | None:
        name = self.signed_head_path.name
        if not self.signed_head_path.exists():
            if self.verifier is not None and self.verifier.required and hashes:
                return AuditProblem(0, None, f"signed head checkpoint {name} is missing (removed?)")
            return None
        try:
            signed = json.loads(self.signed_head_path.read_text())
            seq, hash_, record = int(signed["seq"]), str(signed["hash"]), dict(signed["signature"])
        except (OSError, ValueError, KeyError, TypeError):
            return AuditProblem(0, None, f"signed head checkpoint {name} is damaged")
        if self.verifier is not None:
            reason = self.verifier.check_head(head_payload(seq, hash_), record)
            if reason:
                return AuditProblem(0, None, f"signed head checkpoint {name}: {reason}")
        if seq >= len(hashes):
            return AuditProblem(
                len(hashes) + 1,
                len(hashes),
                f"missing: a signed checkpoint vouches for entries up to {seq} (log truncated)",
            )
        if hashes[seq] != hash_:
            return AuditProblem(seq + 1, seq, "differs from the entry the signed head checkpoint vouches for")
        return None

    def _check_head(self, count: int, last_hash: str) -> AuditProblem | None:
        if not self.head_path.exists():
            return (
                None if count == 0 else AuditProblem(0, None, f"head file {self.head_path.name} is missing")
            )
        try:
            head = json.loads(self.head_path.read_text())
            head_seq, head_hash = int(head["seq"]), str(head["hash"])
        except (OSError, ValueError, KeyError, TypeError):
            return AuditProblem(0, None, f"head file {self.head_path.name} is damaged")
        if head_seq >= count:
            return AuditProblem(
                count + 1, count, f"missing: the head records entries up to {head_seq} (log truncated)"
            )
        # Entries past the head are tolerated (a crash between appending and updating the head)
        # as long as they chain; the head entry itself must be the one recorded.
        if head_seq == count - 1 and head_hash != last_hash:
            return AuditProblem(count, head_seq, "does not match the hash recorded in the head file")
        return None


def _check_line(raw: bytes, line_no: int, expected_seq: int, expected_prev: str) -> AuditProblem | None:
    try:
        entry = json.loads(raw.decode("utf-8"))
        seq = entry.get("seq") if isinstance(entry, dict) else None
    except (UnicodeDecodeError, ValueError):
        return AuditProblem(line_no, None, "not a valid JSON entry (edited or corrupted)")
    if not isinstance(entry, dict) or not {"seq", "prev", "hash"} <= entry.keys():
        return AuditProblem(line_no, seq, "lacks seq/prev/hash fields")
    if entry_hash(entry) != entry["hash"]:
        return AuditProblem(line_no, seq, "content does not match its hash (edited)")
    if seq != expected_seq:
        return AuditProblem(
            line_no, seq, f"expected entry {expected_seq} here (an entry was deleted or reordered)"
        )
    if entry["prev"] != expected_prev:
        return AuditProblem(line_no, seq, "does not chain to the entry before it (deleted or reordered)")
    return None


def _last_line(path: Path) -> bytes | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        end = handle.tell()
        block, data = 4096, b""
        pos = end
        while pos > 0:
            step = min(block, pos)
            pos -= step
            handle.seek(pos)
            data = handle.read(step) + data
            stripped = data.rstrip(b"\n")
            if b"\n" in stripped:
                return stripped.rsplit(b"\n", 1)[1]
        return data.rstrip(b"\n") or None


# -- querying ------------------------------------------------------------------------------------

ARTIFACT_FIELDS = ("artifact", "artifacts", "inputs", "outputs")


@dataclass(frozen=True)
class AuditQuery:
    """Which entries `lmloom audit show` prints; every given criterion must hold.

    `principal`: exactly, or `alice` also matches `alice@any-host`. `event`: a prefix (`security.`).
    `artifact`: an id or prefix found in an entry's artifact/inputs/outputs (a short reference an
    entry recorded, such as a refused read of `3f2a`, matches the full id too). `since` / `until`:
    inclusive bounds on the entry's time; naive datetimes are UTC.
    """

    principal: str | None = None
    event: str | None = None
    artifact: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, entry: dict[str, Any]) -> bool:
        principal = str(entry.get("principal", ""))
        if self.principal and principal != self.principal and not principal.startswith(self.principal + "@"):
            return False
        if self.event and not str(entry.get("event", "")).startswith(self.event):
            return False
        if self.artifact and not any(_same_artifact(ref, self.artifact) for ref in _artifact_refs(entry)):
            return False
        if self.since or self.until:
            when = _entry_time(entry)
            if when is None:
                return False
            if self.since and when < _utc(self.since):
                return False
            if self.until and when > _utc(self.until):
                return False
        return True

    def select(self, entries: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        return (e for e in entries if self.matches(e))


def _artifact_refs(entry: dict[str, Any]) -> Iterator[str]:
    for key in ARTIFACT_FIELDS:
        value = entry.get(key)
        values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        yield from (v for v in values if isinstance(v, str) and v)


def _same_artifact(ref: str, wanted: str) -> bool:
    ref, wanted = ref.lower(), wanted.lower()
    return ref.startswith(wanted) or (len(ref) >= 4 and wanted.startswith(ref))


def _entry_time(entry: dict[str, Any]) -> datetime | None:
    try:
        return _utc(datetime.fromisoformat(str(entry["time"])))
    except (KeyError, ValueError):
        return None


def _utc(when: datetime) -> datetime:
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when
