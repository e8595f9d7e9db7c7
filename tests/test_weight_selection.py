"""Weight selection: a yaml student seeded from its teacher's weights (Xu et al., ICLR 2024). The elements taken,
consistency through concatenations and splits, refusal of pairs that differ in more than width, and the wiring into a
run (yaml students only; a recipe without terms still seeds; the log says what was done)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from ultralytics.nn.tasks import DetectionModel

from distill_cli.errors import DistillError
from distill_cli.training import train
from distill_cli.weight_selection import (
    SERIAL,
    calibrate_batchnorm,
    kept_channels,
    select_weights,
    selection_indices,
    selection_problem,
)

from .test_train import Recorder


def build(yaml: str, nc: int = 3) -> DetectionModel:
    return DetectionModel(yaml, nc=nc, verbose=False)


def with_random_statistics(model: DetectionModel) -> DetectionModel:
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return model


def test_each_student_tensor_takes_every_other_element_where_the_teacher_is_twice_as_wide() -> None:
    torch.manual_seed(0)
    teacher, student = with_random_statistics(build("yolov8s.yaml")), build("yolov8n.yaml")
    select_weights(student, teacher)
    s, t = student.state_dict(), teacher.state_dict()
    assert torch.equal(s["model.0.conv.weight"], t["model.0.conv.weight"][::2])  # 3 input channels in both
    assert torch.equal(s["model.2.cv2.conv.weight"], t["model.2.cv2.conv.weight"][::2, ::2])  # 64x96 -> 32x48
    assert torch.equal(s["model.2.cv2.bn.running_var"], t["model.2.cv2.bn.running_var"][::2])
    # the head: class rows (nc) and the 64 DFL outputs kept whole, inputs from the wider neck at a step of 2
    assert torch.equal(s["model.22.cv3.0.2.weight"], t["model.22.cv3.0.2.weight"][:, ::2])
    assert torch.equal(s["model.22.cv2.0.2.weight"], t["model.22.cv2.0.2.weight"])
    assert torch.equal(s["model.22.cv2.0.0.conv.weight"], t["model.22.cv2.0.0.conv.weight"][:, ::2])


@pytest.mark.parametrize(
    "pair",
    [
        ("yolov8n.yaml", "yolov8s.yaml"),
        ("yolo11n.yaml", "yolo11s.yaml"),
        ("yolo26n.yaml", "yolo26s.yaml"),
        ("yolov8n.yaml", "yolov8m.yaml"),  # deeper (2 C2f blocks for 1), P5 576 wide beside P4's 384 (n: 256, 128)
        ("yolov8n.yaml", "yolov8l.yaml"),  # 3 blocks for 1; widths x4 except P5 (x2)
        ("yolo11m.yaml", "yolo11l.yaml"),  # deeper C3k2 (concatenating) and C2PSA (chained residual PSA blocks)
        ("yolo12n.yaml", "yolo12s.yaml"),  # area attention (A2C2f)
    ],
)
def test_the_selection_is_consistent_through_every_concatenation_split_and_attention_head(
    pair: tuple[str, str],
) -> None:
    """A teacher whose layers ignore the input channels the student does not keep computes, on the channels the
    student keeps, exactly what the selected student computes: so each student layer reads the channels its previous
    layer kept. Taking the first half of each tensor breaks this at the first C2f split and every neck
    concatenation; taking every other channel inside attention blocks mixes one head's q, k and v; one spread over
    a whole concatenation breaks it where the parts differ in width ratio; for a deeper teacher, a C2f's output conv
    must read the chunks of the blocks the student has (the teacher's extra blocks then contribute nothing), and a
    chained stack's first blocks (the teacher's extra ones, residual, made the identity)."""
    torch.manual_seed(0)
    student, teacher = build(pair[0]), with_random_statistics(build(pair[1]))
    s_modules = dict(student.named_modules())
    for name, stack in teacher.named_modules():
        if isinstance(stack, SERIAL) and name in s_modules:  # in the student too: its extra blocks
            for norm in (m for b in stack.m[len(s_modules[name].m) :] for m in b.modules()):
                if isinstance(norm, torch.nn.BatchNorm2d):  # the residual branch's output: zero
                    torch.nn.init.zeros_(norm.weight), torch.nn.init.zeros_(norm.bias)
    kept = selection_indices(student, teacher)
    with torch.no_grad():
        for name, param in teacher.named_parameters():
            if name in kept and param.dim() == 4 and param.shape[1] > 1:  # not depthwise: zero the inputs not kept
                dropped = torch.ones(param.shape[1], dtype=torch.bool)
                dropped[kept[name][1]] = False
                param[:, dropped] = 0
    select_weights(student, teacher)
    layer_channels, _ = kept_channels(student, teacher)
    maps: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
    for role, model in (("student", student), ("teacher", teacher)):
        for layer in model.eval().model[:-1]:  # every layer's output map; the head's outputs are compared below
            layer.register_forward_hook(lambda _m, _i, out, role=role: maps[role].append(out))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = teacher(x)[0], student(x)[0]
    for index, (s_map, t_map) in enumerate(zip(maps["student"], maps["teacher"], strict=True)):
        torch.testing.assert_close(s_map, t_map[:, layer_channels[index]], rtol=1e-4, atol=1e-4, msg=f"layer {index}")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_attention_keeps_whole_heads_with_their_query_key_and_value() -> None:
    student, teacher = build("yolo11n.yaml"), build("yolo11s.yaml")
    s_attn, t_attn = student.model[10].m[0].attn, teacher.model[10].m[0].attn
    assert (s_attn.num_heads, t_attn.num_heads, s_attn.key_dim, s_attn.head_dim) == (2, 4, 32, 64)
    rows = selection_indices(student, teacher)["model.10.m.0.attn.qkv.conv.weight"][0]
    # heads 0 and 2 of the teacher's 4, each 128 rows: q 0-31, k 32-63, v 64-127
    assert rows.tolist() == list(range(0, 128)) + list(range(256, 384))
    values = selection_indices(student, teacher)["model.10.m.0.attn.proj.conv.weight"][1]
    assert values.tolist() == list(range(0, 64)) + list(range(128, 192))


def test_a_teacher_wider_by_a_fraction_gives_evenly_spaced_elements() -> None:
    """With COCO's 80 classes the class branch of the head is 80 wide in YOLOv8n and 128 in v8s: element
    floor(i * 128 / 80) of each, the same in the layer that writes those channels and the one that reads them."""
    torch.manual_seed(0)
    teacher, student = build("yolov8s.yaml", 80), build("yolov8n.yaml", 80)
    select_weights(student, teacher)
    kept = torch.tensor([i * 128 // 80 for i in range(80)])
    assert kept[:6].tolist() == [0, 1, 3, 4, 6, 8] and len(set(kept.tolist())) == 80
    s, t = student.state_dict(), teacher.state_dict()
    assert torch.equal(s["model.22.cv3.0.0.conv.weight"], t["model.22.cv3.0.0.conv.weight"][kept][:, ::2])
    assert torch.equal(s["model.22.cv3.0.1.conv.weight"], t["model.22.cv3.0.1.conv.weight"][kept][:, kept])
    assert torch.equal(s["model.22.cv3.0.2.weight"], t["model.22.cv3.0.2.weight"][:, kept])


@pytest.mark.parametrize("pair", [("yolo11n.yaml", "yolo11s.yaml"), ("yolo26n.yaml", "yolo26s.yaml")])
def test_other_families_select_between_their_n_and_s_scales(pair: tuple[str, str]) -> None:
    student, teacher = build(pair[0]), build(pair[1])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    assert selection_problem(student, teacher) is None
    select_weights(student, teacher)
    assert any(not torch.equal(v, before[k]) for k, v in student.state_dict().items() if v.is_floating_point())


def test_a_deeper_teacher_gives_its_first_blocks_and_each_concatenated_part_its_own_spread() -> None:
    """YOLOv8m for v8n: layer 2 is a C2f of 1 block (cv2 reads 3 chunks of 16) against 2 (4 chunks of 48); layer
    11 concatenates the upsampled P5 (256 of 576) with layer 6 (128 of 384)."""
    torch.manual_seed(0)
    student, teacher = build("yolov8n.yaml"), build("yolov8m.yaml")
    assert selection_problem(student, teacher) is None
    kept = selection_indices(student, teacher)
    assert kept["model.2.cv2.conv.weight"][1].tolist() == [c * 48 + 3 * i for c in range(3) for i in range(16)]
    concat = [i * 576 // 256 for i in range(256)] + [576 + 3 * i for i in range(128)]
    assert concat[:6] == [0, 2, 4, 6, 9, 11] and kept["model.12.cv1.conv.weight"][1].tolist() == concat
    select_weights(student, teacher)
    s, t = student.state_dict(), teacher.state_dict()
    assert torch.equal(s["model.4.m.1.cv1.conv.weight"], t["model.4.m.1.cv1.conv.weight"][::3, ::3])  # 2 of 4
    chunks = kept["model.2.cv2.conv.weight"][1]
    assert torch.equal(s["model.2.cv2.conv.weight"], t["model.2.cv2.conv.weight"][::3][:, chunks])


@pytest.mark.parametrize(
    ("student_yaml", "teacher_yaml", "nc", "reason"),
    [
        ("yolov8n.yaml", "yolo11s.yaml", 3, "(model.2: C2f, C3k2 in the teacher)"),  # another family
        ("yolo11n.yaml", "yolo11m.yaml", 3, "(model.2.m.0: Bottleneck, C3k in the teacher)"),  # other blocks
        ("yolov8m.yaml", "yolov8s.yaml", 3, "(model.2.m.1: Bottleneck, not in the teacher)"),  # shallower teacher
        # YOLOv5's head chains C3 bottlenecks without a shortcut: leaving the teacher's second one out changes the map
        ("yolov5n.yaml", "yolov5m.yaml", 3, "model.13.m.1 is a chained block only in the teacher, without a shortcut"),
        ("yolov8n.yaml", "yolov8s.yaml", 6, "other classes or box bins"),  # 6 = 2 x 3, still other classes
        ("yolov8s.yaml", "yolov8n.yaml", 3, "model.0.conv.weight is (16, 3, 3, 3) in the teacher against (32, 3"),
    ],
)
def test_a_teacher_that_differs_in_more_than_width_is_refused(
    student_yaml: str, teacher_yaml: str, nc: int, reason: str
) -> None:
    problem = selection_problem(build(student_yaml), build(teacher_yaml, nc))
    assert problem is not None and reason in problem


def test_a_teacher_with_the_same_number_of_other_classes_is_refused() -> None:
    student, teacher = build("yolov8n.yaml"), build("yolov8s.yaml")
    teacher.names = {0: "cat", 1: "dog", 2: "bird"}
    assert "other classes" in selection_problem(student, teacher)


def test_a_teacher_with_narrower_attention_heads_is_refused() -> None:
    """More heads of fewer channels would pass the shape checks: a spread of a narrower head repeats channels."""
    student, teacher = build("yolo11n.yaml"), build("yolo11s.yaml")
    teacher.model[10].m[0].attn.head_dim = 32
    assert "fewer or narrower attention heads" in selection_problem(student, teacher)


def test_batchnorm_statistics_are_the_average_over_the_calibration_batches() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4, momentum=0.03))
    model.eval()
    batches = [torch.rand(2, 3, 5, 5) * (i + 1) for i in range(3)]
    calibrate_batchnorm(model, batches)
    with torch.no_grad():
        outs = [model[0](b) for b in batches]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.transpose(0, 1).flatten(1).var(1) for o in outs]).mean(0)  # unbiased, as BatchNorm keeps
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)
    assert model[1].momentum == 0.03 and not model.training  # put back as found


def teacher_selection(teacher_path: str) -> dict[str, torch.Tensor]:
    teacher = torch.load(teacher_path, map_location="cpu", weights_only=False)["model"].float()
    student = build("yolov8n.yaml")
    student.names = teacher.names
    select_weights(student, teacher)
    return student.state_dict()


def started_from(recipe: str, run_kwargs: dict, **extra: object) -> tuple[Recorder, str, Path]:
    """The run's recorder (the student as it starts), its start-up line on the student's weights, its folder."""
    lines: list[str] = []
    recorder = Recorder()

    def callback(event: str, info: dict) -> None:
        recorder(event, info)
        lines.extend([info["student_init"]] if event == "start" else [])

    result = train(recipe=recipe, callback=callback, report=False, **{**run_kwargs, **extra})
    return recorder, lines[0], result.run_dir


def test_the_default_recipe_seeds_a_yaml_student_and_none_leaves_it_random(run_kwargs: dict) -> None:
    selected = teacher_selection(run_kwargs["teacher"])
    recorder, line, _ = started_from("default", run_kwargs)
    assert line == "student init: weight selection from the teacher"
    statistics = {k for k in selected if "running_" in k or "num_batches_tracked" in k}
    assert all(torch.equal(v, selected[k]) for k, v in recorder.student0.items() if k not in statistics)
    # the statistics were measured again on train images, the selected ones do not describe the student
    assert all(not torch.equal(recorder.student0[k], selected[k]) for k in statistics if "running_" in k)
    recorder, line, _ = started_from("none", run_kwargs, name="none")
    assert line == "student init: random" and recorder.state.teacher is None
    assert not torch.equal(recorder.student0["model.0.conv.weight"], selected["model.0.conv.weight"])


def test_a_recipe_with_only_the_init_seeds_the_student_runs_without_a_teacher_and_resumes_without_it(
    run_kwargs: dict, tmp_path: Path
) -> None:
    import shutil

    from .test_resume import interrupt_after_epoch

    recipe = tmp_path / "init-only.yaml"
    recipe.write_text("init: teacher\nlosses: {}\n")
    teacher = shutil.copy(run_kwargs["teacher"], tmp_path / "teacher.pt")
    with pytest.raises(DistillError, match="--resume"):
        train(recipe=str(recipe), callback=interrupt_after_epoch(1), **{**run_kwargs, "teacher": teacher, "epochs": 2})
    Path(teacher).unlink()  # a resumed run was seeded at its start: it needs no teacher
    recorder = Recorder()
    train(resume=Path(run_kwargs["project"]) / "exp", callback=recorder)
    assert recorder.state.teacher is None and recorder.state.cfg.recipe.init == "teacher"
    recorder, line, _ = started_from(str(recipe), run_kwargs, name="again")
    assert line == "student init: weight selection from the teacher" and recorder.state.teacher is None
    selected = teacher_selection(run_kwargs["teacher"])
    assert torch.equal(recorder.student0["model.0.conv.weight"], selected["model.0.conv.weight"])
    with pytest.raises(DistillError, match="no teacher given"):
        train(recipe=str(recipe), **{**run_kwargs, "teacher": "", "name": "no-teacher"})


def test_a_refused_pair_warns_and_its_config_says_the_student_started_at_random(
    run_kwargs: dict, tmp_path: Path
) -> None:
    """YOLOv8s from YOLO26n: wider everywhere, and no box bins in the teacher's head; nothing to take."""
    from distill_cli.data import SYNTHETIC_CLASSES

    from .conftest import save_model

    teacher = build("yolo26n.yaml")
    teacher.names = dict(enumerate(SYNTHETIC_CLASSES))
    run_kwargs = {**run_kwargs, "teacher": str(save_model(tmp_path / "yolo26n.pt", teacher))}
    with pytest.warns(UserWarning, match="the student starts from random weights, not from the teacher's"):
        recorder, line, run_dir = started_from("default", run_kwargs, student="yolov8s.yaml")
    assert line == "student init: random" and recorder.state.teacher is not None  # it still distils
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["recipe"]["init"] == "random"


def test_a_trained_student_keeps_its_own_weights_and_needs_no_teacher_to_start(
    run_kwargs: dict, tmp_path: Path
) -> None:
    from distill_cli.data import SYNTHETIC_CLASSES

    from .conftest import save_model

    torch.manual_seed(1)
    trained = build("yolov8n.yaml")
    trained.names = dict(enumerate(SYNTHETIC_CLASSES))
    student = save_model(tmp_path / "student.pt", trained)
    recorder, line, _ = started_from("default", run_kwargs, student=str(student))
    assert line == "student init: its trained weights"
    own = torch.load(student, map_location="cpu", weights_only=False)["model"].float().state_dict()
    assert all(torch.equal(v, own[k]) for k, v in recorder.student0.items())
    recipe = tmp_path / "init-only.yaml"
    recipe.write_text("init: teacher\nlosses: {}\n")
    recorder, _, _ = started_from(str(recipe), {**run_kwargs, "teacher": ""}, student=str(student), name="alone")
    assert recorder.state.teacher is None


def test_an_api_recipe_with_only_the_init_is_kept_not_replaced_by_the_named_one() -> None:
    """resolve_config reloads ``recipe_name`` only for the empty default Recipe; before, any recipe without loss
    terms was replaced, so ``RunConfig(recipe=Recipe(init="teacher"))`` silently became the default recipe."""
    from distill_cli.config import Recipe, RunConfig
    from distill_cli.settings import resolve_config

    assert resolve_config(RunConfig(recipe=Recipe(init="teacher"))).recipe == Recipe(init="teacher")
    assert resolve_config(RunConfig(recipe_name="none")).recipe.description.startswith("No distillation")
