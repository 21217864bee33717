import pytest

from lmloom.artifacts.store import ArtifactStore
from lmloom.config import Recipe
from lmloom.context import RunContext
from lmloom.errors import ConfigError, DataError, IntegrityError
from lmloom.pipeline import plan, run_recipe
from lmloom.security.audit import AuditLog

TEXT = "The quick brown fox jumps over the lazy dog, again and again, number {i}.\n"


@pytest.fixture
def corpus_dir(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(12):
        (folder / f"doc{i:02d}.txt").write_text(TEXT.format(i=i) * 20)
    return folder


def recipe(corpus_dir, **stages):
    base = {
        "corpus": {
            "stage": "data.prepare",
            "config": {"sources": [{"type": "text-dir", "path": str(corpus_dir)}], "val_fraction": 0.2},
        },
        "tokenizer": {
            "stage": "tokenizer.train",
            "inputs": {"corpus": "corpus"},
            "config": {"vocab_size": 300},
        },
    }
    base.update(stages)
    return Recipe.model_validate({"name": "t", "stages": base})


def test_plan_orders_stages_by_inputs(corpus_dir):
    r = Recipe.model_validate(
        {
            "name": "t",
            "stages": {
                "tokenizer": {"stage": "tokenizer.train", "inputs": {"corpus": "corpus"}},
                "corpus": {"stage": "data.prepare"},
            },
        }
    )
    assert [s.name for s in plan(r)] == ["corpus", "tokenizer"]


def test_plan_rejects_bad_wiring(corpus_dir):
    with pytest.raises(ConfigError, match=r"stages.tokenizer.inputs.corpus = 'corpse': no such stage"):
        plan(recipe(corpus_dir, tokenizer={"stage": "tokenizer.train", "inputs": {"corpus": "corpse"}}))
    with pytest.raises(
        ConfigError,
        match=r"stages.tokenizer.inputs: missing corpus; tokenizer.train takes inputs: corpus \(corpus\)",
    ):
        plan(recipe(corpus_dir, tokenizer={"stage": "tokenizer.train"}))
    with pytest.raises(ConfigError, match="unknown stage 'tokenizer.trian'; available: .*tokenizer.train"):
        plan(recipe(corpus_dir, tokenizer={"stage": "tokenizer.trian"}))
    cyclic = {
        "a": {"stage": "tokenizer.encode", "inputs": {"corpus": "b", "tokenizer": "b"}},
        "b": {"stage": "tokenizer.train", "inputs": {"corpus": "a"}},
    }
    with pytest.raises(ConfigError, match="cycle: a -> b -> a"):
        plan(Recipe.model_validate({"name": "t", "stages": cyclic}))


def test_kind_mismatch_is_a_config_error(tmp_path, corpus_dir):
    ctx = RunContext(ArtifactStore(tmp_path / "store"))
    first = run_recipe(recipe(corpus_dir), ctx)
    wrong = Recipe.model_validate(
        {
            "name": "t",
            "stages": {
                "tok": {"stage": "tokenizer.train", "inputs": {"corpus": f"artifact:{first[1].artifact.id}"}}
            },
        }
    )
    with pytest.raises(ConfigError, match="is a tokenizer, tokenizer.train needs a corpus"):
        run_recipe(wrong, ctx)


def test_rerun_reuses_and_audits_every_stage(tmp_path, corpus_dir):
    ctx = RunContext(ArtifactStore(tmp_path / "store"), principal="tester@ci")
    first = run_recipe(recipe(corpus_dir), ctx)
    second = run_recipe(recipe(corpus_dir), ctx)
    assert [r.reused for r in first] == [False, False]
    assert [r.reused for r in second] == [True, True]
    assert [r.artifact.id for r in first] == [r.artifact.id for r in second]
    assert first[1].artifact.manifest.inputs == {"corpus": first[0].artifact.id}

    log = AuditLog(ctx.store.root / "audit.jsonl")
    assert log.verify().ok
    events = [(e["event"], e["step"]) for e in log.entries()]
    assert events == [
        ("stage.start", "corpus"),
        ("stage.end", "corpus"),
        ("stage.start", "tokenizer"),
        ("stage.end", "tokenizer"),
        ("stage.reuse", "corpus"),
        ("stage.reuse", "tokenizer"),
    ]
    end = [e for e in log.entries() if e["event"] == "stage.end"][1]
    assert end["outcome"] == "ok" and end["outputs"] == [first[1].artifact.id]
    assert end["principal"] == "tester@ci"
    start = [e for e in log.entries() if e["event"] == "stage.start"][1]
    assert start["inputs"] == [first[0].artifact.id] and len(start["config_hash"]) == 64


def test_config_change_and_edited_source_make_new_artifacts(tmp_path, corpus_dir):
    ctx = RunContext(ArtifactStore(tmp_path / "store"))
    first = run_recipe(recipe(corpus_dir), ctx)
    (corpus_dir / "doc00.txt").write_text("A brand new document with different words in it. " * 10)
    second = run_recipe(recipe(corpus_dir), ctx)
    assert not second[0].reused and second[0].artifact.id != first[0].artifact.id
    assert not second[1].reused  # its input changed, so its key changed


def test_tampered_cached_artifact_is_refused_by_consumers(tmp_path, corpus_dir):
    ctx = RunContext(ArtifactStore(tmp_path / "store"))
    first = run_recipe(recipe(corpus_dir), ctx)
    train = first[0].artifact.path / "train.jsonl"
    data = bytearray(train.read_bytes())
    data[10] ^= 0x20
    train.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"train.jsonl does not match its sha256"):
        run_recipe(recipe(corpus_dir), ctx)


def test_failed_stage_is_audited_and_leaves_no_artifact(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    ctx = RunContext(ArtifactStore(tmp_path / "store"))
    with pytest.raises(DataError, match="no documents"):
        run_recipe(recipe(empty), ctx)
    assert ctx.store.ids() == []
    assert list((ctx.store.root / "staging").iterdir()) == []
    end = list(AuditLog(ctx.store.root / "audit.jsonl").entries())[-1]
    assert end["event"] == "stage.end" and end["outcome"] == "error" and "DataError" in end["error"]


def test_two_runs_of_one_stage_at_once_run_it_once(tmp_path):
    """Two `lmloom run`s of the same recipe at once: one runs each stage, the other waits for it and
    reuses the result, instead of both writing one work folder (checkpoints, metrics) at the same time."""
    import fcntl
    import json
    import os
    import subprocess
    import sys
    import threading

    from lmloom.config import load_recipe
    from lmloom.pipeline import stage_key

    corpus = tmp_path / "docs"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"d{i}.txt").write_text(f"Document {i} has several plain words in it, enough to keep. " * 3)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        "name: data-only\nstages:\n  corpus:\n    stage: data.prepare\n    config:\n"
        f"      sources: [{{type: text-dir, path: {corpus}}}]\n      executor: {{workers: 1}}\n"
    )
    store = tmp_path / "store"
    (store / "locks").mkdir(parents=True)
    (step,) = plan(load_recipe(str(recipe_file)))
    key = stage_key(step.stage, step.config, {})
    env = {**os.environ, "LMLOOM_HOME": str(store)}

    def launch():
        return subprocess.Popen(
            [sys.executable, "-m", "lmloom", "run", str(recipe_file)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip

    with open(store / "locks" / f"{key}.lock", "a") as held:  # a first run, busy with the stage
        fcntl.flock(held, fcntl.LOCK_EX)
        runs = [launch(), launch()]
        waiting = [threading.Event() for _ in runs]
        seen: list[list[str]] = [[], []]

        def read(i: int) -> None:
            for line in runs[i].stderr:
                seen[i].append(line)
                if "waiting for it" in line:
                    waiting[i].set()

        readers = [threading.Thread(target=read, args=(i,)) for i in range(2)]
        for reader in readers:
            reader.start()
        assert all(event.wait(120) for event in waiting), seen  # both queue behind the busy stage
        fcntl.flock(held, fcntl.LOCK_UN)
    for run, reader in zip(runs, readers, strict=True):
        assert run.wait(120) == 0, "".join(sum(seen, []))
        reader.join()
    events = [json.loads(line)["event"] for line in (store / "audit.jsonl").read_text().splitlines()]
    assert events.count("stage.start") == 1 and events.count("stage.reuse") == 1
    assert len(list((store / "artifacts").iterdir())) == 1
