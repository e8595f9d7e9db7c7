"""``--set key=value`` overrides: parsed as YAML values and applied to a copy of a run's config, which the schema
(:mod:`config`) then checks."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import replace
from typing import Any

import yaml

from .config import (
    TOO_DEEP,
    Recipe,
    RunConfig,
    UniqueKeyLoader,
    config_from_dict,
    config_to_dict,
    load_recipe,
)
from .errors import DistillError
from .rules import close_or_known, shown


class OverrideLoader(UniqueKeyLoader):
    """The recipe files' YAML loader, but for numbers and dates that a --set value means as text: YAML 1.1 reads
    2024_06_01 as 20240601, 010 as 8, 1:30 as 90 and 2024-06-01 as a date. Its other numbers read as in a recipe file
    (1e-3 and 1.5e3 are text there too, which a number field takes: rules.coerce)."""


NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
DROPPED = (*NUMBER_TAGS, "tag:yaml.org,2002:timestamp")
OverrideLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in DROPPED]
    for first, resolvers in UniqueKeyLoader.yaml_implicit_resolvers.items()
}
OverrideLoader.add_implicit_resolver(NUMBER_TAGS[0], re.compile(r"^(?:[-+]?(?:0|[1-9][0-9]*)|0x[0-9a-fA-F]+)$"), None)
OverrideLoader.add_implicit_resolver(
    NUMBER_TAGS[1],
    re.compile(
        r"^(?:[-+]?[0-9]+\.[0-9]*(?:[eE][-+][0-9]+)?|\.[0-9]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
        r"|\.(?:nan|NaN|NAN))$"
    ),
    None,
)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["epochs=5", "losses.cwd.weight=2"]`` -> ``{"epochs": 5, "losses.cwd.weight": 2.0}`` (YAML-typed values)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise DistillError(f"--set expects key=value, got '{item}'")
        earlier = next((k for k in out if canonical(k) == canonical(key.strip())), None)
        if earlier is not None:  # the last would win without a word
            raise DistillError(f"--set {key.strip()} is given twice (as {earlier}); keep one")
        try:
            out[key.strip()] = yaml.load(raw, Loader=OverrideLoader) if raw.strip() else None  # noqa: S506  safe
        except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: an int beyond Python's 4300 digits
            why = TOO_DEEP if isinstance(e, RecursionError) else str(e).splitlines()[0]
            raise DistillError(f"--set {key.strip()}: the value is not valid YAML ({why})") from e
    return out


def canonical(key: str) -> str:
    """A --set key as the config reads it: recipe fields may omit the ``recipe.`` prefix."""
    return key.removeprefix("recipe.")


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Apply dotted overrides to a copy of ``cfg``; recipe fields may omit the ``recipe.`` prefix
    (``losses.cwd.weight=2``, ``losses.mgd.alpha=2e-5``, ``losses.cwd.schedule.kind=cosine``)."""
    if cfg.recipe is not None and not isinstance(cfg.recipe, Recipe):
        raise DistillError(f"a RunConfig's recipe is a Recipe (load_recipe gives one) or None, got {shown(cfg.recipe)}")
    run_fields = {f.name for f in dataclasses.fields(RunConfig)} - {"recipe"}
    if cfg.recipe is None and any(key.split(".")[0] not in run_fields for key in overrides):
        cfg = replace(cfg, recipe=load_recipe(cfg.recipe_name))  # a recipe field changes: the named recipe's
    data = config_to_dict(cfg)
    for key, value in params_beside_weights(overrides):
        if key in ("losses", "recipe.losses") and not value:  # not a silent "none" under the recipe's name
            raise DistillError(f"--set {key}: give a mapping of terms; --recipe none trains without distillation")
        parts = key.split(".")
        if parts[0] not in data:
            if parts[0] not in data["recipe"]:  # neither a run setting nor a recipe field
                known = [k for k in data if k != "recipe"] + list(data["recipe"])
                raise DistillError(f"unknown setting '{key}'; {close_or_known(parts[0], known)}")
            parts = ["recipe", *parts]
        node, losses = data, (data["recipe"] or {}).get("losses")
        for part in parts[:-1]:
            if node is losses and part not in node:
                node[part] = {"schedule": {}}  # --set adds a new term: losses.cwd.weight=1, and its schedule
            node = node.get(part)
            if not isinstance(node, dict):
                raise DistillError(f"--set {key}: '{part}' is not a known section")
        node[parts[-1]] = value
    return config_from_dict(data)


def params_beside_weights(overrides: dict[str, Any]) -> list[tuple[str, Any]]:
    """A term's parameters sit beside its weight in the config's data: ``losses.cwd.params.tau=2`` and
    ``losses.cwd.params={tau: 2}`` both become ``losses.cwd.tau=2``; other keys stay as given."""
    items: list[tuple[str, Any]] = []
    for key, value in overrides.items():
        parts = key.split(".")
        at = 1 if parts[:1] == ["recipe"] else 0  # where "losses" would be
        if parts[at : at + 1] != ["losses"] or parts[at + 2 : at + 3] != ["params"]:
            items.append((key, value))
            continue
        term = ".".join(parts[: at + 2])
        if len(parts) > at + 3:
            items.append((".".join([term, *parts[at + 3 :]]), value))
        elif isinstance(value, dict) and value:
            items += [(f"{term}.{k}", v) for k, v in value.items()]
        else:  # null or {} would change nothing, silently
            raise DistillError(f"--set {key}: give the parameters as a mapping ({key}={{tau: 2}}) or one by one")
    seen = [key.removeprefix("recipe.") for key, _ in items]
    if twice := sorted({key for key in seen if seen.count(key) > 1}):  # which one won would depend on their order
        raise DistillError(f"--set {twice[0]}: given twice (in a params mapping and on its own); give it once")
    return items
