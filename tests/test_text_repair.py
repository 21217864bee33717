"""The `fix_text` (ftfy mojibake repair) and `whitespace` steps: exact outputs, and no false repairs."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from lmloom.data.documents import Document
from lmloom.data.steps import Edit
from lmloom.data.text_repair import _MOJIBAKE_HINT, FixText, FixTextConfig, Whitespace, WhitespaceConfig

FIXTURES = Path(__file__).parent / "fixtures" / "langid"


def doc(text: str, kind: str = "prose") -> Document:
    return Document(id="d", text=text, kind=kind, source="test")


def fixed(step, text: str, kind: str = "prose") -> str:
    result = step.apply(doc(text, kind))
    return result.document.text if isinstance(result, Edit) else result.text


@pytest.mark.parametrize(
    ("broken", "repaired"),
    [
        ("cafÃ©", "café"),
        ("SchÃ¶ne GrÃ¼ÃŸe aus MÃ¼nchen", "Schöne Grüße aus München"),
        # Broken twice over.
        ("The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.", "The Mona Lisa doesn’t have eyebrows."),
        ("â€œQuotedâ€\x9d text", "“Quoted” text"),
        ("ÐŸÑ€Ð¸Ð²ÐµÑ‚, Ð¼Ð¸Ñ€", "Привет, мир"),
        ("РџСЂРёРІРµС‚", "Привет"),  # UTF-8 read as Windows-1251
        ("æ—¥æœ¬èªž", "日本語"),
        ("voilÃ  le travail", "voilà le travail"),  # the non-breaking space became a plain one
        # Windows-1252 read as Latin-1: a C1 control stands for the euro sign.
        ("Price: 10 \x80", "Price: 10 €"),
        # The 0x85 of "Å" survives as the C1 control NEL, which must not be taken for a line break.
        ("\u00c3\x85ngstr\u00c3\xb6m", "Ångström"),
    ],
)
def test_mojibake_is_repaired(broken, repaired):
    result = FixText().apply(doc(broken))
    assert isinstance(result, Edit)
    assert result.reason == "fix_text.mojibake"
    assert result.document.text == repaired


@pytest.mark.parametrize(
    ("original", "codec"),
    [
        ("Grüße aus Köln, “quoted”", "mac_roman"),
        ("Zażółć gęślą jaźń", "cp1250"),
        ("İstanbul'da ağaç", "cp1254"),
        ("Привет, мир", "cp1251"),
        ("naïve café “ok”", "cp437"),
        ("Ça coûte 5 €", "cp1252"),
    ],
)
def test_utf8_read_with_each_single_byte_codec_family_is_repaired(original, codec):
    broken = original.encode("utf-8").decode(codec)
    assert broken != original
    result = FixText().apply(doc(broken))
    assert result.reason == "fix_text.mojibake"
    assert result.document.text == original


def test_cheap_gate_lets_correct_multilingual_text_skip_ftfy():
    # The langid fixture: 220 correct paragraphs in 10 languages, none of which should even reach ftfy.
    lines = [line for path in sorted(FIXTURES.glob("*.txt")) for line in path.read_text("utf-8").splitlines()]
    assert len(lines) >= 200
    assert [line for line in lines if _MOJIBAKE_HINT.search(line)] == []


def test_edit_detail_names_the_codec_round_trip():
    result = FixText().apply(doc("cafÃ©"))
    assert result.detail == "encode latin-1; decode utf-8"


def test_broken_line_is_repaired_next_to_correct_accented_lines():
    text = "Déjà vu, naïve café.\nLe cafÃ© est fermÃ©.\nÜber Straße.\n"
    assert fixed(FixText(), text) == "Déjà vu, naïve café.\nLe café est fermé.\nÜber Straße.\n"


LEGITIMATE = [
    "naïve café — “quoted” … 10 € ‘single’ «guillemets»",
    "Schöne Grüße aus München, Straße 5.",
    "Ñandú, año, pingüino, ¿qué tal? ¡Olé!",
    "Zażółć gęślą jaźń.",
    "Příliš žluťoučký kůň úpěl ďábelské ódy.",
    "Tiếng Việt có dấu.",
    "İstanbul'da ağaçlar çiçek açtı.",
    "Ελληνικά γράμματα και λέξεις.",
    "Привет, мир! Ёлка и щи.",
    "עברית וערבית: العربية",
    "한국어 텍스트입니다.",
    "日本語（テスト）！全角のカッコと「かぎ括弧」。",
    "中文标点：逗号，句号。",
    "©2024 Example Ltd™ — x ≤ y ± z, 90° angle, ½ cup, µs, Å",
    "Emoji 🎉👍 and ﬁ ligature stay.",
    "PORTUGUÊS EM MAIÚSCULAS: CORAÇÃO, MÃE, IRMÃ E AVÔ, SÃO PAULO.",
    "À BIENTÔT ! Ça va, ÉTÉ ÎLE-DE-FRANCE.",
]


@pytest.mark.parametrize("text", LEGITIMATE)
def test_correct_text_is_left_unchanged(text):
    original = doc(text)
    assert FixText(html_entities=True).apply(original) is original


def test_ascii_text_is_returned_as_is_without_running_ftfy():
    original = doc("Plain ASCII, with a < b and c > d & e.")
    assert FixText().apply(original) is original


def test_html_entities_are_off_by_default_and_unescaped_when_asked():
    text = "Fish &amp; chips &eacute;t&eacute; &#8364;5 &lt;b&gt;"
    assert FixText().apply(doc(text)).text == text
    result = FixText(html_entities=True).apply(doc(text))
    assert result.reason == "fix_text.html_entities"
    assert result.document.text == "Fish & chips été €5 <b>"
    # A bare ampersand is not an entity.
    assert fixed(FixText(html_entities=True), "AT&T and R&D") == "AT&T and R&D"


def test_mojibake_wins_the_reason_when_both_are_fixed():
    result = FixText(html_entities=True).apply(doc("cafÃ© &amp; bar"))
    assert result.reason == "fix_text.mojibake"
    assert result.document.text == "café & bar"


def test_terminal_escapes_are_removed_unless_disabled():
    text = "\x1b[31mError:\x1b[0m disk full"
    result = FixText().apply(doc(text))
    assert result.reason == "fix_text.terminal_escapes"
    assert result.document.text == "Error: disk full"
    assert FixText(terminal_escapes=False).apply(doc(text)).text == text


def test_fix_text_config_builds_and_pickles():
    step = FixTextConfig(html_entities=True).build()
    assert isinstance(step, FixText) and step.html_entities and step.terminal_escapes
    copy = pickle.loads(pickle.dumps(step))
    assert fixed(copy, "cafÃ© &amp; co") == "café & co"


def test_step_run_counts_repairs():
    step = FixText()
    out = list(step.run([doc("cafÃ©"), doc("café"), doc("plain")]))
    assert [d.text for d in out] == ["café", "café", "plain"]
    assert step.stats.modified == 1


# --- whitespace -------------------------------------------------------------------------------------


def test_prose_whitespace_is_collapsed_stripped_and_trimmed():
    text = "\n\n  Hello   world\t!  \nSecond\t\tline here.   \n\n\n\n\n\nNext paragraph.\u00a0 \n \t \n"
    expected = "Hello world !\nSecond line here.\n\n\nNext paragraph."
    result = Whitespace().apply(doc(text))
    assert result.reason == "whitespace.normalized"
    assert result.document.text == expected


def test_up_to_two_blank_lines_survive_and_the_limit_is_configurable():
    text = "a\n\nb\n\n\nc\n\n\n\nd"
    assert fixed(Whitespace(), text) == "a\n\nb\n\n\nc\n\n\nd"
    assert fixed(WhitespaceConfig(max_blank_lines=1).build(), text) == "a\n\nb\n\nc\n\nd"
    assert fixed(Whitespace(max_blank_lines=0), text) == "a\nb\nc\nd"


def test_code_keeps_indentation_and_inner_spacing():
    code = "\n\ndef f(x):  \n\tif x:\t\n\t\treturn  {'a':   1}   \n\n\n\n\n\nclass A:\n    pass\n\n\n"
    expected = "def f(x):\n\tif x:\n\t\treturn  {'a':   1}\n\n\nclass A:\n    pass\n"
    assert fixed(Whitespace(), code, kind="code") == expected


def test_code_without_final_newline_does_not_gain_one():
    assert fixed(Whitespace(), "x = 1   ", kind="code") == "x = 1"
    assert fixed(Whitespace(), "   \n\n", kind="code") == ""


def test_prose_indentation_can_be_kept():
    text = "Intro:\n  -  first   item\n    - nested\titem  \n"
    assert fixed(Whitespace(keep_prose_indentation=True), text) == "Intro:\n  - first item\n    - nested item"
    assert fixed(Whitespace(), text) == "Intro:\n- first item\n- nested item"


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("Already clean.\n\nTwo paragraphs.", "prose"),
        ("日本語の文。\n\n\n三行目。", "prose"),
        ("def f():\n    return 1\n", "code"),
        ("", "prose"),
    ],
)
def test_clean_text_is_returned_unchanged(text, kind):
    original = doc(text, kind)
    assert Whitespace().apply(original) is original


def test_non_breaking_spaces_inside_lines_are_kept():
    # "10 000" with a no-break space is typography, not a run of blanks.
    assert fixed(Whitespace(), "It costs 10\u00a0000 €.") == "It costs 10\u00a0000 €."


def test_whitespace_config_builds_and_pickles():
    step = WhitespaceConfig(max_blank_lines=1, keep_prose_indentation=True).build()
    copy = pickle.loads(pickle.dumps(step))
    assert (copy.max_blank_lines, copy.keep_prose_indentation) == (1, True)
    assert fixed(copy, "  a  b\n\n\n\nc") == "  a b\n\nc"
