"""The ``yolodistill`` command: parse, call one library function, print; a DistillError becomes one line + exit code."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import sys
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

import typer

from .command_group import STATE, Commands
from .config import DEFAULT_RECIPE, RunConfig
from .errors import EXIT_INTERRUPTED, EXIT_RUNTIME, EXIT_USAGE, DistillError, sigterm_interrupts
from .options import CompareOptions, DemoOptions, EvalOptions, ExportOptions, ProbeOptions
from .rules import path_too_long

app = typer.Typer(
    cls=Commands, add_completion=False, no_args_is_help=True, help="Knowledge distillation for YOLO detectors."
)

JSON = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")
TRUST = typer.Option(False, "--trust-checkpoint", help="Fully unpickle checkpoints (only for files you trust).")
ANY_GPU = "GPU 0 if present, else cpu"
MISMATCH = typer.Option(
    False, "--allow-class-mismatch", help="Evaluate although the data yaml's class list differs from the weights'."
)


def config_option(name: str, text: str = "") -> Any:
    """A train option that overrides config field ``name`` when given; its help shows the config's default."""
    return typer.Option(None, help=text or None, show_default=str(getattr(RunConfig, name)))


@app.callback()
def main_options(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Full tracebacks and ultralytics logs."),
) -> None:
    STATE["verbose"] = verbose
    # The network is used for one thing only: an ultralytics model name (yolo26n.pt) with no local file is fetched
    # with ultralytics' own helper, unless YOLO_OFFLINE=1 (models.fetch_named_model).
    os.environ.setdefault("YOLO_VERBOSE", str(verbose))
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    if not verbose:
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)


def handled(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn any error into one line on stderr (after the traceback with --verbose) and its exit code: a DistillError's
    own (2 bad input, 3 run failed, 130 interrupted), 130 for Ctrl-C or SIGTERM, 2 for a path longer than the system
    takes (a value given), 3 for a full disk, 1 for anything unexpected."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .console import json_alone_on_stdout

        try:
            with sigterm_interrupts(), json_alone_on_stdout() if kwargs.get("json_out") else contextlib.nullcontext():
                return command(*args, **kwargs)
        except DistillError as e:
            fail(e.message, e.exit_code)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED)
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:  # a value given: bad input
                fail(path_too_long(e.filename or e), EXIT_USAGE)
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                fail(unexpected(e), 1)
            fail(f"cannot write{f' {e.filename!r}' if e.filename else ''}: {e.strerror}", EXIT_RUNTIME)
        except Exception as e:
            fail(unexpected(e), 1)

    return wrapper


def unexpected(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" + ("" if STATE["verbose"] else " (run with --verbose for details)")


def fail(message: str, exit_code: int) -> NoReturn:
    """The error's one line on stderr (the traceback above it with --verbose), and its exit code."""
    from .console import err_console

    if STATE["verbose"]:
        err_console.print_exception()
    line = message.replace("\r", "\\r").replace("\n", "\\n")  # a path with a line break in it stays on the line
    err_console.print(f"[red]error:[/] {line}", highlight=False, soft_wrap=True)
    raise typer.Exit(exit_code) from None


@app.command("probe-channels")
@handled
def probe_channels_cmd(
    teacher: str = typer.Option(..., help="Teacher .pt or model yaml."),
    student: str = typer.Option(..., help="Student .pt or model yaml."),
    imgsz: int = typer.Option(ProbeOptions.imgsz, help="Input size of the dummy forward."),
    layers: str | None = typer.Option(None, help="Group (head_inputs, neck, backbone, all) or indices 15,18,21."),
    recipe: str | None = typer.Option(None, help="Show the pairing of each feature term of this recipe."),
    json_out: bool = JSON,
    trust_checkpoint: bool = TRUST,
) -> None:
    """List the distillable layers of both models and the layer pairs + adapters that training will use."""
    from .console import print_json, print_probe
    from .features import parse_layers
    from .probe import probe_channels

    report = probe_channels(teacher, student, imgsz, parse_layers(layers), recipe, trust_checkpoint)
    print_json(report) if json_out else print_probe(report)


@app.command()
@handled
def train(
    teacher: str | None = typer.Option(
        None, help="The teacher's trained .pt (a model yaml is untrained: --set allow_untrained_teacher=true)."
    ),
    student: str | None = typer.Option(None, help="Student .pt (fine-tune) or yaml (from scratch)."),
    data: str | None = typer.Option(None, help="ultralytics data yaml."),
    recipe: str | None = typer.Option(
        None, help="Recipe name (see `yolodistill recipes`) or YAML path.", show_default=DEFAULT_RECIPE
    ),
    epochs: int | None = config_option("epochs"),
    batch: int | None = config_option("batch", "Global batch size."),
    imgsz: int | None = config_option("imgsz", "Train and val image size."),
    device: str | None = typer.Option(None, help="cpu, 0, cuda:1 ...", show_default=ANY_GPU),
    workers: int | None = config_option("workers", "Dataloader processes."),
    amp: bool | None = typer.Option(
        None,
        "--amp/--no-amp",
        help="Mixed precision: fp16 on a GPU, bf16 on a CPU with native bf16.",
        show_default="on",
    ),
    lr0: float | None = config_option("lr0", "Initial LR (optimizer auto fits its own)."),
    seed: int | None = config_option("seed"),
    project: str | None = config_option("project", "Folder of the run folders."),
    name: str | None = config_option("name", "Run folder name (name2, name3... if taken)."),
    val_interval: int | None = config_option("val_interval", "Validate every N epochs."),
    layers: str | None = typer.Option(None, help="Override the recipe's layers: group or indices."),
    set_: list[str] = typer.Option([], "--set", help="Override any config field: --set losses.cwd.weight=2"),
    resume: str | None = typer.Option(None, help="Continue an interrupted run: its dir or last.pt."),
    report: bool | None = typer.Option(
        None, "--report/--no-report", help="Write report.md + plots.", show_default="on"
    ),
    tensorboard: bool | None = typer.Option(None, "--tensorboard", help="Also log to TensorBoard if installed."),
    json_out: bool = JSON,
    trust_checkpoint: bool = TRUST,
) -> None:
    """Distil a student from a teacher with our own training loop; writes student-only checkpoints."""
    from .console import TrainProgress, print_json
    from .features import parse_layers
    from .overrides import canonical, parse_overrides
    from .training import train as run_train

    options = {
        "teacher": teacher,
        "student": student,
        "data": data,
        "epochs": epochs,
        "batch": batch,
        "imgsz": imgsz,
        "device": device,
        "workers": workers,
        "amp": amp,
        "lr0": lr0,
        "seed": seed,
        "project": project,
        "name": name,
        "val_interval": val_interval,
        "trust_checkpoint": trust_checkpoint or None,
        "report": report,
        "tensorboard": tensorboard,
        "layers": parse_layers(layers),
    }
    given, settings = {k: v for k, v in options.items() if v is not None}, parse_overrides(set_)
    if both := sorted(set(given) & {canonical(key) for key in settings}):  # one would win without a word
        raise DistillError(f"--{both[0].replace('_', '-')} and --set {both[0]}=... both give {both[0]}; keep one")
    overrides = given | settings
    taken = sorted({"recipe", "resume", "cfg", "callback"} & set(overrides))
    if taken:  # arguments of train(), not config fields
        raise DistillError(f"--set {taken[0]}: not a config field; use --{taken[0]} where there is one")
    resume = resume or None
    recipe = recipe if resume else recipe or "default"
    if device and "," in device and "WORLD_SIZE" not in os.environ:  # one process per GPU, via torchrun
        raise typer.Exit(launch_checked(device, recipe, resume, overrides))
    result = run_train(recipe=recipe, resume=resume, callback=None if json_out else TrainProgress(), **overrides)
    if json_out and result is not None:  # the other ranks of a multi-GPU run return nothing; rank 0 prints
        print_json({**{k: v for k, v in vars(result).items() if k != "history"}, "beat_start": result.beat_start})


@app.command("eval")
@handled
def eval_cmd(
    weights: list[str] = typer.Option(..., help="Checkpoints to compare (repeat, or list after the first)."),
    more: list[str] | None = typer.Argument(None, hidden=True),
    data: str = typer.Option(..., help="ultralytics data yaml."),
    imgsz: int = typer.Option(EvalOptions.imgsz),
    batch: int = typer.Option(EvalOptions.batch),
    device: str = typer.Option(EvalOptions.device, help="cpu, 0, cuda:1 ...", show_default=ANY_GPU),
    split: str = typer.Option(EvalOptions.split),
    allow_class_mismatch: bool = MISMATCH,
    json_out: bool = JSON,
    trust_checkpoint: bool = TRUST,
) -> None:
    """Compare models side by side: params, GFLOPs, mAP50-95, mAP50, ms/img (same numbers as YOLO.val())."""
    from .console import print_eval, print_json
    from .evaluation import evaluate

    models = [*weights, *(more or [])]
    rows = evaluate(
        models, data, imgsz, batch, device, split, trust_checkpoint, allow_class_mismatch=allow_class_mismatch
    )
    print_json(rows) if json_out else print_eval(rows, f"{split} split of {data}")


@app.command()
@handled
def compare(
    weights: list[str] = typer.Option(..., help="Models to compare (repeat, or list after the first)."),
    more: list[str] | None = typer.Argument(None, hidden=True),
    data: str = typer.Option(..., help="ultralytics data yaml."),
    imgsz: int = typer.Option(CompareOptions.imgsz),
    batch: int = typer.Option(CompareOptions.batch),
    device: str = typer.Option(CompareOptions.device, help="cpu, 0, cuda:1 ...", show_default=ANY_GPU),
    split: str = typer.Option(CompareOptions.split),
    out: str = typer.Option(CompareOptions.out, help="Report folder (exp2, exp3... if taken)."),
    samples: int = typer.Option(CompareOptions.samples, help="Validation images in the predictions grid."),
    allow_class_mismatch: bool = MISMATCH,
    json_out: bool = JSON,
    trust_checkpoint: bool = TRUST,
) -> None:
    """Write a report comparing models: eval table, per-class AP, PR curves, sample predictions side by side."""
    from .comparison import compare as run_compare
    from .console import console, print_eval, print_json

    models = [*weights, *(more or [])]
    result = run_compare(
        models, data, imgsz, batch, device, split, out, samples, trust_checkpoint, allow_class_mismatch
    )
    if json_out:
        print_json(result)
    else:
        print_eval(result["table"], f"{split} split of {data}")
        console.print(f"report: {result['report']}")


@app.command()
@handled
def export(
    weights: str = typer.Option(..., help="Student checkpoint."),
    format: str = typer.Option(
        ExportOptions.format, help="Any ultralytics export format; onnx is checked against PyTorch."
    ),
    imgsz: int = typer.Option(ExportOptions.imgsz),
    output: str | None = typer.Option(None, help="Where to write (default: beside the weights)."),
    image: str | None = typer.Option(None, help="Image for the parity check (default: a drawn one)."),
    device: str = typer.Option(ExportOptions.device, help="cpu, 0, cuda:1 ... (engine needs a GPU)."),
    json_out: bool = JSON,
    trust_checkpoint: bool = TRUST,
) -> None:
    """Export the student (ONNX first) and report the largest difference to the PyTorch output."""
    from .console import console, print_json
    from .exporter import export as run_export

    result = run_export(weights, format, imgsz, output, image, trust_checkpoint, device)
    if json_out:
        print_json(result)
    else:
        diff = f"  max |onnx - torch| = {result['max_abs_diff']:.2e}" if "max_abs_diff" in result else ""
        console.print(f"exported {result['file']}{diff}")


@app.command()
@handled
def demo(
    out: str = typer.Option(DemoOptions.out, help="Folder for the generated data and the six runs."),
    epochs: int = typer.Option(DemoOptions.epochs, help="Student epochs (the teacher gets 1.5x as many)."),
    seed: int = typer.Option(DemoOptions.seed, help="Random seed of the data and every run."),
    json_out: bool = JSON,
) -> None:
    """No downloads: for YOLOv8 and YOLO26, draw a dataset, train a teacher, distil a student, compare with a plain
    student."""
    from .console import console, print_eval, print_json
    from .demo import run_demo

    report = run_demo(out, epochs, log=None if json_out else console.print, seed=seed)
    if json_out:
        print_json(report)
        return
    print_eval([{**r, "model": r["label"]} for r in report["table"]], "demo: val split of the drawn dataset")
    for row in report["table"]:
        console.print(f"{row['label']}: {row['model']}")
    console.print(f"outputs in {report['out']} (each run has its report.md)")


@app.command()
@handled
def recipes(json_out: bool = JSON) -> None:
    """List the shipped recipes with a one-line description each."""
    from .config import describe_recipes
    from .console import console, print_json, table

    rows = describe_recipes()
    if json_out:
        print_json(rows)
    else:
        console.print(
            table(
                "recipes", ["name", "terms", "description"], [[r["name"], r["terms"], r["description"]] for r in rows]
            )
        )


def launch_checked(device: str, recipe: str | None, resume: str | None, overrides: dict[str, Any]) -> int:
    """``train --device 0,1``: check the inputs once (bad input is one error line, not one per process; a stop meanwhile
    is an interruption, 130), then run the same command under torchrun and return its exit code."""
    from .dist import device_ids, launch
    from .training import check_inputs

    device_ids(device)  # the quick check first
    with warnings.catch_warnings():  # rank 0 gives them again
        warnings.simplefilter("ignore", UserWarning)
        check_inputs(recipe, resume, **overrides)
    return launch(without_option(sys.argv[1:], "--device"), device)


def without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` minus ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(f"{name}="):
            out.append(arg)
    return out


def main() -> None:
    """The console script: the command, then the interpreter's teardown (most of a second with torch loaded), during
    which a stop is ignored: the command's exit code and output stand. A SIGTERM there killed the process with 143
    after a success; a SIGINT gave 0 with a KeyboardInterrupt traceback, or 130."""
    try:
        app()
    except SystemExit:
        with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
            for stop in (signal.SIGINT, signal.SIGTERM):
                signal.signal(stop, signal.SIG_IGN)
        raise


if __name__ == "__main__":
    main()
