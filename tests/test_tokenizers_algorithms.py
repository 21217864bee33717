"""The five tokenizer algorithms end to end: trained by the `tokenizer.train` stage, loaded by their own
libraries with the same ids as `load_tokenizer`, reported on, and encoded into shards."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tokenizers

from lmloom.artifacts.store import ArtifactStore
from lmloom.config import Recipe
from lmloom.context import RunContext
from lmloom.errors import LmloomError
from lmloom.pipeline import run_recipe, stage_key
from lmloom.security.encryption import MAGIC
from lmloom.stages import get_stage
from lmloom.tokenizers import ALGORITHMS, TextTokenizer, TokenShards, load_tokenizer
from lmloom.tokenizers.base import BOS, EOS, PAD, SENTENCEPIECE_MODEL_FILE

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN_FILES = ["textwrap.py", "json/decoder.py", "string.py", "bisect.py", "colorsys.py", "heapq.py"]
VAL_FILES = ["fnmatch.py", "glob.py"]
PROSE = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Tokenizers split text into pieces; a model predicts the next piece, one at a time.",
    "Ünïcödé text: naïve café, Straße, смысл, 意味, معنى and a party 🎉.",
]
TRICKY = [
    "",
    " ",
    "  leading spaces, trailing spaces   ",
    "def f(x):\n\treturn x  # comment\n\n\n",
    "if True:\r\n        pass\r\n",
    "never seen in training: 🚀 ☃ ∮ Ω ѯ ⅷ",  # byte-fallback / [UNK] territory
    "control \x00\x01\x7f chars and a form feed \x0c",
    "literal specials <|bos|> <|eos|><|pad|> [CLS] <unk> <0x41> stay text",
]
VOCAB_SIZE = 600
EXACT = ("bpe", "unigram", "sentencepiece-bpe", "sentencepiece-unigram")  # decode(encode(t)) == t
UNK = {"bpe": None, "wordpiece": "[UNK]", "unigram": "<unk>"} | dict.fromkeys(
    ("sentencepiece-bpe", "sentencepiece-unigram"), "<unk>"
)


def stdlib_texts(names: list[str]) -> list[str]:
    return [(STDLIB / name).read_text(encoding="utf-8") for name in names]


def make_corpus(store: ArtifactStore, train: list[str], val: list[str]):
    writer = store.create(kind="corpus", stage="data.prepare", config={})
    for split, texts in (("train", train), ("val", val)):
        with open(writer.path / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for i, text in enumerate(texts):
                record = {"id": f"{split}-{i}", "text": text, "kind": "code", "source": "test", "meta": {}}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return writer.commit()


def tokenize_recipe(corpus_id: str, algorithm: str) -> Recipe:
    corpus = f"artifact:{corpus_id}"
    return Recipe.model_validate(
        {
            "name": f"tokenize-{algorithm}",
            "stages": {
                "tokenizer": {
                    "stage": "tokenizer.train",
                    "inputs": {"corpus": corpus},
                    "config": {"algorithm": algorithm, "vocab_size": VOCAB_SIZE},
                },
                "shards": {
                    "stage": "tokenizer.encode",
                    "inputs": {"corpus": corpus, "tokenizer": "tokenizer"},
                    "config": {"max_tokens_per_shard": 5000},
                },
            },
        }
    )


TRAIN_TEXTS = stdlib_texts(TRAIN_FILES) + PROSE
VAL_TEXTS = stdlib_texts(VAL_FILES) + PROSE[:2] + TRICKY


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return ArtifactStore(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def corpus(store):
    return make_corpus(store, TRAIN_TEXTS, VAL_TEXTS)


_TRAINED: dict[tuple[str, str], tuple] = {}


def trained(store, corpus, algorithm):
    """(algorithm, tokenizer artifact, shards artifact, loaded tokenizer) after a real recipe run,
    once per algorithm and module."""
    key = (str(store.root), algorithm)
    if key not in _TRAINED:
        results = {
            r.name: r for r in run_recipe(tokenize_recipe(corpus.id, algorithm), RunContext(store=store))
        }
        tok_artifact = results["tokenizer"].artifact
        _TRAINED[key] = (algorithm, tok_artifact, results["shards"].artifact, load_tokenizer(tok_artifact))
    return _TRAINED[key]


@pytest.fixture(scope="module", params=ALGORITHMS)
def run(request, store, corpus):
    return trained(store, corpus, request.param)


@pytest.fixture(scope="module")
def native_dir(run, tmp_path_factory):
    """The tokenizer's files copied out through the artifact API, for the native libraries to load."""
    algorithm, artifact, _, _ = run
    directory = tmp_path_factory.mktemp(f"native-{algorithm}")
    for name in artifact.manifest.files:
        (directory / name).write_bytes(artifact.read_bytes(name))
    return directory


def samples() -> list[str]:
    return PROSE + TRICKY + stdlib_texts(VAL_FILES)


# -- loading, ids and specials ------------------------------------------------------------------------


def test_loader_gives_a_text_tokenizer_of_the_trained_algorithm(run):
    algorithm, artifact, _, tok = run
    assert isinstance(tok, TextTokenizer)
    assert tok.algorithm == algorithm == artifact.manifest.metadata["algorithm"]
    native = SENTENCEPIECE_MODEL_FILE if algorithm.startswith("sentencepiece") else "tokenizer.json"
    assert set(artifact.manifest.files) == {native, "tokenizer_config.json", "special_tokens_map.json"}
    assert 300 < tok.vocab_size <= VOCAB_SIZE


def test_special_tokens_have_fixed_ids_and_text_cannot_forge_them(run):
    algorithm, _, _, tok = run
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert [tok.token(i) for i in range(3)] == [BOS, EOS, PAD]
    if UNK[algorithm] is None:
        assert tok.unk_id is None
    else:
        assert tok.unk_id == 3 and tok.token(3) == UNK[algorithm]
    ids = tok.encode("a<|eos|>b<|bos|><|pad|>")
    assert not {0, 1, 2} & set(ids)
    shown = f"{BOS} ab {EOS}" if algorithm == "wordpiece" else f"{BOS}ab{EOS}"  # WordPiece joins words
    assert tok.decode([0, *tok.encode("ab"), 1]) == shown
    assert tok.decode([0, *tok.encode("ab"), 2, 1], skip_special_tokens=True) == "ab"


def test_encode_batch_matches_encode(run):
    _, _, _, tok = run
    assert tok.encode_batch(samples()) == [tok.encode(t) for t in samples()]


def test_native_library_loads_the_files_with_identical_ids(run, native_dir):
    algorithm, _, _, tok = run
    if algorithm.startswith("sentencepiece"):
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(
            model_file=str(native_dir / SENTENCEPIECE_MODEL_FILE)
        )
        assert processor.get_piece_size() == tok.vocab_size
        for text in samples():
            assert processor.encode(text) == tok.encode(text)
    else:
        native = tokenizers.Tokenizer.from_file(str(native_dir / "tokenizer.json"))
        assert native.get_vocab_size() == tok.vocab_size
        for text in samples():
            if "<|" in text or "[CLS]" in text or "<unk>" in text:
                continue  # the bare library recognises special strings; see the transformers check
            assert native.encode(text, add_special_tokens=False).ids == tok.encode(text)


def test_transformers_loads_the_files(run, native_dir):
    transformers = pytest.importorskip("transformers")
    algorithm, _, _, tok = run
    if algorithm.startswith("sentencepiece"):
        # transformers >= 5 converts tokenizer.model into a BPE tokenizer: the same ids for
        # SentencePiece BPE; for unigram the segmentation may differ, but our ids decode the same.
        hf = transformers.LlamaTokenizer.from_pretrained(str(native_dir))
    else:
        hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(native_dir))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert len(hf) == tok.vocab_size
    for text in samples():
        ids = tok.encode(text)
        assert hf.decode(ids) == tok.decode(ids)
        if algorithm != "sentencepiece-unigram":
            assert hf.encode(text, add_special_tokens=False) == ids


# -- decoding ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", EXACT)  # WordPiece normalises: see test_wordpiece_decodes_...
def test_exact_algorithms_round_trip_every_text(store, corpus, algorithm):
    tok = trained(store, corpus, algorithm)[3]
    for text in samples():
        assert tok.decode(tok.encode(text)) == text


# byte-level BPE needs no fallback (every byte is a token); WordPiece maps unseen characters to [UNK]
@pytest.mark.parametrize("algorithm", ["unigram", "sentencepiece-bpe", "sentencepiece-unigram"])
def test_byte_fallback_encodes_unseen_characters_as_bytes(store, corpus, algorithm):
    tok = trained(store, corpus, algorithm)[3]
    ids = tok.encode("🚀")  # not in the training text
    assert [tok.token(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0x9A>", "<0x80>"]


def test_wordpiece_decodes_the_normalised_text(store, corpus):
    results = {
        r.name: r for r in run_recipe(tokenize_recipe(corpus.id, "wordpiece"), RunContext(store=store))
    }
    tok = load_tokenizer(results["tokenizer"].artifact)
    assert tok.decode(tok.encode("Hello,  Café World!")) == "hello, cafe world!"
    assert tok.encode("🚀") == [tok.unk_id]


def test_unigram_never_segments_literal_byte_or_special_pieces_even_from_an_unrelated_corpus():
    from lmloom.tokenizers import train_tokenizer

    tok = train_tokenizer("unigram", ["aaa bbb ccc aaa", "bbb aaa"] * 5, vocab_size=300)
    text = "<0x41><|eos|> <unk><|pad|>"  # none of these characters occur in the training text
    ids = tok.encode(text)
    assert all(i > 259 for i in ids)  # no special (0-3) or byte piece (4-259)
    assert tok.decode(ids) == text


# -- the report ----------------------------------------------------------------------------------------


def test_report_is_in_the_metadata_and_the_summary(run):
    algorithm, artifact, _, tok = run
    meta = artifact.manifest.metadata
    sample = meta["bytes_per_token_sample"]
    assert sample["split"] == "val" and sample["documents"] == len(VAL_TEXTS)
    assert meta["vocab_size"] == tok.vocab_size and meta["unk_id"] == tok.unk_id
    assert meta["bytes_per_token"] == pytest.approx(sample["bytes"] / sample["tokens"], abs=1e-4)
    assert meta["bytes_per_token"] > 1.0
    assert meta["unk_rate"] == pytest.approx(sample["unknown_tokens"] / sample["tokens"], abs=1e-6)
    assert meta["round_trip_share"] == pytest.approx(
        sample["round_trip_documents"] / len(VAL_TEXTS), abs=1e-4
    )
    if algorithm in EXACT:
        assert meta["unk_rate"] == 0.0 and meta["round_trip_share"] == 1.0
    else:  # WordPiece: unseen characters are [UNK]; lowercasing breaks most round trips
        assert meta["unk_rate"] > 0.0 and meta["round_trip_share"] < 0.5

    rows = dict(get_stage("tokenizer.train").summarize(artifact.manifest))
    assert rows["algorithm"] == algorithm
    assert rows["vocabulary"] == f"{tok.vocab_size:,}"
    assert rows["bytes per token"] == f"{meta['bytes_per_token']:.2f}"
    assert rows["unknown tokens (val)"] == f"{meta['unk_rate']:.4%}"
    assert rows["exact round trips (val)"] == f"{meta['round_trip_share']:.2%} of documents"


def test_report_falls_back_to_train_when_val_is_empty(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    corpus = make_corpus(store, PROSE, [])
    recipe = tokenize_recipe(corpus.id, "bpe")
    recipe.stages.pop("shards")
    (result,) = run_recipe(recipe, RunContext(store=store))
    sample = result.artifact.manifest.metadata["bytes_per_token_sample"]
    assert sample["split"] == "train" and sample["documents"] == len(PROSE)
    assert dict(result.stage.summarize(result.artifact.manifest))["exact round trips (train)"]


# -- shards --------------------------------------------------------------------------------------------


def test_encode_stage_writes_shards_of_the_tokenizer_ids(run):
    algorithm, tok_artifact, shards_artifact, tok = run
    assert shards_artifact.manifest.inputs["tokenizer"] == tok_artifact.id
    for split, texts in (("train", TRAIN_TEXTS), ("val", VAL_TEXTS)):
        shards = TokenShards(shards_artifact, split)
        assert shards.n_docs == len(texts) and shards.vocab_size == tok.vocab_size
        documents = [shards.document(i).tolist() for i in range(shards.n_docs)]
        assert documents == [tok.encode(text) for text in texts]
        if algorithm in EXACT:
            assert [tok.decode(d) for d in documents] == texts
    assert TokenShards(shards_artifact, "train").n_shards > 1
    assert shards_artifact.manifest.metadata["eos_id"] == 1


# -- the config and its stage key ----------------------------------------------------------------------


def test_default_algorithm_leaves_the_stage_key_of_older_recipes_unchanged():
    from typing import get_args

    from lmloom.tokenizers.stage import Algorithm

    assert get_args(Algorithm) == ALGORITHMS  # the config accepts exactly the trainable algorithms
    stage = get_stage("tokenizer.train")
    default = stage.config.model_validate({"vocab_size": 500})
    explicit = stage.config.model_validate({"vocab_size": 500, "algorithm": "bpe"})
    unigram = stage.config.model_validate({"vocab_size": 500, "algorithm": "unigram"})
    assert "algorithm" not in default.model_dump(mode="json")
    assert stage_key(stage, default, {"corpus": "x"}) == stage_key(stage, explicit, {"corpus": "x"})
    assert stage_key(stage, unigram, {"corpus": "x"}) != stage_key(stage, default, {"corpus": "x"})


def test_unknown_algorithm_and_missing_files_are_clear_errors(tmp_path):
    from lmloom.config import validate_config
    from lmloom.errors import ConfigError

    with pytest.raises(ConfigError, match="tokenizer.algorithm"):
        validate_config(get_stage("tokenizer.train").config, {"algorithm": "bytepiece"}, "tokenizer")
    with pytest.raises(LmloomError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / SENTENCEPIECE_MODEL_FILE).write_bytes(b"not a model")
    pytest.importorskip("sentencepiece")
    with pytest.raises(LmloomError, match="not a valid SentencePiece model"):
        load_tokenizer(tmp_path)


# -- training and generation with a SentencePiece tokenizer -------------------------------------------


def test_checkpoint_carries_the_sentencepiece_model_to_generation(store, corpus):
    pytest.importorskip("sentencepiece")
    recipe = tokenize_recipe(corpus.id, "sentencepiece-unigram").model_dump()
    recipe["stages"]["pretrain"] = {
        "stage": "train.pretrain",
        "inputs": {"shards": "shards", "tokenizer": "tokenizer"},
        "config": {
            "model": {"seq_len": 16, "d_model": 32, "n_layers": 1, "n_heads": 2},
            "batch_size": 2,
            "max_steps": 2,
            "precision": "fp32",
            "compile": False,
            "eval_windows": 2,
            "final_eval_windows": 2,
        },
    }
    recipe["stages"]["samples"] = {
        "stage": "serve.samples",
        "inputs": {"checkpoint": "pretrain"},
        "config": {"prompts": ["def ", "Ünïcödé 🚀"], "max_new_tokens": 4},
    }
    results = {r.name: r.artifact for r in run_recipe(Recipe.model_validate(recipe), RunContext(store=store))}
    checkpoint = results["pretrain"]
    assert SENTENCEPIECE_MODEL_FILE in checkpoint.manifest.files
    assert "tokenizer.json" not in checkpoint.manifest.files

    from lmloom.serve.loading import load_checkpoint_artifact

    _, tok = load_checkpoint_artifact(checkpoint)
    assert tok.algorithm == "sentencepiece-unigram"
    assert tok.encode("Ünïcödé 🚀") == load_tokenizer(results["tokenizer"]).encode("Ünïcödé 🚀")
    samples = results["samples"].read_json("samples.json")
    assert [s["prompt"] for s in samples] == ["def ", "Ünïcödé 🚀"]
    assert all(isinstance(s["completion"], str) and s["tokens"] <= 4 for s in samples)


# -- through the real CLI, with the store encrypted at rest ------------------------------------------

CLI_RECIPE = """
name: sentencepiece-encrypted
security: {{encrypt: true}}
stages:
  corpus:
    stage: data.prepare
    config:
      sources: [{{type: text-dir, path: {corpus}, patterns: ["*.py"]}}]
      val_fraction: 0.25
  tokenizer:
    stage: tokenizer.train
    inputs: {{corpus: corpus}}
    config: {{algorithm: sentencepiece-unigram, vocab_size: 600}}
  shards: {{stage: tokenizer.encode, inputs: {{corpus: corpus, tokenizer: tokenizer}}}}
"""


def test_lmloom_run_trains_and_encodes_with_an_encrypted_sentencepiece_model(tmp_path):
    pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in TRAIN_FILES + VAL_FILES:
        (corpus / name.replace("/", "_")).write_text(stdlib_texts([name])[0], encoding="utf-8")
    (tmp_path / "recipe.yaml").write_text(CLI_RECIPE.format(corpus=corpus))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMLOOM_")}
    env.update(LMLOOM_HOME=str(tmp_path / "store"), LMLOOM_KEK_FILE=str(tmp_path / "kek"), COLUMNS="200")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "lmloom", *args], env=env, capture_output=True, text=True, timeout=300
        )

    init = cli("keys", "init", "--generate-kek-file", str(tmp_path / "kek"))
    assert init.returncode == 0, init.stderr
    proc = cli("run", str(tmp_path / "recipe.yaml"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sentencepiece-unigram" in proc.stdout
    assert re.search(r"exact round trips \(val\)\s*│ 100\.00% of documents", proc.stdout)
    assert re.search(r"unknown tokens \(val\)\s*│ 0\.0000%", proc.stdout)
    # At rest the model is ciphertext: the encode stage could only have read it through the store.
    (model_file,) = (tmp_path / "store" / "artifacts").glob(f"*/{SENTENCEPIECE_MODEL_FILE}")
    assert model_file.read_bytes().startswith(MAGIC)
