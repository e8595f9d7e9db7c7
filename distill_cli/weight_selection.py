"""A student built from a yaml starts from a selection of its teacher's weights instead of random ones.

Weight selection (Xu et al., "Initializing Models with Larger Ones", ICLR 2024, arXiv:2311.18823): every tensor of
the student takes the elements of the teacher's tensor of the same name at an even spread along each dimension.
The paper spreads by rounding ``linspace(0, T-1, S)``; here element ``floor(i * T / S)`` of a teacher dimension of
size T for a student one of size S, which is every k-th element where the teacher is k times wider (YOLOv8s -> v8n:
twice), so the channels a layer keeps are those the next one reads. Where the parts of a concatenation differ in
width ratio (YOLOv8m's 576-channel P5 beside its 384-channel P4, for v8n's 256 and 128) each part keeps its own
spread, and the convs that read the concatenation take the same channels. Attention blocks lay their channels out
per head (``[q, k, v]`` of each head in turn), so there whole heads are kept with their parts spread within.
A deeper teacher (YOLOv8m/l/x for v8n/s) gives each repeated block of the student the teacher's first ones, the
paper's layer selection for depth; a C2f-style block's output conv then reads its leading chunks and those blocks'
outputs. The teacher needs the student's layer types in the same places (one family), kernels, classes and box bins;
otherwise the student takes what matches (:mod:`partial_selection`: the layers the two share, block by block) and
keeps its random start elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from ultralytics.nn.modules.block import C2, C2PSA, C3, A2C2f, AAttn, Attention, C2f, GhostBottleneck
from ultralytics.nn.modules.conv import Concat

from .features import blank_forward, probe_layers
from .models import class_names

Indices = dict[int, torch.Tensor]  # dimension -> the teacher's elements kept along it (elsewhere: the even spread)
# blocks that repeat a sub-block ``m`` a depth-dependent number of times. Concatenating ones feed every sub-block's
# output to their output conv, after a number of leading chunks (C2f: both halves of cv1; A2C2f: cv1), so a teacher's
# extra sub-blocks are left out by not reading their chunks. Serial ones chain them, so only a residual extra
# sub-block (its branch at zero: the identity) can be left out. Matched with isinstance: C3k2, C2fPSA and C2fCIB keep
# C2f's layout, C3k and C3x C3's.
CONCATENATED: dict[type, int] = {C2f: 2, A2C2f: 1}
SERIAL = (C3, C2, C2PSA)
CALIBRATION_IMAGES = 128


def spread(size: int, t_size: int) -> torch.Tensor:
    """The ``size`` of ``t_size`` elements kept: ``floor(i * t_size / size)``."""
    return torch.arange(size) * t_size // size


def selection_problem(student: nn.Module, teacher: nn.Module) -> str | None:
    """Why the teacher's weights cannot seed this student (None when they can)."""
    problem = structure_problem(student, teacher)
    if problem:
        return problem
    s_head, t_head = student.model[-1], teacher.model[-1]
    if s_head.reg_max != t_head.reg_max or class_names(student) != class_names(teacher):
        return "the teacher's head predicts other classes or box bins than the student's"
    t_state = teacher.state_dict()
    for name, s in student.state_dict().items():
        t = t_state.get(name)
        if t is None:
            return f"the teacher has no {name}"
        fits = s.dim() == t.dim() and all(a <= b for a, b in zip(s.shape, t.shape, strict=True))
        if not fits or s.shape[2:] != t.shape[2:]:  # kernels: a spread of a wider one would take off-centre taps
            return f"{name} is {tuple(t.shape)} in the teacher against {tuple(s.shape)} in the student"
    return layer_problem(list(student.named_modules()), dict(teacher.named_modules()))


def structure_problem(student: nn.Module, teacher: nn.Module) -> str | None:
    """Why the teacher's modules cannot seed the student's (None when they can): the teacher must have every module
    of the student, of the same type; beyond them, only further repeats of a block's sub-block (a deeper teacher:
    YOLOv8m for v8n), residual ones where the block chains them."""
    s_modules, t_modules = dict(student.named_modules()), dict(teacher.named_modules())
    for name, module in s_modules.items():
        t = t_modules.get(name)
        if type(t) is not type(module):
            where = f"{type(t).__name__} in the teacher" if t is not None else "not in the teacher"
            return f"the teacher's layers differ from the student's ({name}: {type(module).__name__}, {where})"
    stack_prefixes = tuple(f"{n}.m." for n, module in s_modules.items() if isinstance(module, (*CONCATENATED, *SERIAL)))
    extra = next((n for n in t_modules if n not in s_modules and not n.startswith(stack_prefixes)), None)
    return f"the teacher's layers differ from the student's ({extra}: only in the teacher)" if extra else None


def layer_problem(modules: list[tuple[str, nn.Module]], t_modules: dict[str, nn.Module]) -> str | None:
    """Why these student modules cannot take the teacher's of the same names: a chained block only in the teacher
    (a residual one can be left out), or fewer or narrower attention heads."""
    for name, module in modules:
        t = t_modules.get(name)
        if isinstance(module, SERIAL) and isinstance(t, SERIAL):
            first_chained = next((i for i, b in enumerate(t.m) if i >= len(module.m) and not residual(b)), None)
            if first_chained is not None:
                where = f"{name}.m.{first_chained}"
                return f"{where} is a chained block only in the teacher, without a shortcut to leave it out"
        parts = ("num_heads", "head_dim", "key_dim")  # AAttn has no key_dim: its q and k are head_dim wide
        narrower = any(getattr(t, part, 0) < getattr(module, part, 0) for part in parts)
        if isinstance(module, (Attention, AAttn)) and isinstance(t, (Attention, AAttn)) and narrower:
            return f"{name} has fewer or narrower attention heads in the teacher than in the student"
    return None


def residual(block: nn.Module) -> bool:
    """Whether the block adds its input, unchanged, to its output (Bottleneck and PSABlock with a shortcut, a
    GhostBottleneck of stride 1)."""
    if isinstance(block, GhostBottleneck):
        return isinstance(block.shortcut, nn.Identity)
    return bool(getattr(block, "add", False))


def head_rows(s_heads: int, t_heads: int, s_parts: tuple[int, ...], t_parts: tuple[int, ...]) -> torch.Tensor:
    """The teacher channels kept from a per-head layout (``parts`` of each head in turn): whole heads at an even
    spread, each part spread within its head."""
    rows = []
    for head in spread(s_heads, t_heads).tolist():
        start = head * sum(t_parts)
        for s_part, t_part in zip(s_parts, t_parts, strict=True):
            rows.append(start + spread(s_part, t_part))
            start += t_part
    return torch.cat(rows)


def attention_indices(student: nn.Module, teacher: nn.Module, layers: int) -> dict[str, Indices]:
    """Per tensor of each attention block in the first ``layers``: the rows of its q/k/v projection, and the value
    channels that its positional conv writes and its output projection reads, kept head by head."""
    t_modules = dict(teacher.named_modules())
    chosen: dict[str, Indices] = {}
    for name, s in seeded_modules(student, layers):
        t = t_modules.get(name)
        if not isinstance(s, (Attention, AAttn)) or type(t) is not type(s):
            continue
        qk_s, qk_t = (s.key_dim, t.key_dim) if isinstance(s, Attention) else (s.head_dim, t.head_dim)
        qkv = head_rows(s.num_heads, t.num_heads, (qk_s, qk_s, s.head_dim), (qk_t, qk_t, t.head_dim))
        values = head_rows(s.num_heads, t.num_heads, (s.head_dim,), (t.head_dim,))
        for key, tensor in s.state_dict().items():
            if tensor.dim() and key.startswith(("qkv.", "pe.")):
                chosen[f"{name}.{key}"] = {0: qkv if key.startswith("qkv.") else values}
        chosen[f"{name}.proj.conv.weight"] = {1: values}
    return chosen


def stack_indices(student: nn.Module, teacher: nn.Module, layers: int) -> dict[str, Indices]:
    """The input channels of each C2f-style block's output conv in the first ``layers``, which reads ``[lead chunks,
    sub-block 0 .. n-1]``: the student's lead chunks and sub-blocks take the teacher's first ones, each chunk spread
    within."""
    t_modules = dict(teacher.named_modules())
    chosen: dict[str, Indices] = {}
    for name, s in seeded_modules(student, layers):
        t = t_modules.get(name)
        lead = next(
            (chunks for kind, chunks in CONCATENATED.items() if isinstance(s, kind) and isinstance(t, kind)), None
        )
        if lead is None:
            continue
        s_chunks, t_chunks = lead + len(s.m), lead + len(t.m)
        s_width, t_width = s.cv2.conv.in_channels // s_chunks, t.cv2.conv.in_channels // t_chunks
        chunks = [c * t_width + spread(s_width, t_width) for c in range(s_chunks)]
        chosen[f"{name}.cv2.conv.weight"] = {1: torch.cat(chunks)}
    return chosen


@torch.no_grad()
def conv_readers(model: nn.Module, size: int) -> dict[str, int]:
    """One eval-mode forward: the convs that read their layer's input as it came (conv name -> the layer whose
    output that is)."""
    inputs: list[tuple[torch.Tensor, int]] = []  # the running layer's inputs and the layers they come from
    readers: dict[str, int] = {}
    handles: list[torch.utils.hooks.RemovableHandle] = []
    for index, layer in enumerate(model.model):
        sources = layer_sources(index, layer)

        def enter(_m: nn.Module, args: tuple, sources: list[int] = sources) -> None:
            tensors = args[0] if isinstance(args[0], list) else [args[0]]
            inputs[:] = list(zip(tensors, sources, strict=False))  # not strict: layer 0's image has no source

        handles.append(layer.register_forward_pre_hook(enter))
        for name, conv in layer.named_modules(prefix=f"model.{index}"):
            # a grouped conv takes its input channels along dim 0 (each group its own): it keeps the even spread,
            # consistent where it reads a plain layer's output (no ultralytics yaml has one read a concatenation)
            if isinstance(conv, nn.Conv2d) and conv.groups == 1:

                def read(_m: nn.Module, args: tuple, name: str = name) -> None:
                    source = next((src for tensor, src in inputs if tensor is args[0]), None)
                    if source is not None:
                        readers[name] = source

                handles.append(conv.register_forward_pre_hook(read))
    try:
        blank_forward(model, size)
    finally:
        for handle in handles:
            handle.remove()
    return readers


def layer_sources(index: int, layer: nn.Module) -> list[int]:
    """The layers whose outputs this one reads (none for the image)."""
    froms = [layer.f] if isinstance(layer.f, int) else layer.f
    return [source for source in (index - 1 if f == -1 else f for f in froms) if source >= 0]


def kept_channels(
    student: nn.Module, teacher: nn.Module, layers: int | None = None
) -> tuple[list[torch.Tensor], dict[str, int]]:
    """Per layer of the student below the head (or of its first ``layers``), the teacher's output channels it keeps:
    a concatenation each part's at the teacher's offset of that part, a layer without weights (upsampling) those of
    its input, any other layer the even spread. And the convs that read their layer's input (conv name -> the layer
    whose output that is)."""
    size = probe_size(student, teacher)
    s_widths, t_widths = (layer_widths(m, size) for m in (student, teacher))
    kept: list[torch.Tensor] = []
    for index, layer in enumerate(student.model[: min(layers or len(student.model), len(student.model) - 1)]):
        sources = layer_sources(index, layer)
        weightless = next(layer.parameters(), None) is None
        passes_on = weightless and len(sources) == 1 and s_widths.get(index) == s_widths.get(sources[0])
        if isinstance(layer, Concat):
            offsets = [sum(t_widths.get(s, 0) for s in sources[:i]) for i in range(len(sources))]
            kept.append(torch.cat([offset + kept[s] for offset, s in zip(offsets, sources, strict=True)]))
        elif passes_on:
            kept.append(kept[sources[0]])
        else:
            kept.append(spread(s_widths.get(index, 0), t_widths.get(index, 0)))  # 0: no single map comes out
    return kept, conv_readers(student, size)


def probe_size(student: nn.Module, teacher: nn.Module) -> int:
    """The blank image size at which both models' coarsest maps are 2 x 2: every layer runs, at little cost."""
    return 2 * int(max(student.stride.max(), teacher.stride.max()))


def layer_widths(model: nn.Module, size: int) -> dict[int, int]:
    """The channels of each layer's output map, probed with a blank image of ``size`` (an aligned teacher's, those
    of the teacher layers its layers stand for: :class:`partial_selection.AlignedTeacher`)."""
    widths = getattr(model, "widths", None)
    return widths if widths is not None else {info.index: info.channels for info in probe_layers(model, size)}


def input_indices(student: nn.Module, teacher: nn.Module, layers: int) -> dict[str, Indices]:
    """The input channels of every conv in the first ``layers`` that reads its layer's input: those its source
    layer kept."""
    kept, readers = kept_channels(student, teacher, layers)
    return {f"{name}.weight": {1: kept[source]} for name, source in readers.items() if layer_index(name) < layers}


def selection_indices(
    student: nn.Module, teacher: nn.Module, names: list[str] | None = None
) -> dict[str, list[torch.Tensor]]:
    """For every student tensor (or those ``names``), the teacher's elements it takes along each of its dimensions."""
    s_state, t_state = student.state_dict(), teacher.state_dict()
    names = list(s_state) if names is None else names
    layers = 1 + max((layer_index(name) for name in names), default=-1)
    special: dict[str, Indices] = {}
    finders = (input_indices, stack_indices, attention_indices)
    for found in (find(student, teacher, layers) for find in finders):
        for name, per_dim in found.items():
            special.setdefault(name, {}).update(per_dim)
    return {
        name: [
            special.get(name, {}).get(dim, spread(size, t_size))
            for dim, (size, t_size) in enumerate(zip(s_state[name].shape, t_state[name].shape, strict=True))
        ]
        for name in names
    }


def select_weights(student: nn.Module, teacher: nn.Module, names: list[str] | None = None) -> None:
    """Copy into the student the teacher's selected elements of every tensor (parameters and BatchNorm statistics;
    :func:`selection_problem` must have found none), or of those ``names`` (:func:`partial_selection.shared_tensors`,
    with its aligned teacher)."""
    t_state = teacher.state_dict()
    selected = {}
    for name, per_dim in selection_indices(student, teacher, names).items():
        t = t_state[name]
        for dim, kept in enumerate(per_dim):
            t = t.index_select(dim, kept.to(t.device))
        selected[name] = t
    student.load_state_dict(selected, strict=names is None)  # copies into the student's own dtype and device


def layer_index(name: str) -> int:
    """The layer a module's or tensor's name in a DetectionModel is in (``model.6.cv1.conv.weight``: 6)."""
    return int(name.split(".")[1])


def seeded_modules(student: nn.Module, layers: int) -> Iterable[tuple[str, nn.Module]]:
    """The student's named modules in its first ``layers``."""
    return ((name, m) for name, m in student.named_modules() if name.count(".") >= 1 and layer_index(name) < layers)


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, images: Iterable[torch.Tensor]) -> None:
    """Re-estimate every BatchNorm's running statistics as the plain average over ``images``. The teacher's,
    selected, describe sums over all of its input channels: a student's conv sums over a share of them, and its
    outputs come out with a fraction of that variance, so eval-mode forwards (the first validation, the report's
    "student before", frozen statistics) would normalise by the wrong scale until training had replaced them."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # None: a cumulative average over the batches seen
    training = model.training
    model.train()
    for img in images:
        model(img)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.train(training)
