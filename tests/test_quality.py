"""The heuristic quality filters: every rule drops what breaks it, clean prose passes, thresholds come
from the config, C4 line removal is an edit, and decisions agree with datatrove's reference filters."""

from __future__ import annotations

import pytest
from datatrove.data import Document as DatatroveDocument
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)

from lmloom.data.documents import Document
from lmloom.data.provenance import SourceLedger
from lmloom.data.quality import (
    C4Config,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
)
from lmloom.data.stdlib_corpus import StdlibSource, read_stdlib
from lmloom.data.steps import Drop, Edit
from lmloom.data.words import count_sentences, split_words

CLEAN_PARAGRAPHS = [
    "The harbour town woke slowly on the first cold morning of autumn. Fishing boats returned with "
    "lighter catches than the year before, and the old men on the pier argued about the reasons. Some "
    "blamed the warmer water, while others pointed to the new factory ships that worked far beyond the "
    "horizon.",
    "At the school on the hill, the teacher asked her pupils to write about the sea. Most of them "
    "described storms and shipwrecks they had only heard about in stories. One quiet boy wrote instead "
    "about his grandfather, who had mended nets every evening for forty years and never once complained "
    "about the work.",
    "By the afternoon the wind had changed direction, bringing rain from the west. Shopkeepers pulled "
    "their awnings down and carried crates of apples inside. The ferry to the island was cancelled, so "
    "a small crowd gathered in the cafe to wait for news and share whatever gossip they had collected "
    "that week.",
]
CLEAN = "\n\n".join(CLEAN_PARAGRAPHS)

# Distinct filler words, so that a test document repeats only what it means to repeat.
FILLER = (
    "apple river stone cloud garden window silver morning bridge candle forest harbor letter market "
    "mountain orange pencil rabbit saddle thunder valley wagon yellow zebra anchor basket castle "
    "dragon engine feather glacier hammer island jacket kettle lantern mirror needle ocean pepper "
    "quartz ribbon sunset ticket umbrella violin whistle yogurt blanket cactus dolphin eagle falcon"
).split()


def doc(text: str, kind: str = "prose") -> Document:
    return Document(id="t", text=text, kind=kind, source="test")


def reason(config, text: str) -> str:
    result = config.build().apply(doc(text))
    return result.reason if isinstance(result, Drop) else "kept"


ALL_DEFAULTS = [GopherQualityConfig(), GopherRepetitionConfig(), C4Config(), FineWebConfig()]


@pytest.mark.parametrize("config", ALL_DEFAULTS, ids=lambda c: c.type)
def test_clean_prose_passes_every_step_unchanged(config):
    document = doc(CLEAN)
    step = config.build()
    assert step.per_document
    assert step.apply(document) is document


def test_configs_name_their_step_type():
    assert [c.type for c in ALL_DEFAULTS] == ["gopher_quality", "gopher_repetition", "c4", "fineweb"]


# ------------------------------------------------------------------------------------ gopher_quality


def sentence_lines(count: int, words_per_line: int = 8) -> str:
    """`count` distinct lines of plain words with stop words, each ending in a period."""
    lines = []
    for i in range(count):
        picked = [FILLER[(i * words_per_line + j) % len(FILLER)] for j in range(words_per_line - 2)]
        lines.append(f"The {' '.join(picked)} and more {i}.")
    return "\n".join(lines)


GOPHER_QUALITY_CASES = {
    "too few words": ("The cat sat with the dog and that was all.", "gopher_quality.word_count"),
    "short words": (
        " ".join(["the to of and be it is a an go on up"] * 6),
        "gopher_quality.mean_word_length",
    ),
    "long words": (
        "the and " + " ".join(["internationalization characterization"] * 30),
        "gopher_quality.mean_word_length",
    ),
    "hashes": (CLEAN + "\n" + " ".join(["#tag"] * 40), "gopher_quality.hash_ratio"),
    "ellipses": (CLEAN.replace(", ", "... ").replace(" the ", " the... "), "gopher_quality.ellipsis_ratio"),
    "bullets": (
        "\n".join(f"- the {FILLER[i]} and {FILLER[i + 1]} of {FILLER[i + 2]} were fine." for i in range(12)),
        "gopher_quality.bullet_lines",
    ),
    "ellipsis lines": (
        "\n".join(
            line + ("..." if i % 2 else ".")
            for i, line in enumerate(sentence_lines(10).replace(".", "").splitlines())
        ),
        "gopher_quality.ellipsis_lines",
    ),
    "numbers": (CLEAN + "\n" + " ".join(str(1000 + i) for i in range(120)), "gopher_quality.alpha_words"),
    "no stop words": (" ".join(FILLER) + " " + " ".join(FILLER), "gopher_quality.stop_words"),
}


@pytest.mark.parametrize("case", GOPHER_QUALITY_CASES)
def test_gopher_quality_rules_drop_with_their_reason(case):
    text, expected = GOPHER_QUALITY_CASES[case]
    assert reason(GopherQualityConfig(), text) == expected


def test_gopher_quality_detail_gives_the_measured_value():
    result = GopherQualityConfig().build().apply(doc("The cat sat with the dog."))
    assert isinstance(result, Drop) and result.detail.startswith("6 words < 50")


def test_gopher_quality_thresholds_come_from_the_config():
    assert reason(GopherQualityConfig(max_doc_words=40), CLEAN) == "gopher_quality.word_count"
    assert reason(GopherQualityConfig(min_doc_words=None), "The cat sat with the dog.") == "kept"
    assert reason(GopherQualityConfig(min_stop_words=None), " ".join(FILLER * 2)) == "kept"
    assert reason(GopherQualityConfig(stop_words=["zebra", "quartz"]), " ".join(FILLER * 2)) == "kept"


# --------------------------------------------------------------------------------- gopher_repetition


def phrase_repeated(n: int, times: int = 8) -> str:
    """An n-word phrase repeated `times` times between distinct filler words, on one line."""
    phrase = " ".join(f"w{n}x{j}" for j in range(n))
    return " ".join(f"{phrase} {FILLER[i]}" for i in range(times))


REPETITION_CASES = {
    "repeated paragraphs": (
        f"{CLEAN_PARAGRAPHS[0]}\n\n{CLEAN_PARAGRAPHS[1]}\n\n{CLEAN_PARAGRAPHS[0]}\n\n{CLEAN_PARAGRAPHS[0]}",
        {},
        "gopher_repetition.dup_para_frac",
    ),
    "repeated paragraph characters": (
        "\n\n".join([*(f"Note {w}." for w in FILLER[:10]), CLEAN_PARAGRAPHS[0], CLEAN_PARAGRAPHS[0]]),
        {},
        "gopher_repetition.dup_para_char_frac",
    ),
    "repeated lines": (
        "\n".join([*CLEAN_PARAGRAPHS, "Read more.", "Read more.", "Read more.", "Read more."]),
        {},
        "gopher_repetition.dup_line_frac",
    ),
    "repeated line characters": (
        "\n".join([*(f"Item {w}." for w in FILLER[:20]), CLEAN_PARAGRAPHS[1], CLEAN_PARAGRAPHS[1]]),
        {},
        "gopher_repetition.dup_line_char_frac",
    ),
    "frequent bigram": (
        " ".join(f"big cat {w}" for w in FILLER),
        {},
        "gopher_repetition.top_2_gram_char_frac",
    ),
    **{
        f"frequent {n}-gram": (
            phrase_repeated(n),
            {"top_n_grams": {m: 1.0 for m in (2, 3, 4) if m != n} | {n: 0.18}, "dup_n_grams": {}},
            f"gopher_repetition.top_{n}_gram_char_frac",
        )
        for n in (3, 4)
    },
    **{
        f"duplicated {n}-grams": (
            phrase_repeated(n),
            {"top_n_grams": {}, "dup_n_grams": {m: 1.0 for m in range(5, 11) if m < n} | {n: 0.1}},
            f"gopher_repetition.dup_{n}_gram_char_frac",
        )
        for n in range(5, 11)
    },
}


@pytest.mark.parametrize("case", REPETITION_CASES)
def test_gopher_repetition_rules_drop_with_their_reason(case):
    text, overrides, expected = REPETITION_CASES[case]
    assert reason(GopherRepetitionConfig(**overrides), text) == expected


def test_duplicated_n_grams_are_caught_by_the_default_thresholds():
    assert reason(GopherRepetitionConfig(), phrase_repeated(5)).startswith("gopher_repetition.")
    assert reason(GopherRepetitionConfig(), "").endswith(".empty")


def test_gopher_repetition_thresholds_come_from_the_config():
    text = REPETITION_CASES["repeated lines"][0]
    assert reason(GopherRepetitionConfig(dup_line_frac=0.5), text) == "kept"
    assert reason(GopherRepetitionConfig(dup_line_frac=None), text) == "kept"
    assert reason(GopherRepetitionConfig(), CLEAN) == "kept"
    assert reason(GopherRepetitionConfig(dup_para_frac=0.0), CLEAN + "\n\n" + CLEAN_PARAGRAPHS[2]) == (
        "gopher_repetition.dup_para_frac"
    )


# ------------------------------------------------------------------------------------------------ c4


def test_c4_drops_lorem_ipsum_pages():
    text = CLEAN + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit."
    assert reason(C4Config(), text) == "c4.lorem_ipsum"


def test_c4_drops_pages_with_a_curly_bracket():
    text = CLEAN + "\nFill in the {name} field of the form before you send it."
    assert reason(C4Config(), text) == "c4.curly_bracket"


def test_c4_drops_pages_with_too_few_sentences():
    result = C4Config().build().apply(doc("The cat sat on the mat. The dog ran off."))
    assert isinstance(result, Drop) and result.reason == "c4.too_few_sentences"
    assert result.detail.startswith("2 sentences")


def test_c4_removes_bad_lines_and_reports_an_edit():
    bad_lines = [
        "Menu",  # no terminal punctuation
        "Go home.",  # too few words
        "Please enable JavaScript to view the comments.",
        "By using this site you agree to our privacy policy.",
        f"This line holds one {'x' * 1200} word.",
        "Continue reading...",  # an ellipsis is no terminal punctuation
    ]
    text = "\n".join([bad_lines[0], CLEAN_PARAGRAPHS[0], *bad_lines[1:], CLEAN_PARAGRAPHS[1]])
    result = C4Config().build().apply(doc(text))
    assert isinstance(result, Edit) and result.reason == "c4.lines_removed"
    assert result.document.text == "\n".join(CLEAN_PARAGRAPHS[:2])
    assert result.detail.startswith("6 of 8 lines removed")
    for why in (
        "no terminal punctuation: 2",
        "too few words: 1",
        "javascript: 1",
        "policy: 1",
        "word too long: 1",
    ):
        assert why in result.detail


def test_c4_removes_citations():
    text = CLEAN.replace("the year before,", "the year before[12],")
    result = C4Config().build().apply(doc(text))
    assert isinstance(result, Edit) and result.reason == "c4.lines_trimmed"
    assert result.document.text == CLEAN


def test_c4_keeps_one_blank_line_between_kept_paragraphs():
    text = f"Home\n\n{CLEAN_PARAGRAPHS[0]}\n\n\nShare this\n\n{CLEAN_PARAGRAPHS[1]}\n"
    result = C4Config().build().apply(doc(text))
    assert isinstance(result, Edit) and result.reason == "c4.lines_removed"
    assert result.document.text == f"{CLEAN_PARAGRAPHS[0]}\n\n{CLEAN_PARAGRAPHS[1]}"


def test_c4_thresholds_come_from_the_config():
    short = "The cat sat on the mat. The dog ran off."
    assert reason(C4Config(min_num_sentences=2), short) == "kept"
    assert (
        reason(C4Config(filter_curly_bracket=False), CLEAN + "\nUse the {name} field of the form.") == "kept"
    )
    kept = (
        C4Config(filter_javascript=False).build().apply(doc(CLEAN + "\nJavaScript is a language of the web."))
    )
    assert isinstance(kept, Document) and "JavaScript" in kept.text


# ------------------------------------------------------------------------------------------- fineweb


FINEWEB_CASES = {
    "no line punctuation": (
        "\n".join(f"Section {w} of the long handbook about gardening" for w in FILLER[:12]),
        "fineweb.line_punct_ratio",
    ),
    "short lines": (
        "\n".join([*(f"See {w}." for w in FILLER[:10]), *CLEAN_PARAGRAPHS]),
        "fineweb.short_line_ratio",
    ),
    "duplicated lines": ("\n".join([*CLEAN_PARAGRAPHS, CLEAN_PARAGRAPHS[0]]), "fineweb.char_dup_ratio"),
    "many newlines": (
        "\n".join(f"Internationalization {w}characterization." for w in FILLER[:20]),
        "fineweb.newline_ratio",
    ),
    "blank": ("\n \n", "fineweb.empty"),
}


@pytest.mark.parametrize("case", FINEWEB_CASES)
def test_fineweb_rules_drop_with_their_reason(case):
    text, expected = FINEWEB_CASES[case]
    assert reason(FineWebConfig(), text) == expected


def test_fineweb_thresholds_come_from_the_config():
    text = FINEWEB_CASES["short lines"][0]
    assert reason(FineWebConfig(short_line_thr=0.9), text) == "kept"
    assert reason(FineWebConfig(short_line_length=5), text) == "kept"


# ------------------------------------------------------------------------------------ word splitting


def test_words_follow_spacy_english_rules():
    assert split_words("Don't stop-believing... (hello) world! It's e.g. 3.5% x.y[0]") == [
        "Do", "n't", "stop", "-", "believing", "...", "(", "hello", ")", "world", "!",
        "It", "'s", "e.g.", "3.5", "%", "x.y[0", "]",
    ]  # fmt: skip
    assert count_sentences("Hello world. This is it! And (so) on.") == 3
    assert count_sentences("Version 3.5 of e.g. the tool.") == 1


# ------------------------------------------------------------------------- agreement with datatrove


def stdlib_sample(per_kind: int = 150, piece_chars: int = 1200) -> list[str]:
    """A fixed sample of the local Python's code and docs, cut at blank lines into pieces."""
    source = StdlibSource(max_bytes=1_500_000)
    pieces: dict[str, list[str]] = {"code": [], "prose": []}
    for record in read_stdlib(source, {}, SourceLedger.for_config(source)):
        if not isinstance(record, Document):
            continue
        current: list[str] = []
        for block in record.text.split("\n\n"):
            current.append(block)
            if sum(map(len, current)) >= piece_chars:
                pieces[record.kind].append("\n\n".join(current))
                current = []
        if current and "\n\n".join(current).strip():
            pieces[record.kind].append("\n\n".join(current))
    return pieces["code"][:per_kind] + pieces["prose"][:per_kind]


def test_decisions_agree_with_datatrove():
    texts = stdlib_sample() + [CLEAN] + [text for text, *_ in GOPHER_QUALITY_CASES.values()]
    texts += [text for text, *_ in REPETITION_CASES.values()] + [text for text, _ in FINEWEB_CASES.values()]
    assert len(texts) >= 300
    pairs = [
        (GopherQualityConfig(), GopherQualityFilter()),
        (GopherRepetitionConfig(), GopherRepetitionFilter()),
        (C4Config(), C4QualityFilter()),
        (FineWebConfig(), FineWebQualityFilter()),
    ]
    for config, reference in pairs:
        ours = config.build()
        agree, kept = 0, 0
        for i, text in enumerate(texts):
            theirs_keep = reference.filter(DatatroveDocument(text=text, id=str(i))) is True
            result = ours.apply(doc(text))
            ours_keep = not isinstance(result, Drop)
            agree += ours_keep == theirs_keep
            kept += theirs_keep
        assert 0 < kept < len(texts), f"{config.type}: the sample should hold both kept and dropped documents"
        assert agree / len(texts) >= 0.97, f"{config.type}: {agree} of {len(texts)} decisions agree"
