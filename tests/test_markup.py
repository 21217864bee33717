"""The `markup` step and `html_to_text`: exact text from realistic HTML, Markdown and wiki stripping,
and documents that must come through untouched."""

from __future__ import annotations

import pickle

import pytest

from lmloom.data.documents import Document
from lmloom.data.markup import (
    Markup,
    MarkupConfig,
    html_to_text,
    looks_like_html,
    strip_markdown,
    strip_wiki,
)
from lmloom.data.steps import Edit


def doc(text: str, kind: str = "prose") -> Document:
    return Document(id="d", text=text, kind=kind, source="test")


PAGE = """<!DOCTYPE html>
<html lang="en">
<head><title>Corner Bakery</title><meta charset="utf-8">
<style>p { color: brown; }</style>
<script>window.dataLayer = [];</script></head>
<body>
<nav><a href="/">Home</a> | <a href="/menu">Menu</a></nav>
<header><h1>Fresh   bread &amp; pastries</h1></header>
<main>
  <p>We bake every
     morning.<br>Open from <b>6&nbsp;am</b> to <i>2&#160;pm</i> &ndash; closed on Mondays.</p>
  <h2>Our range</h2>
  <ul>
    <li>Sourdough
      <ul><li>Rye</li><li>Spelt &amp; wheat</li></ul>
    </li>
    <li>Croissants</li>
  </ul>
  <ol><li>Order online</li><li>Collect &gt; pay</li></ol>
  <table><tr><th>Day</th><th>Hours</th></tr><tr><td>Tue</td><td>6&ndash;14</td></tr></table>
  <pre>  price = 2 * loaves
    total &lt; 10</pre>
  <noscript>Enable JavaScript!</noscript>
</main>
<aside>Related: our cafe</aside>
<script type="text/javascript">if (a < b && c > d) { track(); }</script>
<footer><p>&copy; 2024 Corner Bakery</p></footer>
</body></html>"""

PAGE_TEXT = """Fresh bread & pastries

We bake every morning.
Open from 6 am to 2 pm – closed on Mondays.

Our range

- Sourdough
  - Rye
  - Spelt & wheat
- Croissants

1. Order online
2. Collect > pay

Day | Hours
Tue | 6–14

  price = 2 * loaves
    total < 10"""


def test_html_page_to_text_exactly():
    assert html_to_text(PAGE) == PAGE_TEXT


def test_script_style_and_page_furniture_are_dropped():
    text = html_to_text(PAGE)
    for gone in (
        "dataLayer",
        "color: brown",
        "track()",
        "Home",
        "Enable JavaScript",
        "Related",
        "2024",
        "Corner",
    ):
        assert gone not in text


def test_fragment_with_inline_markup_and_entities():
    html = '<div><p>Caf&eacute; <a href="/x">au&nbsp;lait</a>, <em>s\'il</em> vous pla&icirc;t &#x263A;</p></div>'
    assert html_to_text(html) == "Café au lait, s'il vous plaît ☺"


def test_blocks_and_line_breaks_do_not_stack_blank_lines():
    html = "<div><div><p>One</p></div><div><p>Two</p></div></div><div>Three</div><div>Four<br><br>Five</div>"
    assert html_to_text(html) == "One\n\nTwo\n\nThree\nFour\nFive"


def test_deeply_nested_html_does_not_hit_the_recursion_limit():
    html = "<div>" * 5000 + "deep" + "</div>" * 5000
    assert html_to_text(html) == "deep"


def test_empty_and_comment_only_html():
    assert html_to_text("") == ""
    assert html_to_text("<!-- nothing --><script>x()</script>") == ""


def test_step_converts_html_documents_with_reason_and_detail():
    result = Markup().apply(doc(PAGE))
    assert isinstance(result, Edit)
    assert result.reason == "markup.html_to_text"
    assert result.document.text == PAGE_TEXT
    assert result.detail.endswith("of the text") and "tags" in result.detail


@pytest.mark.parametrize(
    "text",
    [
        "If a < b and c > d then the order holds.",
        "if a<b and c>d: return a",
        "Use the <p> tag for paragraphs and <div> for blocks.",  # prose about HTML: no closing tag
        "A List<String> maps to Map<K, V> in Java generics.",
        "Plain text with an arrow -> and a fish <>< and x<y.",
        "Email me at <someone@example.com> or see <https://example.com>.",
        "",
    ],
)
def test_plain_text_is_untouched(text):
    original = doc(text)
    assert not looks_like_html(text)
    assert Markup(markdown=True, wiki=True).apply(original) is original


def test_code_is_not_touched_by_default_even_when_it_is_html():
    code = doc("<ul>\n  <li>{{ item }}</li>\n</ul>\n<p>**not markdown**</p>", kind="code")
    assert Markup(markdown=True, wiki=True).apply(code) is code
    converted = MarkupConfig(kinds=["prose", "code"]).build().apply(code)
    assert converted.document.text == "- {{ item }}\n\n**not markdown**"


def test_prose_quoting_one_tag_pair_is_not_html():
    text = "To make a word bold, write <b>word</b> in the page source."
    original = doc(text)
    assert Markup().apply(original) is original


def test_page_wrapped_in_a_form_keeps_its_content():
    html = '<html><body><form id="aspnetForm"><div><h1>News</h1><p>Story text.</p></div></form></body></html>'
    assert html_to_text(html) == "News\n\nStory text."


def test_a_single_stray_tag_in_long_prose_is_not_html():
    text = "This long article paragraph is ordinary prose. " * 40 + "It ends with a stray </b> tag."
    assert not looks_like_html(text)


def test_html_conversion_can_be_switched_off():
    original = doc("<p>One</p><p>Two</p>")
    assert MarkupConfig(html="keep").build().apply(original) is original


MARKDOWN = """# Getting started #

Install with **pip** and run `pip install lmloom`. See the [docs](https://example.com/docs) or
![the logo](logo.png) *now*; keep snake_case_names and 2 * 3 * 4 as they are.

> Quoted _wisdom_ here.

---

Setext title
============

- item ~~old~~ __new__
- call `__init__` first

```python
def __init__(self):
    self.x = a * b  # see [link](x)
```

See [the guide][ref].

[ref]: https://example.com/guide
"""

MARKDOWN_STRIPPED = """Getting started

Install with pip and run pip install lmloom. See the docs or
the logo now; keep snake_case_names and 2 * 3 * 4 as they are.

Quoted wisdom here.



Setext title

- item old new
- call __init__ first

def __init__(self):
    self.x = a * b  # see [link](x)

See the guide.

"""


def test_markdown_is_stripped_exactly_and_code_blocks_kept_verbatim():
    assert strip_markdown(MARKDOWN) == MARKDOWN_STRIPPED


def test_markdown_is_kept_by_default_and_stripped_when_configured():
    original = doc(MARKDOWN)
    assert Markup().apply(original) is original
    result = MarkupConfig(markdown="strip").build().apply(original)
    assert result.reason == "markup.markdown_stripped"
    assert result.document.text == MARKDOWN_STRIPPED


WIKI = """{{Infobox settlement|name=Paris|population={{formatnum:2102650}}}}
'''Paris''' is the capital of [[France]] and its largest city.<ref name="census">INSEE 2023</ref> It lies on the [[Seine (river)|Seine]].

== History ==
The city was ''founded'' in antiquity by the [[Parisii]].{{citation needed|date=2020}}
See [https://example.org the archive] for more.
[[File:Paris skyline.jpg|thumb|The [[skyline]] at night]]
{| class="wikitable"
|-
| Area || 105 km²
|}
[[Category:Capitals in Europe]]"""

WIKI_STRIPPED = """
Paris is the capital of France and its largest city. It lies on the Seine.

History
The city was founded in antiquity by the Parisii.
See the archive for more.
"""


def test_wiki_markup_is_stripped_exactly():
    assert strip_wiki(WIKI) == WIKI_STRIPPED


def test_step_reports_wiki_then_markdown_when_both_apply():
    result = Markup(wiki=True, markdown=True).apply(
        doc("== Title ==\n'''Bold''' and **strong** [[Link|text]].")
    )
    assert result.reason == "markup.wiki_stripped"
    assert result.detail == "markup.markdown_stripped"
    assert result.document.text == "Title\nBold and strong text."


def test_html_then_markdown_in_one_pass():
    result = Markup(markdown=True).apply(doc("<p>Some **bold** claim.</p><p>Second &amp; last.</p>"))
    assert result.reason == "markup.html_to_text"
    assert "markup.markdown_stripped" in result.detail
    assert result.document.text == "Some bold claim.\n\nSecond & last."


def test_config_and_pickling():
    step = MarkupConfig(markdown="strip", wiki="strip", min_tags=3).build()
    assert (step.html, step.markdown, step.wiki, step.min_tags, step.kinds) == (
        True,
        True,
        True,
        3,
        {"prose"},
    )
    copy = pickle.loads(pickle.dumps(step))
    assert copy.apply(doc("<p>a</p><p>b</p>")).document.text == "a\n\nb"
    assert MarkupConfig().build().min_tags == 3
