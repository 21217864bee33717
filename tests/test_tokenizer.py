"""Byte-level BPE: exact round trips, fixed special ids, the saved format `transformers` loads, the stage."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
from tokenizers import pre_tokenizers

from lmloom.artifacts.store import ArtifactStore
from lmloom.config import validate_config
from lmloom.context import RunContext
from lmloom.errors import ConfigError, DataError, LmloomError
from lmloom.pipeline import PlannedStep, run_step
from lmloom.stages import get_stage
from lmloom.tokenizers.bpe import (
    BOS,
    EOS,
    PAD,
    TOKENIZER_FILES,
    capped_texts,
    load_tokenizer,
    new_bpe_tokenizer,
    train_bpe,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CODE_FILES = ["textwrap.py", "json/decoder.py", "string.py", "bisect.py", "colorsys.py"]
PROSE = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Tokenizers split text into pieces; a model predicts the next piece, one at a time.\n\n"
    "Byte-level BPE never meets an unknown character: every byte is in the vocabulary.",
    "Ünïcödé text: naïve café, Straße, смысл, 意味, معنى, 🎉🚀 and a family 👨‍👩‍👧.",
]

TRICKY = [
    "",
    " ",
    "def f(x):\n\treturn x  # trailing spaces   \n\n\n",
    "if True:\r\n        pass\r\n",
    "    \t  \t\n  \n\t\t\t",
    "x = {'a': [1, 2, 3]}  ;; `backticks` $dollar ~tilde \\backslash",
    "  leading spaces and . , ! ? punctuation with spaces before .",
    "Ünïcödé: 日本語のテキスト, emoji 🎉👨‍👩‍👧, combining e\u0301, rtl שלום, zero\u200bwidth",
    "control \x00\x01\x7f chars and a form feed \x0c and vertical tab \x0b",
    "literal specials <|bos|> <|eos|><|pad|> stay text",
    "1234567890 3.14159 0xDEADBEEF 1e-10",
]


def code_texts() -> list[str]:
    return [(STDLIB / name).read_text(encoding="utf-8") for name in CODE_FILES]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(code_texts() + PROSE, vocab_size=600, min_frequency=2)


@pytest.fixture(scope="module")
def saved_dir(tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    tokenizer.save(directory)
    return directory


def make_corpus(store: ArtifactStore, train: list[str], val: list[str]):
    writer = store.create(kind="corpus", stage="data.prepare", config={})
    for split, texts in (("train", train), ("val", val)):
        with open(writer.path / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for i, text in enumerate(texts):
                record = {"id": f"{split}-{i}", "text": text, "kind": "prose", "source": "test", "meta": {}}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return writer.commit()


def test_special_tokens_have_fixed_ids(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    assert [tokenizer.token(i) for i in range(3)] == [BOS, EOS, PAD]
    assert [tokenizer.backend.token_to_id(t) for t in (BOS, EOS, PAD)] == [0, 1, 2]


def test_vocabulary_holds_every_byte_and_respects_the_size(tokenizer):
    assert 3 + 256 < tokenizer.vocab_size <= 600
    vocab = tokenizer.backend.get_vocab()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    assert len(alphabet) == 256 and all(symbol in vocab for symbol in alphabet)
    assert sorted(vocab[symbol] for symbol in alphabet) == list(range(3, 259))


@pytest.mark.parametrize("text", TRICKY)
def test_decode_of_encode_is_exact(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text


def test_round_trip_on_real_code(tokenizer):
    for text in code_texts():
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_encode_adds_no_special_tokens(tokenizer):
    assert tokenizer.encode("") == []
    ids = tokenizer.encode("hello world")
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids


def test_special_token_strings_in_text_are_not_control_tokens(tokenizer):
    ids = tokenizer.encode("a<|eos|>b<|bos|><|pad|>")
    assert not {0, 1, 2} & set(ids)
    assert tokenizer.decode(ids) == "a<|eos|>b<|bos|><|pad|>"


def test_decode_shows_or_skips_special_ids(tokenizer):
    ids = tokenizer.encode("ab")
    assert tokenizer.decode([*ids, tokenizer.eos_id]) == "ab" + EOS
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id], skip_special_tokens=True) == "ab"


def test_encode_batch_matches_encode(tokenizer):
    assert tokenizer.encode_batch(TRICKY) == [tokenizer.encode(t) for t in TRICKY]


def test_training_is_deterministic():
    texts = code_texts()[:2] + PROSE
    first = train_bpe(texts, vocab_size=400).backend.to_str()
    second = train_bpe(texts, vocab_size=400).backend.to_str()
    assert first == second


def test_vocab_size_below_specials_plus_bytes_is_refused():
    with pytest.raises(ConfigError, match="at least 259"):
        train_bpe(["abc"], vocab_size=258)


def test_training_stops_at_the_byte_cap():
    stats: dict[str, int] = {}
    texts = ["aaaa", "é" * 10, "never read"]
    out = list(capped_texts(iter(texts), 9, stats))
    assert out == ["aaaa", "é" * 2]  # 4 + 4 bytes; the 5th byte would split a character
    assert stats == {"bytes": 8, "documents": 2}
    assert list(capped_texts(iter(texts), 0)) == []


def test_capped_training_learns_only_from_the_head():
    stats: dict[str, int] = {}
    tok = train_bpe(["xyxyxy " * 50, "abab " * 50], vocab_size=300, max_train_bytes=350, stats=stats)
    assert stats == {"bytes": 350, "documents": 1}
    assert tok.backend.token_to_id("xy") is not None
    assert tok.backend.token_to_id("ab") is None


def test_saved_directory_holds_the_three_files_and_reloads(tokenizer, saved_dir):
    assert sorted(p.name for p in saved_dir.iterdir()) == sorted(TOKENIZER_FILES)
    loaded = load_tokenizer(saved_dir)
    assert loaded.vocab_size == tokenizer.vocab_size
    for text in TRICKY + code_texts():
        assert loaded.encode(text) == tokenizer.encode(text)
    config = json.loads((saved_dir / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (BOS, EOS, PAD)


def test_transformers_loads_the_saved_tokenizer_and_encodes_identically(tokenizer, saved_dir):
    import transformers  # the dev extra installs it: an independent reference, never skipped

    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(saved_dir))
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (BOS, EOS, PAD)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert len(hf) == tokenizer.vocab_size
    for text in TRICKY + PROSE + code_texts():
        ids = tokenizer.encode(text)
        assert hf.encode(text) == ids
        assert hf(text)["input_ids"] == ids
        assert hf.decode(ids) == text


def test_load_tokenizer_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(LmloomError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LmloomError, match="not a valid tokenizer file"):
        load_tokenizer(tmp_path)
    foreign = new_bpe_tokenizer()
    foreign.add_special_tokens(["<s>", "</s>"])
    foreign.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(LmloomError, match="special token <\\|bos\\|> has id None"):
        load_tokenizer(tmp_path)


# -- the tokenizer.train stage ------------------------------------------------------------------


def run_train_stage(store, corpus, **config):
    stage = get_stage("tokenizer.train")
    step = PlannedStep("tokenizer", stage, validate_config(stage.config, config, "tokenizer"), {})
    return run_step(step, {"corpus": corpus}, RunContext(store=store))


def test_train_stage_writes_a_loadable_tokenizer_artifact(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    corpus = make_corpus(store, code_texts() + PROSE, PROSE + TRICKY[1:])
    result = run_train_stage(store, corpus, vocab_size=500)
    artifact = result.artifact
    assert artifact.kind == "tokenizer" and not result.reused
    assert set(artifact.manifest.files) == set(TOKENIZER_FILES)
    meta = artifact.manifest.metadata
    tok = load_tokenizer(artifact.path)
    assert meta["vocab_size"] == tok.vocab_size and meta["requested_vocab_size"] == 500
    assert meta["special_tokens"] == {BOS: 0, EOS: 1, PAD: 2}
    assert meta["train_documents"] == len(code_texts() + PROSE)
    sample = meta["bytes_per_token_sample"]
    assert sample["split"] == "val" and sample["documents"] == len(PROSE) + len(TRICKY) - 1
    assert meta["bytes_per_token"] == pytest.approx(sample["bytes"] / sample["tokens"], abs=1e-4)
    assert meta["bytes_per_token"] > 1.0

    rows = dict(result.stage.summarize(artifact.manifest))
    assert rows["vocabulary"] == f"{tok.vocab_size:,}"
    assert rows["bytes per token"] == f"{meta['bytes_per_token']:.2f}"

    again = run_train_stage(store, corpus, vocab_size=500)
    assert again.reused and again.artifact.id == artifact.id


def test_train_stage_config_names_bad_keys():
    stage = get_stage("tokenizer.train")
    with pytest.raises(ConfigError, match="tokenizer.vocab_sise: unknown key"):
        validate_config(stage.config, {"vocab_sise": 100}, "tokenizer")
    with pytest.raises(ConfigError, match="tokenizer.vocab_size"):
        validate_config(stage.config, {"vocab_size": 100}, "tokenizer")


def test_train_stage_refuses_an_empty_or_malformed_corpus(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(DataError, match="no text"):
        run_train_stage(store, make_corpus(store, [], ["val"]), vocab_size=300)

    writer = store.create(kind="corpus", stage="data.prepare", config={})
    (writer.path / "train.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    (writer.path / "val.jsonl").write_text("")
    with pytest.raises(DataError, match="train.jsonl line 2: record has no string field 'text'"):
        run_train_stage(store, writer.commit(), vocab_size=300)
