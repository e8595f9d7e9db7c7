"""Exact resume: a deterministic CPU run interrupted and resumed ends bit-identical to an uninterrupted one.

The run is set up so that the test can fail: the optimizer steps at every batch (``nbs`` = batch), so steps after
the resume point depend on the restored optimizer state and RNG; the resumed part crosses an epoch boundary; mosaic
is on before the boundary (its buffer of recently loaded images carries over) and closes after it.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

import distill_cli
from distill_cli.errors import EXIT_INTERRUPTED, EXIT_USAGE, DistillError
from distill_cli.training import train

EXACT = {"deterministic": True, "seed": 3, "ema": True, "epochs": 3, "close_mosaic": 1, "nbs": 4, "report": False}
EXACT["val_interval"] = 3  # validate the last epoch only: it costs time and changes nothing here


def interrupt_after_epoch(epoch: int):
    def callback(event: str, info: dict) -> None:
        if event == "epoch" and info["epoch"] == epoch:
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets a flag; the loop stops at the next step

    return callback


def interrupted_run(run_kwargs: dict, name: str, recipe: str = "cwd", **options: Any) -> Path:
    """The folder of a 2-epoch run stopped by SIGINT after its first epoch: its last.pt resumes it."""
    kwargs = {**run_kwargs, "epochs": 2, "name": name, "report": False, **options}
    with pytest.raises(DistillError):
        train(recipe=recipe, callback=interrupt_after_epoch(1), **kwargs)
    return Path(kwargs["project"]) / name


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["model"].state_dict()


@pytest.mark.parametrize("nbs", [4, 12], ids=["step-every-batch", "accumulation-across-epochs"])
def test_interrupted_then_resumed_run_equals_an_uninterrupted_run(run_kwargs: dict, nbs: int) -> None:
    """With nbs 12 (up to 3 batches of 4 per optimizer step, ramped up over the warm-up; 2 batches an epoch) the cut
    after epoch 1 falls inside an accumulation: the gradients summed so far must survive the resume."""
    kwargs = {**run_kwargs, **EXACT, "nbs": nbs}
    straight = train(recipe="mgd+logits", **{**kwargs, "name": "straight"})
    with pytest.raises(DistillError) as stopped:
        train(recipe="mgd+logits", callback=interrupt_after_epoch(1), **{**kwargs, "name": "cut"})
    assert stopped.value.exit_code == EXIT_INTERRUPTED and "--resume" in stopped.value.message
    cut_dir = Path(kwargs["project"]) / "cut"
    resume = torch.load(cut_dir / "weights" / "last.pt", weights_only=False)["resume"]
    assert resume["epoch"] == 0 and resume["step"] == 2 and resume["loader"]["mosaic_buffer"]
    resumed = train(resume=cut_dir)
    assert resumed.run_dir == cut_dir and resumed.epochs_done == 3
    a, b = weights(straight.last), weights(resumed.last)
    mismatched = [k for k in a if not torch.equal(a[k], b[k])]
    assert not mismatched, f"{len(mismatched)} tensors differ, e.g. {mismatched[:3]}"
    rows = (cut_dir / "results.csv").read_text().splitlines()
    assert len(rows) == 4  # header + 3 epochs, none lost or repeated


def test_the_shuffle_depends_only_on_seed_and_epoch() -> None:
    from distill_cli.data import EpochOrder

    first, second = EpochOrder(8, seed=3), EpochOrder(8, seed=3)
    orders = [list(first) for _ in range(3)]
    torch.rand(100)  # other draws from any generator change nothing
    second.start(2)
    assert list(second) == orders[2] and orders[0] != orders[1]
    assert sorted(orders[0]) == list(range(8))


def test_the_ddp_shuffle_follows_the_same_rule() -> None:
    """Each rank's share of epoch e, however many passes the persistent workers began early: set_epoch before an
    epoch would come one pass late (epoch 1 would repeat epoch 0's order), and a resume would shuffle differently."""
    from torch.utils.data.distributed import DistributedSampler

    from distill_cli.data import DistributedEpochOrder

    data = list(range(10))
    for rank in (0, 1):
        order = DistributedEpochOrder(data, num_replicas=2, rank=rank, seed=3)
        passes = [list(order) for _ in range(3)]  # no set_epoch between the passes
        reference = DistributedSampler(data, num_replicas=2, rank=rank, seed=3)
        for epoch, indices in enumerate(passes):
            reference.set_epoch(epoch)
            assert indices == list(reference)
        resumed = DistributedEpochOrder(data, num_replicas=2, rank=rank, seed=3)
        resumed.start(2)
        assert list(resumed) == passes[2] and passes[0] != passes[1]


def test_resume_of_a_run_started_by_another_version_is_refused(run_kwargs: dict) -> None:
    """The training state changes between versions (optimizer groups, config fields): one clear line, no traceback."""
    last = interrupted_run(run_kwargs, "old") / "weights" / "last.pt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    ckpt["distill"]["yolodistill_version"] = "0.1.0"
    torch.save(ckpt, last)
    with pytest.raises(DistillError, match="started by yolodistill 0.1.0 and this is .*start it again"):
        train(resume=last.parent.parent)
    ckpt["distill"]["yolodistill_version"] = distill_cli.__version__
    ckpt["distill"]["config"]["recipe"] = None  # a config without its recipe: not one that a run saved
    torch.save(ckpt, last)
    with pytest.raises(DistillError, match="its config holds no recipe"):
        train(resume=last.parent.parent)


def test_a_resumed_run_continues_in_the_folder_of_its_last_pt(
    run_kwargs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run started with a relative project folder, resumed from elsewhere (or after its folder was moved), goes on
    writing beside its last.pt, not into a new folder under the current one."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    interrupted_run(run_kwargs, "cut", project="runs")
    moved = tmp_path / "moved"
    (tmp_path / "a" / "runs" / "cut").rename(moved)
    monkeypatch.chdir(tmp_path / "b")
    resumed = train(resume=moved / "weights" / "last.pt", device="cpu")  # the device may change; nothing else
    assert resumed.run_dir == moved and resumed.epochs_done == 2
    assert len((moved / "results.csv").read_text().splitlines()) == 3
    assert not list((tmp_path / "b").iterdir()) and not (tmp_path / "a" / "runs" / "cut").exists()


@pytest.mark.parametrize(
    ("options", "dropped"),
    [({"epochs": 5}, "epochs"), ({"recipe": "cwd"}, "recipe"), ({"device": "cpu", "lr0": 0.1}, "lr0")],
)
def test_resume_refuses_changes_to_the_run(run_kwargs: dict, options: dict, dropped: str) -> None:
    run = interrupted_run(run_kwargs, "cut")
    with pytest.raises(DistillError, match=f"continues a run as it was configured; drop {dropped}$"):
        train(resume=run, **options)


def test_resume_refuses_a_data_yaml_whose_classes_were_renamed(run_kwargs: dict, tmp_path: Path) -> None:
    """The same number of classes renamed loaded without a word: best.pt kept the old names, last.pt the new."""
    data = tmp_path / "data.yaml"
    text = Path(run_kwargs["data"]).read_text()
    data.write_text(text)
    last = interrupted_run(run_kwargs, "cut", data=str(data)) / "weights" / "last.pt"
    data.write_text(text.replace("2: triangle", "2: renamed"))
    before = last.read_bytes()
    said = r"trained for 3 classes and its data yaml now names 3 \(class 2: 'triangle' then, 'renamed' now\); put the"
    with pytest.raises(DistillError, match=said + r" yaml's names back, or start a new run$") as refused:
        train(resume=last.parent.parent)
    assert refused.value.exit_code == EXIT_USAGE and last.read_bytes() == before


def test_a_moved_last_pt_whose_run_folder_is_gone_says_where_to_put_it(run_kwargs: dict, tmp_path: Path) -> None:
    """It used to fail on the lock file of the missing folder ('cannot open .../.running')."""
    run_dir, copy = interrupted_run(run_kwargs, "gone"), tmp_path / "elsewhere" / "last.pt"
    copy.parent.mkdir()
    shutil.copy(run_dir / "weights" / "last.pt", copy)
    shutil.rmtree(run_dir)
    with pytest.raises(
        DistillError,
        match=r"the folder its run started in, '.*gone', is not found; put this file in a "
        r"folder as <folder>/weights/last.pt and resume <folder>$",
    ) as refused:
        train(resume=copy)
    assert refused.value.exit_code == EXIT_USAGE and not run_dir.exists() and list(copy.parent.iterdir()) == [copy]
    placed = tmp_path / "placed"
    (placed / "weights").mkdir(parents=True)
    shutil.copy(copy, placed / "weights" / "last.pt")
    assert train(resume=placed).epochs_done == 2


def test_a_last_pt_whose_model_names_were_edited_to_no_list_still_resumes(run_kwargs: dict) -> None:
    """The class check reads the saved model's names: an edited file whose names are a number failed with exit 1."""
    last = interrupted_run(run_kwargs, "edited") / "weights" / "last.pt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    ckpt["model"].names = 7
    torch.save(ckpt, last)
    assert train(resume=last.parent.parent).epochs_done == 2
