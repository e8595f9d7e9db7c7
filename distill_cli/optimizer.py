"""The optimizer, group for group as ultralytics builds it (AdamW for short runs, MuSGD for long ones)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from ultralytics.optim import MuSGD

from .config import RunConfig
from .distiller import Distiller
from .errors import DistillError
from .schedule import nominal_accumulate

OPTIMIZERS = ("SGD", "MuSGD", "Adam", "Adamax", "AdamW", "NAdam", "RAdam", "RMSprop")
ADAM_FAMILY = ("Adam", "Adamax", "AdamW", "NAdam", "RAdam")


def optimizer_name(name: str) -> str:
    """ultralytics' spelling of an optimizer name given in any case, or ``auto``."""
    known = {n.lower(): n for n in (*OPTIMIZERS, "auto")}
    if str(name).lower() not in known:
        raise DistillError(f"optimizer '{name}' unknown; valid: auto, {', '.join(OPTIMIZERS)}")
    return known[str(name).lower()]


def build_optimizer(
    model: Distiller, cfg: RunConfig, nc: int, iterations: int
) -> tuple[torch.optim.Optimizer, RunConfig]:
    """ultralytics' optimizer, group for group: weights (decayed), norm weights and biases (not decayed); ``auto``
    picks AdamW with a fitted LR for short runs and MuSGD for long ones (conv weights orthogonalised, the class head
    at 3x LR). Adapters and generators are in the optimizer with the student."""
    name, momentum = optimizer_name(cfg.optimizer), cfg.momentum
    if name == "auto":  # as ultralytics: 0.9 for the optimizer; the warm-up still ends at cfg.momentum
        name, lr0 = ("MuSGD", 0.01) if iterations > 10000 else ("AdamW", round(0.002 * 5 / (4 + nc), 6))
        cfg, momentum = replace(cfg, lr0=lr0, warmup_bias_lr=0.0), 0.9
    cfg = replace(cfg, optimizer=name)
    if name in ADAM_FAMILY:
        options = {"lr": cfg.lr0, "betas": (momentum, 0.999), "weight_decay": 0.0}
    elif name == "RMSprop":
        options = {"lr": cfg.lr0, "momentum": momentum}
    else:
        options = {"lr": cfg.lr0, "momentum": momentum, "nesterov": True}
    weight_decay = cfg.weight_decay * cfg.batch * nominal_accumulate(cfg) / cfg.nbs
    groups = [
        {
            **options,
            "params": params,
            "weight_decay": weight_decay if kind in ("weight", "muon") else 0.0,
            "param_group": kind,
            **({"use_muon": True} if kind == "muon" else {}),
        }
        for kind, params in parameter_kinds(model, muon=name == "MuSGD").items()
    ]
    if name == "MuSGD":
        groups = boost_class_head(groups, model.student.model[-1], cfg.lr0)
        optimizer = MuSGD(groups, muon=0.2, sgd=1.0)
    else:
        fused = {"fused": True} if name in ("Adam", "AdamW") and next(model.parameters()).is_cuda else {}
        optimizer = getattr(torch.optim, name)(groups, **fused)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return optimizer, cfg


def parameter_kinds(model: nn.Module, muon: bool) -> dict[str, list[nn.Parameter]]:
    """weight / bn / bias (/ muon: every matrix and conv filter under MuSGD), in ultralytics' group order."""
    kinds: dict[str, list[nn.Parameter]] = {"weight": [], "bn": [], "bias": [], **({"muon": []} if muon else {})}
    norms = tuple(v for k, v in nn.__dict__.items() if "Norm" in k)
    for module in model.modules():
        for param_name, param in module.named_parameters(recurse=False):
            if muon and param.ndim in (2, 4):
                kinds["muon"].append(param)
            elif "bias" in param_name:  # not the module path: that holds the recipe's term names, any word
                kinds["bias"].append(param)
            elif isinstance(module, norms) or "logit_scale" in param_name:
                kinds["bn"].append(param)
            else:
                kinds["weight"].append(param)
    return kinds


def boost_class_head(groups: list[dict], head: nn.Module, lr0: float) -> list[dict]:
    """MuSGD, as ultralytics: each group splits in two, the class branches of the head at 3x the LR."""
    boosted = {
        id(p)
        for branch in ("cv3", "one2one_cv3")
        if getattr(head, branch, None)
        for p in getattr(head, branch).parameters()
    }
    out = []
    for group in groups:
        params = group.pop("params")
        out.append({**group, "params": [p for p in params if id(p) in boosted], "lr": lr0 * 3})
        out.append({**group, "params": [p for p in params if id(p) not in boosted]})
    return out
