"""The README's table of the default recipe in every setting, read from the committed ``benchmarks/gain.py`` results.

Each setting names the runs that are today's code there: both recipes seed for seed, with 0.3.14 or later, which
trains on both CPU threads (other float sums, the same method), marked with that version; where a later version changed
nothing in a setting, it keeps the runs of the version that last did (benchmarks/RESULTS.md says which). Rows marked
Intel ran on the Intel Xeon of sessions 31-37, the others on the AMD EPYC; where ``keep_start: auto`` keeps the
student as given (0.3.22; from 0.3.25 only in runs of under 100 optimizer steps) the rows are the Intel runs with it
(seeds 3-4 from session 33), and finetune10's the Intel runs without it (seeds 3-4 from session 34); session 36's
five settings (finetune15-18, scratch3) ran with 0.3.26, seeds 3-4 of finetune17 and finetune18 with 0.3.27
(session 37), of finetune15, finetune16 and scratch3 with 0.3.28, as finetune19 (session 38); finetune20 with 0.3.30
on the AMD EPYC (session 39), finetune21 with 0.3.31 on the AMD EPYC (session 40), finetune22 with 0.3.32 there
(session 41); the default of cross11, cross26 and cross11native with 0.3.33 there (session 42: their students, of
another family, start from the teacher's weights in part), beside their earlier none runs. ``none`` is
seed-matched; ``gap closed`` is how far the default went from the student as given to the teacher scored at the
student's size. Each setting's schedule is read from its runs' record. No training here: it only reads JSON.

    python benchmarks/default_table.py
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
Source = list[tuple[str, str]]  # (results file, run label)


@dataclass
class Setting:
    view: str  # what teacher_scale auto picks there for the 512-px teacher (and keep_start), in the runs named
    default: Source
    none: Source
    threads: str  # the version (0.3.14 or later) of the default's runs; none's ran with it or, unchanged since, before
    machine: str = ""  # "Intel" for the Intel Xeon of sessions 31-37; the AMD EPYC otherwise


KEPT = "default, losses.cls_kd.weight=3, losses.box_kd.weight=6"  # the keep_start 1 prototype (RESULTS.md, session 32)
SEEDS34 = "gain-v39-seeds34.json"  # seeds 3-4 of the settings where the start is kept, both recipes (session 33)
SESSION36 = "gain-v42-checks.json"  # five settings fixed before any run of them, both recipes (session 36)
SESSION37 = "gain-v43-seeds34.json"  # seeds 3-4 of finetune17 and finetune18, both recipes (session 37, 0.3.27)
NEW38 = "gain-v45-finetune19.json"  # finetune19, a size never run before, fixed before its runs (session 38, 0.3.28)
NEW39 = "gain-v47-finetune20.json"  # finetune20, fixed before its runs, on the AMD EPYC (session 39, 0.3.30)
NEW40 = "gain-v48-finetune21.json"  # finetune21, fixed before its runs, on the AMD EPYC (session 40, 0.3.31)
NEW41 = "gain-v49-finetune22.json"  # finetune22, fixed before its runs, on the AMD EPYC (session 41, 0.3.32)
NEW42 = "gain-v50-{}.json"  # cross11, cross26, cross11native: the default again with 0.3.33's partial weight selection
SESSION38 = "gain-v44-seeds34.json"  # seeds 3-4 of finetune15, finetune16, scratch3, both recipes (session 38, 0.3.28)


def kept_on_intel(none_file: str) -> Setting:
    """A setting where keep_start auto keeps the start: seeds 0-2 of the default with it (its prototype, which trains
    the same numbers as 0.3.22) beside session 31's none runs of the same seeds, and seeds 3-4 of both recipes (0.3.22),
    all on the same Intel Xeon."""
    default = [("gain-v38-keep-screen.json", KEPT), (SEEDS34, "default")]
    return Setting("1 + start", default, [(none_file, "none"), (SEEDS34, "none")], "0.3.22", "Intel")


def together(view: str, *names: str, threads: str) -> Setting:
    """A setting whose default and none ran together, seed for seed, in these results files (later ones adding
    seeds)."""
    return Setting(view, [(name, "default") for name in names], [(name, "none") for name in names], threads)


def seeded_in_part(setting: str, none_file: str) -> Setting:
    """A student of another family, which 0.3.33 seeds in part from the teacher (it started at random before): the
    default's runs of session 42 on the AMD EPYC beside the earlier none runs of the same seeds (none starts at
    random, as before)."""
    return Setting(
        "2" if setting != "cross11native" else "1",
        [(NEW42.format(setting), "default")],
        [(none_file, "none")],
        "0.3.33",
    )


def on_intel(view: str, *later: str) -> Setting:
    """A setting of session 36, both recipes seed for seed, 0.3.26 on the Intel Xeon; ``later`` files add seeds (0.3.27
    changed a warning, 0.3.28 failure handling only: the same training numbers)."""
    return replace(together(view, SESSION36, *later, threads="0.3.26"), machine="Intel")


SETTINGS = {
    "finetune11": together("2", "gain-v30-finetune11.json", threads="0.3.16"),
    "shared": together("2", "gain-v33-recheck-shared.json", threads="0.3.18"),
    "scratch": together("2", "gain-v35-recheck-scratch.json", threads="0.3.18"),
    "finetune4": together("2", "gain-v34-recheck-finetune4.json", threads="0.3.18"),
    "finetune5": together("2", "gain-v33-recheck-finetune5.json", threads="0.3.18"),
    "finetune3": together("2", "gain-v34-recheck-finetune3.json", threads="0.3.18"),
    "finetune13": together("2", "gain-v32-short.json", threads="0.3.18"),
    "scratch2": together("2", "gain-v35-recheck-scratch2.json", threads="0.3.18"),
    "cross11": seeded_in_part("cross11", "gain-v31-cross11.json"),
    "cross26": seeded_in_part("cross26", "gain-v35-cross26.json"),
    "finetune7": together("1+2", "gain-v25-finetune7-threads.json", threads="0.3.14"),
    "finetune2": together("1+2", "gain-v34-recheck-finetune2.json", threads="0.3.18"),
    "finetune12": together("1+2", "gain-v30-finetune12.json", threads="0.3.16"),
    "finetune6": together("1+2", "gain-v34-recheck-finetune6.json", threads="0.3.18"),
    "batch32": replace(together("1 + start", "gain-v38-keep-batch32.json", SEEDS34, threads="0.3.22"), machine="Intel"),
    "finetune18": on_intel("1 + start", SESSION37),
    "finetune8": kept_on_intel("gain-v37-intel-high.json"),
    "finetune14": kept_on_intel("gain-v37-intel-finetune14.json"),
    "finetune20": together("1 + start", NEW39, threads="0.3.30"),
    "finetune17": on_intel("1 + start", SESSION37),
    "finetune10": Setting(  # 156 optimizer steps: auto leaves the start off (0.3.25); seeds 3-4 from session 34
        "1",
        [(name, "default, keep_start=0") for name in ("gain-v39-finetune10.json", "gain-v40-finetune10-seeds34.json")],
        [(name, "none") for name in ("gain-v39-finetune10.json", "gain-v40-finetune10-seeds34.json")],
        "0.3.22",
        "Intel",
    ),
    "native": kept_on_intel("gain-v37-intel-high.json"),
    "finetune21": together("1 + start", NEW40, threads="0.3.31"),
    "finetune22": together("1 + start", NEW41, threads="0.3.32"),
    "scratch3": on_intel("1", SESSION38),
    "finetune19": replace(together("1", NEW38, threads="0.3.28"), machine="Intel"),
    "finetune16": on_intel("1", SESSION38),
    "finetune9": together("1", "gain-v26-finetune9.json", "gain-v27-finetune9-seeds34.json", threads="0.3.14"),
    "imgsz640": together("1", "gain-v33-recheck-imgsz640.json", threads="0.3.18"),
    "finetune15": on_intel("1", SESSION38),
    "cross11native": seeded_in_part("cross11native", "gain-v31-cross11native.json"),
}


@cache  # each file feeds several rows, and each row reads it for runs, reference and schedule; never mutated
def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())["settings"]


def runs(setting: str, sources: Source) -> dict[str, dict]:
    """Seed -> {"val", "test", ...} over the sources, later ones adding seeds; a source without such runs is an error
    (a misspelt file or label would otherwise drop seeds unseen)."""
    found: dict[str, dict] = {}
    for name, label in sources:
        named = load(name).get(setting, {}).get("runs", {}).get(label)
        if not named:
            raise KeyError(f"{name} has no runs labelled {label!r} in {setting}")
        found.update(named)
    return found


def first(setting: str, sources: Source, key: str) -> dict:
    """The setting's ``key`` ("reference": the teacher's and the student as given's scores; "setting": its schedule)
    from the first source that records it."""
    for name, _ in sources:
        if key in (recorded := load(name)[setting]):
            return recorded[key]
    raise KeyError(f"no {key} for {setting} in {[name for name, _ in sources]}")


def spread(scores: list[float]) -> str:
    """Mean ± half the range (the mean alone for one seed)."""
    mean = f"{statistics.mean(scores):.3f}"
    return mean if len(scores) == 1 else f"{mean} ±{(max(scores) - min(scores)) / 2:.3f}"


def row(setting: str) -> tuple[str, list[int]]:
    """One markdown row, and its counts: cells above ``none``, cells, cells above the student as given, cells with a
    student as given (none from scratch)."""
    entry = SETTINGS[setting]
    default, none = runs(setting, entry.default), runs(setting, entry.none)
    seeds = sorted(seed for seed in default if seed in none)
    sources = entry.default + entry.none
    ref, schedule = first(setting, sources, "reference"), first(setting, sources, "setting")
    given, teacher = ref.get("student as given"), ref["teacher"]
    parts: dict[str, list[str]] = {"given": [], "none": [], "default": [], "teacher": [], "gap": []}
    above_none = above_given = 0
    for split in ("val", "test"):
        scores = [default[seed][split] for seed in seeds]
        above_none += sum(default[seed][split] > none[seed][split] for seed in seeds)
        parts["none"].append(f"{statistics.mean(none[seed][split] for seed in seeds):.3f}")
        parts["default"].append(spread(scores))
        parts["teacher"].append(f"{teacher[split]:.3f}")
        if given:
            above_given += sum(score > given[split] for score in scores)
            parts["given"].append(f"{given[split]:.3f}")
            gap = (statistics.mean(scores) - given[split]) / (teacher[split] - given[split])
            parts["gap"].append(f"{gap:.0%}")
    cells = 2 * len(seeds)
    start = "" if given else f"{Path(schedule['student']).name}, "
    what = f"{setting}: {start}{schedule['epochs']} epochs, batch {schedule['batch']}"
    version = ", ".join(filter(None, [entry.threads, entry.machine]))
    cols = [what, f"{schedule['imgsz']} ({entry.view})", ",".join(seeds) + f" ({version})"]
    cols += [" / ".join(parts[key]) or "-" for key in ("given", "none")]
    cols += [f"**{' / '.join(parts['default'])}**", " / ".join(parts["teacher"]), " / ".join(parts["gap"]) or "-"]
    cols.append(f"{above_none}/{cells} / " + (f"{above_given}/{cells}" if given else "-"))
    return "| " + " | ".join(cols) + " |", [above_none, cells, above_given, cells if given else 0]


def main() -> None:
    print(
        "| setting | imgsz (teacher view) | seeds | student as given | none | **default** | teacher at that size "
        "| gap closed | cells above none / as given |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    totals = [0, 0, 0, 0]
    for setting in SETTINGS:
        line, counts = row(setting)
        print(line)
        totals = [total + count for total, count in zip(totals, counts, strict=True)]
    print(f"\nabove none in {totals[0]} of {totals[1]} cells; above the student as given in {totals[2]} of {totals[3]}")


if __name__ == "__main__":
    main()
