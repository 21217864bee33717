"""The `pii` step: personal data and secrets replaced by typed placeholders such as `<EMAIL>`.

Each PII type has a detector: a cheap prefilter (is there an "@", a digit, a known token prefix?), a
compiled regex that finds candidates, and a validator that rejects what only looks like PII (Luhn for
cards, mod-97 for IBANs, the SSA rules for SSNs, `ipaddress` for IPs, entropy for generic secrets).
Overlapping finds are resolved by type priority (a secret beats the email inside it), and the text is
rebuilt once with every span replaced, so no part of an original value survives.

Decisions a reader should know (each can be changed in `PiiConfig`):

- IP addresses that are not globally routable (private, loopback, link-local, documentation ranges
  such as 192.0.2.0/24 and 2001:db8::/32) identify nobody and are kept (`keep_non_global_ips`).
- A dotted quad written as a version ("v1.2.3.4", "version 1.2.3.4", "==1.2.3.4") or inside a longer
  dotted run ("1.2.3.4.5") is a version, not an IP.
- Addresses at reserved documentation domains (example.com/.org/.net, *.example, *.test, *.invalid,
  localhost) belong to nobody and are kept (`keep_example_domains`); so are SSH remotes
  ("git@github.com:...") and retina asset names ("icon@2x.png").
- Phones are international (+CC and 8-15 digits) or national shapes with separators (NANP
  "(415) 555-2671" with valid area and exchange codes, trunk-prefixed "020 7946 0958", French
  "01 23 45 67 89"); bare digit runs, dates and numbers after "order", "invoice", "#"... are not.
- Generic `password=`/`secret=`/`api_key=` values are secrets only when they look random: at least 8
  characters, two character classes, Shannon entropy >= 3 bits per character, and not a reference to
  a variable, environment value or template (`os.environ[...]`, `${VAR}`, `{{ key }}`, `<your-key>`).
  Fixed-format tokens (ghp_, AKIA, AIza, sk_live_, JWTs...) need only their shape, unless they are as
  repetitive as "ghp_XXXX...": documentation placeholders are kept.
- The generic assignment rule needs the key and value side by side (`password = "..."`, `secret: ...`);
  a key named elsewhere (Terraform's `variable "db_password" { default = "..." }`) is not seen.
"""

from __future__ import annotations

import bisect
import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from lmloom.data.documents import Document
from lmloom.data.steps import Edit, Step, StepConfig

PiiType = Literal["email", "phone", "ip_address", "credit_card", "iban", "us_ssn", "secret"]
ALL_TYPES: tuple[PiiType, ...] = ("email", "phone", "ip_address", "credit_card", "iban", "us_ssn", "secret")

DEFAULT_PLACEHOLDERS: dict[str, str] = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "ip_address": "<IP_ADDRESS>",
    "credit_card": "<CREDIT_CARD>",
    "iban": "<IBAN>",
    "us_ssn": "<US_SSN>",
    "secret": "<SECRET>",
}

# When two finds overlap the one of the earlier type wins: a token is a secret even if it holds an
# email-like part, and a card number is not also a phone number.
_PRIORITY: dict[str, int] = {
    name: rank
    for rank, name in enumerate(("secret", "credit_card", "iban", "us_ssn", "email", "ip_address", "phone"))
}


@dataclass(frozen=True, slots=True)
class PiiSpan:
    """One find: text[start:end] is PII of `type`; `label` refines it for counts (ipv4 / ipv6)."""

    start: int
    end: int
    type: str
    label: str


# --- validators --------------------------------------------------------------------------------------


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


# Issuer prefixes: a Luhn-valid number that no card network issues is more likely an id than a card.
_CARD_ISSUER = re.compile(
    r"4|5[1-5]|2(?:2[2-9]|[3-6]\d|7[01]|720)|3[47]|3(?:0[0-5]|[68])|35|6(?:011|5|4[4-9])|62"
)


def card_valid(digits: str) -> bool:
    return 13 <= len(digits) <= 19 and _CARD_ISSUER.match(digits) is not None and luhn_valid(digits)


# IBAN lengths by country (ISO 13616 registry, the countries most text mentions).
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AT": 20, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "CH": 21, "CY": 28,
    "CZ": 24, "DE": 22, "DK": 18, "EE": 20, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GI": 23,
    "GL": 18, "GR": 27, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IS": 26, "IT": 27, "KW": 30, "KZ": 20,
    "LB": 28, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "ME": 22, "MK": 19, "MT": 31, "MU": 30,
    "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24,
    "SI": 19, "SK": 24, "SM": 27, "TN": 24, "TR": 26, "UA": 29,
}  # fmt: skip


def iban_valid(compact: str) -> bool:
    """ISO 7064 mod 97-10 over the rearranged IBAN (letters as 10..35)."""
    if IBAN_LENGTHS.get(compact[:2]) != len(compact):
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


def ssn_valid(area: str, group: str, serial: str) -> bool:
    """SSA rules: no 000, 666 or 9xx area, no 00 group, no 0000 serial; two famous sample numbers."""
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return False
    return f"{area}{group}{serial}" not in ("078051120", "123456789")


def shannon_entropy(value: str) -> float:
    counts = Counter(value)
    return -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())


def _char_classes(value: str) -> int:
    return sum(
        (
            any(c.islower() for c in value),
            any(c.isupper() for c in value),
            any(c.isdigit() for c in value),
            any(not c.isalnum() for c in value),
        )
    )


_PLACEHOLDER_VALUE = re.compile(
    r"^(?:<.*>|\$\{?.*|\{\{.*|%\(.*|\*+|x+|\.\.\.|changeme|password|secret|none|null|true|false|"
    r"your[_-].*|example.*|redacted|\[.*\])$",
    re.IGNORECASE,
)
_REFERENCE_VALUE = re.compile(r"[()\[\]]|^(?:os|env|process|settings|config|self|cls|request)\.")


def random_looking_secret(value: str) -> bool:
    if len(value) < 8 or _PLACEHOLDER_VALUE.match(value) or _REFERENCE_VALUE.search(value):
        return False
    return _char_classes(value) >= 2 and shannon_entropy(value) >= 3.0


# --- detectors ---------------------------------------------------------------------------------------

_EXAMPLE_DOMAIN = re.compile(
    r"(?:^|\.)(?:example\.(?:com|org|net)|[a-z0-9-]+\.(?:example|test|invalid|localhost)|localhost)$",
    re.IGNORECASE,
)
# Message ids look like addresses but name a message, not a person.
_MESSAGE_ID_LINE = re.compile(r"^(?:message-id|in-reply-to|references)\s*:", re.IGNORECASE | re.MULTILINE)
_FILE_SUFFIXES = frozenset("png jpg jpeg gif svg webp bmp ico js ts css html py md txt json yaml yml".split())
_EMAIL = re.compile(
    r"(?<![\w.%+-])([A-Za-z0-9][A-Za-z0-9._%+-]{0,63})@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,24})(?![\w-]|\.[A-Za-z0-9])"
)

_IPV4 = re.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w]|\.\d)"
)
# "v1.2.3.4", "version 1.2.3.4", "pkg>=1.2.3.4", an image tag "registry/app:1.2.3.4".
_VERSION_BEFORE = re.compile(
    r"(?:\bv|\bver(?:sion)?\w*\.?[\"']?\s*[:=]?\s*[\"']?|\brelease\s+|[=<>~^]=?\s*|/[\w.-]+:)$", re.IGNORECASE
)
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:.]|\.\d)"
)

_CARD = re.compile(r"(?<![\w.-])\d(?:[ -]?\d){12,18}(?![\w]|[.-]\d)")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_SSN = re.compile(r"(?<![\w.-])(?<!\d )(\d{3})([- ])(\d{2})\2(\d{4})(?![\w-]|\.\d| \d)")
_SSN_BARE = re.compile(
    r"(?i)\b(?:ssn|social security(?: number| no\.?)?)\s*(?:#|no\.?|number)?\s*[:=]?\s*(\d{9})\b"
)

_PHONE_INTL = re.compile(r"(?<![\w+.-])\+\d{1,3}(?:[ .-]?\(?\d{1,5}\)?){1,6}(?![\w]|[.-]\d)")
_PHONE_NANP = re.compile(
    r"(?<![\w.+/-])(?<!\d )(?:1[ .-])?(?:\(([2-9]\d\d)\) ?|([2-9]\d\d)([ .-]))[2-9]\d\d[ .-]\d{4}(?![\w]|[./-]\d| \d)"
)
_PHONE_TRUNK = re.compile(r"(?<![\w.+/-])(?<!\d )0[1-9]\d{0,3}[ -]\d{3,4}[ -]?\d{3,4}(?![\w]|[ ./-]?\d)")
_PHONE_FR = re.compile(r"(?<![\w.+/-])(?<!\d )0[1-9](?:[ .]\d\d){4}(?![\w]|[ ./-]?\d)")
_DATE_LIKE = re.compile(r"^(?:\d{4}[-./ ]\d{1,2}[-./ ]\d{1,2}|\d{1,2}[-./ ]\d{1,2}[-./ ]\d{4})$")
# A number right after these words is an identifier of something else, not a phone.
_NOT_PHONE_BEFORE = re.compile(
    r"\b(?:order|invoice|ref(?:erence)?|ticket|tracking|case|isbn|serial|sku|part|build|po|id|nhs|mrn|member|"
    r"account|policy)(?:\s*(?:number|no\.?|num|#|id))?\s*[:#]?\s*$|#\s*$",
    re.IGNORECASE,
)

# (substrings one of which every match holds: a cheap test before the regex, the regex)
_SECRET_PATTERNS: tuple[tuple[tuple[str, ...], re.Pattern[str]], ...] = (
    (
        ("-----BEGIN",),
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY\1?-----"
        ),
    ),
    (("AKIA", "ASIA", "ABIA", "ACCA"), re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b")),
    (("gh",), re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b")),
    (("github_pat_",), re.compile(r"\bgithub_pat_[A-Za-z0-9_]{50,255}\b")),
    (("xox",), re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,250}")),
    (
        ("hooks.slack.com",),
        re.compile(r"https://hooks\.slack\.com/services/T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]+"),
    ),
    (("AIza",), re.compile(r"\bAIza[0-9A-Za-z_-]{35}(?![\w-])")),
    (("_live_",), re.compile(r"\b(?:sk|rk)_live_[0-9A-Za-z]{16,247}\b")),
    (("_test_",), re.compile(r"\b(?:sk|rk)_test_[0-9A-Za-z]{16,247}\b")),
    (("whsec_",), re.compile(r"\bwhsec_[0-9A-Za-z]{24,}\b")),
    (("eyJ",), re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}")),
)
# Secrets whose value is a group inside a larger match (the key name or header stays readable).
_AWS_SECRET = re.compile(
    r"(?i)aws_?secret(?:_?access)?_?key[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])"
)
_BEARER = re.compile(r"(?i)\bbearer\s+([A-Za-z0-9._~+/-]{16,}=*)")
_ASSIGNMENT = re.compile(
    r"(?i)(?:password|passwd|pwd|secret|api[_-]?key|apikey|access[_-]?token|auth[_-]?token|"
    r"private[_-]?key|client[_-]?secret)[\w-]*[\"']?\s*(?::=|=>|[:=])\s*(?:([\"'])(.+?)\1|([^\s\"',;]+))"
)
_SECRET_WORDS = ("password", "passwd", "pwd", "secret", "key", "token")
_CODE_NAME = re.compile(r"[A-Za-z_][A-Za-z_.]*$")


def _ipv4_spans(text: str, keep_non_global: bool) -> Iterator[PiiSpan]:
    for match in _IPV4.finditer(text):
        if _VERSION_BEFORE.search(text, max(0, match.start() - 24), match.start()):
            continue
        if keep_non_global and not ipaddress.IPv4Address(match.group()).is_global:
            continue
        yield PiiSpan(match.start(), match.end(), "ip_address", "ipv4")


def _ipv6_spans(text: str, keep_non_global: bool) -> Iterator[PiiSpan]:
    for match in _IPV6.finditer(text):
        candidate = match.group()
        # "a::b" and "std::" are valid or near-valid IPv6 text but are code; demand real hex content.
        if sum(c in "0123456789abcdefABCDEF" for c in candidate) < 4 or candidate.count(":") < 2:
            continue
        try:
            address = ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        if keep_non_global and not address.is_global:
            continue
        yield PiiSpan(match.start(), match.end(), "ip_address", "ipv6")


def _email_spans(text: str, keep_example: bool) -> Iterator[PiiSpan]:
    line_start, scanned = 0, 0  # the start of the current line, found by scanning forward only once
    for match in _EMAIL.finditer(text):
        local, domain = match.group(1), match.group(2)
        if domain.rsplit(".", 1)[-1].lower() in _FILE_SUFFIXES:
            continue
        if local == "git" and text.startswith(":", match.end()):
            continue
        # (searching back from each match to its line's start was quadratic on one long line)
        line_start = text.rfind("\n", scanned, match.start()) + 1 or line_start
        scanned = match.start()
        if _MESSAGE_ID_LINE.match(text, line_start, match.start()):
            continue
        if keep_example and _EXAMPLE_DOMAIN.search(domain):
            continue
        yield PiiSpan(match.start(), match.end(), "email", "email")


def _card_spans(text: str) -> Iterator[PiiSpan]:
    for match in _CARD.finditer(text):
        raw = match.group()
        separators = {c for c in raw if not c.isdigit()}
        if len(separators) > 1:
            continue
        if card_valid(raw.replace(" ", "").replace("-", "")):
            yield PiiSpan(match.start(), match.end(), "credit_card", "credit_card")


def _iban_spans(text: str) -> Iterator[PiiSpan]:
    for match in _IBAN.finditer(text):
        raw = match.group()
        length = IBAN_LENGTHS.get(raw[:2])
        if length is None:
            continue
        # The regex may run on into a following uppercase word: cut at the country's length, and only
        # where a token ends.
        end = _end_of_nth_alnum(raw, length)
        if end is None or (end < len(raw) and raw[end] != " "):
            continue
        if iban_valid(raw[:end].replace(" ", "")):
            yield PiiSpan(match.start(), match.start() + end, "iban", "iban")


def _end_of_nth_alnum(raw: str, count: int) -> int | None:
    """The index just past the `count`-th non-space character of `raw`, or None if it has fewer."""
    seen = 0
    for index, char in enumerate(raw):
        seen += char != " "
        if seen == count:
            return index + 1
    return None


def _ssn_spans(text: str) -> Iterator[PiiSpan]:
    for match in _SSN.finditer(text):
        if ssn_valid(match.group(1), match.group(3), match.group(4)):
            yield PiiSpan(match.start(), match.end(), "us_ssn", "us_ssn")
    for match in _SSN_BARE.finditer(text):
        digits = match.group(1)
        if ssn_valid(digits[:3], digits[3:5], digits[5:]):
            yield PiiSpan(match.start(1), match.end(1), "us_ssn", "us_ssn")


def _phone_spans(text: str) -> Iterator[PiiSpan]:
    for pattern, min_digits, max_digits in (
        (_PHONE_INTL, 8, 15),
        (_PHONE_NANP, 10, 11),
        (_PHONE_TRUNK, 10, 11),
        (_PHONE_FR, 10, 10),
    ):
        for match in pattern.finditer(text):
            raw = match.group()
            digits = sum(c.isdigit() for c in raw)
            if not min_digits <= digits <= max_digits or _DATE_LIKE.match(raw):
                continue
            if _NOT_PHONE_BEFORE.search(text, max(0, match.start() - 24), match.start()):
                continue
            # NANP with a separator after the area code uses the same one after the exchange.
            if pattern is _PHONE_NANP and match.group(3) and text[match.end(3) + 3] != match.group(3):
                continue
            yield PiiSpan(match.start(), match.end(), "phone", "phone")


def _secret_spans(text: str) -> Iterator[PiiSpan]:
    for needles, pattern in _SECRET_PATTERNS:
        if any(needle in text for needle in needles):
            for match in pattern.finditer(text):
                # "ghp_XXXX...XXXX" in documentation has the shape of a token but none of its randomness.
                if shannon_entropy(match.group()) >= 2.5:
                    yield PiiSpan(match.start(), match.end(), "secret", "secret")
    lowered = text.lower()
    if "aws" in lowered:
        for match in _AWS_SECRET.finditer(text):
            yield PiiSpan(match.start(1), match.end(1), "secret", "secret")
    if "bearer" in lowered:
        for match in _BEARER.finditer(text):
            if _char_classes(match.group(1)) >= 2:
                yield PiiSpan(match.start(1), match.end(1), "secret", "secret")
    if any(word in lowered for word in _SECRET_WORDS):
        for match in _ASSIGNMENT.finditer(text):
            group = 2 if match.group(2) is not None else 3
            if group == 3 and _CODE_NAME.match(match.group(3)):
                continue  # `self.passwd = password_mgr`: an unquoted digit-free name is a variable
            if random_looking_secret(match.group(group)):
                yield PiiSpan(match.start(group), match.end(group), "secret", "secret")


_HAS_DIGIT = re.compile(r"\d")


def find_pii(
    text: str,
    types: frozenset[str] = frozenset(ALL_TYPES),
    keep_non_global_ips: bool = True,
    keep_example_domains: bool = True,
) -> list[PiiSpan]:
    """Every PII span in `text`, sorted and non-overlapping (higher-priority types win overlaps)."""
    finders: list[Callable[[], Iterator[PiiSpan]]] = []
    if "secret" in types:
        finders.append(lambda: _secret_spans(text))
    if "email" in types and "@" in text:
        finders.append(lambda: _email_spans(text, keep_example_domains))
    if _HAS_DIGIT.search(text):  # every remaining type holds digits
        if "credit_card" in types:
            finders.append(lambda: _card_spans(text))
        if "iban" in types:
            finders.append(lambda: _iban_spans(text))
        if "us_ssn" in types:
            finders.append(lambda: _ssn_spans(text))
        if "ip_address" in types:
            if "." in text:
                finders.append(lambda: _ipv4_spans(text, keep_non_global_ips))
            if ":" in text:
                finders.append(lambda: _ipv6_spans(text, keep_non_global_ips))
        if "phone" in types:
            finders.append(lambda: _phone_spans(text))
    found = [span for finder in finders for span in finder()]
    found.sort(key=lambda span: (_PRIORITY[span.type], span.start, -span.end))
    # Kept spans never overlap, so sorted by start only the neighbours of a new span can overlap it:
    # checking those (not every kept span) keeps a document with 100,000 finds linear, not quadratic.
    kept: list[PiiSpan] = []
    starts: list[int] = []
    for span in found:
        at = bisect.bisect_left(starts, span.start)
        if at > 0 and kept[at - 1].end > span.start:
            continue
        if at < len(kept) and kept[at].start < span.end:
            continue
        kept.insert(at, span)
        starts.insert(at, span.start)
    return kept


def redact(text: str, spans: list[PiiSpan], placeholders: dict[str, str]) -> str:
    pieces, cursor = [], 0
    for span in spans:
        pieces.append(text[cursor : span.start])
        pieces.append(placeholders[span.type])
        cursor = span.end
    pieces.append(text[cursor:])
    return "".join(pieces)


class PiiConfig(StepConfig):
    """Replace personal data and secrets with typed placeholders such as `<EMAIL>`."""

    type: Literal["pii"] = "pii"
    types: list[PiiType] = Field(default_factory=lambda: list(ALL_TYPES), description="PII types to redact")
    placeholders: dict[PiiType, str] = Field(
        default_factory=dict, description="replacement text by type; unset types use <EMAIL>, <PHONE>, ..."
    )
    keep_non_global_ips: bool = Field(
        True, description="keep private, loopback, link-local and documentation IP addresses"
    )
    keep_example_domains: bool = Field(
        True, description="keep emails at reserved domains (example.com, *.test, *.invalid, localhost)"
    )

    def build(self) -> PiiRedactor:
        return PiiRedactor(
            types=frozenset(self.types),
            placeholders={**DEFAULT_PLACEHOLDERS, **self.placeholders},
            keep_non_global_ips=self.keep_non_global_ips,
            keep_example_domains=self.keep_example_domains,
        )


class PiiRedactor(Step):
    """Rewrites each document with its PII replaced; the edit's detail counts finds by type."""

    name = "pii"
    reason = "pii.redacted"

    def __init__(
        self,
        types: frozenset[str] = frozenset(ALL_TYPES),
        placeholders: dict[str, str] | None = None,
        keep_non_global_ips: bool = True,
        keep_example_domains: bool = True,
    ):
        super().__init__()
        self.types = types
        self.placeholders = {**DEFAULT_PLACEHOLDERS, **(placeholders or {})}
        self.keep_non_global_ips = keep_non_global_ips
        self.keep_example_domains = keep_example_domains

    def find(self, text: str) -> list[PiiSpan]:
        return find_pii(text, self.types, self.keep_non_global_ips, self.keep_example_domains)

    def apply(self, doc: Document) -> Document | Edit:
        spans = self.find(doc.text)
        if not spans:
            return doc
        counts = Counter(span.label for span in spans)
        detail = ", ".join(f"{label} {count}" for label, count in sorted(counts.items()))
        return Edit(doc.with_text(redact(doc.text, spans, self.placeholders)), self.reason, detail)
