"""The typed schema of runs and recipes: every default and every valid range lives here (the other commands'
options, declared the same way, are in :mod:`options`).

A run is a :class:`RunConfig`; its ``recipe`` field is a :class:`Recipe` (what to distil, how hard and when).
Recipes are YAML files in ``recipes/`` (or any path); ``--set key=value`` overrides any field of either. Each field's
valid values sit in its metadata (``ranged(default, ge=1)``, see :mod:`rules`); building a config or a command's
options (:func:`rules.validated`) checks them all, so unknown keys, wrong types and out-of-range values are errors
before any command reads or writes a file. A loss method's parameters carry their rules on the method
(``param_rules``), checked by ``losses.check_loss_spec``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import stat
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import DistillError
from .rules import api_function, build, device_problem, found, is_file, layers_problem, not_a_file, rule, shown

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
PACKAGED_RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
DEFAULT_RECIPE = "default"
ULTRALYTICS_NBS = 64  # ultralytics' nominal batch size
ULTRALYTICS_MAX_NORM = 10.0  # ultralytics' gradient clip
SCHEDULE_KINDS = ("constant", "linear", "cosine")
STUDENT_INITS = ("random", "teacher")
ADAPTER_INITS = ("fit", "random")
MAX_TEACHER_SCALE = 2.0  # the view mapping pairs each student level with two teacher levels (teacher_scale.py)
TEACHER_SCALE_TEXT = f"auto, a number in [1, {MAX_TEACHER_SCALE:g}], or such numbers joined by + (views averaged)"
MAX_KEEP_START = 100.0  # the teacher's share of the answers is 1 / (1 + keep_start): at most this, it is still 1%
KEEP_START_TEXT = f"auto or a number in [0, {MAX_KEEP_START:g}]"
MAX_IMGSZ = 16384
# optimizers step in float32 (at most 3.4e38): a larger LR or weight decay (scaled by batch / nbs, and by warm-up) is an
# overflow error, not a run that fails
MAX_STEP_SIZE = 1e30


def ranged(default: Any, **kwargs: Any) -> Any:
    """A schema field with its default and its valid values (see :class:`rules.Rule`)."""
    return field(default=default, metadata=rule(**kwargs))


def imgsz_field(default: int) -> Any:
    return ranged(default, ge=32, le=MAX_IMGSZ)


def _optimizers() -> tuple[str, ...]:
    from .optimizer import OPTIMIZERS  # late: the list lives with build_optimizer, which needs torch

    return ("auto", *OPTIMIZERS)


def blank_problem(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?")  # a plain decimal: no sign, exponent, nan or inf


def teacher_scale_problem(value: str) -> str | None:
    views = value.split("+")
    numbers = all(NUMBER.fullmatch(v) and 1 <= float(v) <= MAX_TEACHER_SCALE for v in views)
    if value == "auto" or (numbers and len({float(v) for v in views}) == len(views)):
        return None
    return f"must be {TEACHER_SCALE_TEXT}, each view once"


def keep_start_problem(value: str) -> str | None:
    number = NUMBER.fullmatch(value) and float(value) <= MAX_KEEP_START
    return None if value == "auto" or number else f"must be {KEEP_START_TEXT}"


LAYERS = rule(check=layers_problem, text="a layer group or a list of layer indices")


@dataclass
class Schedule:
    """How a loss weight evolves over training, as a function of the global step.

    ``weight(step) = weight * ramp(step) * decay(step)``: a linear ramp from 0 over ``warmup_epochs``, then
    ``constant`` / ``linear`` / ``cosine`` decay to ``final`` x weight by the end of training (or by ``stop_epoch``),
    and 0 from ``stop_epoch`` on (negative: counted from the end, ``-10`` = the last 10 epochs).
    """

    kind: str = ranged("constant", choices=SCHEDULE_KINDS)
    final: float = ranged(1.0, ge=0)
    warmup_epochs: float = ranged(0.0, ge=0)
    stop_epoch: int | None = None  # any epoch; negative: counted from the end


@dataclass
class LossSpec:
    """One weighted distillation term. ``type`` defaults to the term's name in the recipe."""

    type: str = ""  # checked against the registry (losses.check_loss_spec), with the method's parameters
    weight: float = ranged(1.0, ge=0)
    layers: str | list[int] | None = field(default=None, metadata=LAYERS)  # None: the recipe's layers
    schedule: Schedule = field(default_factory=Schedule)
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Balance:
    """Automatic loss balance: after ``steps`` steps, scale each term so that its weighted value is ``target`` x the
    detection loss (averaged over those steps). The chosen factors are logged and saved with the run."""

    target: float = ranged(0.0, ge=0)  # 0 = off
    steps: int = ranged(50, ge=1)


@dataclass
class Recipe:
    description: str = ""
    layers: str | list[int] = field(default="head_inputs", metadata=LAYERS)
    losses: dict[str, LossSpec] = field(default_factory=dict)
    balance: Balance = field(default_factory=Balance)
    # where a student built from a yaml starts: random (as ultralytics), or teacher: a selection of the teacher's
    # weights when the teacher has its layers, wider or repeated more often (weight_selection.py); a .pt keeps its own
    init: str = ranged("random", choices=STUDENT_INITS)
    # where the 1x1 adapters of feature and cross-head terms start: fit, the least-squares map from the student's
    # layer to the teacher's over the first train images (adapter_fit.py), or random, PyTorch's initialisation
    adapters: str = ranged("fit", choices=ADAPTER_INITS)
    # the size at which the teacher sees the batch, as a multiple of the student's (1 to 2; output terms only), or
    # several views joined by + whose answers are averaged; auto picks 2 where the teacher was trained at 1.6x the
    # student's size or more, 1+2 from 1.3x, else 1 (teacher_scale.py)
    teacher_scale: str = ranged("1", check=teacher_scale_problem, text=TEACHER_SCALE_TEXT)
    # in a fine-tune of a .pt student with the data's classes, the output terms also distil the student as given, at
    # this multiple of the teacher's weight (Learning without Forgetting); 0: the teacher alone; auto: 1 where the
    # student was trained at 1 to 1.3x the run's size and the run has under 100 optimizer steps, else 0 (keep_start.py)
    keep_start: str = ranged("0", check=keep_start_problem, text=KEEP_START_TEXT)

    @property
    def keeps_start(self) -> bool:
        """Whether the output terms distil the student as given beside the teacher (auto: where it applies)."""
        return self.keep_start == "auto" or float(self.keep_start) > 0


@dataclass
class RunConfig:
    """Everything a training run needs; saved as ``config.yaml`` in the run dir and inside every checkpoint."""

    teacher: str = ""
    student: str = ""
    data: str = ""
    # None: the recipe that recipe_name names, which resolve_config loads; a Recipe(): no terms, as written
    recipe: Recipe | None = None
    recipe_name: str = DEFAULT_RECIPE
    epochs: int = ranged(100, ge=1)
    batch: int = ranged(16, ge=1)
    imgsz: int = imgsz_field(640)
    device: str = ranged("", check=device_problem, text="cpu, cuda, 0, cuda:1 or 0,1")  # "" = cuda:0 if any, else cpu
    workers: int = ranged(8, ge=0)
    amp: bool = True
    amp_dtype: str = ranged("auto", choices=("auto", "fp16", "bf16", "fp32"))  # auto: fp16 on GPU, bf16 on some CPUs
    # BatchNorm running statistics while training: frozen (eval mode) keeps a trained student's statistics, which
    # short fine-tunes otherwise wreck in the first epoch; auto = frozen for a .pt student, update for a yaml one
    bn_stats: str = ranged("auto", choices=("auto", "update", "frozen"))
    # the student's first N layers stay fixed (ultralytics' freeze=N; the backbone is 10 layers in YOLOv8, 11 in
    # YOLO11/26: probe-channels shows it); off by default: no gain beyond seed noise measured (benchmarks/RESULTS.md)
    freeze: int = ranged(0, ge=0)
    optimizer: str = ranged("auto", choices=_optimizers, ignore_case=True, text="auto or an ultralytics optimizer")
    lr0: float = ranged(0.01, gt=0, le=MAX_STEP_SIZE)
    lrf: float = ranged(0.01, ge=0, le=1)  # final LR as a fraction of lr0
    momentum: float = ranged(0.937, ge=0, lt=1)
    weight_decay: float = ranged(0.0005, ge=0, le=MAX_STEP_SIZE)
    warmup_epochs: float = ranged(3.0, ge=0)
    warmup_momentum: float = ranged(0.8, ge=0, lt=1)
    warmup_bias_lr: float = ranged(0.1, ge=0, le=MAX_STEP_SIZE)
    cos_lr: bool = False
    # nominal batch size: gradients accumulate to it. 0 (auto): 64, as ultralytics, from scratch; the batch size (an
    # optimizer step every batch) when fine-tuning a .pt student, where a short run needs the updates
    nbs: int = ranged(0, ge=0)
    # max norm of the gradient; 0 = auto: ultralytics' 10, but no clip when a .pt student is fine-tuned with an
    # Adam-family optimizer (the clip rescaled every step there; without it the fine-tunes' means mostly rose)
    grad_clip: float = ranged(0.0, ge=0)
    close_mosaic: int = ranged(10, ge=0)
    # random resize of each training image by a gain in [1 - scale, 1 + scale] (ultralytics' scale). None = auto:
    # ultralytics' 0.5 from scratch, no resize (0) in a fine-tune (benchmarks/RESULTS.md)
    scale: float | None = ranged(None, ge=0, le=1)
    ema: bool = True
    # EMA of the student: decay reached with time constant ema_tau optimizer steps (ultralytics' ModelEMA). 0 = auto:
    # ultralytics' 0.9999 and 2000 from scratch; a fine-tune averages over about the last tenth of its steps
    ema_decay: float = ranged(0.0, ge=0, lt=1)
    ema_tau: float = ranged(0.0, ge=0)
    seed: int = ranged(0, ge=0, le=2**31 - 1)
    deterministic: bool = False
    val_interval: int = ranged(1, ge=1)
    val_split: str = ranged("val", name=True)
    project: str = ranged("runs/distill", check=blank_problem, text="a folder")
    name: str = ranged("exp", name=True)  # a folder inside project, never a path
    max_bad_steps: int = ranged(20, ge=1)  # consecutive non-finite steps before the run stops
    trust_checkpoint: bool = False
    fraction: float = ranged(1.0, gt=0, le=1)  # share of the train split to use
    cache: bool = False  # decoded images in RAM
    report: bool = True  # report.md + plots in the run dir (costs two extra validation passes)
    allow_untrained_teacher: bool = False  # a teacher built from a model yaml: only for smoke tests
    tensorboard: bool = False  # also log every scalar to TensorBoard, if it is installed


def _loss_entry(name: str, value: Any) -> dict[str, Any]:
    """Split a YAML loss entry into the LossSpec fields and the method's own parameters."""
    if not isinstance(value, dict):
        raise DistillError(f"recipe loss '{name}' must be a mapping (e.g. {{weight: 1.0}})")
    spec_keys = {f.name for f in dataclasses.fields(LossSpec)} - {"params"}
    entry = {k: v for k, v in value.items() if k in spec_keys}
    params = value.get("params") or {}
    if not isinstance(params, dict):
        raise DistillError(f"recipe loss '{name}': 'params' must be a mapping")
    beside = {k: v for k, v in value.items() if k not in spec_keys | {"params"}}
    if twice := sorted(set(params) & set(beside), key=str):
        raise DistillError(
            f"recipe loss '{name}': {', '.join(map(str, twice))} given in 'params' and beside it; give it once"
        )
    entry["params"] = {**params, **beside}
    if not entry.get("type"):  # LossSpec() in Python has type "": the term's name, as when a file omits it
        entry["type"] = name
    return entry


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Build a Recipe from YAML data and check every loss name and parameter against the registry."""
    from .losses import check_loss_spec  # late: losses import torch

    if data is not None and not isinstance(data, dict):
        raise DistillError(f"a recipe must be a mapping (description, layers, losses), got {type(data).__name__}")
    data = dict(data or {})
    losses = data.get("losses")
    losses = {} if losses is None else losses  # a file's 'losses:' with every term commented out: no distillation
    if not isinstance(losses, dict):
        raise DistillError("recipe 'losses' must be a mapping of term name -> settings")
    if odd := [name for name in losses if not isinstance(name, str)]:  # null would become a term named "None"
        raise DistillError(f"recipe loss names are text; got {shown(odd[0])}")
    data["losses"] = {k: _loss_entry(k, v) for k, v in losses.items()}
    recipe = build(Recipe, data, "")
    for name, spec in recipe.losses.items():
        check_loss_spec(name, spec)
    return recipe


def recipe_path(name_or_path: str) -> Path:
    """Resolve a recipe name (``cwd``) or a YAML path to a file."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise DistillError(f"a recipe is a name or a YAML path, got {type(name_or_path).__name__}")
    if not str(name_or_path).strip():
        raise DistillError(f"a recipe is a name or a YAML path, got a blank text; one of: {', '.join(list_recipes())}")
    path = Path(name_or_path)
    shipped = name_or_path in list_recipes()  # a bare shipped name beats a local file or folder of that name
    status = None if shipped else found(path)
    if not shipped and (path.suffix in {".yaml", ".yml"} or status is not None):
        if status is None or not stat.S_ISREG(status.st_mode):
            raise DistillError(
                f"recipe file {shown(str(path))} {not_a_file(path)}; give a YAML path or one of: "
                f"{', '.join(list_recipes())}"
            )
        return path
    for folder in (RECIPES_DIR, PACKAGED_RECIPES_DIR):
        candidate = folder / f"{name_or_path}.yaml"
        with contextlib.suppress(DistillError):  # a name too long for a file is none of ours: an unknown recipe
            if is_file(candidate):
                return candidate
    raise DistillError(f"unknown recipe {shown(str(name_or_path))}; valid recipes: {', '.join(list_recipes())}")


def recipes_folder() -> Path:
    return RECIPES_DIR if RECIPES_DIR.is_dir() else PACKAGED_RECIPES_DIR


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_folder().glob("*.yaml"))


TOO_DEEP = "nested deeper than Python's recursion limit"


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key written twice in one mapping is an error: PyYAML keeps the last one silently
    (``cls_kd`` twice would train the second and drop the first). Keys merged in with ``<<`` may be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            with contextlib.suppress(TypeError):  # an unhashable key: the base loader names it
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506  a safe loader (SafeLoader's subclass)


def read_yaml(path: Path, what: str) -> Any:
    try:
        return load_yaml(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise DistillError(f"cannot read {what} {shown(str(path))}: {e}") from e
    except yaml.YAMLError as e:
        raise DistillError(f"{what} {shown(str(path))} is not valid YAML: {str(e).splitlines()[0]}") from e
    except RecursionError as e:
        raise DistillError(f"{what} {shown(str(path))} is not valid YAML: {TOO_DEEP}") from e


@api_function
def load_recipe(name_or_path: str = DEFAULT_RECIPE) -> Recipe:
    """A recipe file, checked. It must list its terms: an empty file or one without ``losses`` is an error (the
    ``none`` recipe, ``losses: {}``, trains without distillation on purpose)."""
    path = recipe_path(name_or_path)
    data = read_yaml(path, "recipe")  # its errors name the file
    if not isinstance(data, dict) or "losses" not in data:
        raise DistillError(
            f"recipe {shown(str(path))} has no 'losses'; list its terms (see `yolodistill recipes`), or write "
            f"'losses: {{}}' (as the 'none' recipe does) to train without distillation"
        )
    try:
        return recipe_from_dict(data)
    except DistillError as e:
        raise DistillError(f"recipe {shown(str(path))}: {e.message}") from e


def names_its_terms(cfg: RunConfig) -> bool:
    """Whether ``recipe_name`` (a shipped name or a YAML path) loads to ``cfg.recipe``'s terms: a blank, unknown or
    unreadable name, or one whose terms differ, would mislabel the run."""
    if not isinstance(cfg.recipe, Recipe):  # the Python API's RunConfig(recipe="cwd"): apply_overrides refuses it
        return False
    try:
        return same_terms(cfg.recipe, load_recipe(cfg.recipe_name))
    except (DistillError, OSError):  # a label check: what cannot be read is not the run's recipe
        return False


def same_terms(a: Recipe, b: Recipe) -> bool:
    """Whether two recipes train alike: every field but the description."""
    return replace(a, description="") == replace(b, description="")


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The run config as plain YAML data; loss entries are flat (method parameters beside weight and schedule)."""
    data = asdict(cfg)
    recipe = data["recipe"]  # a Recipe object of the Python API may hold anything: config_from_dict checks it
    if isinstance(recipe, dict) and isinstance(recipe["losses"], dict):
        recipe["losses"] = {k: _flat_loss(v) for k, v in recipe["losses"].items()}
    return data


def _flat_loss(spec: Any) -> Any:
    if not isinstance(spec, dict) or not isinstance(spec.get("params"), dict):
        return spec  # a term that is no LossSpec, or params that are no mapping: recipe_from_dict names it
    params = spec.pop("params")
    return {**spec, **params}


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    data = dict(data)
    recipe = data.pop("recipe", None)
    return build(RunConfig, {**data, "recipe": None if recipe is None else recipe_from_dict(recipe)}, "")


def describe_recipes() -> list[dict[str, str]]:
    """Name, terms and one-line description of every shipped recipe."""
    rows = []
    for name in list_recipes():
        recipe = load_recipe(name)
        parts = [f"{k} {v.weight:g}" for k, v in recipe.losses.items()]
        parts += ["init from the teacher"] if recipe.init == "teacher" else []
        parts += [f"keep start {recipe.keep_start}"] if recipe.keeps_start else []
        terms = ", ".join(parts) or "-"
        rows.append({"name": name, "terms": terms, "description": recipe.description})
    return rows
