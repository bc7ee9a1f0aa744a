"""Segment-level metrics of event localization, computed from predicted and true class per segment.

The headline metric is the papers': accuracy over all segments, background included (spec §3.5). The rest says
where it comes from: per-class accuracy, event-vs-background precision/recall/F1, and the confusion matrix.
Inputs are integer arrays [N,T] with classes 0..C-1 for events and C (= `background`) for background.
"""

from __future__ import annotations

import numpy as np


def segment_accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """Percent of segments whose predicted class (background included) equals the target."""
    return 100.0 * float(np.mean(np.asarray(pred) == np.asarray(target))) if np.size(target) else 0.0


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_labels: int) -> np.ndarray:
    """[num_labels, num_labels] counts; row = true label, column = predicted label."""
    idx = np.asarray(target).reshape(-1) * num_labels + np.asarray(pred).reshape(-1)
    return np.bincount(idx, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": 100 * precision, "recall": 100 * recall, "f1": 100 * f1}


def localization_metrics(pred: np.ndarray, target: np.ndarray, background: int,
                         class_names: list[str] | None = None) -> dict:
    """Everything a report needs, JSON-ready. `background` is the background label (number of event classes)."""
    pred, target = np.asarray(pred), np.asarray(target)
    labels = background + 1
    cm = confusion_matrix(pred, target, labels)
    names = list(class_names or [str(c) for c in range(background)]) + ["background"]
    support = cm.sum(1)
    per_class = {names[c]: {"accuracy": 100 * cm[c, c] / support[c], "segments": int(support[c])}
                 for c in range(labels) if support[c]}
    is_event_pred, is_event_true = pred != background, target != background
    event = _prf(int(np.sum(is_event_pred & is_event_true)), int(np.sum(is_event_pred & ~is_event_true)),
                 int(np.sum(~is_event_pred & is_event_true)))
    bg = _prf(int(np.sum(~is_event_pred & ~is_event_true)), int(np.sum(~is_event_pred & is_event_true)),
              int(np.sum(is_event_pred & ~is_event_true)))
    return {
        "accuracy": segment_accuracy(pred, target),
        "correct_segments": int(np.sum(pred == target)),
        "segments": int(target.size),
        "all_background_accuracy": segment_accuracy(np.full_like(target, background), target),
        "per_class": per_class,
        "event": event,
        "background": bg,
        "confusion": cm.tolist(),
        "labels": names,
    }
