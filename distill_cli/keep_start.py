"""The student as given distilled beside the teacher in a fine-tune (recipe ``keep_start``).

Why: a trained student fine-tuned near the size it was trained at is already a good detector there, and a few epochs
move it little; at 448 px, where ``auto`` keeps the teacher at 1, the teacher's class lesson cost the first epoch of
every run and short runs ended below plain fine-tuning (benchmarks/RESULTS.md, sessions 19-31). Keeping the outputs
the student started with, while the teacher teaches, is Learning without Forgetting (Li and Hoiem, ECCV 2016,
arXiv:1606.09282): there a network learning a new task distils its own original outputs so as not to lose the old one.

What: each output term also distils a frozen copy of the student as given, at ``keep_start`` (r) times the teacher's
weight: ``w [D(s; t) + r D(s; s0)]``. For ``cls_kd`` as the default has it (binary KL at temperature 1, every anchor or
the positives: BCE with a soft target, less that target's entropy, and BCE is linear in its target) this is one term on
the mixed target, with the same gradient: ``D(s; t) + r D(s; s0) = (1 + r) D(s; m) + const``,
``m = (p_t + r p_s0) / (1 + r)``. So the output terms read the two models' answers mixed with shares ``1 / (1 + r)`` and
``r / (1 + r)`` (``teacher_scale.averaged``: probabilities mixed, boxes weighted by share times confidence) and count
``1 + r`` times. For every other term and form (``box_kd``, ``bckd``, a temperature, ``qfl``, ``kl``, a confidence
weighting) the mixing is the same form, not that identity: ``box_kd`` teaches where the mixed confidence passes its
threshold (with the BCCD pair at 448 px on 8 val images, about 60% of the anchors where the teacher's alone does), and
that is what was measured. ``dfl_kd`` would read a two-hot of the mixed distances in place of the teacher's DFL
distributions, so it refuses a number above 0 and ``auto`` leaves it 0. Feature and cross-head terms read the teacher
alone. The copy answers each training batch in one more forward pass, fused and in the teacher's precision.

Where: a fine-tune of a trained ``.pt`` student whose classes are the data's; a student from a yaml, or one whose class
layers start afresh for other classes, has nothing to keep, and its run records ``keep_start: 0`` (a number given in the
recipe says so in a warning). ``auto`` keeps the start (at 1, the two models' answers averaged) only where the student
was trained at the run's size or up to ``KEEP_START_RATIO`` times it: far below that size the student as given is a weak
detector of the batch (the 512-px BCCD student scores 0.457 at 256 px, where plain fine-tuning reaches 0.525), and
keeping it held the default recipe's students 0.02 below the teacher alone; above it (640 px) it cost the test split
(benchmarks/RESULTS.md, session 32). And only in a run of under ``SHORT_RUN_STEPS`` optimizer steps: a longer one
recovers from the first epoch's cost and did as well without the start (session 34). Measured only on a student
fine-tuned on the data it was trained on; ``auto`` does not check the data.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

from .config import Recipe
from .errors import DistillError
from .losses import LOSSES
from .teacher_scale import REMAPPED_TERMS, averaged

# auto keeps the start in runs of under this many optimizer steps, where the teacher's class lesson cost the first
# epoch at 448 px and the run was too short to recover: without the start, five of six BCCD fine-tunes of 39-90 steps
# (416-640 px, the teacher at 1) ended below plain fine-tuning in 1 to 7 of 10 cells, and 32 cells of 130-156 steps in 3
# (session 26, before the start existed; start.warn_if_short warns from the same bound, at 416-512 px only: at 576 and
# 640 px four such settings lost 2 of 28 cells, session 36). Longer runs did as well
# without it: finetune10 (156 steps, five seeds) +0.003 val / -0.004 test with it, native over 10 epochs (130 steps,
# three seeds) -0.002 / +0.001, finetune8 at batch 8 (448 px, 130 steps) +0.002 / +0.000, each within the seeds'
# spread, for 4-10% more time (benchmarks/RESULTS.md, session 34). Just over the bound it was level too (finetune8
# over 8 epochs, 104 steps: -0.003 / +0.001); just under it (91 steps) it lifted finetune8's test (+0.002 / +0.007) and
# cost native's val (-0.004, test level; session 35): where it stops paying is not measured beyond the seeds' spread
SHORT_RUN_STEPS = 100

# auto keeps the start where the student's training size is at least the run's and under this many times it: with the
# 512-px BCCD student at 448 and 512 px (x1.14, x1) keeping it lifted the default above plain fine-tuning in 16 of 18
# cells against 11 of 18, and at 416 px (x1.23) it was level; at 256 px (x2) it cost the default 0.019. At 640 px
# (x0.8), above the size the student was trained at, it cost the default 0.005 / 0.008 (val / test, 3 seeds; session
# 32), so auto leaves it off there. 352 and 384 px (x1.45, x1.33) were not measured: the same bound as
# the teacher's views (teacher_scale.LEAST_VIEWS_SCALE) leaves them off
KEEP_START_RATIO = 1.3


def output_terms(recipe: Recipe) -> list[str]:
    """The recipe's terms that read the head's answers, which the start's are mixed into."""
    return sorted(name for name, spec in recipe.losses.items() if LOSSES[spec.type].level == "output")


def nothing_to_keep(recipe: Recipe, has_start: bool) -> str | None:
    """Why this run has no start to keep or nothing that would read it, or None."""
    if not has_start:
        return "the student has no start to keep (a yaml student, or its class layers start afresh for the data)"
    return None if output_terms(recipe) else "no output term would read the student's answers"


def mixing_problem(recipe: Recipe) -> str | None:
    """Why an output term of the recipe would learn something else from mixed answers, or None."""
    other = [name for name in output_terms(recipe) if recipe.losses[name].type not in REMAPPED_TERMS]
    if not other:
        return None
    return f"term(s) {', '.join(other)} read the teacher's DFL distributions, which mixed answers do not carry"


def checked_keep(recipe: Recipe, has_start: bool) -> Recipe:
    """The recipe with a number given for ``keep_start`` checked before any work: made 0, with a warning, where there
    is nothing to keep, refused where a term would learn something else from mixed answers; 0 and ``auto`` as they are
    (``auto`` waits for the run's length: ``resolved_keep``)."""
    if recipe.keep_start == "auto" or not recipe.keeps_start:
        return recipe
    unkept = nothing_to_keep(recipe, has_start)
    if unkept:
        warnings.warn(f"keep_start {recipe.keep_start} is not applied: {unkept}", stacklevel=3)
        return replace(recipe, keep_start="0")
    mixing = mixing_problem(recipe)
    if mixing:
        raise DistillError(f"keep_start {recipe.keep_start}: {mixing}; use keep_start 0 with this recipe")
    return recipe


def resolved_keep(recipe: Recipe, has_start: bool, trained: float | None, imgsz: int, optimizer_steps: int) -> Recipe:
    """The recipe (``checked_keep``'s) with ``keep_start`` a number: ``auto`` made 1 where the start can be kept and
    mixed, the student was ``trained`` at ``imgsz`` to ``KEEP_START_RATIO`` times it (``teacher_scale.trained_imgsz``
    of the student as loaded) and the run has under ``SHORT_RUN_STEPS`` optimizer steps, else 0; a number as given,
    written "0" where it keeps nothing."""
    if recipe.keep_start != "auto":
        return recipe if recipe.keeps_start else replace(recipe, keep_start="0")
    keepable = nothing_to_keep(recipe, has_start) is None and mixing_problem(recipe) is None
    near = keepable and trained is not None and 1 <= trained / imgsz < KEEP_START_RATIO
    return replace(recipe, keep_start="1" if near and optimizer_steps < SHORT_RUN_STEPS else "0")


def with_start(answers: dict, start: dict, keep: float, reg_max: int) -> dict:
    """The teacher's ``answers`` (per branch, in the student's encoding) mixed with the ``start``'s at shares
    ``1 : keep``; a branch the start lacks keeps the teacher's."""
    shares = [1.0 / (1.0 + keep), keep / (1.0 + keep)]
    return {b: averaged([a, start[b]], reg_max, shares) if b in start else a for b, a in answers.items()}
