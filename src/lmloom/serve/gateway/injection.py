"""Prompt-injection and jailbreak heuristics over the text a request carries.

Heuristics, not a guarantee: each built-in rule is a regex for a phrasing that attacks use and benign
prompts rarely do. The text is normalised first (NFKC, so full-width and other look-alike forms fold
to ASCII; zero-width characters removed; whitespace collapsed), and with `decode_base64` every blob of
24+ base64 characters that decodes to mostly printable text is scanned as well (instructions hidden
in an encoding the model reads but a reviewer skims past). Unicode "tag" characters (U+E0000-E007F)
and bidirectional overrides, which carry text invisibly, are a finding of their own.

Each finding names its rule; the gateway blocks (403) or flags (passes, audited) by
`injection.action`, and either way writes a `security.prompt_injection` audit entry.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from dataclasses import dataclass

from lmloom.serve.gateway.config import InjectionConfig

_GAP = r"[\s\S]{0,60}?"  # a short stretch of anything between the parts of a phrase

BUILTIN_PATTERNS: dict[str, str] = {
    "ignore_instructions": (
        rf"\b(?:ignore|disregard|forget|override|bypass|skip)\b{_GAP}\b(?:all|any|the|your|previous|prior|"
        rf"above|earlier|preceding|initial|original|system)\b{_GAP}\b(?:instructions?|prompts?|rules|"
        rf"directions|guidelines|directives|constraints|context)\b"
    ),
    "new_instructions": r"\b(?:new|updated|real|actual)\s+(?:system\s+)?instructions?\s*:",
    "roleplay_jailbreak": (
        r"(?-i:\bDAN\b)|\bdo anything now\b|\bdeveloper mode\b|\bjailbr(?:eak|oken)\b|\bgod ?mode\b|"
        rf"\b(?:you are|you're)\s+(?:now\s+)?(?:free|freed|unbound|no longer bound|released)\b{_GAP}"
        r"\b(?:rules|restrictions|guidelines|policies|filters|limitations)\b|"
        rf"\b(?:act|pretend|roleplay|role-play|behave)\b{_GAP}\b(?:unfiltered|uncensored|unrestricted|"
        r"no (?:rules|restrictions|limits|filters|guidelines)|without (?:any )?(?:rules|restrictions|limits|filters|"
        r"guidelines|ethics))\b"
    ),
    "system_prompt_exfiltration": (
        rf"\b(?:reveal|show|print|display|repeat|output|leak|tell me|give me|what(?: is|'s| are| were)|write out)"
        rf"\b{_GAP}\b(?:system|initial|hidden|secret|developer)\s+(?:prompt|instructions?|message)s?\b|"
        r"\brepeat (?:the |all )?(?:words|text) above\b|\beverything above this line\b"
    ),
    "delimiter_injection": r"<\|(?:im_start|im_end|system|endoftext)\|>|\[/?INST\]|<</?SYS>>|^\s*###\s*system\s*:",
}
_HIDDEN_CHARS = re.compile("[\U000e0000-\U000e007f\u202a-\u202e\u2066-\u2069]")
_ZERO_WIDTH = re.compile("[\u200b-\u200f\u2060\ufeff\u00ad]")
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/_-]{24,}={0,2}")


@dataclass(frozen=True)
class Finding:
    rule: str
    role: str
    encoded: bool = False  # found in decoded base64

    def label(self) -> str:
        return f"{self.rule}{' (base64)' if self.encoded else ''}"


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    text = _ZERO_WIDTH.sub("", text)
    return " ".join(text.split())


def _decoded_blobs(text: str) -> list[str]:
    found = []
    for match in _BASE64.finditer(text):
        blob = match.group().replace("-", "+").replace("_", "/")
        blob += "=" * (-len(blob) % 4)
        try:
            decoded = base64.b64decode(blob, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
        printable = sum(c.isprintable() or c.isspace() for c in decoded)
        if decoded and printable / len(decoded) > 0.9:
            found.append(decoded)
    return found


class InjectionScanner:
    def __init__(self, config: InjectionConfig):
        self.config = config
        rules = {k: v for k, v in BUILTIN_PATTERNS.items() if k not in config.disabled}
        rules.update(config.patterns)
        self.rules = {
            name: re.compile(pattern, re.IGNORECASE | re.MULTILINE) for name, pattern in rules.items()
        }
        self.roles = frozenset(config.roles)

    def _match(self, text: str, role: str, encoded: bool) -> list[Finding]:
        return [Finding(name, role, encoded) for name, rule in self.rules.items() if rule.search(text)]

    def scan(self, texts: list[tuple[str, str]]) -> list[Finding]:
        if not self.config.enabled:
            return []
        findings: list[Finding] = []
        for role, raw in texts:
            if role not in self.roles or not raw:
                continue
            if _HIDDEN_CHARS.search(raw):
                findings.append(Finding("hidden_unicode", role))
            findings += self._match(normalise(raw), role, False)
            if self.config.decode_base64 and len(raw) >= 24:
                for decoded in _decoded_blobs(raw):
                    findings += self._match(normalise(decoded), role, True)
        unique: dict[tuple[str, str, bool], Finding] = {}
        for finding in findings:
            unique.setdefault((finding.rule, finding.role, finding.encoded), finding)
        return list(unique.values())
