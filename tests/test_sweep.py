"""`lmloom sweep`: trials are normal runs in the store, pruning stops a bad trial early and leaves
nothing reusable, the study resumes, and a wrong space key is named."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

pytest.importorskip("optuna")

from lmloom.artifacts.store import ArtifactStore  # noqa: E402
from lmloom.config import load_recipe  # noqa: E402
from lmloom.context import RunContext  # noqa: E402
from lmloom.errors import ConfigError  # noqa: E402
from lmloom.security.context import store_audit_log  # noqa: E402
from lmloom.sweep import SweepSpace, builtin_spaces, check_space, load_space, run_sweep  # noqa: E402

MAX_STEPS = 24
RECIPE = """
name: tiny
stages:
  corpus:
    stage: data.prepare
    config:
      sources: [{{type: text-dir, path: {corpus}, patterns: ["*.py"]}}]
      val_fraction: 0.1
  tokenizer: {{stage: tokenizer.train, inputs: {{corpus: corpus}}, config: {{vocab_size: 300}}}}
  shards: {{stage: tokenizer.encode, inputs: {{corpus: corpus, tokenizer: tokenizer}}}}
  pretrain:
    stage: train.pretrain
    inputs: {{shards: shards, tokenizer: tokenizer}}
    config:
      model: {{seq_len: 32, d_model: 32, n_layers: 1, n_heads: 2}}
      batch_size: 4
      max_steps: {steps}
      precision: fp32
      compile: false
      eval_every: 4
      eval_windows: 4
      final_eval_windows: 8
      checkpoint_every: 4
      log_every: 4
      optim: {{lr: 0.003, warmup_steps: 0}}
  samples: {{stage: serve.samples, inputs: {{checkpoint: pretrain}}}}
"""


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "shlex.py", "fnmatch.py", "bisect.py"):
        (folder / name).write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(RECIPE.format(corpus=folder, steps=MAX_STEPS))
    return path


def write_space(tmp_path, **fields) -> Path:
    space = {"objective": {"step": "pretrain"}, **fields}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def lmloom(store, *args):
    env = {**os.environ, "LMLOOM_HOME": str(store), "COLUMNS": "220", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lmloom", *args], capture_output=True, text=True, env=env)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def kinds(store: ArtifactStore) -> list[str]:
    return sorted(store.read_manifest(i).kind for i in store.ids())


def test_a_sweep_runs_trials_as_verified_runs_writes_its_summary_and_resumes(tmp_path, recipe_path):
    store_dir = tmp_path / "store"
    space = write_space(
        tmp_path,
        params={
            "pretrain.optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
            "pretrain.optim.warmup_steps": {"type": "int", "low": 0, "high": 8, "step": 4},
        },
        pruner={"type": "none"},
        sampler={"type": "random", "seed": 3},
    )
    args = ("sweep", str(recipe_path), "--space", str(space), "--study", "s1")
    first = lmloom(store_dir, *args, "--trials", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    again = lmloom(store_dir, *args, "--trials", "4")  # the study exists: continuing it is explicit
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = lmloom(store_dir, *args, "--trials", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Sweep s1: minimize val_loss of step pretrain" in resumed.stdout and "★" in resumed.stdout

    folder = store_dir / "sweeps" / "s1"
    summary = json.loads((folder / "sweep.json").read_text())
    trials = summary["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3] and summary["counts"]["complete"] == 4
    assert len({json.dumps(t["params"], sort_keys=True) for t in trials}) == 4  # resumed: new values
    store = ArtifactStore(store_dir)
    for t in trials:
        artifact = store.open(t["artifact"])  # verified: hashes of every file
        manifest = artifact.manifest
        assert (
            manifest.stage == "train.pretrain"
            and manifest.config["optim"]["lr"] == t["params"]["pretrain.optim.lr"]
        )
        assert set(manifest.inputs) == {"shards", "tokenizer"}  # lineage to the shared data steps
        assert t["steps"] == MAX_STEPS and t["value"] == manifest.metadata["val_loss"]
        assert sorted(int(s) for s in t["intermediate"]) == list(range(4, MAX_STEPS + 1, 4))
    best = min(trials, key=lambda t: t["value"])
    assert summary["best_trial"] == best["number"]
    # The data steps ran once; the recipe's later step (samples) never ran.
    assert kinds(store) == ["checkpoint"] * 4 + ["corpus", "shards", "tokenizer"]
    entries = list(store_audit_log(store_dir).entries())
    assert [e["state"] for e in entries if e["event"] == "sweep.trial"] == ["complete"] * 4
    assert sum(e["event"] == "stage.reuse" and e["step"] == "tokenizer" for e in entries) == 3
    page = (folder / "sweep.html").read_text()
    assert "<svg" in page and "val_loss by trial" in page and 'http-equiv="Content-Security-Policy"' in page
    assert "src=" not in page and "<script" not in page  # nothing to fetch, nothing to run


def test_pruning_stops_a_bad_trial_early_and_leaves_nothing_to_reuse(tmp_path, recipe_path):
    store = ArtifactStore(tmp_path / "store")
    good, hopeless = 1e-2, 1e-7  # a learning rate this small leaves the model where it started
    space = SweepSpace.model_validate(
        {
            "objective": {"step": "pretrain"},
            "params": {"pretrain.optim.lr": {"type": "categorical", "choices": [good, hopeless]}},
            # the same hopeless values twice: the second must train again, not find the first's work
            "enqueue": [{"pretrain.optim.lr": v} for v in (good, hopeless, hopeless)],
            "pruner": {"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
        }
    )
    sweep = check_space(load_recipe(str(recipe_path)), space, "space")
    result = run_sweep(sweep, RunContext(store), study="prune", trials=3)

    states = [t.state for t in result.trials]
    assert states == ["complete", "pruned", "pruned"], [(t.state, t.error) for t in result.trials]
    complete = result.trials[0]
    for pruned in result.trials[1:]:
        assert pruned.steps < MAX_STEPS and pruned.artifact is None  # stopped before its last step
        assert pruned.intermediate and max(pruned.intermediate) == pruned.steps
        assert pruned.value > complete.intermediate[pruned.steps]  # worse than the trial it lost to
    # One checkpoint in the store (the complete trial's), no scratch state left by the pruned ones.
    assert kinds(store) == ["checkpoint", "corpus", "shards", "tokenizer"]
    assert not [p for p in (store.root / "work").iterdir() if any(p.iterdir())]
    assert not list((store.root / "staging").iterdir())
    entries = list(store_audit_log(store.root).entries())
    ends = [e for e in entries if e["event"] == "stage.end" and e["step"] == "pretrain"]
    assert [e["outcome"] for e in ends] == ["ok", "stopped", "stopped"] and "TrialPruned" in ends[1]["error"]
    assert [e["state"] for e in entries if e["event"] == "sweep.trial"] == states
    summary = json.loads(result.json_path.read_text())
    assert summary["counts"]["pruned"] == 2 and summary["best_trial"] == 0
    assert "trial 1 pruned" in result.html_path.read_text()


def test_a_wrong_space_key_or_value_is_named(tmp_path, recipe_path):
    recipe = load_recipe(str(recipe_path))

    def check(**fields):
        check_space(
            recipe, SweepSpace.model_validate({"objective": {"step": "pretrain"}, **fields}), "s.yaml"
        )

    lr = {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}
    with pytest.raises(
        ConfigError,
        match=r"s.yaml: params.pretrain.optim.lrr = 0.0001: stages.pretrain.config.optim.lrr: unknown key .*allowed: .*lr",
    ):
        check(params={"pretrain.optim.lrr": lr})
    with pytest.raises(
        ConfigError,
        match=r"params.pretrian.optim.lr: 'pretrian' is not a step of recipe 'tiny' \(steps: corpus, tokenizer, shards, pretrain, samples\)",
    ):
        check(params={"pretrian.optim.lr": lr})
    with pytest.raises(
        ConfigError, match=r"params.samples.max_new_tokens: step 'samples' does not run in this sweep"
    ):
        check(params={"samples.max_new_tokens": {"type": "int", "low": 4, "high": 8}})
    with pytest.raises(ConfigError, match=r"params.pretrain.model.n_layers = 0: .*n_layers"):
        check(params={"pretrain.model.n_layers": {"type": "categorical", "choices": [2, 0]}})
    with pytest.raises(ConfigError, match=r"set.pretrain.max_step = 5: .*unknown key"):
        check(params={"pretrain.optim.lr": lr}, set={"pretrain.max_step": 5})
    with pytest.raises(ConfigError, match=r"objective.step = 'pretrained' is not a step"):
        check_space(
            recipe,
            SweepSpace.model_validate(
                {"objective": {"step": "pretrained"}, "params": {"pretrain.optim.lr": lr}}
            ),
            "s.yaml",
        )
    bad = tmp_path / "bad.yaml"
    bad.write_text("params:\n  pretrain.optim.lr: {type: float, low: 0.01, high: 0.001}\n")
    with pytest.raises(
        ConfigError, match=r"space .*bad.yaml: params.pretrain.optim.lr.*high \(0.001\) is below low"
    ):
        load_space(str(bad))
    bad.write_text("params:\n  pretrain.optim.lr: {type: floaty, low: 0.01, high: 0.1}\n")
    with pytest.raises(
        ConfigError, match=r"params.pretrain.optim.lr: .*float, int, categorical|params.pretrain.optim.lr"
    ):
        load_space(str(bad))
    # The shipped example checks against the default recipe.
    assert "quickstart-pretrain" in builtin_spaces()
    space, where = load_space("quickstart-pretrain")
    sweep = check_space(load_recipe("quickstart"), space, where)
    assert sweep.steps == ["corpus", "tokenizer", "shards", "pretrain"] and space.trials >= 6
