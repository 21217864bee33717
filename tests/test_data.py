import gzip
import json
import random
import sysconfig
from pathlib import Path

import pytest

from lmloom.artifacts.store import ArtifactStore
from lmloom.config import Recipe
from lmloom.context import RunContext
from lmloom.data.documents import Document, Reject
from lmloom.data.sources import JsonlSource, TextDirSource, read_source
from lmloom.data.split import SplitWriter, split_of, val_score
from lmloom.data.stage import FILES, PREPARE, PrepareConfig, fingerprint
from lmloom.data.stdlib_corpus import StdlibSource, module_docstring, read_stdlib
from lmloom.data.steps import (
    ExactDedup,
    MinChars,
    NormalizeUnicode,
    StripControlChars,
    build_steps,
    run_steps,
)
from lmloom.errors import ConfigError, DataError
from lmloom.pipeline import plan, run_recipe

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def doc(text, id="d", kind="prose"):
    return Document(id, text, kind, "test")


def split_records(records):
    records = list(records)
    docs = [r for r in records if isinstance(r, Document)]
    rejects = [r for r in records if isinstance(r, Reject)]
    return docs, rejects


# -- python-stdlib ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stdlib_docs():
    """The default built-in corpus, read once (about 2 s): everything fits under the default cap."""
    notes = {}
    docs, rejects = split_records(read_stdlib(StdlibSource(), notes))
    return docs, rejects, notes


def test_stdlib_default_is_code_and_docs_of_the_standard_library_only(stdlib_docs):
    docs, rejects, notes = stdlib_docs
    assert rejects == []
    assert notes["left_out_by_cap"] == 0
    ids = [d.id for d in docs]
    assert len(ids) == len(set(ids))
    code = {d.id for d in docs if d.kind == "code"}
    assert {"json/__init__.py", "asyncio/tasks.py", "os.py"} <= code
    for d in docs:
        if d.kind == "code":
            assert d.id.endswith(".py") and (STDLIB / d.id).is_file()
            parts = d.id.split("/")
            assert not {"site-packages", "dist-packages", "__pycache__"} & set(parts)
            assert not {"test", "tests", "idle_test"} & set(parts[:-1])
    assert "pydoc_data/topics.py" not in code  # its text is the topic documents


def test_stdlib_docstrings_come_from_the_parsed_source(stdlib_docs):
    docs = {d.id: d for d in stdlib_docs[0]}
    docstring = docs["json/__init__.py#docstring"]
    assert docstring.kind == "prose" and docstring.meta == {"path": "json/__init__.py", "module": "json"}
    assert docstring.text.startswith("JSON (JavaScript Object Notation)")
    assert docstring.text.split("\n")[0] == json.__doc__.split("\n")[0]
    assert "antigravity.py" in docs  # read as text: nothing opened a browser


def test_stdlib_includes_pydoc_topics(stdlib_docs):
    topics = {d.meta["topic"]: d for d in stdlib_docs[0] if d.id.startswith("pydoc-topic:")}
    assert {"assert", "for", "with"} <= set(topics)
    assert topics["assert"].kind == "prose" and 'The "assert" statement' in topics["assert"].text


def test_stdlib_cap_is_respected_deterministic_and_representative():
    cfg = StdlibSource(max_bytes=1_000_000, include_tests=True)
    first_notes = {}
    first, _ = split_records(read_stdlib(cfg, first_notes))
    second, _ = split_records(read_stdlib(cfg))
    assert [(d.id, d.text) for d in first] == [(d.id, d.text) for d in second]
    assert sum(len(d.text.encode()) for d in first) <= 1_000_000
    assert first_notes["bytes_available"] > 10_000_000 and first_notes["left_out_by_cap"] > 0
    # a hash-ordered cut, not an alphabetical one: packages from across the alphabet and some docs
    initials = {d.id[0].lower() for d in first if d.kind == "code"}
    assert len(initials) >= 8
    assert any(d.id.startswith("test/") for d in first)
    assert any(d.kind == "prose" for d in first)


def make_fake_stdlib(root: Path, reverse: bool = False) -> Path:
    files = {
        "os.py": '"""Operating system things."""\nimport sys\n',
        "pkg/__init__.py": '"""A package docstring."""\n',
        "pkg/mod.py": "x = 1\n",
        "antigravity.py": (
            f'"""Would have side effects."""\nopen({str(root / "IMPORTED")!r}, "w").close()\n'
            "raise SystemExit\n"
        ),
        "py2.py": 'print "not python 3"\n',
        "test/test_os.py": '"""Tests for os."""\n',
        "pkg/tests/test_mod.py": "assert True\n",
        "site-packages/thirdparty.py": '"""Not the stdlib."""\n',
        "dist-packages/other.py": '"""Not the stdlib either."""\n',
        "pkg/__pycache__/mod.py": "cached = True\n",
        "notes.txt": "not python",
        "pydoc_data/__init__.py": "",
        "pydoc_data/topics.py": "# generated\ntopics = {'if': 'The if statement\\n', 'bad': 3}\n",
    }
    items = sorted(files.items(), reverse=reverse)
    for rel, text in items:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (root / "latin1.py").write_bytes(b"# -*- coding: latin-1 -*-\nname = 'caf\xe9'\n")
    return root


def test_stdlib_reading_never_imports_and_excludes_site_packages(tmp_path):
    root = make_fake_stdlib(tmp_path / "lib")
    docs, rejects = split_records(read_stdlib(StdlibSource(root=root)))
    ids = sorted(d.id for d in docs)
    assert ids == [
        "antigravity.py",
        "antigravity.py#docstring",
        "os.py",
        "os.py#docstring",
        "pkg/__init__.py",
        "pkg/__init__.py#docstring",
        "pkg/mod.py",
        "py2.py",  # kept as code; it has no docstring because it does not parse
        "pydoc-topic:if",
        "pydoc_data/__init__.py",
    ]
    assert not (root / "IMPORTED").exists()
    assert [(r.location, r.reason) for r in rejects] == [("latin1.py:2", "invalid-utf8")]
    assert "caf\\xe9" in rejects[0].excerpt


def test_stdlib_tests_flag_and_filesystem_order(tmp_path):
    a = make_fake_stdlib(tmp_path / "a")
    b = make_fake_stdlib(tmp_path / "b", reverse=True)
    docs_a, _ = split_records(read_stdlib(StdlibSource(root=a, include_tests=True)))
    docs_b, _ = split_records(read_stdlib(StdlibSource(root=b, include_tests=True)))
    assert [d.id for d in docs_a] == [d.id for d in docs_b]
    assert {"test/test_os.py", "pkg/tests/test_mod.py"} <= {d.id for d in docs_a}


def test_missing_stdlib_root_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        list(read_stdlib(StdlibSource(root=tmp_path / "nowhere")))


def test_module_docstring_of_unparsable_source_is_none():
    assert module_docstring('"""Doc."""\nx = (') is None
    assert module_docstring('"""  Doc.\n\n    more\n"""') == "Doc.\n\nmore"


# -- jsonl and text-dir ---------------------------------------------------------------------------

JSONL_LINES = [
    b'{"text": "a good record", "id": "first"}',
    b"this is not json {",
    b'{"text": "caf\xe9 in latin-1"}',
    b'{"body": "the field is missing"}',
    b'{"text": 42}',
    b"[1, 2, 3]",
    b"",
    b'{"text": "lone \\ud800 surrogate"}',
    b'{"text": "another good record"}\r',
]


def write_jsonl(path: Path, lines=JSONL_LINES) -> Path:
    data = b"\n".join(lines) + b"\n"
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", ["data.jsonl", "data.jsonl.gz"])
def test_jsonl_malformed_records_become_rejects_and_reading_goes_on(tmp_path, name):
    path = write_jsonl(tmp_path / name)
    docs, rejects = split_records(read_source(JsonlSource(path=path, id_field="id")))
    assert [(d.id, d.text) for d in docs] == [
        ("first", "a good record"),
        (f"{name}:9", "another good record"),
    ]
    assert docs[1].meta == {"file": name, "line": 9}
    assert [(r.location, r.reason) for r in rejects] == [
        (f"{path}:2", "invalid-json"),
        (f"{path}:3", "invalid-utf8"),
        (f"{path}:4", "missing-field"),
        (f"{path}:5", "field-not-string"),
        (f"{path}:6", "not-an-object"),
        (f"{path}:8", "invalid-unicode"),
    ]
    assert "this is not json" in rejects[0].excerpt and rejects[0].detail
    assert "'text'" in rejects[2].detail and "int" in rejects[3].detail


def test_jsonl_text_field_and_truncated_gzip(tmp_path):
    lines = [json.dumps({"content": f"record number {i}"}).encode() for i in range(2000)]
    data = gzip.compress(b"\n".join(lines))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    docs, rejects = split_records(read_source(JsonlSource(path=path, text_field="content")))
    assert 0 < len(docs) < 2000 and docs[0].text == "record number 0"
    assert [r.reason for r in rejects] == ["unreadable-file"]
    assert rejects[0].location == f"{path}:{len(docs) + 1}"


def test_jsonl_directory_and_missing_path(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [b'{"text": "from b"}'])
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "a.jsonl.gz", [b'{"text": "from sub/a"}'])
    docs, _ = split_records(read_source(JsonlSource(path=tmp_path)))
    assert [(d.id, d.text) for d in docs] == [("b.jsonl:1", "from b"), ("sub/a.jsonl.gz:1", "from sub/a")]
    with pytest.raises(DataError, match=r"missing\.jsonl does not exist"):
        list(read_source(JsonlSource(path=tmp_path / "missing.jsonl")))


def test_text_dir_reads_matching_files_sorted_and_rejects_bad_bytes(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "z.txt").write_text("zed")
    (tmp_path / "sub" / "a.md").write_text("# A\n")
    (tmp_path / "code.py").write_text("x = 1")
    (tmp_path / ".hidden" / "h.txt").write_text("hidden")
    (tmp_path / "bom.txt").write_bytes("\ufeffwith a byte order mark".encode())
    (tmp_path / "bad.txt").write_bytes(b"line one\nline \xff two\n")
    docs, rejects = split_records(read_source(TextDirSource(path=tmp_path)))
    assert [(d.id, d.text) for d in docs] == [
        ("bom.txt", "with a byte order mark"),
        ("sub/a.md", "# A\n"),
        ("z.txt", "zed"),
    ]
    assert docs[0].source == f"text-dir:{tmp_path}" and docs[0].kind == "prose"
    assert [(r.location, r.reason) for r in rejects] == [(f"{tmp_path / 'bad.txt'}:2", "invalid-utf8")]
    code, _ = split_records(read_source(TextDirSource(path=tmp_path, patterns=["*.py"], kind="code")))
    assert [(d.id, d.kind) for d in code] == [("code.py", "code")]
    with pytest.raises(DataError, match="nope does not exist"):
        list(read_source(TextDirSource(path=tmp_path / "nope")))


# -- steps ---------------------------------------------------------------------------------------


def test_normalize_nfc_nfkc_and_counts():
    step = NormalizeUnicode("NFC")
    out = list(step.run([doc("cafe\u0301"), doc("plain")]))
    assert [d.text for d in out] == ["caf\u00e9", "plain"]
    s = step.stats
    assert (s.docs_in, s.docs_out, s.modified, s.bytes_in, s.bytes_out) == (2, 2, 1, 11, 10)
    assert [d.text for d in NormalizeUnicode("NFKC").run([doc("\ufb01ne x\u00b2")])] == ["fine x2"]
    assert [type(s).__name__ for s in build_steps("none", 0, False)] == ["StripControlChars"]


def test_control_characters_are_stripped_but_newlines_and_tabs_kept():
    step = StripControlChars()
    out = list(step.run([doc("a\r\nb\rc\x00d\x1b[0m\te\x7f\x85f\n"), doc("clean\ttext\n")]))
    assert [d.text for d in out] == ["a\nb\ncd[0m\tef\n", "clean\ttext\n"]
    assert (step.stats.modified, step.stats.docs_out) == (1, 2)
    assert step.stats.bytes_in - step.stats.bytes_out == 6  # \r of \r\n, \x00, \x1b, \x7f, 2-byte \x85


def test_min_chars_drops_short_documents_with_a_reason():
    step = MinChars(5)
    dropped = []
    out = list(
        step.run(
            [doc("four"), doc("   abcd   "), doc("long enough")], lambda d, s, r: dropped.append(r.reason)
        )
    )
    assert [d.text for d in out] == ["long enough"]
    assert step.stats.removed == {"short": 2} and dropped == ["short", "short"]


def test_exact_dedup_after_normalisation():
    steps = build_steps("NFC", 0, True)
    docs = [doc("caf\u00e9", "a"), doc("cafe\u0301", "b"), doc("other", "c"), doc("caf\u00e9", "d")]
    out = list(run_steps(docs, steps))
    assert [d.id for d in out] == ["a", "c"]
    dedup = steps[-1]
    assert isinstance(dedup, ExactDedup)
    assert (dedup.stats.docs_in, dedup.stats.docs_out, dedup.stats.removed) == (4, 2, {"duplicate": 2})


# -- split ---------------------------------------------------------------------------------------


def run_split(docs, val_fraction):
    got = {"train": [], "val": []}
    writer = SplitWriter({s: got[s].append for s in got}, val_fraction)
    for d in docs:
        writer.add(d)
    writer.finish()
    return {s: {d.id for d in docs} for s, docs in got.items()}


def test_split_depends_only_on_the_text():
    docs = [doc(f"document number {i}", f"d{i}") for i in range(400)]
    full = run_split(docs, 0.1)
    assert 15 < len(full["val"]) < 70
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    assert run_split(shuffled, 0.1) == full
    subset = run_split(docs[::3], 0.1)
    assert subset["val"] == full["val"] & {d.id for d in docs[::3]}
    for d in docs:
        assert (d.id in full["val"]) == (split_of(d.text, 0.1) == "val") == (val_score(d.text) < 0.1)


def test_split_keeps_both_splits_non_empty_from_two_documents():
    docs = [doc(f"text {i}", f"d{i}") for i in range(5)]
    low = run_split(docs, 1e-9)
    assert len(low["val"]) == 1 and len(low["train"]) == 4
    assert run_split(docs[::-1], 1e-9) == low
    moved = min(docs, key=lambda d: val_score(d.text))
    assert low["val"] == {moved.id}
    high = run_split(docs[:2], 0.5)
    assert len(high["val"]) == 1 and len(high["train"]) == 1
    assert run_split(docs[:1], 0.01) == {"train": {"d0"}, "val": set()}
    assert run_split(docs, 0.0)["val"] == set()


# -- the stage through the pipeline ---------------------------------------------------------------


def recipe(config):
    return Recipe(name="t", stages={"corpus": {"stage": "data.prepare", "config": config}})


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def corpus_dir(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(30):
        (texts / f"doc{i:02d}.txt").write_text(f"Document {i} says something long enough to keep.\r\n")
    (texts / "dup.txt").write_text("Document 3 says something long enough to keep.\n")
    (texts / "short.txt").write_text("tiny")
    (texts / "bad.txt").write_bytes(b"\xff\xfe broken")
    write_jsonl(tmp_path / "records.jsonl")
    return tmp_path


def test_stage_end_to_end_writes_corpus_and_reuses_it(tmp_path, corpus_dir):
    store = ArtifactStore(tmp_path / "store")
    config = {
        "sources": [
            {"type": "text-dir", "path": str(corpus_dir / "texts")},
            {"type": "jsonl", "path": str(corpus_dir / "records.jsonl")},
        ],
        "min_chars": 10,
        "val_fraction": 0.1,
    }
    [result] = run_recipe(recipe(config), RunContext(store))
    artifact = result.artifact
    assert not result.reused and artifact.kind == "corpus"
    assert (
        set(artifact.manifest.files)
        == set(FILES)
        == {"train.jsonl", "val.jsonl", "rejects.jsonl", "removed.jsonl", "edited.jsonl", "sources.jsonl"}
    )

    train, val = read_jsonl(artifact.file("train.jsonl")), read_jsonl(artifact.file("val.jsonl"))
    assert len(train) + len(val) == 32 and len(val) >= 1
    record = next(r for r in train + val if r["id"] == "doc05.txt")
    assert record == {
        "id": "doc05.txt",
        "text": "Document 5 says something long enough to keep.\n",  # \r\n normalised
        "kind": "prose",
        "source": f"text-dir:{corpus_dir / 'texts'}",
        "meta": {"path": "doc05.txt"},
    }
    for r in val:
        assert split_of(r["text"], 0.1) == "val" or len(val) == 1

    rejects = read_jsonl(artifact.file("rejects.jsonl"))
    assert sorted(r["reason"] for r in rejects) == sorted(
        [
            "invalid-utf8",
            "invalid-json",
            "invalid-utf8",
            "missing-field",
            "field-not-string",
            "not-an-object",
            "invalid-unicode",
        ]
    )
    removed = read_jsonl(artifact.file("removed.jsonl"))
    assert sorted((r["id"], r["reason"], r["text"]) for r in removed) == [
        ("dup.txt", "duplicate", "Document 3 says something long enough to keep.\n"),
        ("short.txt", "short", "tiny"),
    ]

    meta = artifact.manifest.metadata
    assert meta["documents"] == {
        "read": 34,
        "kept": 32,
        "train": len(train),
        "val": len(val),
        "removed": {"duplicate": 1, "short": 1},
        "kept_by_kind": {"prose": 32},
    }
    assert meta["rejects"]["by_reason"]["invalid-utf8"] == 2 and meta["rejects"]["total"] == 7
    assert [s["name"] for s in meta["steps"]] == ["normalize", "control_chars", "min_chars", "dedup"]
    assert (
        meta["steps"][1]["modified"] == 30
        and meta["steps"][1]["bytes_in"] - meta["steps"][1]["bytes_out"] == 30
    )
    assert [s["documents"] for s in meta["sources"]] == [32, 2]
    assert meta["bytes"]["kept"] == sum(len(r["text"].encode()) for r in train + val)

    rows = dict(PREPARE.summarize(artifact.manifest))
    assert rows["documents kept"] == "32 of 34 (prose 32)"
    assert rows["removed"] == "duplicate 1, short 1"
    assert rows["rejected records"].startswith("7 (")
    assert rows["train / val docs"] == f"{len(train)} / {len(val)}"

    [again] = run_recipe(recipe(config), RunContext(store))
    assert again.reused and again.artifact.id == artifact.id


def test_stage_on_the_builtin_stdlib_corpus(tmp_path):
    config = {"sources": [{"type": "python-stdlib", "max_bytes": 300_000}]}
    [result] = run_recipe(recipe(config), RunContext(ArtifactStore(tmp_path)))
    meta = result.artifact.manifest.metadata
    assert 0 < meta["bytes"]["kept"] <= 300_000
    assert meta["documents"]["val"] >= 1 and set(meta["documents"]["kept_by_kind"]) == {"code", "prose"}
    assert meta["sources"][0]["root"] == str(STDLIB)


def test_empty_corpus_is_a_clear_data_error(tmp_path, corpus_dir):
    config = {"sources": [{"type": "jsonl", "path": str(corpus_dir / "records.jsonl")}], "min_chars": 1000}
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(DataError) as exc:
        run_recipe(recipe(config), RunContext(store))
    message = str(exc.value)
    assert "no documents left: read 2 documents" in message
    assert "removed short 2 (min_chars=1000)" in message and "rejected 6 records (" in message
    assert store.ids() == []  # nothing half-made was published

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="read 0 documents .* check the source paths"):
        run_recipe(
            recipe({"sources": [{"type": "text-dir", "path": str(tmp_path / "empty")}]}), RunContext(store)
        )
    with pytest.raises(DataError, match="gone does not exist"):
        run_recipe(
            recipe({"sources": [{"type": "text-dir", "path": str(tmp_path / "gone")}]}), RunContext(store)
        )


def test_config_errors_name_the_key():
    with pytest.raises(
        ConfigError, match=r"stages\.corpus\.config\.min_char: unknown key .*allowed: .*min_chars"
    ):
        plan(recipe({"min_char": 3}))
    with pytest.raises(
        ConfigError,
        match=r"stages\.corpus\.config\.sources\.0\.patern: unknown key .*allowed: digest, kind, name, path, patterns, pins, sensitive, storage_options, type",
    ):
        plan(recipe({"sources": [{"type": "text-dir", "path": "x", "patern": ["*.txt"]}]}))
    with pytest.raises(ConfigError, match=r"sources\.0.*'csv'.*python-stdlib.*text-dir.*jsonl"):
        plan(recipe({"sources": [{"type": "csv"}]}))
    with pytest.raises(
        ConfigError, match=r"sources\.0: needs a 'type' key, one of: python-stdlib, text-dir, jsonl"
    ):
        plan(recipe({"sources": [{"path": "x"}]}))
    with pytest.raises(ConfigError, match=r"normalize = 'NFD'"):
        plan(recipe({"normalize": "NFD"}))


def test_default_config_is_the_stdlib():
    config = PrepareConfig()
    assert [s.type for s in config.sources] == ["python-stdlib"]
    assert config.sources[0].root == STDLIB and config.sources[0].max_bytes == 20_000_000
    assert (config.normalize, config.min_chars, config.dedup, config.val_fraction) == ("NFC", 32, True, 0.02)


def test_fingerprint_notices_edited_input(tmp_path, corpus_dir):
    config = PrepareConfig(sources=[{"type": "text-dir", "path": corpus_dir / "texts"}])
    before = fingerprint(config)
    assert fingerprint(config) == before
    (corpus_dir / "texts" / "doc00.txt").write_text("Document 0 now says something else entirely.\n")
    assert fingerprint(config) != before
    assert len(fingerprint(PrepareConfig())[0]) == 64
