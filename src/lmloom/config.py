"""Typed configs, YAML recipes and `--set a.b=c` overrides, with one-line errors that name the key.

A recipe names its stages; each stage says which registered stage function it runs, which earlier
stages feed it, and its config:

    name: quickstart
    stages:
      corpus:    {stage: data.prepare, config: {min_chars: 64}}
      tokenizer: {stage: tokenizer.train, inputs: {corpus: corpus}, config: {vocab_size: 8192}}

`--set tokenizer.vocab_size=4096` is shorthand for `--set stages.tokenizer.config.vocab_size=4096`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, ClassVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmloom.errors import ConfigError


class StrictConfig(BaseModel):
    """Base of every stage config: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Groups of keys that are alternatives (give one of them): a block given over a default that set
    # one key of a group replaces the whole group, e.g. DP's target_epsilon and noise_multiplier.
    alternative_keys: ClassVar[tuple[tuple[str, ...], ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _partial_blocks_keep_defaults(cls, data: Any) -> Any:
        """A mapping given for a nested block overrides only its own keys of the field's default.

        `optim: {lr: 0.01}` (what `--set sft.optim.lr=0.01` makes when the recipe has no optim block)
        keeps the stage's own `OptimConfig(lr=1e-3, warmup_steps=20)` warmup instead of starting again
        from OptimConfig's class defaults.
        """
        if not isinstance(data, dict):
            return data
        merged = None
        for name, field in cls.model_fields.items():
            value = data.get(name)
            if not isinstance(value, dict) or field.is_required():
                continue
            default = field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel) and _same_tag(default, value):
                merged = merged if merged is not None else dict(data)
                merged[name] = _overlay(default, value)
        return data if merged is None else merged


def _same_tag(default: BaseModel, value: dict[str, Any]) -> bool:
    """False when `value` picks another member of a `type`-tagged union than the default is."""
    if "type" not in type(default).model_fields:
        return True
    return value.get("type", default.type) == default.type


def _overlay(default: BaseModel, value: dict[str, Any]) -> dict[str, Any]:
    """The fields set on `default`, with `value` on top (nested blocks overlaid the same way)."""
    merged = default.model_dump(exclude_unset=True)
    for group in getattr(type(default), "alternative_keys", ()):
        if value.keys() & set(group):
            for key in group:
                merged.pop(key, None)
    for key, item in value.items():
        current = getattr(default, key) if key in type(default).model_fields else None
        if isinstance(item, dict) and isinstance(current, BaseModel) and _same_tag(current, item):
            merged[key] = _overlay(current, item)
        else:
            merged[key] = item
    return merged


class StageSpec(StrictConfig):
    stage: str
    inputs: dict[str, str] = {}
    config: dict[str, Any] = {}


class RecipeSecurity(StrictConfig):
    encrypt: bool = Field(
        False, description="encrypt every artifact (and scratch checkpoint) of the run at rest"
    )


class Recipe(StrictConfig):
    name: str
    description: str = ""
    security: RecipeSecurity = RecipeSecurity()
    stages: dict[str, StageSpec]


def format_validation_error(exc: ValidationError, prefix: str, model: type[BaseModel] | None = None) -> str:
    """One line per problem: the dotted key, the offending value and what is allowed."""
    lines = []
    for err in exc.errors():
        loc, target = _walk(model, err["loc"]) if model else ([str(p) for p in err["loc"]], None)
        key = ".".join([prefix, *loc] if prefix else loc)
        if err["type"] == "extra_forbidden":
            parent = _walk(model, err["loc"][:-1])[1] if model else None
            hint = f"; allowed: {', '.join(sorted(parent.model_fields))}" if _is_model(parent) else ""
            lines.append(f"{key}: unknown key (value {err['input']!r}){hint}")
        elif err["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        elif err["type"] == "union_tag_not_found":
            tags = ", ".join(_union_tags(target)) or "?"
            lines.append(f"{key}: needs a '{err['ctx']['discriminator'].strip(chr(39))}' key, one of: {tags}")
        elif err["type"] == "value_error" and isinstance(err["input"], dict):
            # A whole block's own check (a model validator): its message names the keys; echoing the
            # block back would bury it under every value of the block.
            lines.append(f"{key}: {err['ctx']['error']}")
        else:
            lines.append(f"{key} = {err['input']!r}: {err['msg']}")
    return "\n".join(lines)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated[...] and Optional[...] down to the type that matters for key lookup."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, UnionType) and type(None) in get_args(annotation):
            rest = [a for a in get_args(annotation) if a is not type(None)]
            if len(rest) != 1:
                return annotation
            annotation = rest[0]
        else:
            return annotation


def _tagged_members(annotation: Any) -> dict[str, type[BaseModel]]:
    """Tag -> model for a union discriminated on a `type: Literal[...]` field."""
    members = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else ()
    tagged = {}
    for member in map(_unwrap, members):
        field = member.model_fields.get("type") if _is_model(member) else None
        for tag in get_args(field.annotation) if field is not None else ():
            tagged[str(tag)] = member
    return tagged


def _union_tags(annotation: Any) -> list[str]:
    return list(_tagged_members(annotation))


def _walk(model: type[BaseModel] | None, loc: tuple) -> tuple[list[str], Any]:
    """Follow an error location through models, lists and tagged unions.

    Returns the location as a user writes it (union tags, which pydantic inserts, are dropped) and
    the annotation found there, so hints can list the keys a nested model allows.
    """
    shown: list[str] = []
    annotation: Any = model
    for part in loc:
        annotation = _unwrap(annotation)
        origin = get_origin(annotation)
        if _is_model(annotation) and str(part) in annotation.model_fields:
            annotation = annotation.model_fields[str(part)].annotation
        elif origin in (list, tuple, set) and isinstance(part, int):
            annotation = get_args(annotation)[0]
        elif origin is dict:
            annotation = get_args(annotation)[1]
        elif str(part) in _tagged_members(annotation):
            annotation = _tagged_members(annotation)[str(part)]
            continue  # the tag is pydantic's, not part of the user's key
        else:
            annotation = None
        shown.append(str(part))
    return shown, _unwrap(annotation)


def validate_config(model: type[BaseModel], data: dict[str, Any], prefix: str) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, prefix, model)) from None


# -- recipes ------------------------------------------------------------------------------------


def builtin_recipes() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("lmloom.recipes").iterdir() if p.name.endswith(".yaml")
    )


def read_recipe_text(ref: str) -> tuple[str, str]:
    """(text, where) of a recipe file path or a built-in recipe name."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file {ref} does not exist")
        return path.read_text(encoding="utf-8"), str(path)
    if ref in builtin_recipes():
        return resources.files("lmloom.recipes").joinpath(f"{ref}.yaml").read_text(encoding="utf-8"), ref
    raise ConfigError(f"unknown recipe {ref!r}; built-in recipes: {', '.join(builtin_recipes())}")


def load_recipe(ref: str, overrides: list[str] = ()) -> Recipe:
    text, where = read_recipe_text(ref)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"recipe {where}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {where}: expected a mapping with 'name' and 'stages' at the top")
    for override in overrides:
        apply_override(raw, override)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "", Recipe)) from None


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to a raw recipe dict, expanding stage shorthand."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. pretrain.max_steps=200")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    set_path(raw, expand_key(raw, key.strip().split(".")), value, f"--set {key}")


def set_path(raw: dict[str, Any], path: list[str], value: Any, where: str) -> None:
    """raw[path[0]][path[1]]... = value, creating missing mappings; `where` names the setting in errors."""
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {'.'.join(path[: i + 1])} is {child!r}, not a mapping")
        node = child
    node[path[-1]] = value


def expand_key(raw: dict[str, Any], parts: list[str]) -> list[str]:
    if parts[0] in Recipe.model_fields:
        return parts
    stages = raw.get("stages") or {}
    if parts[0] not in stages:
        known = ", ".join(sorted(stages)) or "none"
        raise ConfigError(
            f"--set {'.'.join(parts)}: {parts[0]!r} is neither a recipe key ({', '.join(Recipe.model_fields)}) "
            f"nor a stage of this recipe (stages: {known})"
        )
    if len(parts) > 1 and parts[1] in StageSpec.model_fields:
        return ["stages", *parts]
    return ["stages", parts[0], "config", *parts[1:]]
