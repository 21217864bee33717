"""The `safety` step: shipped word lists, thresholds, user lists, allowlist and the classifier hook."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lmloom.data.documents import Document
from lmloom.data.safety import (
    CategoryThreshold,
    SafetyConfig,
    WordListMatcher,
    builtin_categories,
    builtin_terms,
)
from lmloom.data.steps import Drop
from lmloom.errors import ConfigError

CLEAN = (
    "The river delta supports rice farming and a large migratory bird population. Farmers plant in "
    "spring, harvest in autumn, and sell most of the crop at regional markets. "
) * 5


def doc(text: str) -> Document:
    return Document(id="d", text=text, kind="prose", source="test")


def toy_classifier(text: str) -> dict[str, float]:
    """The hook under test: scores 'violence' high when the text mentions a duel."""
    return {"violence": 0.97 if "duel" in text.lower() else 0.01, "sexual": 0.0}


not_callable = 42


def test_shipped_categories_load():
    assert set(builtin_categories()) >= {"sexual", "violence", "hate", "self_harm", "weapons", "drugs"}
    assert "heroin" in builtin_terms("drugs")
    assert all(not term.startswith("#") for term in builtin_terms("weapons"))


def test_clean_document_passes():
    original = doc(CLEAN)
    assert SafetyConfig().build().apply(original) is original


def test_document_over_threshold_is_dropped_with_its_category():
    text = "Buy cocaine and heroin here. Cheap heroin, pure cocaine, fentanyl delivered. " + CLEAN[:200]
    result = SafetyConfig().build().apply(doc(text))
    assert isinstance(result, Drop)
    assert result.reason == "safety.drugs"
    assert "drugs 5" in result.detail


def test_a_few_mentions_in_a_long_text_stay():
    # Three mentions in ~1,500 words is a rate of 2 per 1,000: under the default 5.
    text = (
        CLEAN * 5
        + " Opium and heroin shaped the history of the port; heroin and later fentanyl. "
        + CLEAN * 5
    )
    original = doc(text)
    assert SafetyConfig().build().apply(original) is original


def test_matching_is_whole_word_and_case_insensitive():
    matcher = WordListMatcher({"drugs": ["meth"], "weapons": ["pipe bomb"]})
    assert matcher.count("METH, meth. Method, methane, something.") == {"drugs": 2}
    assert matcher.count("a Pipe\n  Bomb and pipe bombs") == {"weapons": 1}


def test_per_category_threshold_and_disabled_category():
    text = "suicide " * 2 + CLEAN[:100]
    assert isinstance(SafetyConfig().build().apply(doc(text)), Document)  # 2 < default min_count 3
    strict = SafetyConfig(thresholds={"self_harm": CategoryThreshold(min_count=1, max_per_1000_words=0)})
    assert strict.build().apply(doc(text)).reason == "safety.self_harm"
    assert isinstance(SafetyConfig(disabled=["self_harm"]).build().apply(doc("suicide " * 10)), Document)


def test_user_extended_list_adds_terms_and_categories(tmp_path):
    extra = tmp_path / "gambling.txt"
    extra.write_text("# my list\nonline casino\nsports betting\n", encoding="utf-8")
    text = "Online casino bonus! Sports betting odds! Online  casino jackpot! " + CLEAN[:100]
    assert isinstance(SafetyConfig().build().apply(doc(text)), Document)
    result = SafetyConfig(extra_lists={"gambling": [extra]}).build().apply(doc(text))
    assert isinstance(result, Drop)
    assert result.reason == "safety.gambling"
    assert "gambling 3" in result.detail


def test_allowlist_phrases_are_not_counted(tmp_path):
    text = "Our suicide prevention hotline and suicide prevention training; suicide prevention works."
    assert SafetyConfig().build().apply(doc(text)).reason == "safety.self_harm"
    assert isinstance(SafetyConfig(allowlist=["suicide prevention"]).build().apply(doc(text)), Document)
    phrases = tmp_path / "allow.txt"
    phrases.write_text("suicide prevention\n", encoding="utf-8")
    assert isinstance(SafetyConfig(allowlist_files=[phrases]).build().apply(doc(text)), Document)


def test_classifier_hook_drops_by_score():
    step = SafetyConfig(classifier="test_safety:toy_classifier", classifier_threshold=0.9).build()
    result = step.apply(doc("At dawn the two officers fought a duel by the river."))
    assert isinstance(result, Drop)
    assert result.reason == "safety.violence"
    assert "0.970" in result.detail
    assert isinstance(step.apply(doc(CLEAN)), Document)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:score", "cannot import module 'no_such_module_xyz'"),
        ("test_safety:missing_function", "has no attribute 'missing_function'"),
        ("test_safety:not_callable", "is not callable"),
    ],
)
def test_bad_classifier_spec_gives_a_clear_error(spec, message):
    with pytest.raises(ConfigError, match=message):
        SafetyConfig(classifier=spec).build()


def test_malformed_classifier_spec_is_rejected_by_the_config():
    with pytest.raises(ValidationError, match="package.module:callable"):
        SafetyConfig(classifier="just_a_module")


def test_unknown_disabled_category_and_unreadable_list_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown categories"):
        SafetyConfig(disabled=["spam"]).build()
    with pytest.raises(ConfigError, match="cannot read word list"):
        SafetyConfig(extra_lists={"spam": [tmp_path / "missing.txt"]}).build()
