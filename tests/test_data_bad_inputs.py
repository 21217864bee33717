"""Bad input on the data-ingest and tokenizer paths: a clear error that names the key or file (or a
reject with its reason), never a traceback, a hang, or data silently read from the wrong place."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmloom.artifacts.store import ArtifactStore
from lmloom.config import Recipe, validate_config
from lmloom.context import RunContext
from lmloom.data.documents import Document, Reject
from lmloom.data.sources import read_source
from lmloom.data.sources.warc import WarcSource
from lmloom.data.stage import PrepareConfig
from lmloom.errors import ConfigError, DataError
from lmloom.pipeline import run_recipe
from lmloom.tokenizers.training import train_tokenizer

PROSE = "Rivers run past quiet stone houses to the north, and the light falls on them. "


def prepare(config: dict) -> PrepareConfig:
    return validate_config(PrepareConfig, config, "stages.corpus.config")  # type: ignore[return-value]


# -- tokenizer training --------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["bpe", "wordpiece"])
def test_one_enormous_repeated_word_does_not_stall_tokenizer_training(algorithm):
    # The HF trainers were quadratic in the length of such a word: ~25 s for 200k characters, hours
    # for a 5 MB line of "=" or spaces in a source file.
    texts = ["=" * 200_000, "a" * 200_000, PROSE * 20, "x" + " " * 200_000 + "y"]
    # (no timing asserted: the old code took minutes here, which CI's duration would show)
    tokenizer = train_tokenizer(algorithm, texts, vocab_size=300)
    assert tokenizer.vocab_size > 0


def test_training_on_text_without_long_runs_is_unchanged():
    from lmloom.tokenizers.bpe import bounded_runs

    texts = [PROSE * 50, "def f(x):\n    return x\n" * 40]
    assert list(bounded_runs(texts)) == texts
    cut = list(bounded_runs(["ab " + "=" * 2500 + " cd"]))
    assert "".join(cut) == "ab " + "=" * 2500 + " cd" and max(map(len, cut)) <= 1024


def test_a_corpus_with_an_enormous_line_trains_and_encodes_quickly(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"d{i}.txt").write_text(f"Document {i}. " + PROSE * 5)
    (docs / "table.txt").write_text("header\n" + "-" * 300_000 + "\nfooter line of the table\n")
    recipe = Recipe(
        name="t",
        stages={
            "corpus": {
                "stage": "data.prepare",
                "config": {
                    "sources": [{"type": "text-dir", "path": str(docs)}],
                    "executor": {"workers": 1},
                    "val_fraction": 0.0,  # every document, the table too, is trained on
                },
            },
            "tokenizer": {
                "stage": "tokenizer.train",
                "inputs": {"corpus": "corpus"},
                "config": {"vocab_size": 300},
            },
            "shards": {"stage": "tokenizer.encode", "inputs": {"corpus": "corpus", "tokenizer": "tokenizer"}},
        },
    )
    results = run_recipe(recipe, RunContext(ArtifactStore(tmp_path / "store")))
    assert [r.artifact.kind for r in results] == ["corpus", "tokenizer", "shards"]
    assert results[-1].artifact.manifest.metadata["splits"]["train"]["documents"] == 5


def test_unigram_vocab_too_small_for_the_characters_is_a_config_error():
    text = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 60)) * 3  # 60 distinct CJK characters
    with pytest.raises(ConfigError, match=r"vocab_size = 262: too small .*raise vocab_size"):
        train_tokenizer("unigram", [text, PROSE], vocab_size=262)


def test_a_vocab_too_small_for_unigram_is_rejected_before_the_run():
    from lmloom.tokenizers.stage import TrainTokenizerConfig

    with pytest.raises(ConfigError, match=r"stages\.tokenizer\.config.*algorithm unigram needs at least 261"):
        validate_config(
            TrainTokenizerConfig, {"algorithm": "unigram", "vocab_size": 260}, "stages.tokenizer.config"
        )
    validate_config(TrainTokenizerConfig, {"algorithm": "bpe", "vocab_size": 260}, "stages.tokenizer.config")


@pytest.mark.parametrize("texts", [[], ["", ""]])
def test_unigram_on_no_text_is_a_data_error(texts):
    with pytest.raises(DataError, match="no text to train a Unigram model on"):
        train_tokenizer("unigram", texts, vocab_size=300)


def test_sentencepiece_with_only_overlong_lines_says_why():
    pytest.importorskip("sentencepiece")
    texts = [PROSE * 60, PROSE * 70]  # one line each, over SentencePiece's 4,192 bytes
    with pytest.raises(DataError, match=r"all 2 lines are longer than 4,192 bytes"):
        train_tokenizer("sentencepiece-bpe", texts, vocab_size=300)


# -- source configs ------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["/etc/*.conf", "../*.txt", "sub/../../*.txt", ""])
@pytest.mark.parametrize("source_type", ["text-dir", "books", "warc", "parquet"])
def test_patterns_outside_the_source_are_config_errors(tmp_path, pattern, source_type):
    source = {"type": source_type, "path": str(tmp_path), "patterns": ["*.txt", pattern]}
    with pytest.raises(ConfigError, match=r"stages\.corpus\.config\.sources\.0\.patterns"):
        prepare({"sources": [source]})


def test_an_empty_path_is_refused_instead_of_reading_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.txt").write_text(PROSE)
    for path in ("", "  ", "file://"):
        with pytest.raises(ConfigError, match=r"sources\.0\.path.*the path is empty"):
            prepare({"sources": [{"type": "text-dir", "path": path}]})


@pytest.mark.parametrize("path", [5, None, ["a"]])
def test_a_path_that_is_not_a_string_gets_one_plain_line(path):
    with pytest.raises(ConfigError) as caught:
        prepare({"sources": [{"type": "jsonl", "path": path}]})
    message = str(caught.value)
    assert "sources.0.path" in message and "expected a path or URL string" in message
    assert "lax-or-strict" not in message and len(message.splitlines()) == 1


def test_an_invalid_chapter_pattern_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"sources\.0\.chapter_pattern.*not a valid regular expression"):
        prepare({"sources": [{"type": "books", "path": str(tmp_path), "chapter_pattern": "(CHAPTER"}]})


def test_an_unknown_code_language_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"sources\.0\.languages.*unknown language 'pyhton'.*python"):
        prepare({"sources": [{"type": "code", "path": str(tmp_path), "languages": ["python", "pyhton"]}]})


@pytest.mark.parametrize("template", ["chatml2", "<|{role}|>\n"])
def test_a_conversation_template_without_content_is_a_config_error(tmp_path, template):
    source = {"type": "conversations", "path": str(tmp_path), "template": template}
    with pytest.raises(ConfigError, match=r"sources\.0\.template.*\{content\}"):
        prepare({"sources": [source]})
    prepare({"sources": [{**source, "template": "{role}: {content}\n"}]})  # a real template is fine


# -- malformed files -----------------------------------------------------------------------------


def test_a_warc_response_without_target_uri_is_rejected_not_a_crash(tmp_path):
    good = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n"
        b"<html><body><article><p>" + PROSE.encode() * 3 + b"</p></article></body></html>"
    )
    record = (
        b"WARC/1.0\r\nWARC-Type: response\r\nWARC-Target-URI: http://example.org/\r\n"
        b"Content-Length: %d\r\n\r\n" % len(good) + good + b"\r\n\r\n"
    )
    (tmp_path / "a.warc").write_bytes(record)
    (tmp_path / "b.warc").write_bytes(b"WARC/1.0\r\nWARC-Type: response\r\nContent-Length: 9\r\n\r\nshort")
    records = list(read_source(WarcSource(path=tmp_path)))
    docs = [r for r in records if isinstance(r, Document)]
    rejects = [r for r in records if isinstance(r, Reject)]
    assert len(docs) == 1 and docs[0].meta["file"] == "a.warc"
    assert [r.reason for r in rejects] == ["unreadable-file"]
    assert (
        rejects[0].location.startswith(str(tmp_path / "b.warc"))
        and "malformed WARC record" in rejects[0].detail
    )


# -- the data command line -----------------------------------------------------------------------


def test_data_export_with_an_option_that_is_not_yaml_is_a_config_error(tmp_path):
    env = {**os.environ, "LMLOOM_HOME": str(tmp_path / "store"), "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "lmloom", "data", "export", "abc", str(tmp_path / "out"), "-o", "a=@x"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--option 'a=@x': the value is not valid YAML" in proc.stderr


def test_a_file_name_that_is_not_utf8_is_read_and_recorded_escaped(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "plain.txt").write_text("Plain. " + PROSE * 3)
    try:
        with open(os.fsencode(docs) + b"/caf\xe9.txt", "wb") as handle:  # a Latin-1 name
            handle.write(("Latin-1 name. " + PROSE * 3).encode())
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    config = {
        "sources": [{"type": "text-dir", "path": str(docs)}],
        "executor": {"workers": 1},
        "val_fraction": 0.0,
    }
    recipe = Recipe(name="t", stages={"corpus": {"stage": "data.prepare", "config": config}})
    [result] = run_recipe(recipe, RunContext(ArtifactStore(tmp_path / "store")))
    ids = sorted(json.loads(line)["id"] for line in result.artifact.read_bytes("train.jsonl").splitlines())
    assert ids == ["caf\\xe9.txt", "plain.txt"]
    listed = [json.loads(line) for line in result.artifact.read_bytes("sources.jsonl").splitlines()]
    assert sorted(f["path"] for f in listed) == [str(docs / "caf\\xe9.txt"), str(docs / "plain.txt")]


# -- steps on enormous documents -----------------------------------------------------------------


def test_pii_redaction_of_a_document_with_many_finds_is_not_quadratic():
    from lmloom.data.pii import PiiConfig

    # one line (a log or mail dump read as one document): 30,000 addresses took ~40 s before
    text = " ".join(f"user{i}@mail{i % 7}.org sent 8.8.{i % 250}.{i % 200} ok" for i in range(30_000))
    edit = PiiConfig().build().apply(Document("d", text, "prose", "s", {}))  # seconds, not a minute
    assert edit.document.text.count("<EMAIL>") == 30_000 and "@mail" not in edit.document.text


def test_pii_overlaps_resolve_as_before():
    from lmloom.data.pii import _PRIORITY, ALL_TYPES, find_pii

    line = (
        "mail bob@corp.org or 4111 1111 1111 1111, key AKIAABCDEFGHIJKLMNOP, ssn 123-45-6789, "
        "call +1 415 555 0134, ip 8.8.4.4 or 2001:4860:4860::8888, iban DE89370400440532013000. "
    )
    text = line * 20 + "\nMessage-ID: <abc123@mail.org>\n" + line * 20
    spans = find_pii(text, frozenset(ALL_TYPES))
    # the reference: every type's finds, higher priority first, each kept unless it overlaps a kept one
    everything = sorted(
        (s for kind in ALL_TYPES for s in find_pii(text, frozenset([kind]))),
        key=lambda s: (_PRIORITY[s.type], s.start, -s.end),
    )
    reference: list = []
    for span in everything:
        if all(span.end <= other.start or span.start >= other.end for other in reference):
            reference.append(span)
    assert spans == sorted(reference, key=lambda s: s.start)
    assert "abc123@mail.org" not in {text[s.start : s.end] for s in spans}  # a message id, not a person


def test_html_nested_past_any_real_page_has_no_text_instead_of_stalling_the_parser():
    """The fallback parser is quadratic in nesting depth (200,000 nested <div>s: minutes): such a page
    gets no text; a page nested like real ones still gets its text."""
    from lmloom.data.html import MAX_FALLBACK_DEPTH, _nested_deeper_than, extract_main_text

    deep = "<div>" * 200_000 + "<p>text</p>" + "</div>" * 200_000
    assert _nested_deeper_than(deep, MAX_FALLBACK_DEPTH) and extract_main_text(deep) is None
    page = "<html><body>" + "<div>" * 100 + "<p>Plain words that are the page.</p>" + "</div>" * 100
    assert extract_main_text(page + "</body></html>") == "Plain words that are the page."
    # end tags that may be left out (p, li, td, ...) and void elements do not count as nesting
    assert not _nested_deeper_than("<ul>" + "<li>item<br>" * 5000 + "</ul>" + "<p>para" * 5000, 2048)
