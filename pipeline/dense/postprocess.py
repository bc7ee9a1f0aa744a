"""Dense AVEL post-processing: a detector's per-level probabilities and offsets -> scored segments in seconds.

It owns the steps after the model's forward pass, as `../shared/reference/dense-avel-spec.md` §6 (steps 2-7)
describes them for UnAV-100 (points as in §3.10, checked by §8 test (d)):
- per pyramid level, the real points only, (point, class) entries with p > `pre_nms_thresh`, the top
  `pre_nms_topk` of them per level, decoded with that class's offsets and dropped if no longer than `duration_thresh`;
- multi-class Gaussian Soft-NMS, each class on its own (sigma 0.4, `min_score`, `max_per_class`); the Gaussian mode
  has no IoU threshold (the config's `iou_threshold` 0.7 is ignored by it), so none is taken here;
- the classes merged, the top `max_segments` kept, converted to seconds on the feature grid, clamped to the video.
Written here in plain torch (no compiled NMS extension), deterministic: every sort is stable, ties go to the lower
candidate index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch

IOU_EPS = 1e-6  # added to each length, so two identical (near) zero-length segments do not divide by zero


@dataclass(frozen=True)
class PostprocessConfig:
    pre_nms_thresh: float = 0.001
    pre_nms_topk: int = 2000  # per level, not per video
    duration_thresh: float = 0.05  # grid units
    sigma: float = 0.4
    min_score: float = 0.001
    max_per_class: int = 100
    max_segments: int = 100


class Level(NamedTuple):
    """One pyramid level of one video: probs [T_l, C], offsets [T_l, C, 2] (in strides), stride 2**l, valid points."""

    probs: torch.Tensor
    offsets: torch.Tensor
    stride: int
    valid: int


def _empty(like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kw = {"dtype": like.dtype, "device": like.device} if like is not None else {}
    return torch.zeros((0, 2), **kw), torch.zeros(0, **kw), torch.zeros(0, dtype=torch.long)


def candidates(levels: Sequence, cfg: PostprocessConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(segments [N, 2] in grid units, scores [N], labels [N] long), levels concatenated in order."""
    segs, scores, labels = [], [], []
    for level in levels:
        if not hasattr(level, "probs"):  # a plain (probs, offsets, stride, valid) tuple
            level = Level(*level)
        probs, offsets, stride, valid = level.probs, level.offsets, int(level.stride), int(level.valid)
        probs, offsets = probs[:valid], offsets[:valid]  # padded points could carry garbage offsets
        n_cls = probs.shape[1]
        flat = probs.reshape(-1)
        idx = torch.nonzero(flat > cfg.pre_nms_thresh).flatten()  # ascending, so the stable sort keeps index order
        idx = idx[torch.sort(flat[idx], descending=True, stable=True).indices[:cfg.pre_nms_topk]]
        point, cls = idx // n_cls, idx % n_cls
        t = point.to(probs.dtype) * stride
        off = offsets[point, cls] * stride  # the class-aware pair of the entry's own class
        seg = torch.stack([t - off[:, 0], t + off[:, 1]], dim=1)
        keep = (seg[:, 1] - seg[:, 0]) > cfg.duration_thresh
        segs.append(seg[keep])
        scores.append(flat[idx][keep])
        labels.append(cls[keep].long())
    if not segs:
        return _empty()
    return torch.cat(segs), torch.cat(scores), torch.cat(labels)


def _iou(seg: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    inter = (torch.minimum(seg[1], others[:, 1]) - torch.maximum(seg[0], others[:, 0])).clamp(min=0)
    union = (seg[1] - seg[0] + IOU_EPS) + (others[:, 1] - others[:, 0] + IOU_EPS) - inter
    return inter / union


def soft_nms(segments: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, cfg: PostprocessConfig
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian Soft-NMS per class; the survivors with their decayed scores, sorted by score (stable)."""
    kept_idx, kept_scores = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()  # ascending candidate indices: the tie order
        s = scores[idx].clone()
        alive = s >= cfg.min_score
        idx, s = idx[alive], s[alive]
        n_kept = 0
        while idx.numel() and n_kept < cfg.max_per_class:
            j = int(torch.nonzero(s == s.max())[0])  # the first of the highest: the lowest index on a tie
            kept_idx.append(int(idx[j]))
            kept_scores.append(s[j])
            n_kept += 1
            rest = torch.arange(idx.numel(), device=idx.device) != j
            idx, s = idx[rest], s[rest]
            if idx.numel():
                s = s * torch.exp(-_iou(segments[kept_idx[-1]], segments[idx]) ** 2 / cfg.sigma)
                alive = s >= cfg.min_score  # decayed below min_score: gone for good
                idx, s = idx[alive], s[alive]
    if not kept_idx:
        return _empty(segments)
    idx = torch.tensor(kept_idx, dtype=torch.long, device=segments.device)
    s = torch.stack(kept_scores)
    order = torch.sort(s, descending=True, stable=True).indices
    return segments[idx[order]], s[order], labels[idx[order]]


def to_seconds(segments: torch.Tensor, grid, duration: float) -> torch.Tensor:
    """Grid units -> seconds with `grid.to_seconds` (UnAV: 0.32 g + 0.48), clamped to [0, duration]; float64."""
    g = segments.detach().cpu().double().numpy().reshape(-1, 2)
    sec = torch.as_tensor(np.asarray(grid.to_seconds(g), dtype=np.float64))
    return sec.clamp(0.0, float(duration))


def postprocess_video(levels: Sequence, grid, duration: float, cfg: PostprocessConfig = PostprocessConfig()
                      ) -> list[dict]:
    """One video's detections: [{"segment": [start_s, end_s], "label_id": int, "score": float}], best first."""
    segs, scores, labels = soft_nms(*candidates(levels, cfg), cfg)
    # soft_nms already sorts across classes, so the top max_segments are a prefix
    segs, scores, labels = segs[:cfg.max_segments], scores[:cfg.max_segments], labels[:cfg.max_segments]
    out = []
    for (start, end), score, label in zip(to_seconds(segs, grid, duration).tolist(), scores.tolist(),
                                          labels.tolist()):
        start, end = round(start, 3), round(end, 3)
        if end <= start:  # wholly outside the video (clamped flat), or too short to survive the rounding
            continue
        out.append({"segment": [start, end], "label_id": int(label), "score": round(float(score), 6)})
    return out
