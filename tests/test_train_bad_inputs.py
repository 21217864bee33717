"""Bad input to the training and adaptation stages (train.*, tune.sft, align.*): one clear error naming the
key or file, given before anything trains where it can be, never a traceback; nothing published."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from lmloom.artifacts.store import ArtifactStore
from lmloom.config import Recipe, load_recipe, validate_config
from lmloom.context import RunContext
from lmloom.errors import ConfigError, DataError, LmloomError
from lmloom.pipeline import plan, run_plan, run_recipe
from lmloom.tokenizers.shards import TokenShards

RECIPE = """
name: bad-inputs
stages:
  corpus:
    stage: data.prepare
    config:
      sources: [{{type: text-dir, path: {corpus}, patterns: ["*.py"]}}]
      val_fraction: 0.2
      executor: {{workers: 1}}
  tokenizer: {{stage: tokenizer.train, inputs: {{corpus: corpus}}, config: {{vocab_size: 400}}}}
  shards: {{stage: tokenizer.encode, inputs: {{corpus: corpus, tokenizer: tokenizer}}}}
  pretrain:
    stage: train.pretrain
    inputs: {{shards: shards, tokenizer: tokenizer}}
    config:
      model: {{seq_len: 128, d_model: 32, n_layers: 1, n_heads: 2}}
      batch_size: 2
      max_steps: 2
      precision: fp32
      compile: false
      eval_windows: 2
      final_eval_windows: 2
"""
FAST = {"precision": "fp32", "batch_size": 2, "max_steps": 1, "eval_windows": 2, "final_eval_windows": 2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py"):
        (corpus / name).write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    recipe = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    recipe.write_text(RECIPE.format(corpus=corpus))
    store = ArtifactStore(tmp_path_factory.mktemp("store"))
    runs = {r.name: r.artifact for r in run_recipe(load_recipe(str(recipe)), RunContext(store))}
    return store, runs


def one_stage(stage: str, inputs: dict[str, str], config: dict, name: str = "step") -> Recipe:
    refs = {role: f"artifact:{ref}" for role, ref in inputs.items()}
    raw = {"name": "one", "stages": {name: {"stage": stage, "inputs": refs, "config": config}}}
    return Recipe.model_validate(raw)


def run_one(store, stage: str, inputs: dict[str, str], config: dict, name: str = "step"):
    return run_plan(plan(one_stage(stage, inputs, config, name)), RunContext(store))


def kinds(store) -> list[str]:
    return sorted(store.read_manifest(a).kind for a in (p.name for p in (store.root / "artifacts").iterdir()))


# -- adapters: settings the model cannot take --------------------------------------------------------


def test_lora_on_a_block_past_the_models_depth_is_a_config_error(tiny):
    store, runs = tiny
    before = kinds(store)
    config = {**FAST, "method": "lora", "lora": {"layers_to_transform": [5]}, "safety_eval": False}
    with pytest.raises(
        ConfigError, match=r"^stages\.sft\.config\.lora: layers_to_transform \[5\] names a block"
    ):
        run_one(store, "tune.sft", {"checkpoint": runs["pretrain"].id}, config, name="sft")
    assert kinds(store) == before  # nothing published


def test_a_prefix_as_long_as_the_context_is_a_config_error(tiny):
    store, runs = tiny
    config = {**FAST, "method": "prefix", "prefix": {"n_prefix": 128}, "safety_eval": False}
    with pytest.raises(ConfigError, match=r"^stages\.sft\.config\.prefix: n_prefix \(128\) leaves no room"):
        run_one(store, "tune.sft", {"checkpoint": runs["pretrain"].id}, config, name="sft")


def test_bad_adapter_settings_are_refused_when_the_recipe_is_planned():
    recipe = one_stage("tune.sft", {"checkpoint": "0" * 12}, {"method": "lora", "lora": {"rank": 0}}, "sft")
    with pytest.raises(
        ConfigError, match=r"^stages\.sft\.config: lora\.rank = 0: .*greater than or equal to 1$"
    ):
        plan(recipe)
    # a block for the other method is checked too: `tune lora --set prefix.n_prefix=0` is a typo'd intent
    recipe = one_stage(
        "tune.sft", {"checkpoint": "0" * 12}, {"method": "lora", "prefix": {"n_prefix": 0}}, "sft"
    )
    with pytest.raises(ConfigError, match=r"prefix\.n_prefix = 0"):
        plan(recipe)


# -- data files --------------------------------------------------------------------------------------


def test_a_missing_sft_data_file_or_a_directory_is_one_data_error(tmp_path):
    from lmloom.tune.formats import load_sft

    with pytest.raises(DataError, match=r"missing\.jsonl: no such file$"):
        load_sft(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="a directory, not a data file"):
        load_sft(tmp_path)


def test_a_prompts_file_without_a_valid_row_says_why(tmp_path):
    from lmloom.align.grpo_stage import load_prompt_tasks

    messages = tmp_path / "sft.jsonl"  # an SFT file given where prompts belong
    messages.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(
        DataError, match=r"(?s)none of its 1 rows is valid\n.*bad_row: 1 \(line 1: missing or empty 'prompt'"
    ):
        load_prompt_tasks(str(messages))
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'\xff\xfe{"prompt": "x"}\n')
    with pytest.raises(DataError, match="binary.jsonl: not UTF-8 text"):
        load_prompt_tasks(str(binary))


# -- config values refused when the recipe is planned ------------------------------------------------


@pytest.mark.parametrize(
    "stage, inputs",
    [
        ("train.pretrain", {"shards": "0" * 12, "tokenizer": "1" * 12}),
        ("train.continue", {"checkpoint": "0" * 12, "shards": "1" * 12}),
        ("train.objective", {"shards": "0" * 12, "tokenizer": "1" * 12}),
    ],
)
def test_a_negative_seed_is_refused_when_planned(stage, inputs):
    # The window loader refuses it only once the stage runs, as "seed = -1" without the key, exit 1.
    with pytest.raises(ConfigError, match=r"^stages\.step\.config\.seed = -1: .*greater than or equal to 0"):
        plan(one_stage(stage, inputs, {"seed": -1}))


def test_an_infinite_learning_rate_or_beta_is_refused_when_planned():
    from lmloom.align.stage import DPOConfig
    from lmloom.train.stage import PretrainConfig

    # YAML's .inf passes lr > 0; it only failed after the stability guard's five rollbacks, and for
    # DPO's beta with "lower the learning rate".
    with pytest.raises(ConfigError, match=r"^stages\.pretrain\.config\.optim\.lr = inf: .*finite"):
        validate_config(PretrainConfig, {"optim": {"lr": float("inf")}}, "stages.pretrain.config")
    with pytest.raises(ConfigError, match=r"^stages\.dpo\.config\.beta = inf: .*finite"):
        validate_config(DPOConfig, {"beta": float("inf")}, "stages.dpo.config")


def test_a_block_check_names_the_block_without_echoing_every_value():
    from lmloom.align.stage import PairDataConfig

    with pytest.raises(ConfigError) as info:
        validate_config(PairDataConfig, {"compile": True, "data": "x.jsonl"}, "stages.dpo.config")
    assert str(info.value) == (
        "stages.dpo.config: compile = true is not supported by the preference stages yet; set it to false"
    )


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model": {"n_embd": 30}}, r"^stages\.step\.config: model: n_embd: unknown key \(value 30\)$"),
        (
            {"architecture": "bert", "objective": "mlm", "model": {"hidden": 3}},
            r"^stages\.step\.config: model: hidden: unknown key \(value 3\)$",
        ),
        ({"preset": "nosuch"}, r"^stages\.step\.config: unknown GPT preset 'nosuch'; choose from"),
    ],
)
def test_objective_model_overrides_of_every_architecture_are_checked_when_planned(config, message):
    recipe = one_stage("train.objective", {"shards": "0" * 12, "tokenizer": "1" * 12}, config)
    with pytest.raises(ConfigError, match=message):
        plan(recipe)


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"batch_size": 4, "batch_size_ramp": {"steps": 3, "start": 8}},
            r"batch_size_ramp\.start = 8 is not below batch_size = 4",
        ),
        (
            {"model": {"seq_len": 32}, "seq_len_warmup": {"steps": 3}},
            r"seq_len_warmup\.start = 64 is not below model\.seq_len = 32",
        ),
    ],
)
def test_a_ramp_or_warmup_that_cannot_grow_is_refused_instead_of_ignored(config, message):
    recipe = one_stage("train.pretrain", {"shards": "0" * 12, "tokenizer": "1" * 12}, config)
    with pytest.raises(ConfigError, match=r"^stages\.step\.config: " + message):
        plan(recipe)


# -- checks that need the inputs: before training, naming the key ------------------------------------


def test_a_model_vocabulary_below_the_tokenizers_names_the_key(tiny):
    store, runs = tiny
    inputs = {"shards": runs["shards"].id, "tokenizer": runs["tokenizer"].id}
    config = {**FAST, "compile": False, "model": {"seq_len": 32, "d_model": 32, "n_layers": 1, "n_heads": 2}}
    config["model"]["vocab_size"] = 100
    with pytest.raises(ConfigError, match=r"^stages\.step\.config\.model\.vocab_size = 100: smaller than"):
        run_one(store, "train.pretrain", inputs, config)


def test_a_validation_split_too_short_for_one_window_fails_before_training(tiny):
    store, runs = tiny
    val_tokens = TokenShards(runs["shards"], "val").n_tokens
    assert TokenShards(runs["shards"], "train").n_tokens > val_tokens + 1
    inputs = {"shards": runs["shards"].id, "tokenizer": runs["tokenizer"].id}
    shape = {"seq_len": val_tokens, "d_model": 32, "n_layers": 1, "n_heads": 2}
    config = {
        **FAST,
        "batch_size": 1,
        "max_steps": 2,
        "checkpoint_every": 1,
        "compile": False,
        "model": shape,
    }
    with pytest.raises(DataError, match=r"split 'val' has .* tokens; a window of seq_len="):
        run_one(store, "train.pretrain", inputs, config)
    # It used to train (and checkpoint) first and fail at the final validation pass.
    assert not list((store.root / "work").glob("*/checkpoints/step-*"))


def test_lmloom_train_on_a_corpus_says_it_is_not_shards(tiny):
    store, runs = tiny
    env = {**os.environ, "LMLOOM_HOME": str(store.root), "OMP_NUM_THREADS": "1"}
    env.pop("LMLOOM_TOKEN", None)
    proc = subprocess.run(
        [sys.executable, "-m", "lmloom", "train", runs["corpus"].short_id],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: artifact {runs['corpus'].short_id} is a corpus, not token shards")


def test_a_prefix_tuned_checkpoint_is_refused_where_its_prefix_would_be_lost(tiny, tmp_path):
    store, runs = tiny
    sft = tmp_path / "sft.jsonl"
    sft.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"q {i}"},
                        {"role": "assistant", "content": f"a {i}"},
                    ]
                }
            )
            + "\n"
            for i in range(40)
        )
    )
    prefix = {**FAST, "compile": False, "method": "prefix", "prefix": {"n_prefix": 2}, "safety_eval": False}
    [tuned] = run_one(
        store, "tune.sft", {"checkpoint": runs["pretrain"].id}, {**prefix, "data": str(sft)}, "sft"
    )
    assert tuned.artifact.manifest.metadata["adapter_only"]  # its model files are the base model
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps({"prompt": f"p {i}", "chosen": "yes", "rejected": "no"}) + "\n" for i in range(20))
    )
    dpo = {**FAST, "data": str(pairs), "safety_eval": False}
    # DPO used to load those files and train the base, publishing a model without the tuning.
    with pytest.raises(ConfigError, match=f"checkpoint {tuned.artifact.short_id} is a prefix-tuning adapter"):
        run_one(store, "align.dpo", {"checkpoint": tuned.artifact.id}, dpo, "dpo")
    # Generating, chatting, serving and evaluating loaded the same files and ran the base model.
    from lmloom.serve.loading import load_checkpoint_artifact

    with pytest.raises(LmloomError, match="lmloom's inference does not apply"):
        load_checkpoint_artifact(tuned.artifact)


def test_lmloom_stages_name_explains_every_key_of_one_stage():
    env = {**os.environ, "COLUMNS": "250"}
    proc = subprocess.run(
        [sys.executable, "-m", "lmloom", "stages", "train.pretrain"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("│")[1].strip(): line for line in proc.stdout.splitlines() if line.count("│") == 5}
    assert "peak learning rate" in rows["optim.lr"] and "0.003" in rows["optim.lr"]
    assert (
        "fp32 | bf16 | fp16" in rows["precision"] and "model.seq_len" in rows and "guard.spike_zscore" in rows
    )
    proc = subprocess.run(
        [sys.executable, "-m", "lmloom", "stages", "train.pretrian"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.startswith(
        "error: unknown stage 'train.pretrian'; available:"
    )


def test_multi_task_weights_must_be_non_negative_and_not_all_zero(tiny):
    store, runs = tiny
    inputs = {"shards": runs["shards"].id, "tokenizer": runs["tokenizer"].id, "code": runs["shards"].id}
    shape = {"seq_len": 32, "d_model": 32, "n_layers": 1, "n_heads": 2}
    config = {**FAST, "compile": False, "model": shape}
    # A negative weight made the mixture's cumulative bounds non-monotone (silently wrong task shares).
    with pytest.raises(
        ConfigError, match=r"^stages\.step\.config\.task_weights: weights must be >= 0; negative for code"
    ):
        plan(one_stage("train.pretrain", inputs, {**config, "task_weights": {"shards": 1, "code": -1}}))
    # All zero divided by zero (a ZeroDivisionError traceback).
    with pytest.raises(ConfigError, match=r"^stages\.step\.config\.task_weights: every task has weight 0"):
        run_one(store, "train.pretrain", inputs, {**config, "task_weights": {"shards": 0, "code": 0}})
