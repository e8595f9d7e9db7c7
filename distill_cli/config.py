"""The typed run and recipe schema: every default lives here, unknown keys are errors.

A run is a :class:`RunConfig`; its ``recipe`` field is a :class:`Recipe` (what to distil, how hard and when).
Recipes are YAML files in ``recipes/`` (or any path); ``--set key=value`` overrides any field of either.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import DistillError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
PACKAGED_RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
DEFAULT_RECIPE = "default"


@dataclass
class Schedule:
    """How a loss weight evolves over training, as a function of the global step.

    ``weight(step) = weight * ramp(step) * decay(step)``: a linear ramp from 0 over ``warmup_epochs``, then
    ``constant`` / ``linear`` / ``cosine`` decay to ``final`` x weight by the end of training (or by ``stop_epoch``),
    and 0 from ``stop_epoch`` on (negative: counted from the end, ``-10`` = the last 10 epochs).
    """

    kind: str = "constant"
    final: float = 1.0
    warmup_epochs: float = 0.0
    stop_epoch: int | None = None


@dataclass
class LossSpec:
    """One weighted distillation term. ``type`` defaults to the term's name in the recipe."""

    type: str = ""
    weight: float = 1.0
    layers: str | list[int] | None = None  # None: the recipe's layers
    schedule: Schedule = field(default_factory=Schedule)
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Balance:
    """Automatic loss balance: after ``steps`` steps, scale each term so that its weighted value is ``target`` x the
    detection loss (averaged over those steps). The chosen factors are logged and saved with the run."""

    target: float = 0.0  # 0 = off
    steps: int = 50


@dataclass
class Recipe:
    description: str = ""
    layers: str | list[int] = "head_inputs"
    losses: dict[str, LossSpec] = field(default_factory=dict)
    balance: Balance = field(default_factory=Balance)


@dataclass
class RunConfig:
    """Everything a training run needs; saved as ``config.yaml`` in the run dir and inside every checkpoint."""

    teacher: str = ""
    student: str = ""
    data: str = ""
    recipe: Recipe = field(default_factory=Recipe)
    recipe_name: str = DEFAULT_RECIPE
    epochs: int = 100
    batch: int = 16
    imgsz: int = 640
    device: str = ""  # "" = cuda:0 if available else cpu; "cpu", "0", "0,1"
    workers: int = 8
    amp: bool = True
    optimizer: str = "auto"  # auto | SGD | AdamW
    lr0: float = 0.01
    lrf: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 0.0005
    warmup_epochs: float = 3.0
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    cos_lr: bool = False
    nbs: int = 64  # nominal batch size: gradients accumulate to it, as in ultralytics
    grad_clip: float = 10.0
    close_mosaic: int = 10
    ema: bool = True
    seed: int = 0
    deterministic: bool = False
    val_interval: int = 1
    val_split: str = "val"
    project: str = "runs/distill"
    name: str = "exp"
    max_bad_steps: int = 20  # consecutive non-finite steps before the run stops
    trust_checkpoint: bool = False
    fraction: float = 1.0  # share of the train split to use
    cache: bool = False  # decoded images in RAM
    report: bool = True  # report.md + plots in the run dir (costs two extra validation passes)
    tensorboard: bool = False  # also log every scalar to TensorBoard, if it is installed


def _strip_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types with the key's path."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DistillError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise DistillError(f"unknown key '{_join(where, unknown[0])}'; valid keys: {', '.join(names)}")
    kwargs = {k: _coerce(hints[k], v, _join(where, k)) for k, v in data.items()}
    return cls(**kwargs)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(tp: Any, value: Any, where: str) -> Any:
    tp = _strip_optional(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if value is None:
        return None
    if typing.get_origin(tp) is dict:
        val_tp = typing.get_args(tp)[1]
        if not isinstance(value, dict):
            raise DistillError(f"'{where}' must be a mapping")
        return {k: _coerce(val_tp, v, _join(where, str(k))) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise DistillError(f"'{where}' must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DistillError(f"'{where}' must be a number, got {value!r}")
        if tp is int and float(value) != int(value):
            raise DistillError(f"'{where}' must be a whole number, got {value!r}")
        return tp(value)
    if tp is str:
        return str(value)
    # str | list[int]: a layer group or a list of layer indices
    if isinstance(value, str) or isinstance(value, list) and all(type(i) is int for i in value):
        return value
    raise DistillError(f"'{where}' must be a layer group name or a list of layer indices, got {value!r}")


def _loss_entry(name: str, value: Any) -> dict[str, Any]:
    """Split a YAML loss entry into the LossSpec fields and the method's own parameters."""
    if not isinstance(value, dict):
        raise DistillError(f"recipe loss '{name}' must be a mapping (e.g. {{weight: 1.0}})")
    spec_keys = {f.name for f in dataclasses.fields(LossSpec)} - {"params"}
    entry = {k: v for k, v in value.items() if k in spec_keys}
    entry["params"] = {**value.get("params", {}), **{k: v for k, v in value.items() if k not in spec_keys | {"params"}}}
    entry.setdefault("type", name)
    return entry


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Build a Recipe from YAML data and check every loss name and parameter against the registry."""
    from .losses import check_loss_spec  # late: losses import torch

    data = dict(data or {})
    losses = data.get("losses") or {}
    if not isinstance(losses, dict):
        raise DistillError("recipe 'losses' must be a mapping of term name -> settings")
    data["losses"] = {str(k): _loss_entry(str(k), v) for k, v in losses.items()}
    recipe = _build(Recipe, data, "")
    for name, spec in recipe.losses.items():
        check_loss_spec(name, spec)
    return recipe


def recipe_path(name_or_path: str) -> Path:
    """Resolve a recipe name (``cwd``) or a YAML path to a file."""
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise DistillError(
                f"recipe file '{path}' not found; give a YAML path or one of: {', '.join(list_recipes())}"
            )
        return path
    for folder in (RECIPES_DIR, PACKAGED_RECIPES_DIR):
        candidate = folder / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    raise DistillError(f"unknown recipe '{name_or_path}'; valid recipes: {', '.join(list_recipes())}")


def recipes_folder() -> Path:
    return RECIPES_DIR if RECIPES_DIR.is_dir() else PACKAGED_RECIPES_DIR


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_folder().glob("*.yaml"))


def read_yaml(path: Path, what: str) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise DistillError(f"cannot read {what} '{path}': {e}") from e
    except yaml.YAMLError as e:
        raise DistillError(f"{what} '{path}' is not valid YAML: {str(e).splitlines()[0]}") from e


def load_recipe(name_or_path: str = DEFAULT_RECIPE) -> Recipe:
    path = recipe_path(name_or_path)
    try:
        return recipe_from_dict(read_yaml(path, "recipe"))
    except DistillError as e:
        raise DistillError(f"recipe '{path}': {e.message}") from e


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["epochs=5", "losses.cwd.weight=2"]`` -> ``{"epochs": 5, "losses.cwd.weight": 2.0}`` (YAML-typed values)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise DistillError(f"--set expects key=value, got '{item}'")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The run config as plain YAML data; loss entries are flat (method parameters beside weight and schedule)."""
    data = asdict(cfg)
    data["recipe"]["losses"] = {k: _flat_loss(v) for k, v in data["recipe"]["losses"].items()}
    return data


def _flat_loss(spec: dict[str, Any]) -> dict[str, Any]:
    params = spec.pop("params", {})
    return {**spec, **params}


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    data = dict(data)
    recipe = recipe_from_dict(data.pop("recipe", {}))
    return _build(RunConfig, {**data, "recipe": recipe}, "")


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Apply dotted overrides to a copy of ``cfg``; recipe fields may omit the ``recipe.`` prefix
    (``losses.cwd.weight=2``, ``losses.mgd.alpha=2e-5``, ``losses.cwd.schedule.kind=cosine``)."""
    data = config_to_dict(cfg)
    for key, value in overrides.items():
        parts = key.split(".")
        if parts[0] not in data:
            parts = ["recipe", *parts]
        node, losses = data, data["recipe"]["losses"]
        for part in parts[:-1]:
            if node is losses and part not in node:
                node[part] = {}  # --set adds a new term: losses.cwd.weight=1
            node = node.get(part)
            if not isinstance(node, dict):
                raise DistillError(f"--set {key}: '{part}' is not a known section")
        node[parts[-1]] = value
    return config_from_dict(data)


def describe_recipes() -> list[dict[str, str]]:
    """Name, terms and one-line description of every shipped recipe."""
    rows = []
    for name in list_recipes():
        recipe = load_recipe(name)
        terms = ", ".join(f"{k} {v.weight:g}" for k, v in recipe.losses.items()) or "-"
        rows.append({"name": name, "terms": terms, "description": recipe.description})
    return rows
