"""Provenance: every source file that fed a corpus is recorded with the sha256 of the bytes read,
pinned sources refuse changed input before anything is published, and lineage walks from any
artifact down to those files (text, JSON, Graphviz DOT)."""

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from lmloom.artifacts.lineage import SOURCES_FILE, build_lineage, listing_digest
from lmloom.artifacts.store import ArtifactStore
from lmloom.config import Recipe
from lmloom.context import RunContext
from lmloom.data.provenance import SourceLedger
from lmloom.data.sources import JsonlSource, read_source
from lmloom.data.stdlib_corpus import StdlibSource, read_stdlib
from lmloom.errors import ConfigError, IntegrityError
from lmloom.pipeline import plan, run_recipe

STDLIB = Path(sysconfig.get_paths()["stdlib"])
LONG = "is a document long enough to be kept by the length filter"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sha256sum_digest(root: Path, relpaths) -> str:
    """What `cd ROOT && sha256sum FILES | sha256sum` prints for the files sorted by name."""
    listing = "".join(f"{sha256(root / rel)}  {rel}\n" for rel in sorted(relpaths))
    return hashlib.sha256(listing.encode()).hexdigest()


def corpus_recipe(sources, **stages):
    spec = {"corpus": {"stage": "data.prepare", "config": {"sources": sources, "min_chars": 20}}}
    spec.update(stages)
    return Recipe.model_validate({"name": "t", "stages": spec})


def source_records(artifact):
    return [json.loads(line) for line in artifact.lines(SOURCES_FILE)]


@pytest.fixture
def data(tmp_path):
    """A text-dir (with a duplicate, a short file, bad bytes, a hidden and an unmatched file) and a
    directory of JSON Lines files, one of them gzipped."""
    texts = tmp_path / "texts"
    (texts / "sub").mkdir(parents=True)
    (texts / ".hidden").mkdir()
    for i in range(3):
        (texts / f"doc{i}.txt").write_text(f"text file {i} {LONG}\n")
    (texts / "sub" / "notes.md").write_text(f"# notes\n{LONG}\n")
    (texts / "dup.txt").write_text(f"text file 0 {LONG}\n")
    (texts / "short.txt").write_text("tiny")
    (texts / "bad.txt").write_bytes(b"bad \xff\xfe bytes " + LONG.encode())
    (texts / "skipped.rst").write_text(f"not matched by the patterns {LONG}")
    (texts / ".hidden" / "h.txt").write_text(f"hidden {LONG}")

    records = tmp_path / "records"
    (records / "part").mkdir(parents=True)
    lines = [json.dumps({"text": f"record {i} {LONG}"}) for i in range(4)] + ["{not json"]
    (records / "a.jsonl").write_text("\n".join(lines) + "\n")
    gz_lines = [json.dumps({"text": f"gzipped record {i} {LONG}"}) for i in range(3)]
    (records / "part" / "b.jsonl.gz").write_bytes(gzip.compress("\n".join(gz_lines).encode()))
    return tmp_path


def sources(data, **pins):
    return [
        {"type": "text-dir", "path": str(data / "texts"), **pins.get("texts", {})},
        {"type": "jsonl", "path": str(data / "records"), **pins.get("records", {})},
    ]


TEXT_FILES = ["bad.txt", "doc0.txt", "doc1.txt", "doc2.txt", "dup.txt", "short.txt", "sub/notes.md"]
JSONL_FILES = ["a.jsonl", "part/b.jsonl.gz"]


# -- sources.jsonl --------------------------------------------------------------------------------


def test_sources_jsonl_lists_exactly_the_files_read_with_their_sha256(tmp_path, data):
    store = ArtifactStore(tmp_path / "store")
    [result] = run_recipe(corpus_recipe(sources(data)), RunContext(store))
    corpus = result.artifact
    records = source_records(corpus)

    expected = [(0, data / "texts" / rel, rel) for rel in TEXT_FILES] + [
        (1, data / "records" / rel, rel) for rel in JSONL_FILES
    ]
    assert [(r["source_index"], r["path"], r["relpath"]) for r in records] == [
        (index, str(path), rel) for index, path, rel in expected
    ]
    for record, (_, path, _) in zip(records, expected, strict=True):
        assert record["sha256"] == sha256(path)  # of the bytes on disk, compressed for .gz
        assert record["size"] == path.stat().st_size
        assert Path(record["path"]).is_absolute()
    assert {r["source"] for r in records[:7]} == {f"text-dir:{data / 'texts'}"}
    assert {r["type"] for r in records[7:]} == {"jsonl"}

    counts = {r["relpath"]: (r["documents"], r["kept"], r["removed"], r["rejected"]) for r in records}
    assert counts["doc0.txt"] == (1, 1, 0, 0)
    assert counts["dup.txt"] == (1, 0, 1, 0)  # a duplicate of doc0.txt
    assert counts["short.txt"] == (1, 0, 1, 0)
    assert counts["bad.txt"] == (0, 0, 0, 1)  # read and hashed, but rejected as invalid UTF-8
    assert counts["a.jsonl"] == (4, 4, 0, 1)
    assert counts["part/b.jsonl.gz"] == (3, 3, 0, 0)
    meta = corpus.manifest.metadata
    assert sum(c[1] for c in counts.values()) == meta["documents"]["kept"]
    assert sum(c[0] for c in counts.values()) == meta["documents"]["read"]

    # the manifest holds counts and digests only; the per-source digest is what a `digest:` pin takes
    assert meta["source_files"] == {
        "count": 9,
        "bytes": sum(path.stat().st_size for _, path, _ in expected),
        "unreadable": 0,
        "digest": listing_digest((str(path), sha256(path)) for _, path, _ in expected),
    }
    assert meta["sources"][0]["digest"] == sha256sum_digest(data / "texts", TEXT_FILES)
    assert meta["sources"][1]["digest"] == sha256sum_digest(data / "records", JSONL_FILES)
    assert [s["files"] for s in meta["sources"]] == [7, 2]
    assert "bad \\xff" not in json.dumps(corpus.manifest.to_json_dict())


def test_stdlib_source_records_every_py_file_read_and_the_topics_file(tmp_path):
    config = [{"type": "python-stdlib", "max_bytes": 150_000}]
    [result] = run_recipe(corpus_recipe(config), RunContext(ArtifactStore(tmp_path)))
    corpus = result.artifact
    records = {r["relpath"]: r for r in source_records(corpus)}
    assert "pydoc_data/topics.py" in records  # read whole for the topic documents
    assert all(
        r["source"] == "python-stdlib" and r["path"] == str(STDLIB / rel) for rel, r in records.items()
    )

    # every code document of the corpus came from a recorded file, and nothing unread is recorded
    docs = [json.loads(line) for name in ("train.jsonl", "val.jsonl") for line in corpus.lines(name)]
    code_files = {d["meta"]["path"] for d in docs if d["kind"] == "code"}
    assert code_files <= records.keys()
    assert all(r["documents"] >= 1 for r in records.values())
    assert len(records) < 200  # the cap: far fewer than the ~1,300 files of the library

    for rel in [*sorted(code_files)[:3], "pydoc_data/topics.py"]:  # spot-check against hashlib
        assert records[rel]["sha256"] == sha256(STDLIB / rel)
        assert records[rel]["size"] == (STDLIB / rel).stat().st_size
    assert corpus.manifest.metadata["sources"][0]["files"] == len(records)


def test_jsonl_hashes_the_bytes_on_disk_also_for_a_truncated_gzip(tmp_path):
    data = gzip.compress(b"\n".join(json.dumps({"text": f"record {i}"}).encode() for i in range(3000)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    ledger = SourceLedger("cut", "jsonl")
    records = list(read_source(JsonlSource(path=path), ledger=ledger))
    assert records[-1].reason == "unreadable-file" and len(records) > 1
    [entry] = ledger.files
    assert (entry.relpath, entry.sha256, entry.size) == ("cut.jsonl.gz", sha256(path), path.stat().st_size)
    assert all(record.origin is entry for record in records)


# -- pins -----------------------------------------------------------------------------------------


def pinned(data):
    texts, records = data / "texts", data / "records"
    return sources(
        data,
        texts={
            "pins": {"doc1.txt": sha256(texts / "doc1.txt")},
            "digest": sha256sum_digest(texts, TEXT_FILES),
        },
        records={"pins": {"part/b.jsonl.gz": sha256(records / "part" / "b.jsonl.gz").upper()}},
    )


def test_matching_pins_pass_and_are_part_of_the_stage_key(tmp_path, data):
    store = ArtifactStore(tmp_path / "store")
    [result] = run_recipe(corpus_recipe(pinned(data)), RunContext(store))
    config = result.artifact.manifest.config["sources"]
    assert config[0]["pins"] == {"doc1.txt": sha256(data / "texts" / "doc1.txt")}
    assert config[1]["pins"]["part/b.jsonl.gz"] == sha256(
        data / "records" / "part" / "b.jsonl.gz"
    )  # lowercased
    [unpinned] = run_recipe(corpus_recipe(sources(data)), RunContext(store))
    assert unpinned.artifact.manifest.stage_key != result.artifact.manifest.stage_key

    single = data / "records" / "a.jsonl"
    [one] = run_recipe(
        corpus_recipe([{"type": "jsonl", "path": str(single), "sha256": sha256(single)}]), RunContext(store)
    )
    assert source_records(one.artifact)[0]["sha256"] == sha256(single)


def refused(store, recipe) -> str:
    before = store.ids()
    with pytest.raises(IntegrityError) as exc:
        run_recipe(recipe, RunContext(store))
    assert store.ids() == before  # nothing published
    assert not any((store.root / "staging").iterdir())
    return str(exc.value)


def test_a_changed_pinned_file_is_refused_naming_the_file_and_both_digests(tmp_path, data):
    store = ArtifactStore(tmp_path / "store")
    recipe = corpus_recipe(pinned(data))
    doc1 = data / "texts" / "doc1.txt"
    old = sha256(doc1)
    doc1.write_text(f"text file 1, edited {LONG}\n")
    message = refused(store, recipe)
    assert (
        str(doc1) in message and f"expected sha256 {old}" in message and f"actual {sha256(doc1)}" in message
    )

    # a streamed (gzipped) file is checked once read: its documents never reach a published corpus
    doc1.write_text(f"text file 1 {LONG}\n")
    assert sha256(doc1) == old
    gz = data / "records" / "part" / "b.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "a poisoned record that is long enough to keep"}\n'))
    message = refused(store, recipe)
    assert str(gz) in message and f"actual {sha256(gz)}" in message

    single = data / "records" / "a.jsonl"
    pin = {"type": "jsonl", "path": str(single), "sha256": "0" * 64}
    assert f"{single} does not match its pin" in refused(store, corpus_recipe([pin]))


def test_a_pinned_digest_refuses_added_or_removed_files(tmp_path, data):
    store = ArtifactStore(tmp_path / "store")
    texts = data / "texts"
    recipe = corpus_recipe(sources(data, texts={"digest": sha256sum_digest(texts, TEXT_FILES)}))
    (texts / "new.txt").write_text(f"an added file {LONG}\n")
    message = refused(store, recipe)
    assert f"the 8 files read from {texts} do not match the pinned digest" in message
    (texts / "new.txt").unlink()
    (texts / "doc2.txt").unlink()
    assert "the 6 files read" in refused(store, recipe)


def test_a_missing_pinned_file_is_refused(tmp_path, data):
    store = ArtifactStore(tmp_path / "store")
    recipe = corpus_recipe(pinned(data))
    doc1 = data / "texts" / "doc1.txt"
    pin = sha256(doc1)
    doc1.unlink()
    assert f"pinned file {doc1} is missing (expected sha256 {pin})" in refused(store, recipe)

    single = data / "records" / "a.jsonl"
    pin = sha256(single)
    recipe = corpus_recipe([{"type": "jsonl", "path": str(single), "sha256": pin}])
    single.unlink()
    assert f"pinned file {single} is missing (expected sha256 {pin})" in refused(store, recipe)

    # a pinned file the source would not read (its patterns do not match) is refused too
    other = {"type": "text-dir", "path": str(data / "texts"), "pins": {"skipped.rst": "a" * 64}}
    message = refused(store, corpus_recipe([other]))
    assert f"pinned file {data / 'texts' / 'skipped.rst'} is not among the files this source reads" in message


def test_stdlib_pins_cover_the_files_the_cap_takes(tmp_path):
    root = tmp_path / "lib"
    (root / "pydoc_data").mkdir(parents=True)
    (root / "small.py").write_text('"""A small module."""\n')
    (root / "big.py").write_text("x = 1\n" * 1000)
    (root / "pydoc_data" / "topics.py").write_text("topics = {'if': 'The if statement'}\n")
    pins = {rel: sha256(root / rel) for rel in ("small.py", "pydoc_data/topics.py")}
    docs = list(read_stdlib(StdlibSource(root=root, pins=pins, max_bytes=500)))
    assert {d.id for d in docs} == {"small.py", "small.py#docstring", "pydoc-topic:if"}

    with pytest.raises(IntegrityError, match=r"pinned file .*big\.py was not read \(left out by a size cap"):
        list(read_stdlib(StdlibSource(root=root, pins={"big.py": sha256(root / "big.py")}, max_bytes=500)))
    (root / "pydoc_data" / "topics.py").write_text("topics = {'if': 'Changed'}\n")
    with pytest.raises(IntegrityError, match=r"topics\.py does not match its pin"):
        list(read_stdlib(StdlibSource(root=root, pins=pins)))


def test_bad_pins_are_config_errors_naming_the_key(tmp_path, data):
    with pytest.raises(ConfigError, match=r"stages\.corpus\.config\.sources\.0\.sha256 = 'abc'"):
        plan(corpus_recipe([{"type": "jsonl", "path": "x.jsonl", "sha256": "abc"}]))
    with pytest.raises(ConfigError, match=r"sources\.0\.pins\.\.\./x\.txt"):
        plan(corpus_recipe([{"type": "text-dir", "path": "x", "pins": {"../x.txt": "a" * 64}}]))
    with pytest.raises(ConfigError, match="sha256 pins a single file"):
        run_recipe(
            corpus_recipe([{"type": "jsonl", "path": str(data / "records"), "sha256": "a" * 64}]),
            RunContext(ArtifactStore(tmp_path / "store")),
        )


# -- lineage --------------------------------------------------------------------------------------


def full_recipe(data, texts="texts"):
    return corpus_recipe(
        [{"type": "text-dir", "path": str(data / texts)}, {"type": "jsonl", "path": str(data / "records")}],
        tokenizer={"stage": "tokenizer.train", "inputs": {"corpus": "corpus"}, "config": {"vocab_size": 300}},
        shards={"stage": "tokenizer.encode", "inputs": {"corpus": "corpus", "tokenizer": "tokenizer"}},
    )


@pytest.fixture
def made(tmp_path, data):
    """corpus -> tokenizer -> shards over files with awkward names (quotes, backslash, spaces, [markup])."""
    odd = data / "texts" / 'we"ird \\ [bold]name.txt'
    odd.write_text(f"an oddly named file {LONG}\n")
    store = ArtifactStore(tmp_path / "store")
    results = {r.name: r.artifact for r in run_recipe(full_recipe(data), RunContext(store))}
    return store, results, odd


def test_lineage_from_shards_reaches_every_source_file(made, data):
    store, made_by, odd = made
    graph = build_lineage(store, made_by["shards"].id[:10]).to_json()
    nodes = {node["id"]: node for node in graph["nodes"]}
    assert graph["root"] == made_by["shards"].id
    artifacts = {n["kind"]: n for n in nodes.values() if n["type"] == "artifact"}
    assert set(artifacts) == {"shards", "tokenizer", "corpus"}  # the corpus once, though reached twice
    assert artifacts["corpus"]["stage"] == "data.prepare" and artifacts["corpus"]["principal"]

    files = {n["path"]: n for n in nodes.values() if n["type"] == "file"}
    on_disk = [data / "texts" / rel for rel in [*TEXT_FILES, odd.name]] + [
        data / "records" / r for r in JSONL_FILES
    ]
    assert set(files) == {str(path) for path in on_disk}
    for path in on_disk:
        assert files[str(path)]["sha256"] == sha256(path) and files[str(path)]["size"] == path.stat().st_size
    assert graph["summary"] == {"artifacts": 3, "source_files": len(on_disk)}

    # follow edges (they point the way data flowed) from every file up to the shards
    up: dict[str, set[str]] = {}
    for edge in graph["edges"]:
        assert edge["from"] in nodes and edge["to"] in nodes and edge["role"]
        up.setdefault(edge["from"], set()).add(edge["to"])
    roles = {(nodes[e["from"]].get("kind"), nodes[e["to"]].get("kind")): e["role"] for e in graph["edges"]}
    assert roles[("corpus", "shards")] == "corpus" and roles[("tokenizer", "shards")] == "tokenizer"

    def reaches(start: str, goal: str) -> bool:
        todo, seen = [start], set()
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            seen.add(node)
            todo.extend(up.get(node, set()) - seen)
        return False

    assert all(reaches(f, f"artifact:{made_by['shards'].id}") for f in nodes if f.startswith("file:"))
    sources_nodes = [n for n in nodes.values() if n["type"] == "source"]
    assert [n["digest"] for n in sources_nodes] == [
        s["digest"] for s in made_by["corpus"].manifest.metadata["sources"]
    ]
    assert not any(
        n["type"] == "file" for n in build_lineage(store, made_by["shards"].id).to_json(files=False)["nodes"]
    )


DOT_STATEMENT = re.compile(r'^\s*"((?:[^"\\]|\\.)*)"(?:\s*->\s*"((?:[^"\\]|\\.)*)")?\s*(\[.*\])?;$')


def check_dot(text: str) -> tuple[set[str], list[tuple[str, str]]]:
    """A structural check of DOT: one digraph, balanced braces and brackets outside strings, every
    statement a quoted node or edge, every edge's endpoints declared. Returns (nodes, edges)."""
    assert text.startswith("digraph ") and text.rstrip().endswith("}")
    depth, brackets, in_string, escaped = 0, 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
            continue
        if char == '"':
            in_string = True
        depth += {"{": 1, "}": -1}.get(char, 0)
        brackets += {"[": 1, "]": -1}.get(char, 0)
        assert depth >= 0 and brackets >= 0
    assert depth == 0 and brackets == 0 and not in_string
    nodes, edges = set(), []
    for line in text.splitlines()[1:-1]:
        if re.match(r"^\s*(graph|node|edge) \[.*\];$", line):
            continue
        match = DOT_STATEMENT.match(line)
        assert match, f"not a quoted node or edge statement: {line}"
        if match.group(2) is None:
            nodes.add(match.group(1))
        else:
            edges.append((match.group(1), match.group(2)))
    assert edges and all(a in nodes and b in nodes for a, b in edges)
    return nodes, edges


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pyparsing, inside pydot
def test_dot_output_is_well_formed_graphviz(made):
    store, made_by, odd = made
    lineage = build_lineage(store, made_by["shards"].id)
    nodes, edges = check_dot(lineage.to_dot())
    assert sum(n.startswith("file:") for n in nodes) == len(lineage.source_files())
    escaped = 'we\\"ird \\\\ [bold]name.txt'  # the quote and the backslash escaped inside the DOT string
    assert escaped in lineage.to_dot()
    small, _ = check_dot(lineage.to_dot(files=False))
    assert not any(n.startswith("file:") for n in small) and any(n.startswith("source:") for n in small)

    import pydot  # an independent DOT parser (the dev extra installs it; no graphviz binary needed)

    [graph] = pydot.graph_from_dot_data(lineage.to_dot())
    assert len(graph.get_edges()) == len(edges)


# -- the command line -----------------------------------------------------------------------------


def lmloom(store, *args, check=0):
    env = {**os.environ, "LMLOOM_HOME": str(store), "COLUMNS": "100"}
    proc = subprocess.run([sys.executable, "-m", "lmloom", *args], capture_output=True, text=True, env=env)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == check, proc.stdout + proc.stderr
    return proc


def test_cli_lineage_text_json_and_dot(made, data):
    store, made_by, odd = made
    shards = made_by["shards"].id[:12]
    text = lmloom(store.root, "artifacts", "lineage", shards).stdout
    assert text.splitlines()[0].startswith(f"shards {shards}")
    for path in [data / "texts" / "doc0.txt", odd, data / "records" / "part" / "b.jsonl.gz"]:
        assert f"{sha256(path)}  {path}" in text  # whole lines, not wrapped at the terminal width
    assert "source text-dir:" in text and "(shown above)" in text and "3 artifacts, 10 source files" in text
    quiet = lmloom(store.root, "artifacts", "lineage", shards, "--no-files").stdout
    assert "source text-dir:" in quiet and sha256(data / "texts" / "doc0.txt") not in quiet

    graph = json.loads(lmloom(store.root, "artifacts", "lineage", shards, "--format", "json").stdout)
    assert {n["path"] for n in graph["nodes"] if n["type"] == "file"} >= {str(odd)}
    check_dot(lmloom(store.root, "artifacts", "lineage", shards, "-f", "dot").stdout)


def test_cli_text_summarises_large_sources_unless_files(tmp_path, data):
    many = data / "many"
    many.mkdir()
    for i in range(30):
        (many / f"f{i:02d}.txt").write_text(f"file {i} {LONG}\n")
    store = ArtifactStore(tmp_path / "store")
    results = {r.name: r.artifact for r in run_recipe(full_recipe(data, texts="many"), RunContext(store))}
    ref = results["tokenizer"].id[:12]
    text = lmloom(store.root, "artifacts", "lineage", ref).stdout
    assert "30 files" in text and "… and 25 more files (--files lists them all)" in text
    assert str(many / "f04.txt") in text and str(many / "f05.txt") not in text
    assert str(data / "records" / "a.jsonl") in text  # a small source is listed whole
    full = lmloom(store.root, "artifacts", "lineage", ref, "--files").stdout
    assert all(f"{sha256(p)}  {p}" in full for p in many.iterdir()) and "more files" not in full


def test_cli_lineage_refuses_a_tampered_source_record(made):
    store, made_by, _ = made
    listing = made_by["corpus"].path / SOURCES_FILE
    listing.write_bytes(listing.read_bytes().replace(b'"size": ', b'"size":  ', 1))
    proc = lmloom(store.root, "artifacts", "lineage", made_by["shards"].id[:12], check=3)
    assert f"file {SOURCES_FILE}" in proc.stderr
