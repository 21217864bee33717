"""The `markup` step: turn HTML that slipped into text documents into plain text; optionally strip
Markdown and wiki syntax. Also `html_to_text`, for sources that read HTML pages.

HTML is only converted when a document clearly is HTML: enough tags of real HTML elements, including a
closing or void tag, making up a measurable share of the text. Prose that merely mentions `<p>` or
compares `a < b and c > d` is never parsed. Code documents are left alone unless asked for.

`html_to_text` parses with selectolax (lexbor, an HTML5 parser) and walks the tree: script, style,
navigation, footers, asides and other page furniture are dropped; paragraphs and headings become
blank-line separated blocks, list items and table rows become lines ("- item", "1. item", nested items
indented two spaces a level; cells joined by " | "), <pre> keeps its own spacing, inline whitespace
collapses as a browser would and entities are decoded.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from lmloom.data.documents import Document, Kind
from lmloom.data.steps import Edit, Step, StepConfig

if TYPE_CHECKING:
    from selectolax.lexbor import LexborNode

HTML_TO_TEXT = "markup.html_to_text"
WIKI_STRIPPED = "markup.wiki_stripped"
MARKDOWN_STRIPPED = "markup.markdown_stripped"

# Page furniture and non-text content: removed with everything inside. <form> stays: some sites
# (ASP.NET WebForms ones) wrap the whole page in one.
DROPPED_ELEMENTS = (
    "script", "style", "noscript", "template", "nav", "footer", "aside", "iframe", "svg", "canvas",
    "head", "button", "select", "object", "embed", "math",
)  # fmt: skip
# Blocks set off by a blank line; a list nested inside a list item only starts a new line.
_PARAGRAPH = frozenset(
    "p h1 h2 h3 h4 h5 h6 blockquote pre table ul ol dl figure hr section article main header address details".split()
)
_LINE = frozenset("div li tr dt dd br caption figcaption summary center fieldset legend".split())
_CELLS = frozenset(("td", "th"))
_LISTS = frozenset(("ul", "ol"))

# Element names that mark real HTML, for detection. Generic-looking names are left out on purpose
# ("<T>", "<E>", "<List>" in prose about types are not HTML).
_HTML_NAMES = (
    "html|head|body|title|meta|link|script|style|noscript|div|span|p|a|br|hr|h[1-6]|ul|ol|li|dl|dt|dd|"
    "table|thead|tbody|tfoot|tr|td|th|img|nav|footer|header|aside|section|article|main|em|strong|b|i|u|"
    "code|pre|blockquote|form|input|button|label|select|option|iframe|figure|figcaption|sup|sub|small|"
    "font|center|abbr|cite|time|svg|picture|source|video|audio|canvas|textarea|template|caption"
)
_TAG = re.compile(
    rf"</?(?:{_HTML_NAMES})(?:\s[^<>]*)?/?>"
    r"|<!--.{0,4000}?-->"  # bounded: an unclosed "<!--" must not make every later one scan to the end
    r"|<!doctype\s[^<>]*>",
    re.IGNORECASE | re.DOTALL,
)
_STRONG_TAG = re.compile(rf"</(?:{_HTML_NAMES})\s*>|<(?:br|hr|img)\b[^<>]*>|<!doctype\s", re.IGNORECASE)
_INLINE_SPACE = re.compile(r"\s+")


def html_tag_stats(text: str) -> tuple[int, float]:
    """(number of HTML tags, share of the text's characters inside them)."""
    if "<" not in text:
        return 0, 0.0
    tags = _TAG.findall(text)
    return len(tags), (sum(map(len, tags)) / len(text)) if text else 0.0


def looks_like_html(text: str, min_tags: int = 3, min_tag_share: float = 0.01) -> bool:
    """True when `text` is HTML rather than prose that mentions a tag or uses < and > as operators."""
    if "<" not in text or ">" not in text:
        return False
    count, share = html_tag_stats(text)
    return count >= min_tags and share >= min_tag_share and _STRONG_TAG.search(text) is not None


class _TextBuilder:
    """Accumulates text with pending line/paragraph breaks, so consecutive blocks never stack blank lines."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.pending = 0  # newlines owed before the next text: 1 a line break, 2 a paragraph break
        self.at_line_start = True

    def brk(self, newlines: int) -> None:
        if self.parts:
            self.pending = max(self.pending, newlines)
        self.at_line_start = True

    def _flush(self) -> None:
        if self.pending:
            if self.parts:
                self.parts[-1] = self.parts[-1].rstrip(" ")
            self.parts.append("\n" * self.pending)
            self.pending = 0

    def inline(self, text: str) -> None:
        text = _INLINE_SPACE.sub(" ", text)
        if self.at_line_start or (self.parts and self.parts[-1].endswith((" ", "\n"))):
            text = text.lstrip(" ")
        if not text:
            return
        self._flush()
        self.parts.append(text)
        self.at_line_start = False

    def verbatim(self, text: str) -> None:
        if text:
            self._flush()
            self.parts.append(text)
            self.at_line_start = text.endswith("\n")

    def result(self) -> str:
        return "\n".join(line.rstrip() for line in "".join(self.parts).split("\n")).strip()


def html_to_text(html: str) -> str:
    """Plain text of an HTML page or fragment (see the module docstring for what is kept)."""
    from selectolax.lexbor import LexborHTMLParser  # a compiled module: imported where it is needed

    tree = LexborHTMLParser(html)
    tree.strip_tags(list(DROPPED_ELEMENTS))
    root = tree.body or tree.root
    if root is None:
        return ""
    out = _TextBuilder()
    list_stack: list[list[int]] = []  # one entry per open <ul>/<ol>: [next number, or 0 for bullets]
    pre_depth = 0
    # An explicit stack instead of recursion: real pages nest deeper than Python's recursion limit.
    stack: list[tuple[LexborNode, bool]] = [(root, False)]
    while stack:
        node, leaving = stack.pop()
        tag = node.tag or ""
        if leaving:
            if tag in _LISTS:
                list_stack.pop()
            elif tag == "pre":
                pre_depth -= 1
            if tag in _PARAGRAPH and not (tag in _LISTS and list_stack):
                out.brk(2)
            elif tag in _LINE or tag in _LISTS:
                out.brk(1)
            continue
        if tag == "-text":
            text = node.text(deep=False)
            if pre_depth:
                out.verbatim(text)
            else:
                out.inline(text)
            continue
        if tag.startswith("-"):  # comments, doctype
            continue
        if tag in _PARAGRAPH and not (tag in _LISTS and list_stack):
            out.brk(2)
        elif tag in _LINE or tag in _LISTS:
            out.brk(1)
        if tag in _LISTS:
            list_stack.append([1 if tag == "ol" else 0])
        elif tag == "li" and list_stack:
            counter = list_stack[-1]
            marker = f"{counter[0]}. " if counter[0] else "- "
            counter[0] += counter[0] > 0
            out.verbatim("  " * (len(list_stack) - 1) + marker)
            out.at_line_start = True  # the item's own leading spaces are not wanted after the marker
        elif tag in _CELLS and not out.at_line_start:
            out.verbatim(" | ")
            out.at_line_start = True
        elif tag == "pre":
            pre_depth += 1
        stack.append((node, True))
        children = []
        child = node.child
        while child is not None:
            children.append(child)
            child = child.next
        stack.extend((c, False) for c in reversed(children))
    return out.result()


# --- Markdown ----------------------------------------------------------------------------------------

_MD_FENCE = re.compile(r"[ \t]{0,3}(```+|~~~+)")
_MD_HEADING = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.MULTILINE)
_MD_SETEXT = re.compile(r"^(.+)\n[ \t]{0,3}(?:={2,}|-{2,})[ \t]*$", re.MULTILINE)
_MD_RULE = re.compile(r"^[ \t]{0,3}(?:(?:\*[ \t]*){3,}|(?:-[ \t]*){3,}|(?:_[ \t]*){3,})$", re.MULTILINE)
_MD_QUOTE = re.compile(r"^[ \t]{0,3}>[ \t]?", re.MULTILINE)
_MD_IMAGE = re.compile(r"!\[([^\]\n]*)\]\([^)\n]*\)")
_MD_LINK = re.compile(r"\[([^\]\n]+)\](?:\([^)\n]*\)|\[[^\]\n]*\])")
_MD_REF_DEF = re.compile(r"^[ \t]{0,3}\[[^\]\n]+\]:[ \t]+\S+.*(?:\n|$)", re.MULTILINE)
_MD_BOLD = re.compile(
    r"(?<![\w*])\*\*(?=\S)(.+?)(?<=\S)\*\*(?![\w*])|(?<![\w_])__(?=\S)(.+?)(?<=\S)__(?![\w_])"
)
_MD_ITALIC = re.compile(
    r"(?<![\w*])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![\w*])|(?<![\w_])_(?=[^\s_])(.+?)(?<=[^\s_])_(?![\w_])"
)
_MD_STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")
_MD_CODE = re.compile(r"`([^`\n]+)`")
_MD_SIGNS = re.compile(r"[#*_`\[>~]|^[ \t]*[-=]{3,}", re.MULTILINE)  # any Markdown at all?


def _first_group(match: re.Match[str]) -> str:
    return next(g for g in match.groups() if g is not None)


def strip_markdown(text: str) -> str:
    """Markdown syntax removed, its text kept: headings, emphasis, links, images (alt text), inline code,
    block quotes, rules, fences and link definitions. List markers stay: they are text structure.
    Code (fenced blocks, `spans`) is kept verbatim: `__init__` there is a name, not bold."""
    if not _MD_SIGNS.search(text):
        return text
    out: list[str] = []
    prose: list[str] = []
    fence: str | None = None  # the opening fence while inside a fenced code block
    for line in text.splitlines(keepends=True):
        opener = _MD_FENCE.match(line)
        if fence is None and opener:
            out.append(_strip_markdown_prose("".join(prose)))
            prose, fence = [], opener.group(1)
        elif fence is not None:
            if line.strip().startswith(fence):
                fence = None
            else:
                out.append(line)
        else:
            prose.append(line)
    out.append(_strip_markdown_prose("".join(prose)))
    return "".join(out)


def _strip_markdown_prose(text: str) -> str:
    if not text:
        return text
    text = _MD_REF_DEF.sub("", text)
    text = _MD_RULE.sub("", text)
    text = _MD_HEADING.sub(r"\1", text)
    text = _MD_SETEXT.sub(r"\1", text)
    text = _MD_QUOTE.sub("", text)
    # Split off inline code spans (odd indexes) so emphasis patterns never reach inside them.
    pieces = _MD_CODE.split(text)
    for i in range(0, len(pieces), 2):
        piece = _MD_IMAGE.sub(r"\1", pieces[i])
        piece = _MD_LINK.sub(r"\1", piece)
        piece = _MD_BOLD.sub(_first_group, piece)
        piece = _MD_ITALIC.sub(_first_group, piece)
        pieces[i] = _MD_STRIKE.sub(r"\1", piece)
    return "".join(pieces)


# --- MediaWiki ---------------------------------------------------------------------------------------

_WIKI_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # innermost first; repeated to peel nested templates
_WIKI_TABLE = re.compile(r"^\{\|.*?^\|\}[ \t]*$\n?", re.MULTILINE | re.DOTALL)
_WIKI_REF = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?</ref>", re.IGNORECASE | re.DOTALL)
_WIKI_FILE = re.compile(
    r"\[\[(?:File|Image|Category|Datei|Fichier|Kategorie|Catégorie):[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*\]\]\n?",
    re.IGNORECASE,
)
_WIKI_LINK = re.compile(r"\[\[(?:[^|\[\]]*\|)?([^\[\]]*)\]\]")
_WIKI_EXTERNAL = re.compile(r"\[(?:https?|ftp)://[^\s\]]+(?:\s([^\]]*))?\]")
_WIKI_HEADING = re.compile(r"^(={1,6})[ \t]*(.+?)[ \t]*\1[ \t]*$", re.MULTILINE)
_WIKI_QUOTES = re.compile(r"'{2,5}")
_WIKI_SIGNS = re.compile(r"\[\[|\{\{|''|^=|\{\||<ref", re.MULTILINE | re.IGNORECASE)
_MAX_TEMPLATE_DEPTH = 20


def strip_wiki(text: str) -> str:
    """MediaWiki markup removed: templates, tables, references, file/category links dropped; links,
    headings and bold/italic reduced to their text."""
    if not _WIKI_SIGNS.search(text):
        return text
    for _ in range(_MAX_TEMPLATE_DEPTH):
        text, removed = _WIKI_TEMPLATE.subn("", text)
        if not removed:
            break
    text = _WIKI_TABLE.sub("", text)
    text = _WIKI_REF.sub("", text)
    text = _WIKI_FILE.sub("", text)
    text = _WIKI_LINK.sub(r"\1", text)
    text = _WIKI_EXTERNAL.sub(lambda m: m.group(1) or "", text)
    text = _WIKI_HEADING.sub(r"\2", text)
    return _WIKI_QUOTES.sub("", text)


# --- the step ----------------------------------------------------------------------------------------


class MarkupConfig(StepConfig):
    """Convert HTML documents to text; optionally strip Markdown and wiki syntax from prose."""

    type: Literal["markup"] = "markup"
    html: Literal["convert", "keep"] = Field("convert", description="convert documents that look like HTML")
    markdown: Literal["keep", "strip"] = Field("keep", description="strip Markdown syntax, keeping its text")
    wiki: Literal["keep", "strip"] = Field("keep", description="strip MediaWiki syntax, keeping its text")
    kinds: list[Kind] = Field(
        default_factory=lambda: ["prose"],
        description="document kinds cleaned (code is left alone by default)",
    )
    min_tags: int = Field(3, ge=1, description="HTML detection: at least this many HTML tags ...")
    min_tag_share: float = Field(
        0.01, ge=0.0, le=1.0, description="... making up at least this share of the text"
    )

    def build(self) -> Markup:
        return Markup(
            html=self.html == "convert",
            markdown=self.markdown == "strip",
            wiki=self.wiki == "strip",
            kinds=self.kinds,
            min_tags=self.min_tags,
            min_tag_share=self.min_tag_share,
        )


class Markup(Step):
    """HTML to text (when the document looks like HTML), then optional wiki and Markdown stripping."""

    name = "markup"
    per_document = True

    def __init__(
        self,
        html: bool = True,
        markdown: bool = False,
        wiki: bool = False,
        kinds: list[Kind] | None = None,
        min_tags: int = 3,
        min_tag_share: float = 0.01,
    ):
        super().__init__()
        self.html = html
        self.markdown = markdown
        self.wiki = wiki
        self.kinds = frozenset(["prose"] if kinds is None else kinds)
        self.min_tags = min_tags
        self.min_tag_share = min_tag_share

    def apply(self, doc: Document) -> Document | Edit:
        if doc.kind not in self.kinds:
            return doc
        text, reasons, details = doc.text, [], []
        if self.html and looks_like_html(text, self.min_tags, self.min_tag_share):
            count, share = html_tag_stats(text)
            text = html_to_text(text)
            reasons.append(HTML_TO_TEXT)
            details.append(f"{count} tags, {share:.1%} of the text")
        if self.wiki:
            stripped = strip_wiki(text)
            if stripped != text:
                text = stripped
                reasons.append(WIKI_STRIPPED)
        if self.markdown:
            stripped = strip_markdown(text)
            if stripped != text:
                text = stripped
                reasons.append(MARKDOWN_STRIPPED)
        if text == doc.text:
            return doc
        return Edit(doc.with_text(text), reasons[0], "; ".join([*details, *reasons[1:]]))
