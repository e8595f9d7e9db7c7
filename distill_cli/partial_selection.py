"""Weight selection where the teacher cannot seed the whole student: another family (YOLO11n or YOLO26n from
YOLOv8s), other box bins, other classes.

The two models' layers are matched in order: a student layer matches the teacher's next one where it is of the
teacher's type or derived from it (YOLO11's C3k2 is a C2f), reads the layers that match the teacher layer's inputs,
and puts out a map no wider and of the same size. A student layer with no counterpart that keeps its input's width
and size (YOLO11's C2PSA after the SPPF) is passed over: the layers after it read it where the teacher's read its
input (it starts at random itself); the first other mismatch ends the matching. Within matched layers, each block (a
conv with its BatchNorm) takes the teacher's block of the same place where it computes as the teacher's does and its
tensors fit (:func:`shared_tensors`), by the same even spread as a whole selection (:mod:`weight_selection`), so the
channels a layer keeps are those the next one reads. The head's last box conv is left out where the box bins differ
(YOLO26's four distances against YOLOv8's 4 x 16 bins) and its last class conv where the classes differ. The rest
keep their random start.
"""

from __future__ import annotations

import re

from torch import nn

from .features import probe_layers
from .models import class_names
from .weight_selection import CONCATENATED, layer_index, layer_problem, layer_sources, probe_size, residual

HEAD_BOX_OUT, HEAD_CLASS_OUT = re.compile(r"(one2one_)?cv2\.\d+\.2\."), re.compile(r"(one2one_)?cv3\.\d+\.2\.")


class AlignedTeacher(nn.Module):
    """The teacher's layers under the indices of the student's layers they match (``model.N``: the teacher layer
    matching the student's layer N; an empty placeholder where none does), so that weight selection finds them by
    name. ``widths``: the output channels of the teacher layer each student layer stands for."""

    def __init__(self, teacher: nn.Module, matched: dict[int, int], widths: dict[int, int], layers: int) -> None:
        super().__init__()
        self.model = nn.ModuleList(teacher.model[matched[i]] if i in matched else nn.Identity() for i in range(layers))
        self.stride, self.widths = teacher.stride, widths


def aligned_teacher(student: nn.Module, teacher: nn.Module) -> AlignedTeacher:
    """Match the student's layers to the teacher's in order (module docstring)."""
    size = probe_size(student, teacher)
    s_maps, t_maps = ({i.index: (i.channels, i.height) for i in probe_layers(m, size)} for m in (student, teacher))
    matched: dict[int, int] = {}
    stands_for: dict[int, int] = {}  # student layer -> the teacher layer whose output it stands for
    following = 0  # the teacher's next layer
    for index, layer in enumerate(student.model):
        reads = layer_sources(index, layer)
        sources = [stands_for.get(source, -1) for source in reads]
        t = teacher.model[following] if following < len(teacher.model) else None
        same_inputs = t is not None and sources == layer_sources(following, t)
        if same_inputs and matches(index, layer, t) and fits_map(s_maps.get(index), t_maps.get(following)):
            matched[index] = stands_for[index] = following
            following += 1
        elif len(sources) == 1 and sources[0] >= 0 and s_maps.get(index) == s_maps.get(reads[0]):
            stands_for[index] = sources[0]  # an inserted block that keeps its input's width and size (C2PSA)
        else:
            break
    widths = {index: t_maps[t][0] for index, t in stands_for.items() if t in t_maps}
    return AlignedTeacher(teacher, matched, widths, len(student.model))


def fits_map(s_map: tuple[int, int] | None, t_map: tuple[int, int] | None) -> bool:
    """Whether a student layer's output map (channels, height) can be the teacher's kept channels: no wider, the same
    size (a wider one would repeat the teacher's channels to the layers reading it); layers with no single map pass."""
    return s_map is None or t_map is None or (s_map[0] <= t_map[0] and s_map[1] == t_map[1])


def matches(index: int, layer: nn.Module, t_layer: nn.Module) -> bool:
    """Whether the student's layer can take the teacher layer's weights in part: of its type or derived from it,
    with no chained block only in the teacher and no narrower attention heads."""
    if not isinstance(layer, type(t_layer)):
        return False
    prefix = f"model.{index}"
    return layer_problem(list(layer.named_modules(prefix=prefix)), dict(t_layer.named_modules(prefix=prefix))) is None


def shared_tensors(student: nn.Module, teacher: nn.Module, aligned: AlignedTeacher) -> list[str]:
    """The student tensors the aligned teacher seeds: in a matched layer, those whose module and every module around
    it in the layer are of the teacher's kind (:func:`same_kind`), where the teacher's tensor is as large in every
    dimension with the same kernel; a conv and its BatchNorm both or neither; not the head's last convs where they
    mean other things, nor fixed ones (the DFL's bin values)."""
    s_modules, t_modules = dict(student.named_modules()), dict(aligned.named_modules())
    t_state = aligned.state_dict()
    head = f"model.{len(student.model) - 1}."
    other_outputs = [
        pattern
        for pattern, differs in (
            (HEAD_BOX_OUT, student.model[-1].reg_max != getattr(aligned.model[-1], "reg_max", None)),
            (HEAD_CLASS_OUT, class_names(student) != class_names(teacher)),
        )
        if differs
    ]
    fixed = {name for name, p in student.named_parameters() if not p.requires_grad}
    deeper_outputs = tuple(  # a C2f-style block with more sub-blocks than the teacher's: its output conv reads more
        f"{name}.cv2."
        for name, m in s_modules.items()
        if isinstance(m, tuple(CONCATENATED)) and len(m.m) > len(getattr(t_modules.get(name), "m", m.m))
    )
    names = []
    for name, s in student.state_dict().items():
        if (t := t_state.get(name)) is None or name in fixed:
            continue
        if name.startswith(head) and any(p.match(name.removeprefix(head)) for p in other_outputs):
            continue
        path = name.split(".")
        owners = [".".join(path[:end]) for end in range(3, len(path))]  # below the layer (model.N: matches())
        layer = ".".join(path[:2])  # its type may derive from the teacher's (matches()), its computation not
        same = all(same_kind(s_modules[owner], t_modules.get(owner)) for owner in owners)
        same = same and same_kind(s_modules[layer], t_modules[layer], same_type=False)
        fits = s.dim() == t.dim() and all(a <= b for a, b in zip(s.shape, t.shape, strict=True))
        if same and fits and s.shape[2:] == t.shape[2:] and not name.startswith(deeper_outputs):
            names.append(name)
    left_out = {block(name) for name in student.state_dict() if name not in names}
    return [name for name in names if block(name) not in left_out]


def same_kind(module: nn.Module, t_module: nn.Module | None, same_type: bool = True) -> bool:
    """Computes as the teacher's module does: of the same type, adding its input to its output in both or neither
    (YOLOv8's neck bottlenecks have no shortcut, YOLO11's have), the same activation (YOLO26's SPPF has none after
    its first conv), and for a conv the same groups and stride (a depthwise conv is a Conv too); ``same_type`` False:
    any type (a layer's, which :func:`matches` checked)."""
    parts = ("groups", "stride", "dilation")
    return (
        (type(module) is type(t_module) or not same_type)
        and adds_input(module) == adds_input(t_module)
        and type(getattr(module, "act", None)) is type(getattr(t_module, "act", None))
        and (not isinstance(module, nn.Conv2d) or all(getattr(module, p) == getattr(t_module, p) for p in parts))
    )


def adds_input(module: nn.Module) -> bool:
    """Whether the module adds its input to its output: a residual block, YOLO26's SPPF, an A2C2f with its layer
    scale (YOLO12 l and x)."""
    return residual(module) or getattr(module, "gamma", None) is not None


def block(name: str) -> str:
    """The block a tensor's module is in (``model.2.m.0.cv1.conv.weight``: ``model.2.m.0.cv1``, conv and BatchNorm)."""
    return name.rsplit(".", 2)[0]


def seeded_part(student: nn.Module, names: list[str]) -> str:
    """In words, the part of the student that the tensors ``names`` (:func:`shared_tensors`, not empty) are."""
    layers = len({layer_index(name) for name in names})
    tensors = f"{len(names)} of the student's {len(student.state_dict())} tensors"
    return f"{tensors} (in {layers} layers, where the blocks match)"


def select_shared(student: nn.Module, teacher: nn.Module) -> tuple[AlignedTeacher, list[str]]:
    """The aligned teacher and the tensors it seeds (none: nothing to take)."""
    aligned = aligned_teacher(student, teacher)
    return aligned, shared_tensors(student, teacher, aligned)
