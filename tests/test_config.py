import pytest
from pydantic import Field

from lmloom.config import StrictConfig, apply_override, load_recipe, validate_config
from lmloom.errors import ConfigError


class Inner(StrictConfig):
    rate: float = Field(1.0, gt=0)


class Example(StrictConfig):
    vocab_size: int = Field(8192, ge=256)
    mode: str = "a"
    inner: Inner = Inner()


def test_unknown_key_names_key_value_and_allowed():
    with pytest.raises(ConfigError) as exc:
        validate_config(Example, {"vocab_sise": 10}, "stages.tok.config")
    msg = str(exc.value)
    assert msg.count("\n") == 0
    assert "stages.tok.config.vocab_sise" in msg and "10" in msg
    assert "allowed: inner, mode, vocab_size" in msg


def test_nested_unknown_key_lists_nested_fields():
    with pytest.raises(ConfigError, match=r"inner\.rte: unknown key .*allowed: rate"):
        validate_config(Example, {"inner": {"rte": 2}}, "")


def test_bad_value_names_key_value_and_rule():
    with pytest.raises(ConfigError) as exc:
        validate_config(Example, {"vocab_size": 12}, "x")
    msg = str(exc.value)
    assert "x.vocab_size = 12" in msg and "greater than or equal to 256" in msg


def recipe_file(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


RECIPE = """
name: t
stages:
  corpus:
    stage: data.prepare
    config: {min_chars: 10}
  tokenizer:
    stage: tokenizer.train
    inputs: {corpus: corpus}
"""


def test_overrides_with_stage_shorthand(tmp_path):
    recipe = load_recipe(
        recipe_file(tmp_path, RECIPE),
        ["corpus.min_chars=20", "tokenizer.vocab_size=512", "tokenizer.inputs.corpus=corpus", "name=u"],
    )
    assert recipe.name == "u"
    assert recipe.stages["corpus"].config == {"min_chars": 20}
    assert recipe.stages["tokenizer"].config == {"vocab_size": 512}


def test_override_values_are_parsed_as_yaml():
    raw = {"stages": {"a": {"stage": "x", "config": {}}}}
    apply_override(raw, "a.flag=true")
    apply_override(raw, "a.items=[1, 2]")
    apply_override(raw, "a.ratio=0.5")
    assert raw["stages"]["a"]["config"] == {"flag": True, "items": [1, 2], "ratio": 0.5}


def test_override_of_unknown_stage_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="'pretrian' is neither a recipe key.*stages: corpus, tokenizer"):
        load_recipe(recipe_file(tmp_path, RECIPE), ["pretrian.max_steps=3"])


def test_malformed_override_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_recipe(recipe_file(tmp_path, RECIPE), ["corpus.min_chars"])


def test_unknown_recipe_key(tmp_path):
    with pytest.raises(ConfigError, match="stages.corpus.confg: unknown key"):
        load_recipe(recipe_file(tmp_path, RECIPE.replace("config: {min", "confg: {min")))


def test_invalid_yaml_names_line(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_recipe(recipe_file(tmp_path, "name: [unclosed\n"))


def test_missing_recipe_file_and_unknown_builtin(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="unknown recipe 'nope'; built-in recipes: .*quickstart"):
        load_recipe("nope")
