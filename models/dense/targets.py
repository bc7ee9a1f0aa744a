"""Training targets of the dense detector: the pyramid's points and the label assignment by regression ranges
(`shared/reference/dense-avel-spec.md` §3.10), and its losses (§3.11).

Level l has points at t = 0, 2^l, 2 * 2^l, ... (grid units), each with its stride and regression range (lo, hi).
A point is positive for an event [s, e] iff min(t - s, e - t) > 0 and lo <= max(t - s, e - t) <= hi; no centre
sampling. Class-aware: every matching event counts (multi-hot class target), the regression target of a class slot
is (t - s, e - t) / stride, a later same-class event overwriting an earlier one (the reference's index order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Points:
    t: torch.Tensor  # [P] grid positions
    stride: torch.Tensor  # [P]
    lo: torch.Tensor  # [P]
    hi: torch.Tensor  # [P]
    level_sizes: list[int]


def make_points(length: int, ranges: tuple[tuple[float, float], ...]) -> Points:
    """The points of every level for a padded length (a multiple of the coarsest stride)."""
    ts, strides, los, his, sizes = [], [], [], [], []
    for level, (lo, hi) in enumerate(ranges):
        stride = 2 ** level
        n = length // stride
        ts.append(torch.arange(n, dtype=torch.float32) * stride)
        strides.append(torch.full((n,), float(stride)))
        los.append(torch.full((n,), float(lo)))
        his.append(torch.full((n,), float(hi)))
        sizes.append(n)
    return Points(torch.cat(ts), torch.cat(strides), torch.cat(los), torch.cat(his), sizes)


def assign(points: Points, segments: torch.Tensor, labels: torch.Tensor, num_classes: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(class targets [P, C] in {0, 1}, offset targets [P, C, 2] in strides) for one video's events
    (segments [N, 2] in grid units, labels [N])."""
    p = points.t.shape[0]
    cls = torch.zeros(p, num_classes)
    reg = torch.zeros(p, num_classes, 2)
    if segments.numel() == 0:
        return cls, reg
    left = points.t[:, None] - segments[None, :, 0]  # [P, N]
    right = segments[None, :, 1] - points.t[:, None]
    far = torch.maximum(left, right)
    positive = (torch.minimum(left, right) > 0) & (far >= points.lo[:, None]) & (far <= points.hi[:, None])
    for n in range(segments.shape[0]):  # in event order, so a later same-class event overwrites
        rows = positive[:, n].nonzero().squeeze(1)
        c = int(labels[n])
        cls[rows, c] = 1.0
        reg[rows, c, 0] = left[rows, n] / points.stride[rows]
        reg[rows, c, 1] = right[rows, n] / points.stride[rows]
    return cls, reg


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Summed sigmoid focal loss (RetinaNet's), elementwise over the given entries."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum()


def diou_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Summed 1-D distance-IoU loss of (left, right) offsets from the same points, [N, 2] each."""
    lp, rp, lg, rg = pred[:, 0], pred[:, 1], target[:, 0], target[:, 1]
    inter = torch.minimum(lp, lg) + torch.minimum(rp, rg)
    union = lp + rp + lg + rg - inter
    iou = inter / union.clamp(min=eps)
    enclosing = torch.maximum(lp, lg) + torch.maximum(rp, rg)
    rho = 0.5 * ((rp - lp) - (rg - lg))
    return (1 - iou + (rho / enclosing.clamp(min=eps)) ** 2).sum()


class LossNormalizer:
    """The running number of positive points that divides both losses: N <- 0.9 N + 0.1 max(#pos, 1), from 250."""

    def __init__(self, value: float = 250.0, momentum: float = 0.9):
        self.value, self.momentum = value, momentum

    def update(self, positives: int) -> float:
        self.value = self.momentum * self.value + (1 - self.momentum) * max(positives, 1)
        return self.value


def detector_loss(logits: torch.Tensor, offsets: torch.Tensor, valid: torch.Tensor, cls_targets: torch.Tensor,
                  reg_targets: torch.Tensor, normalizer: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(classification, regression) losses of a batch: logits [B, P, C], offsets [B, P, C, 2] (all levels
    concatenated), valid [B, P] bool, targets as `assign` makes them, stacked."""
    cls_loss = sigmoid_focal_loss(logits[valid], cls_targets[valid]) / normalizer
    pairs = valid[..., None] & (reg_targets.sum(-1) > 0)  # (point, class) pairs with a regression target
    reg_loss = diou_loss(offsets[pairs], reg_targets[pairs]) / normalizer if pairs.any() else logits.sum() * 0
    return cls_loss, reg_loss
