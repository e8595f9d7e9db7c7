"""benchmarks/default_table.py: the README's table of the default, read from the committed results."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "default_table.py"


@pytest.fixture(scope="module")
def table() -> ModuleType:
    """The script as a module (benchmarks/ is not a package); registered first, as its dataclass needs."""
    spec = importlib.util.spec_from_file_location("default_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_run_it_names_is_committed_and_rows_add_up(table: ModuleType, capsys: pytest.CaptureFixture) -> None:
    table.main()  # raises on a missing file, or on a file without runs under the label named
    lines = capsys.readouterr().out.splitlines()
    assert len([line for line in lines if line.startswith("| ") and "**0." in line]) == len(table.SETTINGS)
    total = sum(2 * len(line.split(" | ")[2].split(" (")[0].split(",")) for line in lines if "**0." in line)
    assert lines[-1].startswith("above none in ") and f" of {total} cells;" in lines[-1]
    assert lines[-1] == "above none in 213 of 240 cells; above the student as given in 184 of 206"


def test_rows_hold_the_committed_runs(table: ModuleType) -> None:
    line, counts = table.row("shared")  # gain-v33-recheck-shared.json, both recipes seed for seed (0.3.18)
    # val 0.5484 / 0.5524 / 0.5530 / 0.5541 / 0.5478, test 0.5410 / 0.5434 / 0.5372 / 0.5349 / 0.5325;
    # gap (0.5511 - 0.4574) / (0.5449 - 0.4574) = 107%, (0.5378 - 0.4373) / (0.5505 - 0.4373) = 89%
    assert "| 0,1,2,3,4 (0.3.18) |" in line
    assert "**0.551 ±0.003 / 0.538 ±0.005** | 0.545 / 0.550 | 107% / 89% |" in line
    assert counts == [10, 10, 10, 10]
    # seeds 0-2 and 3-4 from two files, for the default and for none: below none on val in seed 0 and on test in seed 2
    assert table.row("finetune9")[1] == [8, 10, 10, 10]
    # one file, both recipes seed for seed (0.3.18): seed 2 is below none on val (0.5669 against 0.5742)
    assert table.row("finetune2")[1] == [9, 10, 10, 10]
    # keep_start kept the start (0.3.22 on the Intel Xeon; seeds 0-2 in one file, 3-4 in another): test seeds 0, 2
    # and 4 below none (0.5668 against 0.5702, 0.5653 against 0.5820, 0.5661 against 0.5693)
    line, counts = table.row("batch32")
    assert "| 416 (1 + start) | 0,1,2,3,4 (0.3.22, Intel) |" in line and counts == [7, 10, 10, 10]
    # the prototype's runs (seeds 0-2) beside session 31's none, seeds 3-4 of both: seeds 2-4 below none on test
    # (0.5707 against 0.5710, 0.5655 against 0.5725, 0.5719 against 0.5761); seeds 2-4 below the student as given
    # on test (0.5803)
    assert table.row("finetune8")[1] == [7, 10, 5, 10]
    # 3 epochs at 448 px: seed 2 below none on test by 0.00002, seed 3 on val (0.5729 against 0.5752)
    assert table.row("finetune14")[1] == [8, 10, 4, 10]
    # 480 px, 156 optimizer steps: auto leaves the start off (0.3.25); seeds 0-2 from session 33's file, 3-4 from
    # session 34's, both recipes in each, every cell above none and the student as given (0.5767 / 0.5756)
    line, counts = table.row("finetune10")
    assert "| 480 (1) | 0,1,2,3,4 (0.3.22, Intel) |" in line and counts == [10, 10, 10, 10]
    # from scratch (0.3.18, one file): none val 0.3513 / 0.3755 / 0.3594, mean 0.3621; the default 0.5538 / 0.5548 /
    # 0.5552, 0.5546 ± 0.0007; no student as given, so no gap closed and no cells counted against it
    line, counts = table.row("scratch")
    assert "| - | 0.362 / 0.353 | **0.555 ±0.001 / 0.551 ±0.008** | 0.545 / 0.550 | - |" in line
    assert counts == [6, 6, 0, 0]


def test_every_row_is_marked_with_the_version_and_machine_its_files_ran_with(table: ModuleType) -> None:
    """The default's runs ran with the version named; none's with it or an earlier one from 0.3.14 (none's step has
    not changed since); a row marked Intel read only Intel runs, and the others only AMD runs."""
    marked = set()
    for name, setting in table.SETTINGS.items():
        machine = {file: str(json.loads((table.RESULTS / file).read_text()).get("machine")) for file, _ in setting.none}
        machine |= {
            file: str(json.loads((table.RESULTS / file).read_text()).get("machine")) for file, _ in setting.default
        }
        assert re.fullmatch(r"0\.3\.(1[4-9]|[2-9]\d)", setting.threads), name  # both CPU threads from 0.3.14
        assert all(setting.threads in machine[file] for file, _ in setting.default), name
        assert all(re.search(r"0\.3\.(1[4-9]|[2-9]\d)", machine[file]) for file, _ in setting.none), name
        assert all(("Intel" in m) == (setting.machine == "Intel") for m in machine.values()), name
        version = f"{setting.threads}, Intel" if setting.machine else setting.threads
        assert f"({version}) |" in table.row(name)[0], name
        marked.add(version)
    assert marked == {
        "0.3.14",
        "0.3.16",
        "0.3.18",
        "0.3.22, Intel",
        "0.3.26, Intel",
        "0.3.28, Intel",
        "0.3.30",
        "0.3.31",
        "0.3.32",
        "0.3.33",
    }


def test_a_misspelt_label_is_an_error_not_a_dropped_seed(table: ModuleType) -> None:
    with pytest.raises(KeyError, match="no runs labelled 'defualt'"):
        table.runs("shared", [("gain-v21-default-seeds.json", "defualt")])
