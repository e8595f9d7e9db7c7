"""Schedules equal their formulas; the config schema rejects unknown keys and applies --set overrides."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest

from distill_cli.config import (
    Recipe,
    RunConfig,
    Schedule,
    config_from_dict,
    config_to_dict,
    describe_recipes,
    list_recipes,
    load_recipe,
    recipe_from_dict,
    recipe_path,
)
from distill_cli.errors import DistillError
from distill_cli.overrides import apply_overrides, parse_overrides
from distill_cli.schedule import lr_factor, warmup_steps, weight_factor
from distill_cli.settings import resolve_config

EPOCHS, SPE = 10, 5  # 50 steps


def test_constant_schedule_and_stop_epoch() -> None:
    schedule = Schedule(stop_epoch=-2)  # no distillation in the last 2 epochs
    assert weight_factor(schedule, 0, EPOCHS, SPE) == 1.0
    assert weight_factor(schedule, 39, EPOCHS, SPE) == 1.0
    assert weight_factor(schedule, 40, EPOCHS, SPE) == 0.0
    assert weight_factor(Schedule(stop_epoch=3), 15, EPOCHS, SPE) == 0.0


def test_linear_and_cosine_decay_to_final() -> None:
    linear = Schedule(kind="linear", final=0.2)
    assert weight_factor(linear, 25, EPOCHS, SPE) == pytest.approx(1 - 0.8 * 25 / 50)
    cosine = Schedule(kind="cosine", final=0.0)
    for step in (0, 10, 25, 49):
        assert weight_factor(cosine, step, EPOCHS, SPE) == pytest.approx(0.5 * (1 + math.cos(math.pi * step / 50)))


def test_warmup_ramp_then_decay_over_the_rest() -> None:
    schedule = Schedule(kind="linear", final=0.0, warmup_epochs=2, stop_epoch=8)
    assert weight_factor(schedule, 5, EPOCHS, SPE) == pytest.approx(0.5)  # half-way up the 10-step ramp
    # after warm-up, decay spans steps 10..40: at 25 half-way down
    assert weight_factor(schedule, 25, EPOCHS, SPE) == pytest.approx(0.5)
    assert weight_factor(schedule, 40, EPOCHS, SPE) == 0.0


def test_schedule_counts_global_steps_not_epoch_steps() -> None:
    schedule = Schedule(kind="linear", final=0.0)
    values = [weight_factor(schedule, epoch * SPE, EPOCHS, SPE) for epoch in range(EPOCHS)]
    assert values == sorted(values, reverse=True) and len(set(values)) == EPOCHS


def test_lr_factor_linear_and_cosine() -> None:
    cfg = RunConfig(epochs=10, lrf=0.01)
    assert lr_factor(cfg, 0) == 1.0 and lr_factor(cfg, 10) == pytest.approx(0.01)
    cos = RunConfig(epochs=10, lrf=0.01, cos_lr=True)
    assert lr_factor(cos, 5) == pytest.approx(0.505)


def test_every_shipped_recipe_loads_and_is_described() -> None:
    names = list_recipes()
    shipped = ("mgd", "cwd", "pkd", "logits", "mgd+logits", "cwd+logits", "sl2", "at", "default")
    for required in (*shipped, "none", "bckd", "crosskd"):
        assert required in names
    rows = describe_recipes()
    assert all(row["description"] for row in rows)


def test_unknown_keys_are_errors_naming_valid_keys() -> None:
    with pytest.raises(DistillError, match="unknown key 'epoch'.*epochs"):
        config_from_dict({"epoch": 3})
    with pytest.raises(DistillError, match="unknown key 'losses.cwd.schedule.decay'"):
        config_from_dict({"recipe": {"losses": {"cwd": {"schedule": {"decay": 1}}}}})
    with pytest.raises(DistillError, match="must be a number"):
        config_from_dict({"lr0": "fast"})


def test_set_overrides_reach_run_recipe_and_method_fields() -> None:
    cfg = RunConfig(recipe=load_recipe("cwd+logits"))
    sets = parse_overrides(
        [
            "epochs=3",
            "losses.cwd.weight=2.5",
            "losses.cwd.tau=4",
            "losses.cwd.schedule.kind=cosine",
            "layers=[15,18]",
            "losses.pkd.weight=0.5",
            "losses.pkd.schedule.kind=linear",  # the schedule of a term that --set added
            "losses.cls_kd.params.temperature=2",  # the YAML's params section, spelt out
        ]
    )
    out = apply_overrides(cfg, sets)
    assert out.recipe.losses["pkd"].schedule.kind == "linear" and out.recipe.losses["cls_kd"].params["temperature"] == 2
    assert out.epochs == 3
    assert out.recipe.losses["cwd"].weight == 2.5 and out.recipe.losses["cwd"].params["tau"] == 4
    assert out.recipe.losses["cwd"].schedule.kind == "cosine"
    assert out.recipe.layers == [15, 18]
    assert out.recipe.losses["pkd"].weight == 0.5  # --set can add a term
    assert cfg.epochs == 100  # the original is untouched
    with pytest.raises(DistillError, match="unknown setting 'bogus'"):
        apply_overrides(cfg, {"bogus": 1})
    with pytest.raises(DistillError, match="--set losses: give a mapping of terms; --recipe none trains without"):
        apply_overrides(cfg, parse_overrides(["losses="]))  # not a silent "no distillation" under the recipe's name
    for empty in ("losses=[]", "losses={}", "recipe.losses=0"):
        with pytest.raises(DistillError, match="give a mapping of terms"):
            apply_overrides(cfg, parse_overrides([empty]))
    with pytest.raises(DistillError, match="recipe 'losses' must be a mapping"):
        recipe_from_dict({"losses": []})
    assert recipe_from_dict({"losses": None}).losses == {}  # a file's 'losses:' with every term commented out
    spelt = apply_overrides(cfg, parse_overrides(["losses.cwd.params={tau: 3}"]))  # given once, as a mapping
    assert spelt.recipe.losses["cwd"].params["tau"] == 3
    with pytest.raises(DistillError, match="--set losses.cwd.tau: given twice"):
        apply_overrides(cfg, parse_overrides(["losses.cwd.params={tau: 2}", "losses.cwd.tau=3"]))
    with pytest.raises(DistillError, match=r"--set losses.cwd.tau is given twice \(as recipe.losses.cwd.tau\)"):
        parse_overrides(["recipe.losses.cwd.tau=3", "losses.cwd.tau=2"])  # one field, spelt two ways
    for nothing in ("losses.cwd.params=", "losses.cwd.params={}", "losses.pkd.params=2"):
        with pytest.raises(DistillError, match="give the parameters as a mapping"):
            apply_overrides(cfg, parse_overrides([nothing]))
    with pytest.raises(DistillError, match="key=value"):
        parse_overrides(["epochs"])


def test_config_round_trips_through_plain_data() -> None:
    cfg = apply_overrides(RunConfig(recipe=load_recipe("mgd+logits")), {"losses.mgd.alpha": 1e-5})
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_automatic_balance_scales_each_term_to_its_target_share() -> None:
    import torch

    from distill_cli.engine import TrainState, term_weights, update_balance

    cfg = apply_overrides(
        RunConfig(recipe=load_recipe("cwd+logits")),
        {"balance.target": 0.5, "balance.steps": 2, "losses.cwd.weight": 2.0},
    )
    state = TrainState(
        cfg,
        None,
        None,
        None,
        None,
        None,
        torch.device("cpu"),
        None,
        steps_per_epoch=10,
        accumulate=1,
        max_grad_norm=10.0,
    )
    for det, cwd, cls in ((4.0, 1.0, 0.1), (2.0, 3.0, 0.3)):
        terms = {"cwd": torch.tensor(cwd), "cls_kd": torch.tensor(cls), "dfl_kd": torch.tensor(0.0)}
        update_balance(state, torch.tensor(det), terms)
        state.step += 1
    # mean det 3, mean cwd 2 (x weight 2 = 4): factor 0.5 * 3 / 4; a zero term keeps factor 1
    assert state.balance["cwd"] == pytest.approx(0.375)
    assert state.balance["cls_kd"] == pytest.approx(0.5 * 3 / (0.2 * 3.0))  # the recipe weighs cls_kd 3
    assert state.balance["dfl_kd"] == 1.0
    assert term_weights(state)["cwd"] == pytest.approx(2.0 * 0.375)  # weighted cwd = 0.5 x det


def test_automatic_balance_reads_terms_in_the_graph_without_a_torch_warning() -> None:
    """The terms it averages are in the autograd graph: float() of them made torch warn in every balanced run."""
    import warnings

    import torch

    from distill_cli.engine import TrainState, update_balance

    cfg = apply_overrides(RunConfig(recipe=load_recipe("cwd")), {"balance.target": 1.0, "balance.steps": 1})
    state = TrainState(
        cfg,
        model=None,
        teacher=None,
        optimizer=None,
        scaler=None,
        ema=None,
        device=torch.device("cpu"),
        amp_dtype=None,
        steps_per_epoch=10,
        accumulate=1,
        max_grad_norm=10.0,
    )
    det, cwd = (torch.tensor(v, requires_grad=True) * 1 for v in (2.0, 4.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        update_balance(state, det, {"cwd": cwd})
    assert state.balance["cwd"] == pytest.approx(2.0 / (4.0 * cfg.recipe.losses["cwd"].weight))


def test_layer_lists_must_hold_indices() -> None:
    assert config_from_dict({"recipe": {"layers": [15, 18]}}).recipe.layers == [15, 18]
    with pytest.raises(DistillError, match="'layers' must be a layer group name or a list of layer indices"):
        config_from_dict({"recipe": {"layers": [15, "x"]}})


@pytest.mark.parametrize(("stop", "epochs"), [(-10, 5), (-5, 5), (0, 5), (-1, 1)])
def test_a_stop_epoch_that_leaves_a_term_no_epoch_is_refused(stop: int, epochs: int, tmp_path) -> None:
    """It would train without that term while config.yaml and the checkpoints still name the recipe."""
    term = {"losses.cls_kd.schedule.stop_epoch": stop}
    with pytest.raises(DistillError, match=f"stop_epoch {stop} leaves 'cls_kd' none of the run's {epochs} epoch"):
        resolve_config(recipe="default", epochs=epochs, project=str(tmp_path / "runs"), **term)
    assert not (tmp_path / "runs").exists()
    for stop_epoch in (1, -1, 7):  # one epoch with the term, all but the last one, never stopped
        term = {"losses.cls_kd.schedule.stop_epoch": stop_epoch}
        cfg = resolve_config(recipe="default", epochs=2, **term)
        assert cfg.recipe.losses["cls_kd"].schedule.stop_epoch == stop_epoch


def test_recipe_name_is_chosen_with_the_recipe_not_set() -> None:
    with pytest.raises(DistillError, match="--set recipe_name: choose the recipe with --recipe"):
        resolve_config(recipe="default", recipe_name="cwd")
    cwd = load_recipe("cwd")
    assert resolve_config(RunConfig(recipe=cwd)).recipe_name == "custom"  # its terms are not the default's
    assert resolve_config(RunConfig(recipe=cwd, recipe_name="cwd")).recipe_name == "cwd"
    assert resolve_config(RunConfig()).recipe_name == "default"
    assert resolve_config(RunConfig(recipe=load_recipe("default"))).recipe_name == "default"
    empty = resolve_config(RunConfig(recipe=Recipe()))  # no terms given on purpose: not the default's
    assert empty.recipe == Recipe() and empty.recipe_name == "custom"
    assert resolve_config(RunConfig(recipe=Recipe(), recipe_name="cwd")).recipe_name == "custom"
    assert resolve_config(RunConfig(recipe=Recipe(), recipe_name="none")).recipe_name == "none"  # none's terms
    with pytest.raises(DistillError, match="a recipe is a name or a YAML path, got a blank text"):
        resolve_config(RunConfig(recipe_name=" "))  # it trained without terms, under a blank name
    assert resolve_config(RunConfig(recipe=load_recipe("cwd"), recipe_name=" ")).recipe_name == "custom"
    with pytest.raises(DistillError, match=r"^unknown recipe 'a\\nb'; valid recipes: at, "):  # one line
        resolve_config(recipe="a\nb")
    with pytest.raises(DistillError, match=r"^recipe file 'a\\nb.yaml' not found; give a YAML path"):
        resolve_config(recipe="a\nb.yaml")


def test_a_recipe_given_keeps_its_name_only_where_the_name_loads_to_its_terms(tmp_path) -> None:
    """Before, only shipped names were checked: an unknown name or a path whose file holds other terms stayed the
    run's label in its config, report and JSON."""
    cwd = load_recipe("cwd")
    assert resolve_config(RunConfig(recipe=cwd, recipe_name="typo")).recipe_name == "custom"
    mine = tmp_path / "mine.yaml"
    mine.write_text(recipe_path("cwd").read_text())
    assert resolve_config(RunConfig(recipe=cwd, recipe_name=str(mine))).recipe_name == str(mine)
    assert resolve_config(RunConfig(recipe=Recipe(), recipe_name=str(mine))).recipe_name == "custom"
    assert resolve_config(RunConfig(recipe=cwd, recipe_name=str(tmp_path / "gone.yaml"))).recipe_name == "custom"
    assert resolve_config(RunConfig(recipe=cwd, recipe_name="x" * 300)).recipe_name == "custom"


def test_a_recipe_path_longer_than_the_system_takes_is_bad_input_in_the_python_api() -> None:
    """It was an OSError (ENAMETOOLONG) from the filesystem; the CLI already made it exit 2 with this line."""
    for long in ("x" * 300, "x" * 300 + ".yaml"):
        with pytest.raises(DistillError, match=r"^a path is longer than this system takes: 'x{59}\.\.\. \(30[05] "):
            load_recipe(long)


def test_a_config_without_a_recipe_means_the_named_one_through_every_path() -> None:
    """RunConfig's recipe None stands for the recipe its recipe_name names: a round trip through the config's data
    keeps it so, and a recipe field changed before it is loaded changes the named recipe's."""
    default = load_recipe("default")
    data = config_to_dict(RunConfig())
    assert data["recipe"] is None and resolve_config(config_from_dict(data)).recipe == default
    assert resolve_config(apply_overrides(RunConfig(), {"epochs": 2})).recipe == default
    changed = resolve_config(apply_overrides(RunConfig(recipe_name="cwd"), {"teacher_scale": "1", "layers": [15]}))
    assert changed.recipe == replace(load_recipe("cwd"), teacher_scale="1", layers=[15])
    assert changed.recipe_name == "custom"
    assert resolve_config(RunConfig(), **{"losses.cwd.weight": 2}).recipe.losses.keys() == {"cls_kd", "box_kd", "cwd"}


def test_number_fields_take_exponents_without_a_dot() -> None:
    """YAML 1.1 reads ``1e9`` and ``2e-5`` as strings; a number field takes them as the numbers they are, an int
    field where the number is whole."""
    cfg = apply_overrides(RunConfig(), parse_overrides(["grad_clip=1e9", "losses.mgd.alpha=2e-5", "epochs=1e2"]))
    assert cfg.grad_clip == 1e9 and cfg.recipe.losses["mgd"].params["alpha"] == 2e-5
    assert cfg.epochs == 100 and type(cfg.epochs) is int
    bad = {
        "grad_clip=abc": "'grad_clip' must be a number, got 'abc'",
        "grad_clip=1e999": "'grad_clip' must be a finite number within ±1e300, got inf",
        "epochs=1.5e0": "'epochs' must be a whole number, got 1.5",
        "epochs=" + "9" * 23: "'epochs' must be a whole number within ±2147483647, got a number of about 23",
    }
    for override, message in bad.items():
        with pytest.raises(DistillError, match=re.escape(message)):
            apply_overrides(RunConfig(), parse_overrides([override]))


def test_layers_for_a_recipe_whose_terms_do_not_read_them_is_refused() -> None:
    with pytest.raises(DistillError, match=r"--layers: no term of the recipe \(terms: cls_kd, box_kd\) distils"):
        resolve_config(recipe="default", layers="neck")  # output terms only: the layers would be ignored
    with pytest.raises(DistillError, match="--set losses.cwd.layers=null makes cwd read them"):
        resolve_config(recipe="cwd", **{"losses.cwd.layers": [15], "recipe.layers": "neck"})  # cwd has its own
    assert resolve_config(recipe="cwd", layers="neck").recipe.layers == "neck"
    assert resolve_config(recipe="default", layers="neck", **{"losses.mgd.weight": 1}).recipe.layers == "neck"
    own = {"losses.cwd.layers": [15], "layers": "neck"}
    assert resolve_config(recipe="cwd", **{**own, "losses.cwd.layers": None}).recipe.losses["cwd"].layers is None


def test_a_one_epoch_run_still_warms_up_and_longer_runs_keep_their_last_epoch_free() -> None:
    assert warmup_steps(RunConfig(epochs=1), 26) == 13  # half the epoch (it was 0: the full LR from the first step)
    assert warmup_steps(RunConfig(epochs=2), 26) == 26  # warmup_epochs 3, capped to leave the last epoch
    assert warmup_steps(RunConfig(epochs=8), 26) == 78
    assert warmup_steps(RunConfig(epochs=1, warmup_epochs=0), 26) == 0


def test_the_warm_up_ends_a_full_accumulation_before_the_run_does() -> None:
    """The accumulation ramps up with the warm-up; one that ran to the run's end left a short run (a yaml student,
    nbs 64) with a single optimizer step, at its first batch and LR 0 (tests/test_train.py's one-epoch runs)."""
    assert warmup_steps(RunConfig(epochs=1, batch=4, nbs=64), 2) == 0  # 2 steps, accumulating 2: no room
    assert warmup_steps(RunConfig(epochs=1, batch=4, nbs=64), 20) == 4  # 20 steps, accumulating 16
    assert warmup_steps(RunConfig(epochs=1, batch=16, nbs=64), 13) == 6  # accumulating 4: half the epoch fits
    assert warmup_steps(RunConfig(epochs=2, batch=4, nbs=64), 2) == 0  # as ultralytics would: 2, and LR 0 only
    assert warmup_steps(RunConfig(epochs=2, batch=16, nbs=16), 13) == 13  # a fine-tune accumulates 1: unchanged
