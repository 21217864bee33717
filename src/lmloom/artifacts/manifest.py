"""The manifest: what an artifact is, where it came from, and the hash of every file in it.

An artifact's id is the sha256 of its canonical manifest, so the id vouches for the manifest and the
manifest vouches for every file: checking one 64-hex string checks the whole artifact.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmloom.artifacts.hashing import canonical_json, sha256_bytes
from lmloom.errors import IntegrityError

SCHEMA = "lmloom.artifact/v1"
MANIFEST_NAME = "manifest.json"


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_: str = Field(SCHEMA, alias="schema")
    kind: str
    stage: str
    stage_key: str | None = None
    config: dict[str, Any] = {}
    inputs: dict[str, str] = {}
    files: dict[str, FileEntry]
    metadata: dict[str, Any] = {}
    # None for plaintext; else what a reader needs besides the key (scheme, key id, chunking, binding).
    encryption: dict[str, Any] | None = None
    tool: dict[str, str]
    principal: str
    created: str

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_json_dict())

    @property
    def id(self) -> str:
        return sha256_bytes(self.canonical_bytes())

    @classmethod
    def parse(cls, raw: bytes, where: str) -> Manifest:
        """Parse stored manifest bytes; a malformed manifest is an integrity failure naming `where`."""
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(part) for part in first["loc"])
            at = f"{loc}: " if loc else ""  # no location when the file is not JSON at all
            raise IntegrityError(f"{where}: malformed manifest ({at}{first['msg']})") from None
