"""Main text of an HTML page: the article, not the menus, footers and cookie banners around it.

trafilatura does the work, tuned for precision (a little less text, far less boilerplate); where it
finds nothing (a short page, an odd layout), the visible text of the page via selectolax is the
fallback (selectolax's lexbor parser), with scripts, styles and navigation removed. A page with no text at all gives None.
"""

from __future__ import annotations

import logging
import re

# Elements whose text is never main text, for the fallback.
_NOT_TEXT = ("script", "style", "noscript", "template", "nav", "header", "footer", "aside", "form", "svg")
_BLANK_LINES = re.compile(r"\n\s*\n+")

# The fallback parser takes time quadratic in nesting depth (200,000 nested <div>s, a 1.2 MB page:
# minutes). Real pages nest a few dozen deep; a page past this is markup nobody reads, so no text.
MAX_FALLBACK_DEPTH = 2048
_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9-]*)[^>]*?(/?)>")
# Elements that never hold others (void) or whose end tag may be left out: they do not deepen a page.
_FLAT = frozenset(
    "area base br col embed hr img input link meta source track wbr "
    "p li dt dd tr td th thead tbody tfoot option optgroup rb rt rp colgroup caption".split()
)

# trafilatura logs every page it gives up on; the reader counts those itself.
logging.getLogger("trafilatura").setLevel(logging.ERROR)


def extract_main_text(html: str, url: str | None = None) -> str | None:
    """The page's main text (paragraphs separated by blank lines), or None if it has none."""
    if not html.strip():
        return None
    text = _trafilatura_text(html, url)
    if not text and not _nested_deeper_than(html, MAX_FALLBACK_DEPTH):
        text = _visible_text(html)
    text = _BLANK_LINES.sub("\n\n", text or "").strip()
    return text or None


def _trafilatura_text(html: str, url: str | None) -> str | None:
    import trafilatura

    try:
        return trafilatura.extract(
            html,
            url=url,
            favor_precision=True,
            include_comments=False,
            include_tables=True,
            include_images=False,
            include_links=False,
            deduplicate=False,
            output_format="txt",
        )
    except (ValueError, TypeError, RecursionError, AssertionError):  # malformed markup it cannot parse
        return None


def _visible_text(html: str) -> str:
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(html)
    for tag in _NOT_TEXT:
        for node in tree.css(tag):
            node.decompose()
    root = tree.body or tree.root
    return root.text(separator="\n", strip=True) if root is not None else ""


def _nested_deeper_than(html: str, limit: int) -> bool:
    """Whether the page's elements nest more than `limit` deep (one linear scan of its tags)."""
    depth = 0
    for match in _TAG.finditer(html):
        closing, name, self_closing = match.groups()
        if self_closing or name.lower() in _FLAT:
            continue
        if closing:
            depth = max(0, depth - 1)
        else:
            depth += 1
            if depth > limit:
                return True
    return False
