"""Losses of the CACE-Net pipeline: the supervised localizer loss (spec §3.3), the BECE
supervised contrastive loss (spec §3.4, paper Eq. 7) and the symmetric InfoNCE used by the
targeted fine-tuning stage (spec §5), whole (`info_nce_loss`) or as one process's share of a
batch spread over several (`info_nce_share`)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SegmentTargets",
    "derive_targets",
    "supervised_contrastive_loss",
    "cace_loss",
    "info_nce_loss",
    "info_nce_share",
]


class SegmentTargets(NamedTuple):
    y_bce: Tensor  # [B, T] float: 1 event segment, 0 background
    y_seg: Tensor  # [B, T] long: event class, 0 for background segments (reference quirk)
    y_vid: Tensor  # [B] long: video-level class (0 for an all-background video)
    y_eval: Tensor  # [B, T] long: argmax over all C+1 columns (background = C)


def derive_targets(labels: Tensor) -> SegmentTargets:
    """Targets from one-hot segment labels [B, T, C+1] (background = last column), exactly as
    the reference training loop derives them (spec §1.2 "Derived training targets")."""
    if labels.dim() != 3 or labels.shape[-1] < 2:
        raise ValueError(f"labels must be one-hot [B, T, C+1], got shape {tuple(labels.shape)}")
    fg = labels[..., :-1]
    y_bce = fg.max(dim=-1).values.float()
    # argmax returns the first maximal index, so an all-zero (background) row gives 0.
    y_seg = fg.argmax(dim=-1)
    y_vid = y_seg.max(dim=-1).values
    return SegmentTargets(y_bce, y_seg, y_vid, labels.argmax(dim=-1))


def supervised_contrastive_loss(q: Tensor, k: Tensor, is_event: Tensor,
                                temperature: float = 0.01) -> Tensor:
    """BECE loss over the 2T views of each video (q: clean, k: noisy key), spec §3.4.

    Positives of sample i (within its own video): every other event sample in both views when
    i is an event, and always i's own copy in the other view; background-background pairs are
    not positives.  Denominator: all j != i.
        l_i = -[logsumexp_{K(i)} s_ij - logsumexp_{j != i} s_ij - log|K(i)|],  s = f f^T / tau
    The mean is over all N*2T samples.  Written with logsumexp because exp(1/tau) = exp(100)
    overflows float32 (the reference only works in float64).  q, k are expected L2-normalised.
    The loss never goes below mean_i log|K(i)| (reached when all of a sample's similarity mass is on its
    positives): a floor set by the labels alone, e.g. 1.994 for the demo's training videos, where a training
    curve of this term goes flat once the embeddings separate events from background.
    """
    if q.dim() != 3 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [N, T, d], got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    if is_event.shape != q.shape[:2]:
        raise ValueError(f"is_event must be [N, T] = {tuple(q.shape[:2])}, got "
                         f"{tuple(is_event.shape)}")
    T = q.shape[1]
    f = torch.cat([q, k], dim=1)  # [N, 2T, d]
    logits = f @ f.transpose(1, 2) / temperature  # [N, 2T, 2T]
    ev = torch.cat([is_event, is_event], dim=1).bool()  # [N, 2T]
    idx = torch.arange(2 * T, device=q.device)
    self_mask = idx[:, None] == idx[None, :]
    own_copy = (idx[:, None] % T == idx[None, :] % T) & ~self_mask  # same segment, other view
    positives = ((ev[:, :, None] & ev[:, None, :]) | own_copy) & ~self_mask  # [N, 2T, 2T]
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    # Every row has at least its own copy as a positive, so no logsumexp is over an empty set.
    log_num = torch.logsumexp(torch.where(positives, logits, neg_inf), dim=-1)
    log_den = torch.logsumexp(torch.where(self_mask, neg_inf, logits), dim=-1)
    log_count = positives.sum(dim=-1).to(logits.dtype).log()
    return -(log_num - log_den - log_count).mean()


def cace_loss(outputs: Any, labels: Tensor, *, contrastive: bool = False,
              contrastive_coeff: float = 1.0,
              temperature: float = 0.01) -> tuple[Tensor, dict[str, Tensor]]:
    """Training loss of spec §3.3 from a CACEOutput and one-hot labels [B, T, C+1].

    total = BCEwL(is_event, y_bce) + CE(event_scores, y_vid) + BCEwL(gate, y_bce)
            + CE(av_score, y_vid) [+ contrastive_coeff * SupCon(q, k, y_bce)]
    The gate is already a product of sigmoids and BCEWithLogits applies another one: a CMBS
    oddity kept on purpose (it is the paper's L^sup as trained).  Returns (total, terms);
    terms['contrastive'] is the unweighted SupCon value, 0 when disabled."""
    num_classes = outputs.event_scores.shape[-1]
    if labels.shape[:2] != outputs.is_event_logits.shape or labels.shape[-1] != num_classes + 1:
        raise ValueError(f"labels must be one-hot [B, T, C+1] = "
                         f"{(*outputs.is_event_logits.shape, num_classes + 1)}, got "
                         f"{tuple(labels.shape)}")
    t = derive_targets(labels.to(outputs.event_scores.device))
    y_bce = t.y_bce.to(outputs.is_event_logits.dtype)
    terms = {
        "is_event": F.binary_cross_entropy_with_logits(outputs.is_event_logits, y_bce),
        "event": F.cross_entropy(outputs.event_scores, t.y_vid),
        "gate": F.binary_cross_entropy_with_logits(outputs.gate, y_bce),
        "cas": F.cross_entropy(outputs.av_score, t.y_vid),
    }
    total = terms["is_event"] + terms["event"] + terms["gate"] + terms["cas"]
    if contrastive:
        terms["contrastive"] = supervised_contrastive_loss(outputs.q, outputs.k, y_bce,
                                                           temperature)
        total = total + contrastive_coeff * terms["contrastive"]
    else:
        terms["contrastive"] = total.new_zeros(())
    return total, terms


def info_nce_loss(a: Tensor, b: Tensor, temperature: float | Tensor = 0.2) -> Tensor:
    """Symmetric InfoNCE between paired embeddings a [B, d] and b [B, d] (row i of a matches
    row i of b; the other rows are negatives): (CE(L, arange) + CE(L^T, arange)) / 2 with
    L = norm(a) norm(b)^T / temperature.  The reference's temperature is a fixed 0.2; a scalar
    tensor (a learnable temperature) passes its gradient through."""
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must both be [B, d], got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    value = float(temperature.detach()) if isinstance(temperature, Tensor) else temperature
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be positive, got {value}")
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def info_nce_share(a: Tensor, b: Tensor, a_all: Tensor, b_all: Tensor, offset: int,
                   temperature: float | Tensor = 0.2) -> Tensor:
    """One process's share of `info_nce_loss(a_all, b_all)` when the batch is spread over processes.

    a, b [n, d]: this process's pairs, rows offset..offset+n of the gathered a_all, b_all [N, d]. Its queries are
    scored against all N keys in both directions (a against b_all, b against a_all, targets offset + arange(n)),
    and the share is the sum of those 2n cross-entropies over 2N, so the shares of all processes add up to the
    full-batch loss. The gradient is the full-batch one only if a_all / b_all were gathered with autograd (their
    rows of other processes then send this process's negatives' gradients back)."""
    if a.dim() != 2 or a.shape != b.shape or a_all.shape != b_all.shape or a_all.shape[1:] != a.shape[1:]:
        raise ValueError(f"a, b must be [n, d] and a_all, b_all [N, d], got {tuple(a.shape)}, {tuple(b.shape)}, "
                         f"{tuple(a_all.shape)}, {tuple(b_all.shape)}")
    if not 0 <= offset <= a_all.shape[0] - a.shape[0]:
        raise ValueError(f"offset {offset} + {a.shape[0]} rows do not fit in {a_all.shape[0]} gathered rows")
    value = float(temperature.detach()) if isinstance(temperature, Tensor) else temperature
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be positive, got {value}")
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    a_all, b_all = F.normalize(a_all, dim=-1), F.normalize(b_all, dim=-1)
    target = torch.arange(offset, offset + a.shape[0], device=a.device)
    a_to_b = F.cross_entropy(a @ b_all.T / temperature, target, reduction="sum")
    b_to_a = F.cross_entropy(b @ a_all.T / temperature, target, reduction="sum")
    return (a_to_b + b_to_a) / (2 * a_all.shape[0])
