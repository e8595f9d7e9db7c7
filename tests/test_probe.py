"""probe-channels: layers, strides and the default pairing, for yaml models, across families, and real checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from distill_cli.config import LossSpec, Recipe, load_recipe
from distill_cli.errors import DistillError
from distill_cli.probe import probe_channels

from .conftest import BCCD_STUDENT, BCCD_TEACHER, needs_shared


def pairs_of(report: dict, name: str = "default") -> list[tuple[int, int, int, str]]:
    return [(p["student_channels"], p["teacher_channels"], p["stride"], p["adapter"]) for p in report["pairs"][name]]


def test_yolov8n_student_yolov8s_teacher_default_pairing() -> None:
    report = probe_channels("yolov8s.yaml", "yolov8n.yaml", imgsz=256)
    assert pairs_of(report) == [
        (64, 128, 8, "64 -> 128, 1x1 conv"),
        (128, 256, 16, "128 -> 256, 1x1 conv"),
        (256, 512, 32, "256 -> 512, 1x1 conv"),
    ]
    assert report["weight_selection"] == "applies"
    layer15 = next(i for i in report["student"]["layers"] if i["index"] == 15)
    assert (layer15["module"], layer15["channels"], layer15["height"], layer15["stride"]) == ("C2f", 64, 32, 8)


def test_across_families_v8s_teacher_yolo11n_student() -> None:
    report = probe_channels("yolov8s.yaml", "yolo11n.yaml", imgsz=128)
    assert [(p["student"], p["teacher"]) for p in report["pairs"]["default"]] == [(16, 15), (19, 18), (22, 21)]
    assert [p[2] for p in pairs_of(report)] == [8, 16, 32]
    verdict = (
        "in part: 222 of the student's 499 tensors (in 17 layers, where the blocks match), random elsewhere; "
        "the teacher's layers differ from the student's (model.2: C3k2, C2f in the teacher)"
    )
    assert report["weight_selection"] == verdict


def test_layer_groups_and_index_lists_pair_by_stride() -> None:
    neck = probe_channels("yolov8s.yaml", "yolov8n.yaml", imgsz=128, layers="neck")
    assert all(p["stride"] in (8, 16, 32) for p in neck["pairs"]["default"]) and len(neck["pairs"]["default"]) == 12
    chosen = probe_channels("yolov8s.yaml", "yolo11n.yaml", imgsz=128, layers=[4, 6])
    for pair in chosen["pairs"]["default"]:
        teacher = next(i for i in chosen["teacher"]["layers"] if i["index"] == pair["teacher"])
        assert teacher["stride"] == pair["stride"]
    with pytest.raises(DistillError, match="layer 99 has no feature map"):
        probe_channels("yolov8s.yaml", "yolov8n.yaml", imgsz=128, layers=[99])


def test_recipe_pairings_are_shown_per_feature_term() -> None:
    report = probe_channels("yolov8s.yaml", "yolov8n.yaml", imgsz=128, recipe="cwd+logits")
    assert list(report["pairs"]) == ["cwd"]  # output terms need no pairing


def test_a_recipe_object_and_numpy_numbers_are_taken_as_train_takes_them() -> None:
    by_name = probe_channels("yolov8s.yaml", "yolov8n.yaml", imgsz=128, recipe="cwd+logits")
    by_object = probe_channels("yolov8s.yaml", "yolov8n.yaml", imgsz=np.int64(128), recipe=load_recipe("cwd+logits"))
    assert by_object == by_name
    chosen = probe_channels("yolov8s.yaml", "yolov8n.yaml", imgsz=np.float32(128), layers=[np.int64(15)])
    assert [p["student"] for p in chosen["pairs"]["default"]] == [15]
    broken = Recipe(losses={"cwd": LossSpec(type="cwd", params={"bogus": 1})})
    with pytest.raises(DistillError, match="no parameter 'bogus'"):  # checked as train checks it
        probe_channels("yolov8s.yaml", "yolov8n.yaml", imgsz=128, recipe=broken)
    with pytest.raises(DistillError, match=r"'imgsz' must be a number, got a Recipe$"):  # a line, not a repr
        probe_channels("yolov8s.yaml", "yolov8n.yaml", imgsz=broken)


def test_a_bad_recipe_is_refused_even_where_layers_decide_the_pairing() -> None:
    with pytest.raises(DistillError, match="unknown recipe 'nonexistent'"):
        probe_channels("yolov8s.yaml", "yolov8n.yaml", imgsz=128, layers="neck", recipe="nonexistent")


def test_layers_that_training_would_refuse_with_the_recipe_are_flagged() -> None:
    assert "train refuses these --layers" in probe_channels("yolov8s.yaml", "yolov8n.yaml", 64, layers="neck")["note"]
    assert probe_channels("yolov8s.yaml", "yolov8n.yaml", 64, layers="neck", recipe="cwd")["note"] == ""


def test_an_imgsz_off_the_stride_is_rounded_up_as_training_rounds_it() -> None:
    with pytest.warns(UserWarning, match="imgsz 33 is not a multiple of the stride 32; using 64"):
        report = probe_channels("yolov8s.yaml", "yolov8n.yaml", imgsz=33)
    assert report["imgsz"] == 64


def test_a_yaml_student_is_probed_with_the_teachers_classes(tiny_teacher) -> None:
    report = probe_channels(str(tiny_teacher), "yolov8n.yaml", imgsz=64)  # the yaml alone says 80 classes
    assert report["output_terms"]["cls_kd"] == report["output_terms"]["box_kd"] == "applies"
    assert report["weight_selection"] == "applies"


@needs_shared
def test_real_bccd_checkpoints() -> None:
    report = probe_channels(str(BCCD_TEACHER), str(BCCD_STUDENT), imgsz=512)
    assert [p[:3] for p in pairs_of(report)] == [(64, 128, 8), (128, 256, 16), (256, 512, 32)]
    assert report["weight_selection"] == "no: a trained .pt student keeps its own weights"
    assert report["teacher_scale"] == "1 (auto; imgsz 512, the teacher trained at 512)"
    assert probe_channels(str(BCCD_TEACHER), str(BCCD_STUDENT), imgsz=256)["teacher_scale"].startswith("2 (")
