"""``probe-channels``: the layers of both models and the pairing + adapters a recipe will use."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from torch import nn

from .config import ProbeOptions, load_recipe
from .distiller import output_problem
from .features import pair_layers, probe_layers
from .losses import LOSSES
from .models import load_model
from .rules import validated
from .weight_selection import selection_problem


def probe_channels(
    teacher: str,
    student: str,
    imgsz: int = ProbeOptions.imgsz,
    layers: str | list[int] | None = None,
    recipe: str | None = None,
    trust_checkpoint: bool = False,
) -> dict[str, Any]:
    """Every candidate layer of both models (index, module, C x H x W, stride) and the layer pairs with adapters.

    The pairing is that of ``layers`` (a group or student indices), else of each feature term of ``recipe``, else
    the default: the maps feeding the Detect head, matched by stride.
    """
    opts = validated(ProbeOptions, locals())
    teacher, student, imgsz, layers, recipe = opts.teacher, opts.student, opts.imgsz, opts.layers, opts.recipe
    teacher_model = load_model(teacher, "teacher", trust=opts.trust_checkpoint)
    student_model = load_model(student, "student", trust=opts.trust_checkpoint)
    teacher_infos, student_infos = probe_layers(teacher_model, imgsz), probe_layers(student_model, imgsz)
    selections: dict[str, str | list[int]] = {"default": layers or "head_inputs"}
    if recipe is not None and layers is None:
        spec = load_recipe(recipe)
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
        "output_terms": {  # method -> "applies", or why it cannot distil this pair
            name: output_problem(name, student_model, teacher_model) or "applies"
            for name, cls in sorted(LOSSES.items())
            if cls.level != "feature"
        },
        "weight_selection": weight_selection_verdict(student, teacher_model, opts.trust_checkpoint),
    }


def weight_selection_verdict(student: str, teacher_model: nn.Module, trust: bool) -> str:
    """Whether a recipe's ``init: teacher`` seeds this student with a selection of the teacher's weights."""
    if str(student).endswith(".pt"):
        return "no: a trained .pt student keeps its own weights"
    # a yaml student is built for the data's classes when it trains: here, the teacher's (as output terms need)
    candidate = load_model(student, "student", nc=teacher_model.model[-1].nc, trust=trust)
    candidate.names = teacher_model.names
    problem = selection_problem(candidate, teacher_model)
    return f"no: {problem}" if problem else "applies"
