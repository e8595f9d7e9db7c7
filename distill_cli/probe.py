"""``probe-channels``: the layers of both models and the pairing + adapters a recipe will use."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from torch import nn

from .config import Recipe, RunConfig, load_recipe
from .distiller import output_problem, uses_recipe_layers
from .features import pair_layers, probe_layers
from .losses import LOSSES
from .models import load_model, stride_multiple
from .options import ProbeOptions
from .overrides import apply_overrides
from .partial_selection import seeded_part, select_shared
from .rules import api_function, validated
from .teacher_scale import resolved, scale_problem, trained_imgsz, upsamples
from .weight_selection import selection_problem


@api_function
def probe_channels(
    teacher: str,
    student: str,
    imgsz: int = ProbeOptions.imgsz,
    layers: str | list[int] | None = None,
    recipe: str | Recipe | None = None,
    trust_checkpoint: bool = False,
) -> dict[str, Any]:
    """Every candidate layer of both models (index, module, C x H x W, stride) and the layer pairs with adapters.

    The pairing is that of ``layers`` (a group or student indices), else of each feature term of ``recipe``, else
    the default: the maps feeding the Detect head, matched by stride.
    """
    # a Recipe object, as train() takes it, checked the way train() checks it
    given = apply_overrides(RunConfig(recipe=recipe), {}).recipe if isinstance(recipe, Recipe) else None
    opts = validated(ProbeOptions, {**locals(), "recipe": None if given else recipe})
    teacher, student, imgsz, layers, recipe = opts.teacher, opts.student, opts.imgsz, opts.layers, opts.recipe
    spec = given or (load_recipe(recipe) if recipe is not None else None)  # checked even where --layers decides
    teacher_model = load_model(teacher, "teacher", trust=opts.trust_checkpoint)
    student_model = probe_student(student, teacher_model, opts.trust_checkpoint)
    imgsz = stride_multiple(imgsz, int(max(teacher_model.stride.max(), student_model.stride.max())))
    teacher_infos, student_infos = probe_layers(teacher_model, imgsz), probe_layers(student_model, imgsz)
    recipe_terms = spec or load_recipe()
    ignored = layers is not None and not uses_recipe_layers(recipe_terms)
    selections: dict[str, str | list[int]] = {"default": layers or "head_inputs"}
    if spec is not None and layers is None:
        selections = {
            name: term.layers if term.layers is not None else spec.layers
            for name, term in spec.losses.items()
            if LOSSES[term.type].level == "feature"
        }
    pairings = {
        name: [p.as_dict() for p in pair_layers(student_model, teacher_model, student_infos, teacher_infos, sel)]
        for name, sel in selections.items()
    }
    return {
        "imgsz": imgsz,
        "teacher": {"model": str(teacher), "layers": [asdict(i) for i in teacher_infos]},
        "student": {"model": str(student), "layers": [asdict(i) for i in student_infos]},
        "selection": {k: v for k, v in selections.items()},
        "pairs": pairings,
        "output_terms": {  # method -> "applies", or why it cannot distil this pair (with --recipe's parameters)
            name: output_verdict(name, student_model, teacher_model, spec)
            for name, cls in sorted(LOSSES.items())
            if cls.level != "feature"
        },
        "weight_selection": weight_selection_verdict(student, student_model, teacher_model),
        "teacher_scale": teacher_scale_verdict(imgsz, teacher_model, recipe_terms),
        "note": "train refuses these --layers with this recipe: none of its terms reads the recipe's layers"
        if ignored
        else "",
    }


def output_verdict(method: str, student: nn.Module, teacher: nn.Module, spec: Recipe | None) -> str:
    """ "applies", or why ``method`` cannot distil this pair: with the parameters of each of the recipe's terms of it
    (as training checks them), else with its defaults."""
    params = [term.params for term in spec.losses.values() if term.type == method] if spec else []
    problems = (output_problem(method, student, teacher, params=p) for p in params or [None])
    return next(filter(None, problems), None) or "applies"


def probe_student(student: str, teacher_model: nn.Module, trust: bool) -> nn.Module:
    """A trained .pt as it is; a yaml built, as training builds it for the data's classes, for the teacher's (the
    classes output terms need)."""
    if str(student).endswith(".pt"):
        return load_model(student, "student", trust=trust)
    model = load_model(student, "student", nc=teacher_model.model[-1].nc, trust=trust)
    model.names = teacher_model.names
    return model


def teacher_scale_verdict(imgsz: int, teacher_model: nn.Module, recipe: Recipe) -> str:
    """The scale at which the teacher will see the batch with ``recipe`` (auto resolved at this size), or why the
    recipe's scale is refused."""
    if not recipe.losses:
        return "no teacher pass (the recipe has no terms)"
    if upsamples(recipe) and (problem := scale_problem(recipe, teacher_model.model[-1])):
        return f"refused: {problem}"
    scale = resolved(recipe, imgsz, teacher_model).teacher_scale
    how = "auto" if recipe.teacher_scale == "auto" else "the recipe's teacher_scale"
    trained = trained_imgsz(teacher_model)
    size = f"the teacher trained at {trained:g}" if trained else "the teacher's training size unknown"
    return f"{scale} ({how}; imgsz {imgsz}, {size})"


def weight_selection_verdict(student: str, student_model: nn.Module, teacher_model: nn.Module) -> str:
    """Whether a recipe's ``init: teacher`` seeds this student with a selection of the teacher's weights."""
    if str(student).endswith(".pt"):
        return "no: a trained .pt student keeps its own weights"
    problem = selection_problem(student_model, teacher_model)
    if not problem:
        return "applies"
    _, names = select_shared(student_model, teacher_model)
    return f"in part: {seeded_part(student_model, names)}, random elsewhere; {problem}" if names else f"no: {problem}"
