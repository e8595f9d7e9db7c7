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
    total = sum(2 * len(line.split(" | ")[2].split(",")) for line in lines if "**0." in line)
    assert lines[-1].startswith("above none in ") and f" of {total} cells;" in lines[-1]
    assert lines[-1] == "above none in 152 of 170 cells; above the student as given in 129 of 142"


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
    # rerun whole with 0.3.14 (one file, marked): test seeds 0, 2 and 4 below none (0.5686, 0.5742 for seed 0)
    line, counts = table.row("batch32")
    assert "| 0,1,2,3,4 (0.3.14) |" in line and counts == [7, 10, 10, 10]
    assert table.row("finetune8")[1] == [8, 10, 6, 10]  # on test, every seed of none is below the student as given
    # 3 epochs at 448 px: below none on val in seeds 0, 1, 3 and 4 (0.5680 against 0.5695 for seed 0)
    assert table.row("finetune14")[1] == [3, 10, 2, 10]
    # from scratch (0.3.18, one file): none val 0.3513 / 0.3755 / 0.3594, mean 0.3621; the default 0.5538 / 0.5548 /
    # 0.5552, 0.5546 ± 0.0007; no student as given, so no gap closed and no cells counted against it
    line, counts = table.row("scratch")
    assert "| - | 0.362 / 0.353 | **0.555 ±0.001 / 0.551 ±0.008** | 0.545 / 0.550 | - |" in line
    assert counts == [6, 6, 0, 0]


def test_every_row_is_marked_with_the_version_every_file_it_reads_ran_with(table: ModuleType) -> None:
    marked = set()
    for name, setting in table.SETTINGS.items():
        files = {file for file, _ in setting.default + setting.none}
        machines = [str(json.loads((table.RESULTS / file).read_text()).get("machine")) for file in files]
        assert re.fullmatch(r"0\.3\.(1[4-9]|[2-9]\d)", setting.threads), name  # both CPU threads from 0.3.14
        assert all(setting.threads in m for m in machines), name
        assert f"({setting.threads}) |" in table.row(name)[0], name
        marked.add(setting.threads)
    assert marked == {"0.3.14", "0.3.16", "0.3.17", "0.3.18"}


def test_a_misspelt_label_is_an_error_not_a_dropped_seed(table: ModuleType) -> None:
    with pytest.raises(KeyError, match="no runs labelled 'defualt'"):
        table.runs("shared", [("gain-v21-default-seeds.json", "defualt")])
