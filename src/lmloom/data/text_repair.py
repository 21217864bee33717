"""Text repair steps: `fix_text` undoes mojibake with ftfy; `whitespace` tidies spaces and blank lines.

`fix_text` only runs ftfy's repairs that restore what the author wrote (text decoded with the wrong
codec, "cafÃ©" -> "café"; optionally HTML entities and terminal colour codes). ftfy's cosmetic rewrites
of legitimate text (straightening curly quotes, folding full-width CJK punctuation and ligatures,
Unicode normalisation, line breaks, control characters) are left off: other steps own those, and
they would change correct text. Order it before `control_chars`, which would delete the C1 characters
(\\x80-\\x9f) that tell ftfy which Windows-1252 character was meant.

`whitespace` collapses runs of spaces and tabs, strips trailing whitespace, limits runs of blank lines
and trims the document. Code keeps its indentation and inner spacing: there only trailing whitespace
and blank-line runs are touched.
"""

from __future__ import annotations

import re
from typing import Literal

import ftfy
from pydantic import Field

from lmloom.data.documents import Document
from lmloom.data.steps import Edit, Step, StepConfig

MOJIBAKE = "fix_text.mojibake"
HTML_ENTITIES = "fix_text.html_entities"
TERMINAL_ESCAPES = "fix_text.terminal_escapes"
WHITESPACE = "whitespace.normalized"

# A cheap gate in front of ftfy, whose own badness test is a large regex (~0.25 µs a character).
# Mojibake is UTF-8 read with a single-byte codec, so it always shows a character that was a UTF-8 lead
# byte followed by one that was a continuation byte (0x80-0xBF) in that codec, or a lone C1 control /
# U+FFFD. One alternative per codec family ftfy repairs; a line with no such pair (ASCII, CJK, most
# correct text in any script) skips ftfy entirely, and a legitimate pair ("ół" in Polish, "é…") only
# costs a look by ftfy, which then leaves the line alone. Lead and continuation characters per family:
_CP1252_LEAD = "\u00c2-\u00f4\u0100-\u017f"  # Windows-1252 / Latin-1, also 1250, 1254, 1257: Ã© â€™ Ĺ‚
_CP1252_CONT = "\u0080-\u00bf\u0100-\u017f\u0192\u02c6\u02c7\u02d8-\u02dd\u2013-\u2122"
_CP1251_LEAD = "\u0420\u0421"  # Windows-1251, Cyrillic text: Рџ СЂ Рё
_CP1251_CONT = "\u0080-\u00bf\u0401-\u040f\u0451-\u045f\u0490\u0491\u2013-\u2122"
_CP1253_LEAD = "\u039e\u039f"  # Windows-1253, Greek text: Ξ± Ο€
_CP1253_CONT = "\u0080-\u00bf\u0384-\u038f\u2013-\u2122"
_CP437_LEAD = "\u0393\u2500-\u257f"  # code page 437: ΓÇÖ ├⌐
_CP437_CONT = "\u00a0-\u00ff\u2500-\u25a0\u0192\u20a7\u2310"
_MACROMAN_LEAD = "\u00ac\u221a\u0192\u2248\u2206\u201a"  # Mac OS Roman: Gr√º√üe ‚Äô
_MACROMAN_CONT = "\u00a2-\u00ff\u2020\u2022\u2122\u2260\u221e\u2264\u2265\u2202\u2211\u220f\u03c0\u222b\u03a9"
_ALONE = "\x80-\x9f\ufffd"  # C1 controls and replacement characters are suspect on their own
# One leading character class (which `re` scans for quickly), then a look back at which lead it was.
_MOJIBAKE_HINT = re.compile(
    f"[{_CP1252_LEAD}{_CP1251_LEAD}{_CP1253_LEAD}{_CP437_LEAD}{_MACROMAN_LEAD}{_ALONE}]"
    f"(?:(?<=[{_CP1252_LEAD}])[{_CP1252_CONT}]"
    f"|(?<=[{_CP1251_LEAD}])[{_CP1251_CONT}]"
    f"|(?<=[{_CP1253_LEAD}])[{_CP1253_CONT}]"
    f"|(?<=[{_CP437_LEAD}])[{_CP437_CONT}]"
    f"|(?<=[{_MACROMAN_LEAD}])[{_MACROMAN_CONT}]"
    # a no-break space (C2 A0, or the A0 of "à" C3 A0) that was turned into a plain space: "Â " "Ã "
    "|(?<=[\u00c2\u00c3]) "
    f"|(?<=[{_ALONE}]))"
)

# ftfy explanation steps that mean "decoded with the wrong codec" (the rest name a single fixer).
_ENCODING_STEPS = {"encode", "decode", "transcode"}
_ENCODING_FIXERS = {"decode_inconsistent_utf8", "fix_c1_controls", "fix_surrogates"}


class FixTextConfig(StepConfig):
    """Repair mojibake (UTF-8 read with a single-byte codec) with ftfy; optionally unescape HTML entities."""

    type: Literal["fix_text"] = "fix_text"
    html_entities: bool = Field(
        False, description="also turn HTML entities (&amp; &eacute; &#233;) into the characters they name"
    )
    terminal_escapes: bool = Field(True, description="also remove ANSI terminal colour/cursor codes")

    def build(self) -> FixText:
        return FixText(html_entities=self.html_entities, terminal_escapes=self.terminal_escapes)


class FixText(Step):
    """ftfy's encoding repair, line by line, only on lines that look broken."""

    name = "fix_text"
    per_document = True

    def __init__(self, html_entities: bool = False, terminal_escapes: bool = True):
        super().__init__()
        self.html_entities = html_entities
        self.terminal_escapes = terminal_escapes
        # A plain tuple of settings (no compiled state), so the step pickles to workers as is.
        self._config = ftfy.TextFixerConfig(
            unescape_html=html_entities,
            remove_terminal_escapes=terminal_escapes,
            fix_latin_ligatures=False,
            fix_character_width=False,
            uncurl_quotes=False,
            fix_line_breaks=False,
            remove_control_chars=False,
            normalization=None,
        )

    def _needs_fixing(self, text: str) -> bool:
        # Cheapest tests first: ASCII text holds no mojibake.
        if self.html_entities and "&" in text:
            return True
        if self.terminal_escapes and "\x1b" in text:
            return True
        return not text.isascii() and _MOJIBAKE_HINT.search(text) is not None

    def apply(self, doc: Document) -> Document | Edit:
        text = doc.text
        if not self._needs_fixing(text):
            return doc
        # Line by line, as ftfy.fix_text does: one broken line is repaired even when another line holds
        # correct accented text that no single codec round trip would survive. Split on "\n" only:
        # str.splitlines would also split at \x85, a byte that mojibake keeps as a C1 character.
        lines = text.split("\n")
        fixes: list[str] = []
        changed = False
        for i, line in enumerate(lines):
            if not self._needs_fixing(line):
                continue
            fixed, explanation = ftfy.fix_and_explain(line, self._config)
            if fixed != line:
                lines[i] = fixed
                changed = True
                fixes += [f"{step.action} {step.parameter}" for step in explanation or ()]
        if not changed:
            return doc
        return Edit(doc.with_text("\n".join(lines)), _reason(fixes), "; ".join(dict.fromkeys(fixes)))


def _reason(fixes: list[str]) -> str:
    """The most telling reason among the fixes applied: mojibake, then entities, then escapes."""
    actions = [fix.split(" ", 1) for fix in fixes]
    if any(action in _ENCODING_STEPS or param in _ENCODING_FIXERS for action, param in actions):
        return MOJIBAKE
    if any(param == "unescape_html" for _, param in actions):
        return HTML_ENTITIES
    return TERMINAL_ESCAPES


# Whitespace other than a newline, at the end of a line or of the text.
_TRAILING = re.compile(r"[^\S\n]+(?=\n|\Z)")
_INDENT = re.compile(r"^[ \t]+", re.MULTILINE)
_INNER_RUN = re.compile(r"[ \t]{2,}|\t")


class WhitespaceConfig(StepConfig):
    """Collapse spaces and tabs, strip trailing whitespace, limit blank-line runs, trim."""

    type: Literal["whitespace"] = "whitespace"
    max_blank_lines: int = Field(2, ge=0, description="longer runs of blank lines are cut to this many")
    keep_prose_indentation: bool = Field(
        False, description="keep leading spaces/tabs of prose lines (code always keeps its indentation)"
    )

    def build(self) -> Whitespace:
        return Whitespace(
            max_blank_lines=self.max_blank_lines, keep_prose_indentation=self.keep_prose_indentation
        )


class Whitespace(Step):
    """Prose: one space between words, no trailing or leading spaces, at most N blank lines, trimmed.
    Code: trailing whitespace and blank-line runs only; indentation and alignment are meaning there."""

    name = "whitespace"
    per_document = True

    def __init__(self, max_blank_lines: int = 2, keep_prose_indentation: bool = False):
        super().__init__()
        self.max_blank_lines = max_blank_lines
        self.keep_prose_indentation = keep_prose_indentation
        self._blank_run = re.compile("\n{" + str(max_blank_lines + 2) + ",}")
        self._blank_limit = "\n" * (max_blank_lines + 1)

    def normalize(self, text: str, kind: str) -> str:
        text = _TRAILING.sub("", text)  # also empties whitespace-only lines, so blank runs are "\n" runs
        if "\n\n" in text:
            text = self._blank_run.sub(self._blank_limit, text)
        if kind == "code":
            # Keep one final newline if there was one: source files end with one.
            ends_with_newline = text.endswith("\n")
            text = text.strip("\n")
            return text + "\n" if ends_with_newline and text else text
        if not self.keep_prose_indentation:
            text = _INDENT.sub("", text)
        if "  " in text or "\t" in text:
            if self.keep_prose_indentation:
                text = "\n".join(_collapse_after_indent(line) for line in text.split("\n"))
            else:
                text = _INNER_RUN.sub(" ", text)
        return text.strip("\n") if self.keep_prose_indentation else text.strip()

    def apply(self, doc: Document) -> Document | Edit:
        text = self.normalize(doc.text, doc.kind)
        if text == doc.text:
            return doc
        detail = f"{len(doc.text)} -> {len(text)} chars"
        return Edit(doc.with_text(text), WHITESPACE, detail)


def _collapse_after_indent(line: str) -> str:
    body = line.lstrip(" \t")
    return line[: len(line) - len(body)] + _INNER_RUN.sub(" ", body)
