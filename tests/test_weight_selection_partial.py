"""Weight selection across families: a student the teacher cannot seed whole (YOLO11n or YOLO26n from YOLOv8s) takes
the teacher's weights in the layers the two share, matched in order, block by block where the blocks match, and keeps
its random start elsewhere; the run and probe-channels say which part."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from ultralytics.nn.tasks import DetectionModel

from distill_cli.partial_selection import aligned_teacher, block, select_shared
from distill_cli.probe import probe_channels
from distill_cli.weight_selection import (
    kept_channels,
    layer_index,
    select_weights,
    selection_indices,
    selection_problem,
)

from .test_weight_selection import build, started_from, with_random_statistics

V8S_IN_YOLO11N = [  # v8's C2f blocks for YOLO11's C3k2: whole where YOLO11 has plain bottlenecks, else but m.0
    *("model.0", "model.1", "model.2.cv1", "model.2.cv2", "model.2.m.0.cv1", "model.2.m.0.cv2", "model.3"),
    *("model.4.cv1", "model.4.cv2", "model.4.m.0.cv1", "model.4.m.0.cv2", "model.5", "model.6.cv1", "model.6.cv2"),
    *("model.7", "model.8.cv1", "model.8.cv2", "model.9.cv1", "model.9.cv2"),  # 10: C2PSA, only in YOLO11
    *(f"model.{i}.{part}" for i in (13, 16, 19) for part in ("cv1", "cv2")),  # m.0: YOLO11's adds its input
    *("model.17", "model.20", "model.22.cv1", "model.22.cv2"),
    *(f"model.23.cv2.{level}.{conv}" for level in range(3) for conv in (0, 1)),  # the box branch
]
YOLO11_HEAD = [f"model.23.cv2.{level}" for level in range(3)]  # the last box conv: 16 bins, as v8's
YOLO11_CLASS_OUT = [f"model.23.cv3.{level}" for level in range(3)]  # the last class conv: the same classes
V8S_IN_YOLO26N = [b for b in V8S_IN_YOLO11N if not b.startswith("model.9.")]  # its SPPF adds its input, no act


def teacher_layer(index: int) -> int:
    """The YOLOv8 layer a YOLO11 or YOLO26 layer matches: the same to the SPPF, one before after the C2PSA (which
    stands for the SPPF)."""
    return index if index < 10 else index - 1


@pytest.mark.parametrize(
    ("student_yaml", "blocks"),
    [
        ("yolo11n.yaml", V8S_IN_YOLO11N + YOLO11_HEAD + YOLO11_CLASS_OUT),
        ("yolo26n.yaml", V8S_IN_YOLO26N + YOLO11_CLASS_OUT),
    ],
)
def test_another_family_takes_the_teachers_matching_blocks(student_yaml: str, blocks: list[str]) -> None:
    """YOLO26's last box conv gives 4 distances, not v8's 4 x 16 bins: left out; so is its SPPF (it adds its input,
    and its first conv has no activation); its one-to-one branches have no counterpart in v8."""
    torch.manual_seed(0)
    student, teacher = build(student_yaml), with_random_statistics(build("yolov8s.yaml"))
    assert selection_problem(student, teacher) is not None
    aligned, names = select_shared(student, teacher)
    assert sorted({block(name) for name in names}) == sorted(blocks)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    select_weights(student, aligned, names)
    s, t = student.state_dict(), teacher.state_dict()
    assert torch.equal(s["model.0.conv.weight"], t["model.0.conv.weight"][::2])  # 16 of 32 outputs, 3 inputs
    assert torch.equal(s["model.2.cv1.bn.running_var"], t["model.2.cv1.bn.running_var"][::2])  # 32 of 64
    # C3k2's bottleneck is half as wide inside (e=0.5) as C2f's: 8 of 32 hidden channels, 16 of 32 inputs
    assert torch.equal(s["model.2.m.0.cv1.conv.weight"], t["model.2.m.0.cv1.conv.weight"][::4, ::2])
    # the neck's C3k2 at 13 is v8's C2f at 12; it reads the C2PSA (for v8's SPPF, 256 of 512) and layer 6 (128 of 256)
    assert torch.equal(s["model.13.cv1.conv.weight"], t["model.12.cv1.conv.weight"][::2, ::2])
    box = s["model.23.cv2.0.0.conv.weight"]  # the box branch: 64 wide in YOLO11n as in v8s, 16 in YOLO26n
    assert torch.equal(box, t["model.22.cv2.0.0.conv.weight"][:: 64 // len(box), ::2])
    untouched = [k for k in s if k not in names]
    assert any(k.startswith("model.6.m.0.") for k in untouched) and any(k.startswith("model.10.") for k in untouched)
    assert all(torch.equal(s[k], before[k]) for k in untouched)


def test_the_matched_layers_compute_the_teachers_kept_channels() -> None:
    """As for a whole selection: a teacher that ignores the input channels the student does not keep computes, on the
    channels the student keeps, what the seeded student computes at every matched layer whose blocks were all taken,
    with the student's C2PSA passed over (its output replaced by its input) as the matching passes over it, and the
    teacher's C2f blocks whose bottlenecks the student does not take (C3k blocks at 6, 8 and 22, residual ones in the
    neck) reading their two halves only (the bottlenecks' chunks of their output conv at zero)."""
    torch.manual_seed(0)
    student, teacher = build("yolo11n.yaml"), with_random_statistics(build("yolov8s.yaml"))
    with torch.no_grad():
        for index in (6, 8, 13, 16, 19, 22):
            stack = teacher.model[teacher_layer(index)]
            torch.nn.init.zeros_(stack.cv2.conv.weight[:, 2 * stack.c :])
    aligned, names = select_shared(student, teacher)
    kept = selection_indices(student, aligned, names)
    with torch.no_grad():
        for name, param in aligned.named_parameters():
            if name in kept and param.dim() == 4 and param.shape[1] > 1:
                dropped = torch.ones(param.shape[1], dtype=torch.bool)
                dropped[kept[name][1]] = False
                param[:, dropped] = 0
    select_weights(student, aligned, names)
    layer_channels, _ = kept_channels(student, aligned)
    maps: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
    for role, model in (("student", student), ("teacher", teacher)):
        for layer in model.eval().model[:-1]:
            layer.register_forward_hook(lambda _m, _i, out, role=role: maps[role].append(out))
    student.model[10].register_forward_hook(lambda _m, inputs, _out: inputs[0])  # after the recording hook
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        student(x), teacher(x)
    for index in [*range(10), *range(11, 23)]:
        want = maps["teacher"][teacher_layer(index)][:, layer_channels[index]]
        torch.testing.assert_close(maps["student"][index], want, rtol=1e-4, atol=1e-4, msg=f"layer {index}")


def test_a_conv_and_its_batchnorm_are_seeded_together_and_the_matching_ends_at_the_first_other_layer() -> None:
    """YOLOv5n's first conv is 6x6 against v8s's 3x3: neither it nor its BatchNorm is taken; its second conv is; its
    C3 at layer 2 is not a C2f and widens its input, so the matching ends there."""
    student, teacher = build("yolov5n.yaml"), build("yolov8s.yaml")
    assert {block(name) for name in select_shared(student, teacher)[1]} == {"model.1"}
    assert isinstance(aligned_teacher(student, teacher).model[2], torch.nn.Identity)


def test_the_same_family_with_other_classes_takes_all_but_the_last_class_conv() -> None:
    student, teacher = build("yolov8n.yaml"), build("yolov8s.yaml", nc=5)
    names = select_shared(student, teacher)[1]
    left_out = {block(name) for name in student.state_dict() if name not in names}
    assert left_out == {*(f"model.22.cv3.{level}" for level in range(3)), "model.22.dfl"}  # the DFL's fixed bins


def test_a_student_wider_everywhere_has_nothing_to_take() -> None:
    """YOLOv8s from YOLO26n, YOLOv8m from v8s: the first layer is wider in the student, so no layer matches (the
    box branch's last convs, as wide in both, are not taken on their own)."""
    assert select_shared(build("yolov8s.yaml"), build("yolo26n.yaml"))[1] == []
    assert select_shared(build("yolov8m.yaml"), build("yolov8s.yaml"))[1] == []


def test_a_run_and_probe_channels_say_which_part_started_from_the_teacher(run_kwargs: dict) -> None:
    part = "222 of the student's 499 tensors (in 17 layers, where the blocks match)"
    with pytest.warns(UserWarning, match=f"{re.escape(part)} start from the teacher's weights"):
        recorder, line, run_dir = started_from("default", run_kwargs, student="yolo11n.yaml")
    assert line == f"student init: weight selection from the teacher for {part}, random elsewhere"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["recipe"]["init"] == "teacher"
    teacher = torch.load(run_kwargs["teacher"], map_location="cpu", weights_only=False)["model"].float()
    assert torch.equal(recorder.student0["model.1.conv.weight"], teacher.state_dict()["model.1.conv.weight"][::2, ::2])
    verdict = probe_channels(run_kwargs["teacher"], "yolo11n.yaml", imgsz=128)["weight_selection"]
    assert verdict.startswith(f"in part: {part}, random elsewhere; ")


def yaml_with(base: str, **changes: object) -> dict:
    """An ultralytics model yaml with top-level keys replaced, and backbone layers (``layer_3=[...]``)."""
    import ultralytics

    cfg = yaml.safe_load((Path(ultralytics.__file__).parent / "cfg" / "models" / base).read_text())
    for key, value in changes.items():
        if key.startswith("layer_"):
            cfg["backbone"][int(key.removeprefix("layer_"))] = value
        else:
            cfg[key] = value
    return cfg


def test_a_student_block_deeper_than_the_teachers_keeps_its_own_output_conv() -> None:
    """A C2f with more bottlenecks in the student than in the teacher: its output conv reads more chunks than the
    teacher's has (the selection crashed with an index out of range); the bottlenecks they share are taken."""
    deeper = DetectionModel(yaml_with("v8/yolov8.yaml", scales={"n": [0.67, 0.25, 1024]}), nc=3, verbose=False)
    teacher = build("yolov8s.yaml")
    assert (len(deeper.model[2].m), len(teacher.model[2].m)) == (2, 1)
    aligned, names = select_shared(deeper, teacher)
    select_weights(deeper, aligned, names)
    assert "model.2.m.0.cv1.conv.weight" in names and not any(n.startswith("model.2.cv2.") for n in names)


def test_a_conv_that_computes_otherwise_is_not_taken() -> None:
    """Depthwise where the teacher's is dense (a DWConv is a Conv), or a layer whose stride would differ after a
    passed-over max-pool (YOLOv3-tiny's stride-1 convs against v8s's stride-2)."""
    dw = yaml_with("v8/yolov8.yaml", layer_3=[-1, 1, "DWConv", [256, 3, 2]])
    dw_names = select_shared(DetectionModel(dw, nc=3, verbose=False), build("yolov8s.yaml"))[1]
    assert "model.2.cv1.conv.weight" in dw_names and not any(n.startswith("model.3.") for n in dw_names)
    assert select_shared(build("yolov3-tinyu.yaml"), build("yolov8s.yaml"))[1] == []


def test_a_layer_wider_in_the_student_ends_the_matching() -> None:
    """YOLOv8m's SPPF is 576 wide against v8l's 512: the convs reading it would repeat teacher channels."""
    names = select_shared(build("yolov8m.yaml"), build("yolov8l.yaml"))[1]
    assert {layer_index(name) for name in names} == set(range(7))  # 7: Conv 576 wide in m, 512 in l


def test_a_resumed_run_says_the_same_part(run_kwargs: dict) -> None:
    from distill_cli.config import RunConfig, load_recipe
    from distill_cli.start import seed_student

    teacher = torch.load(run_kwargs["teacher"], map_location="cpu", weights_only=False)["model"].float()
    cfg = RunConfig(student="yolo11n.yaml", recipe=load_recipe("default"))
    student = build("yolo11n.yaml")
    student.names = teacher.names
    before = {k: v.clone() for k, v in student.state_dict().items()}
    _, resumed = seed_student(cfg, student, teacher, resuming=True)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())  # the checkpoint's come later
    with pytest.warns(UserWarning, match="start from the teacher's weights"):
        _, started = seed_student(cfg, student, teacher)
    assert (
        resumed
        == started
        == (
            "weight selection from the teacher for 222 of the student's 499 tensors (in 17 layers, where the blocks "
            "match), random elsewhere"
        )
    )
