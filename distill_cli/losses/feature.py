"""Feature-level distillation: student map -> adapter -> compared with the teacher map of the same stride.

Every loss here receives the adapted student map ``s`` and the teacher map ``t``, both (N, C, H, W), and returns a
scalar that is a mean over the batch, so recipe weights keep their meaning when the batch size changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..rules import Rule
from .registry import DistillContext, FeatureLoss, register


@register("mimic")
class Mimic(FeatureLoss):
    """Plain feature mimicking (FitNets, Romero et al. 2015; Li et al., "Mimicking very efficient networks", 2017).

    ``L = mean((s - t)^2)`` over all elements. With ``normalize: true`` both maps are first layer-normalised over
    (C, H, W) per image, which removes the scale gap between a small and a large network's activations.
    """

    def __init__(self, student_channels: int, teacher_channels: int, normalize: bool = False) -> None:
        super().__init__(student_channels, teacher_channels)
        self.normalize = normalize

    def compare(self, s: torch.Tensor, t: torch.Tensor, ctx: DistillContext) -> torch.Tensor:
        if self.normalize:
            s, t = F.layer_norm(s, s.shape[1:]), F.layer_norm(t, t.shape[1:])
        return F.mse_loss(s, t)


@register("sl2")
class ScoreWeightedL2(FeatureLoss):
    """Teacher-score-weighted L2, the method of ultralytics' built-in KD (``distill_model=``).

    ``L = sum_xy w_xy * sum_c (s - t)^2 / (C * sum_xy w_xy)`` with ``w_xy`` the teacher's max sigmoid class score at
    that location (taken from the Detect level of the same size). Locations the teacher finds empty count little.
    """

    def compare(self, s: torch.Tensor, t: torch.Tensor, ctx: DistillContext) -> torch.Tensor:
        weight = ctx.score_map(*s.shape[-2:]).float()
        squared = (s.float() - t.float()).pow(2) * weight
        return squared.sum() / (weight.sum() * s.shape[1] + 1e-9)


@register("mgd")
class MGD(FeatureLoss):
    """Masked Generative Distillation (Yang et al., ECCV 2022, arXiv:2205.01529).

    A random share ``ratio`` of the student's locations is zeroed, a generator (3x3 conv, ReLU, 3x3 conv) must
    rebuild the full teacher map from what is left: ``L = alpha * sum((G(s * M) - t)^2) / N``. Detection defaults
    from the paper: ``alpha = 2e-5``, ``ratio = 0.65`` (the sum over C*H*W makes alpha small).
    """

    param_rules = {"alpha": Rule(gt=0), "ratio": Rule(ge=0, lt=1)}

    def __init__(self, student_channels: int, teacher_channels: int, alpha: float = 2e-5, ratio: float = 0.65) -> None:
        super().__init__(student_channels, teacher_channels)
        self.alpha, self.ratio = alpha, ratio
        self.generator = nn.Sequential(
            nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1),
        )

    def compare(self, s: torch.Tensor, t: torch.Tensor, ctx: DistillContext) -> torch.Tensor:
        n, _, h, w = s.shape
        keep = (torch.rand(n, 1, h, w, device=s.device) >= self.ratio).to(s.dtype)
        generated = self.generator(s * keep)
        return self.alpha * (generated.float() - t.float()).pow(2).sum() / n


@register("cwd")
class CWD(FeatureLoss):
    """Channel-Wise Distillation (Shu et al., ICCV 2021, arXiv:2011.13256).

    Each channel becomes a distribution over locations, ``softmax(x_c / tau)`` over H*W; the student matches the
    teacher's with ``L = tau^2 / (N * C) * sum_{n,c} KL(p_t || p_s)``. It teaches *where* each channel fires and
    ignores the scale gap between the networks.
    """

    param_rules = {"tau": Rule(gt=0)}

    def __init__(self, student_channels: int, teacher_channels: int, tau: float = 1.0) -> None:
        super().__init__(student_channels, teacher_channels)
        self.tau = tau

    def compare(self, s: torch.Tensor, t: torch.Tensor, ctx: DistillContext) -> torch.Tensor:
        n, c = s.shape[:2]
        log_p_s = F.log_softmax(s.float().flatten(2) / self.tau, dim=2)
        log_p_t = F.log_softmax(t.float().flatten(2) / self.tau, dim=2)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
        return kl * self.tau**2 / (n * c)


@register("pkd")
class PKD(FeatureLoss):
    """Pearson-correlation Knowledge Distillation (Cao et al., NeurIPS 2022, arXiv:2207.02039).

    Each channel is standardised to zero mean and unit variance over (N, H, W), then ``L = mean((s' - t')^2) / 2``,
    which equals ``1 - r`` (r: the Pearson correlation) averaged over channels. Magnitude differences between
    teacher and student no longer matter, only the pattern.
    """

    def compare(self, s: torch.Tensor, t: torch.Tensor, ctx: DistillContext) -> torch.Tensor:
        return F.mse_loss(_standardise(s), _standardise(t)) / 2


def _standardise(x: torch.Tensor) -> torch.Tensor:
    x = x.float().transpose(0, 1).flatten(1)  # (C, N*H*W)
    return (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True, unbiased=False) + 1e-6)


@register("at")
class AttentionTransfer(FeatureLoss):
    """Attention Transfer (Zagoruyko & Komodakis, ICLR 2017, arXiv:1612.03928), with FGD's options
    (Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022, arXiv:2111.11837).

    Spatial attention ``a = normalize(mean_c |x|^p)`` (flattened over H*W, unit L2 norm);
    ``L = mean_n ||a_s - a_t||^2`` (+ the same on channel attention ``normalize(mean_hw |x|^p)`` if ``channel``).
    With ``focal: true`` a FGD-style focal term is added: the squared feature error weighted by the teacher's
    spatial x channel attention (softmax with ``temperature``, scaled by H*W and C) and by the ground-truth box mask,
    foreground and background averaged separately and weighted ``fg_weight`` / ``bg_weight``. The defaults are
    FGD's, but the foreground here is a mean over all its cells, where FGD gives each box 1/area and sums over an
    image's boxes: at the same ``fg_weight`` this foreground term is about (objects per image) times weaker than
    FGD's (whose mask and global terms are not here).
    """

    param_rules = {"p": Rule(gt=0), "temperature": Rule(gt=0), "fg_weight": Rule(ge=0), "bg_weight": Rule(ge=0)}

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        p: float = 2.0,
        channel: bool = False,
        focal: bool = False,
        temperature: float = 0.5,
        fg_weight: float = 1e-3,
        bg_weight: float = 5e-4,
    ) -> None:
        super().__init__(student_channels, teacher_channels)
        self.p, self.channel, self.focal = p, channel, focal
        self.temperature, self.fg_weight, self.bg_weight = temperature, fg_weight, bg_weight

    def compare(self, s: torch.Tensor, t: torch.Tensor, ctx: DistillContext) -> torch.Tensor:
        s, t = s.float(), t.float()
        loss = _attention_gap(s.abs().pow(self.p).mean(1).flatten(1), t.abs().pow(self.p).mean(1).flatten(1))
        if self.channel:
            loss = loss + _attention_gap(s.abs().pow(self.p).mean((2, 3)), t.abs().pow(self.p).mean((2, 3)))
        if self.focal:
            loss = loss + self._focal(s, t, ctx)
        return loss

    def _focal(self, s: torch.Tensor, t: torch.Tensor, ctx: DistillContext) -> torch.Tensor:
        n, c, h, w = t.shape
        spatial = h * w * F.softmax(t.abs().mean(1).flatten(1) / self.temperature, dim=1).view(n, 1, h, w)
        channel = c * F.softmax(t.abs().mean((2, 3)) / self.temperature, dim=1).view(n, c, 1, 1)
        error = (s - t).pow(2) * spatial * channel
        fg = ctx.box_mask(h, w)
        fg_term = (error * fg).sum() / fg.sum().clamp(min=1)
        bg_term = (error * (1 - fg)).sum() / (1 - fg).sum().clamp(min=1)
        return self.fg_weight * fg_term + self.bg_weight * bg_term


def _attention_gap(a_s: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    return (F.normalize(a_s, dim=1) - F.normalize(a_t, dim=1)).pow(2).sum(1).mean()
