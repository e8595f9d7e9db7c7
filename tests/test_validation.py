"""One validation layer: every field of every schema (run, recipe, loss parameters, schedules, command options) is
checked against the rule declared beside it, before anything is read or written, from the CLI and the Python API.

The table below is not written by hand: it walks the schema and derives an out-of-range value from each rule.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from distill_cli import config, options, overrides, rules
from distill_cli.cli import app
from distill_cli.comparison import compare
from distill_cli.config import LossSpec, Recipe, RunConfig, Schedule
from distill_cli.demo import run_demo
from distill_cli.errors import EXIT_USAGE, DistillError
from distill_cli.evaluation import evaluate
from distill_cli.exporter import export
from distill_cli.losses import LOSSES, loss_params
from distill_cli.options import CompareOptions, DemoOptions, EvalOptions, ExportOptions, ProbeOptions
from distill_cli.probe import probe_channels
from distill_cli.training import train

from .conftest import tree

runner = CliRunner()

# free-form fields: paths checked by the code that opens them, names of things, text
FREE = {
    (RunConfig, "teacher"),
    (RunConfig, "student"),
    (RunConfig, "data"),
    (RunConfig, "recipe_name"),
    (Recipe, "description"),
    (LossSpec, "type"),  # checked against the registry: see test_unknown_loss_names_are_refused
    (Schedule, "stop_epoch"),  # any epoch; negative counts from the end
    (ProbeOptions, "teacher"),
    (ProbeOptions, "student"),
    (ProbeOptions, "recipe"),
}
BAD_FOR_CHECK: dict[Callable, list[Any]] = {
    rules.device_problem: ["tpu", "cuda:x"],
    rules.layers_problem: ["bogus", [-1], [], [15, 18, 15]],
    config.blank_problem: ["  "],
    options.out_name_problem: ["runs/..", ""],
    options.checkpoint_problem: ["yolov8n.yaml"],
    options.checkpoints_problem: [[], ["yolov8n.yaml"], ["a.pt", "./a.pt"]],
    options.image_file_problem: ["missing.png", ""],
    options.output_file_problem: ["", "  ", "newdir/"],
    config.teacher_scale_problem: [
        "3",
        "0.5",
        "nan",
        "inf",
        "two",
        "",
        " 2",
        "-0",
        "1e0",
        "\u0662",
        "1+1",
        "1+3",
        "1+",
        "+2",
    ],
    config.keep_start_problem: ["-1", "101", "nan", "inf", "", " 1", "1.", "1e-5", "AUTO", "\u0662", "1+1"],
}


def bad_values(tp: Any, rule: rules.Rule | None) -> Iterator[Any]:
    """Values outside ``rule`` (and of the wrong type) for a field of type ``tp``."""
    base = typing.get_args(tp)[0] if typing.get_origin(tp) in (typing.Union, type(int | str)) else tp
    if base is bool:
        yield "maybe"
        return
    if base in (int, float):
        yield "many"
        if base is float:
            yield math.nan
    if rule is None:
        return
    step = 1 if base is int else 0.5
    yield from (v for v in (rule.ge - step if rule.ge is not None else None, rule.gt) if v is not None)
    above = None if rule.le is None else rule.le + step if rule.le + step > rule.le else rule.le * 2  # 1e38 + 0.5
    yield from (v for v in (above, rule.lt) if v is not None)
    if rule.valid_choices():
        yield "bogus"
    if rule.name:
        yield from ("../escape", "a/b", "..")
    if rule.check:
        yield from BAD_FOR_CHECK[rule.check]


def schema_cases(cls: type, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, bad value) for every field of ``cls`` and the dataclasses inside it."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        optional = typing.get_args(tp) if type(None) in typing.get_args(tp) else ()  # Recipe | None
        section = next((t for t in (tp, *optional) if dataclasses.is_dataclass(t)), None)
        if section is not None:
            yield from schema_cases(section, f"{prefix}{f.name}.")
        elif f.name == "losses":
            yield from schema_cases(LossSpec, f"{prefix}losses.cwd.")
        elif f.name == "params":
            continue  # the methods' own parameters: loss_param_cases
        else:
            values = list(bad_values(tp, f.metadata.get("rule")))
            assert values or (cls, f.name) in FREE, f"{cls.__name__}.{f.name} has no rule and is not listed as free"
            yield from ((f"{prefix}{f.name}", v) for v in values)


def loss_param_cases() -> Iterator[tuple[str, Any]]:
    for name, cls in sorted(LOSSES.items()):
        for param, default in loss_params(cls).items():
            values = list(bad_values(type(default), cls.param_rules.get(param)))
            assert values and (type(default) is bool or param in cls.param_rules), f"{name}.{param} has no rule"
            yield from ((f"losses.{name}.{param}", v) for v in values)


TRAIN_CASES = [*schema_cases(RunConfig), *loss_param_cases()]  # a field without a rule fails the collection


def as_set(key: str, value: Any) -> str:
    """``--set key=value`` with the value written in YAML."""
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).removesuffix(chr(10) + '...' + chr(10)).strip()}"


def assert_refused(result, key: str) -> None:
    assert result.exit_code == EXIT_USAGE, (key, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.stderr
    assert key.split(".")[-1] in lines[0], lines[0]


@pytest.mark.parametrize(("key", "value"), TRAIN_CASES, ids=[f"{k}={v!r}" for k, v in TRAIN_CASES])
def test_train_refuses_every_out_of_range_field(key: str, value: Any, run_kwargs: dict, quiet_folder: Path) -> None:
    before = tree(quiet_folder)
    args = ["train", "--teacher", run_kwargs["teacher"], "--student", "yolov8n.yaml", "--data", run_kwargs["data"]]
    result = runner.invoke(app, [*args, "--set", as_set(key, value)])
    assert_refused(result, key)
    api_key = key.removeprefix("recipe.")
    with pytest.raises(DistillError) as refused:
        train(recipe="cwd", **{**run_kwargs, "project": str(quiet_folder / "runs"), api_key: value})
    assert refused.value.exit_code == EXIT_USAGE and api_key.split(".")[-1] in refused.value.message
    assert tree(quiet_folder) == before


def command_calls(synthetic_data: Path, tiny_teacher: Path) -> dict[type, tuple[str, list[str], Callable]]:
    """Per options class: the CLI command, its required arguments, and the API function with those filled in."""
    data, weights = str(synthetic_data), str(tiny_teacher)
    return {
        EvalOptions: ("eval", ["--weights", weights, "--data", data], partial(evaluate, [weights], data)),
        CompareOptions: ("compare", ["--weights", weights, "--data", data], partial(compare, [weights], data)),
        ExportOptions: ("export", ["--weights", weights], partial(export, weights)),
        ProbeOptions: ("probe-channels", ["--teacher", weights, "--student", weights], partial(probe_channels, weights,
                                                                                             weights)),
        DemoOptions: ("demo", [], run_demo),
    }  # fmt: skip


OPTION_CASES = [(cls, key, value) for cls in (EvalOptions, CompareOptions, ExportOptions, ProbeOptions, DemoOptions)
                for key, value in schema_cases(cls)]  # fmt: skip


@pytest.mark.parametrize(
    ("cls", "key", "value"), OPTION_CASES, ids=[f"{c.__name__}.{k}={v!r}" for c, k, v in OPTION_CASES]
)
def test_every_command_refuses_every_out_of_range_option(
    cls: type, key: str, value: Any, synthetic_data: Path, tiny_teacher: Path, quiet_folder: Path
) -> None:
    before = tree(quiet_folder)
    command, required, call = command_calls(synthetic_data, tiny_teacher)[cls]
    with pytest.raises(DistillError) as refused:
        call(**{key: value}) if key not in ("weights", "data") else call.func(**{**fill(call), key: value})
    assert refused.value.exit_code == EXIT_USAGE and key in refused.value.message
    params = {p.name: p for p in typer_params(command)}
    if key in params and not params[key].is_flag and not isinstance(value, list):
        flag = "--" + key.replace("_", "-")
        assert_refused(runner.invoke(app, [command, *required, flag, str(value)]), key)
    assert tree(quiet_folder) == before


def fill(call: partial) -> dict[str, Any]:
    """The positional arguments of ``call`` by name (to replace one of them)."""
    names = list(inspect.signature(call.func).parameters)
    return dict(zip(names, call.args, strict=False))


def typer_params(command: str) -> list:
    import typer.main

    return typer.main.get_command(app).commands[command].params


@pytest.mark.parametrize("cls", [RunConfig, EvalOptions, CompareOptions, ExportOptions, ProbeOptions, DemoOptions])
def test_defaults_satisfy_their_own_rules(cls: type) -> None:
    hints = typing.get_type_hints(cls)
    required = {
        f.name: ["x.pt"] if hints[f.name] == list[str] else "x.pt"
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    data = {**dataclasses.asdict(cls(**required)), **required}
    if cls is RunConfig:
        assert config.config_from_dict(config.config_to_dict(RunConfig())) == RunConfig()  # recipe: None
    else:
        assert rules.validated(cls, data) == cls(**required)


def test_the_python_api_checks_a_config_object_too(run_kwargs: dict, quiet_folder: Path) -> None:
    with pytest.raises(DistillError, match="'epochs' must be >= 1"):
        train(RunConfig(**{**run_kwargs, "epochs": 0}))
    with pytest.raises(DistillError, match="'losses.cwd.tau' must be > 0"):
        train(RunConfig(**run_kwargs, recipe=Recipe(losses={"cwd": LossSpec("cwd", params={"tau": -1.0})})))
    assert tree(quiet_folder) == {"keep.txt"}


def test_a_run_name_is_a_name_not_a_path(run_kwargs: dict, tmp_path: Path) -> None:
    for name in ("../outside", "/tmp/abs", "a/b", "..", ""):
        with pytest.raises(DistillError, match="'name' must be a plain name"):
            train(recipe="cwd", **{**run_kwargs, "name": name})
    assert not (tmp_path / "outside").exists() and not Path(run_kwargs["project"]).exists()


def test_optimizer_names_follow_ultralytics_in_any_case() -> None:
    for name in ("auto", "SGD", "adam", "ADAMW", "MuSGD", "nadam", "RAdam", "Adamax", "rmsprop"):
        assert overrides.apply_overrides(RunConfig(), {"optimizer": name}).optimizer == name
    with pytest.raises(DistillError, match="'optimizer' must be one of: auto, SGD"):
        overrides.apply_overrides(RunConfig(), {"optimizer": "lion"})


def test_unknown_loss_names_are_refused() -> None:
    with pytest.raises(DistillError, match="unknown loss 'kd'"):
        overrides.apply_overrides(RunConfig(), {"losses.kd.weight": 1})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "has no 'losses'"),
        ("description: only words\n", "has no 'losses'"),
        ("losses:\n  cwd: {weight: .nan}\n", "'losses.cwd.weight' must be a finite number"),
        ("losses:\n  cwd: {weight: 1.0e+308}\n", "'losses.cwd.weight' must be a finite number within ±1e300, got"),
        ("losses:\n  cwd: {tau: -3}\n", "'losses.cwd.tau' must be > 0"),
        ("losses:\n  cwd: {schedule: {kind: sine}}\n", "'losses.cwd.schedule.kind' must be one of"),
        ("- a list\n", "has no 'losses'"),
        ("losses: [unclosed\n", "is not valid YAML"),
        ("losses:\n  cls_kd: {weight: 1}\n  cls_kd: {weight: 2}\n", "is not valid YAML: key 'cls_kd' given twice"),
        ("losses:\n  null: {weight: 1, type: cls_kd}\n", "recipe loss names are text; got None"),
        ("losses:\n  3: {weight: 1, type: cls_kd}\n", "recipe loss names are text; got 3"),
    ],
)
def test_recipe_files_are_checked_with_one_clear_message(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(DistillError, match=message) as refused:
        config.load_recipe(str(path))
    assert refused.value.message.count(str(path)) == 1  # the file is named once, not in a repeated prefix


def test_set_with_a_malformed_yaml_value_is_one_line(run_kwargs: dict) -> None:
    result = runner.invoke(app, ["train", "--teacher", run_kwargs["teacher"], "--set", "epochs=[1"])
    assert_refused(result, "epochs")


def test_readme_safety_section_lists_every_rule() -> None:
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    for line in options.describe_rules():
        assert line in readme, f"README's safety section lacks (regenerate it from options.describe_rules()): {line}"
