"""How well each adapter maps the student's layer to the teacher's at the start of a run: random against fitted.

Fits the adapters of a feature recipe on the first train images (as a run does), then measures on images the fit did
not see (the val split): R^2 of the adapted student map against the teacher map (1 - residual / the teacher map's
variance around its per-channel mean; below 0 is worse than predicting that mean), and the recipe term's own loss.

    python benchmarks/adapter_fit.py --imgsz 416 --recipe cwd
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gain import BCCD, STUDENT, TEACHER  # noqa: E402
from distill_cli.adapter_fit import adapter_targets, fit_adapters  # noqa: E402
from distill_cli.config import RunConfig, load_recipe  # noqa: E402
from distill_cli.data import hyperparameters, load_data  # noqa: E402
from distill_cli.distiller import Distiller, Teacher, build_terms  # noqa: E402
from distill_cli.models import load_model  # noqa: E402
from distill_cli.start import first_train_images  # noqa: E402

FROZEN = RunConfig(bn_stats="frozen")  # a trained .pt student is fine-tuned with its BatchNorm statistics frozen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--imgsz", type=int, default=416)
    p.add_argument("--recipe", default="cwd", help="a recipe whose first term is a feature term (cwd, mimic, pkd)")
    p.add_argument("--batches", type=int, default=4, help="val batches of 16 to measure on")
    args = p.parse_args()
    torch.manual_seed(0)
    student, teacher_model = load_model(STUDENT), load_model(TEACHER)
    recipe = load_recipe(args.recipe)
    name = next(iter(recipe.losses))
    terms, pairs = build_terms(student, teacher_model, recipe, args.imgsz)
    distiller = Distiller(student, terms, pairs)
    layers = sorted({p.teacher for ps in pairs.values() for p in ps})
    teacher = Teacher(teacher_model, layers, torch.device("cpu"), torch.float32)
    data, hyp = load_data(BCCD), hyperparameters(imgsz=args.imgsz, batch=16, workers=0)
    stride = int(student.stride.max())
    held_out = list(first_train_images({**data, "train": data["val"]}, hyp, 16, stride, torch.device("cpu")))
    held_out = held_out[: args.batches]
    random_state = copy.deepcopy(terms[name].state_dict())
    fit_adapters(distiller, teacher, first_train_images(data, hyp, 16, stride, torch.device("cpu")), FROZEN)
    fitted_state = copy.deepcopy(terms[name].state_dict())
    layer_pairs = ", ".join(f"{p.student}->{p.teacher}" for p in pairs[name])
    print(f"{args.recipe} term '{name}', {args.imgsz} px, {len(held_out)} val batches; layers {layer_pairs}")
    print("| adapters | R^2 per layer | term loss per layer |\n|---|---|---|")
    for label, state in (("random", random_state), ("fitted", fitted_state)):
        terms[name].load_state_dict(state)
        r2, loss = measure(distiller, teacher, name, held_out)
        print(f"| {label} | {' / '.join(f'{x:.3f}' for x in r2)} | {' / '.join(f'{x:.4f}' for x in loss)} |")


@torch.no_grad()
def measure(distiller: Distiller, teacher: Teacher, name: str, images: list) -> tuple[list[float], list[float]]:
    """Per adapter of term ``name``: mean R^2 and mean term loss over ``images``."""
    distiller.student.eval()  # frozen BatchNorm, as in a fine-tune's training step
    targets = adapter_targets(distiller)
    r2, loss = [0.0] * len(targets), [0.0] * len(targets)
    for img in images:
        distiller.student(img)
        s_maps, t_maps = distiller.hooks.pop(), teacher(img).feats
        for i, (module, pair) in enumerate(zip(distiller.terms[name], distiller.pairs[name], strict=True)):
            adapted, target = module.adapter(s_maps[pair.student]), t_maps[pair.teacher].float()
            spread = ((target - target.mean((0, 2, 3), keepdim=True)) ** 2).sum()
            r2[i] += float(1 - ((adapted - target) ** 2).sum() / spread) / len(images)
            loss[i] += float(module.compare(adapted, target, None)) / len(images)
    return r2, loss


if __name__ == "__main__":
    main()
