"""Dense AVEL evaluation: ActivityNet-style average precision per class at tIoU thresholds, as UnAV-100 scores it.

The procedure of `shared/reference/dense-avel-spec.md` §1 and §6 step 8, written here (not ported):
- ground truth = the events of the evaluated split, duplicates (same label_id, both boundaries within 1e-3 s)
  counted once;
- per class, every video's predictions of that class pooled and sorted by score, highest first (ties keep the
  order of the predictions file: a stable sort, so the result does not depend on the sorting algorithm);
- a prediction is a true positive when its best still-unmatched ground-truth event of that class in the same video
  has tIoU >= theta (looking at them in order of decreasing tIoU, stopping at the first below theta, skipping
  matched ones); otherwise a false positive (always so in a video without that class);
- AP = the area under the monotone upper envelope of precision over recall (VOC 2011 all-point, sentinels (0, 0)
  and (1, 0)); mAP = the mean over the classes with ground truth in the split (a class with no prediction: AP 0);
- thresholds 0.1:0.1:0.9; "average mAP" = the mean over all nine, reported with the mean over 0.5:0.9 labelled
  separately (papers print 0.5..0.9 and the nine-threshold average).
Label ids are used as they are (the reference evaluator's remapping to the sorted ground-truth label set is not
needed, and its collision for a label absent from the ground truth cannot happen here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.dense.annotations import DUPLICATE_TOL_S, DenseDataset, normalise_subset, read_json_mapping
from pipeline.errors import UserError

THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(1, 10))


@dataclass(frozen=True)
class Prediction:
    video: str
    start: float
    end: float
    label_id: int
    score: float


def tiou(s: float, e: float, gs: np.ndarray, ge: np.ndarray) -> np.ndarray:
    """tIoU of one segment [s, e] with each ground-truth segment [gs, ge]."""
    inter = np.clip(np.minimum(e, ge) - np.maximum(s, gs), 0.0, None)
    union = (e - s) + (ge - gs) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def average_precision(tp: np.ndarray, n_gt: int) -> float:
    """VOC 2011 all-point AP from the TP flags of score-sorted predictions."""
    if n_gt == 0:
        return 0.0
    tp = np.asarray(tp, np.float64)
    ctp, cfp = np.cumsum(tp), np.cumsum(1.0 - tp)
    recall = ctp / n_gt
    precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]  # the monotone upper envelope
    steps = np.flatnonzero(r[1:] != r[:-1]) + 1
    return float(np.sum((r[steps] - r[steps - 1]) * p[steps]))


def ground_truth(ds: DenseDataset, subset: str) -> dict[int, dict[str, np.ndarray]]:
    """class -> video -> [n, 2] segments of the split, duplicates dropped."""
    out: dict[int, dict[str, list[tuple[float, float]]]] = {}
    for v in ds.split(subset):
        for e in v.events:
            segs = out.setdefault(e.label_id, {}).setdefault(v.id, [])
            if not any(abs(s - e.start) <= DUPLICATE_TOL_S and abs(t - e.end) <= DUPLICATE_TOL_S for s, t in segs):
                segs.append((e.start, e.end))
    return {c: {vid: np.asarray(s, np.float64).reshape(-1, 2) for vid, s in vids.items()} for c, vids in out.items()}


def class_ap(preds: list[Prediction], gt: dict[str, np.ndarray], theta: float) -> float:
    n_gt = sum(len(s) for s in gt.values())
    order = sorted(range(len(preds)), key=lambda i: -preds[i].score)  # sorted() is stable: ties keep file order
    matched = {vid: np.zeros(len(s), bool) for vid, s in gt.items()}
    tp = np.zeros(len(preds), bool)
    for rank, i in enumerate(order):
        p = preds[i]
        segs = gt.get(p.video)
        if segs is None or len(segs) == 0:
            continue
        ious = tiou(p.start, p.end, segs[:, 0], segs[:, 1])
        for j in np.argsort(-ious, kind="stable"):
            if ious[j] < theta:
                break
            if matched[p.video][j]:
                continue
            matched[p.video][j] = True
            tp[rank] = True
            break
    return average_precision(tp, n_gt)


def evaluate(ds: DenseDataset, predictions: list[Prediction], subset: str = "test",
             thresholds: tuple[float, ...] = THRESHOLDS) -> dict:
    subset = normalise_subset(subset)
    gt = ground_truth(ds, subset)
    if not gt:
        raise UserError(f"{ds.path}: the {subset} split has no events to evaluate against")
    in_split = {v.id for v in ds.split(subset)}
    by_class: dict[int, list[Prediction]] = {}
    for p in predictions:
        if p.video in in_split:
            by_class.setdefault(p.label_id, []).append(p)
    classes = sorted(gt)
    table = np.array([[class_ap(by_class.get(c, []), gt[c], th) for c in classes] for th in thresholds])
    maps = table.mean(axis=1)
    high = [k for k, th in enumerate(thresholds) if th >= 0.5 - 1e-9]
    return {
        "split": subset,
        "thresholds": list(thresholds),
        "mAP": {f"{th:.1f}": float(m) for th, m in zip(thresholds, maps)},
        "average_mAP": float(maps.mean()),
        "average_mAP_0.5:0.9": float(maps[high].mean()) if high else None,
        "per_class_AP": {ds.classes.get(c, str(c)): {f"{th:.1f}": float(table[k, i]) for k, th in enumerate(thresholds)}
                         for i, c in enumerate(classes)},
        "classes_evaluated": len(classes),
        "videos": len(in_split),
        "predictions": sum(len(v) for v in by_class.values()),
        "predictions_outside_split": sum(1 for p in predictions if p.video not in in_split),
    }


def load_predictions(path: Path, ds: DenseDataset) -> list[Prediction]:
    """`{"results": {video_id: [{"segment": [s, e], "label": id_or_name, "score": x}, ...]}}`, checked: one error
    naming the video and what is wrong."""
    path = Path(path)
    results = read_json_mapping(path, "predictions file", "results",
                                "video id -> list of {segment, label, score}")
    out = []
    for vid, items in results.items():
        if vid not in ds.videos:
            raise UserError(f"{path}: video {vid!r} is not in {ds.path.name}")
        if not isinstance(items, list):
            raise UserError(f"{path}: video {vid!r}: predictions must be a list, got {type(items).__name__}")
        for k, it in enumerate(items):
            where = f"{path}: video {vid!r}, prediction {k}"
            missing = [f for f in ("segment", "label", "score") if not isinstance(it, dict) or f not in it]
            if missing:
                raise UserError(f"{where}: missing {', '.join(missing)}")
            seg = it["segment"]
            if not isinstance(seg, (list, tuple)) or len(seg) != 2 or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in seg):
                raise UserError(f"{where}: segment must be [start_s, end_s] numbers, got {seg!r}")
            if seg[1] < seg[0]:
                raise UserError(f"{where}: segment ends at {seg[1]} s, before its start {seg[0]} s")
            score = it["score"]
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not np.isfinite(score):
                raise UserError(f"{where}: score must be a finite number, got {score!r}")
            try:
                label = ds.label_id(it["label"])
            except ValueError as e:
                raise UserError(f"{where}: {e}") from None
            out.append(Prediction(vid, float(seg[0]), float(seg[1]), label, float(score)))
    return out
