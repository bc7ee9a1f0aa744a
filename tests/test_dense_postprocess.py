"""Dense post-processing (spec §6, §8 d): candidate decoding, Gaussian Soft-NMS, seconds, the per-video output."""

import math
import random
from dataclasses import replace

import pytest
import torch

from pipeline.dense.postprocess import Level, PostprocessConfig, candidates, postprocess_video, soft_nms, to_seconds
from pipeline.extraction.grids import TimeGrid

CFG = PostprocessConfig()


def _nms(segs, scores, labels, cfg=CFG):
    return soft_nms(torch.tensor(segs, dtype=torch.float64), torch.tensor(scores, dtype=torch.float64),
                    torch.tensor(labels, dtype=torch.long), cfg)


def _level(T, C, stride, valid=None, entries=()):
    """A level with zero probs except `entries`: (point, class, prob, (left, right))."""
    probs, offsets = torch.zeros(T, C), torch.zeros(T, C, 2)
    for i, c, p, off in entries:
        probs[i, c] = p
        offsets[i, c] = torch.tensor(off)
    return Level(probs, offsets, stride, T if valid is None else valid)


# --- Soft-NMS ---------------------------------------------------------------------------------------------------

def test_spec_d_identical_segments_same_class_decay_other_class_untouched():
    segs = [[0.0, 10.0], [0.0, 10.0], [0.0, 10.0], [0.0, 10.0]]
    s, sc, lab = _nms(segs, [0.9, 0.8, 0.7, 0.01], [0, 0, 1, 0])
    # 0.01 * e^-2.5 = 0.00082 < 0.001: removed; class 1's 0.7 is not touched by class 0
    assert lab.tolist() == [0, 1, 0]
    assert sc[0].item() == pytest.approx(0.9)
    assert sc[1].item() == pytest.approx(0.7)
    assert sc[2].item() == pytest.approx(0.8 * math.exp(-2.5), abs=1e-4)
    assert sc[2].item() == pytest.approx(0.0657, abs=1e-4)
    assert s.shape == (3, 2)


def test_scores_below_min_score_removed_and_zero_length_segments_do_not_nan():
    s, sc, lab = _nms([[5.0, 5.0], [5.0, 5.0], [1.0, 2.0]], [0.5, 0.4, 0.0005], [0, 0, 0])
    assert sc.tolist() == pytest.approx([0.5, 0.4])  # IoU of two points is 0 (the 1e-6 keeps the union > 0)
    assert not torch.isnan(sc).any()


def test_non_overlapping_untouched_and_order():
    segs = [[0.0, 1.0], [1.0, 2.0], [3.0, 5.0]]  # touching at 1.0 is no overlap
    s, sc, lab = _nms(segs, [0.4, 0.6, 0.5], [2, 2, 2])
    assert sc.tolist() == pytest.approx([0.6, 0.5, 0.4])
    assert s.tolist() == [[1.0, 2.0], [3.0, 5.0], [0.0, 1.0]]


def test_max_per_class():
    segs = [[10.0 * i, 10.0 * i + 5] for i in range(8)]
    scores = [0.1, 0.9, 0.3, 0.8, 0.5, 0.7, 0.6, 0.2]
    labels = [0, 0, 0, 0, 0, 1, 1, 1]
    s, sc, lab = _nms(segs, scores, labels, replace(CFG, max_per_class=2))
    assert sc.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert lab.tolist() == [0, 0, 1, 1]


def test_tie_goes_to_lower_index():
    s, sc, lab = _nms([[5.0, 15.0], [0.0, 10.0]], [0.5, 0.5], [0, 0])
    assert s[0].tolist() == [5.0, 15.0] and sc[0].item() == 0.5
    assert sc[1].item() < 0.5


def _reference_soft_nms(segs, scores, labels, cfg):
    """A plain-Python transcription of the spec, for random inputs."""
    out = []
    for c in sorted(set(labels)):
        rem = [[i, scores[i]] for i in range(len(segs)) if labels[i] == c and scores[i] >= cfg.min_score]
        kept = 0
        while rem and kept < cfg.max_per_class:
            best = max(range(len(rem)), key=lambda k: (rem[k][1], -k))
            i, si = rem.pop(best)
            out.append((si, c, i))
            kept += 1
            for r in rem:
                a, b = segs[i], segs[r[0]]
                inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
                iou = inter / ((a[1] - a[0] + 1e-6) + (b[1] - b[0] + 1e-6) - inter)
                r[1] *= math.exp(-iou * iou / cfg.sigma)
            rem = [r for r in rem if r[1] >= cfg.min_score]
    return sorted(out, key=lambda x: -x[0])


def test_matches_reference_on_random_input():
    rng = random.Random(0)
    segs = [(a, a + rng.uniform(0.1, 20)) for a in (rng.uniform(0, 50) for _ in range(60))]
    scores = [rng.uniform(0, 1) for _ in segs]
    labels = [rng.randrange(3) for _ in segs]
    cfg = replace(CFG, max_per_class=12, min_score=0.05)
    s, sc, lab = _nms(segs, scores, labels, cfg)
    ref = _reference_soft_nms(segs, scores, labels, cfg)
    assert len(ref) == sc.numel()
    assert sc.tolist() == pytest.approx([r[0] for r in ref], abs=1e-9)
    assert lab.tolist() == [r[1] for r in ref]
    assert s.flatten().tolist() == pytest.approx([x for r in ref for x in segs[r[2]]])


# --- candidates -------------------------------------------------------------------------------------------------

def test_candidates_decode_with_stride_and_class_offsets():
    lvl = _level(6, 2, 4, entries=[(3, 1, 0.9, (1.0, 2.0))])
    lvl.offsets[3, 0] = torch.tensor([9.0, 9.0])  # the other class's offsets must not be used
    s, sc, lab = candidates([lvl], CFG)
    assert s.tolist() == [[8.0, 20.0]]  # t = 3 * 4 = 12, [12 - 4, 12 + 8]
    assert sc.tolist() == pytest.approx([0.9]) and lab.tolist() == [1] and lab.dtype == torch.long


def test_candidates_valid_cut_and_threshold():
    lvl = _level(8, 2, 1, valid=5, entries=[(1, 0, 0.0005, (1, 1)), (2, 0, 0.002, (1, 1)), (6, 1, 0.9, (1, 1))])
    s, sc, lab = candidates([lvl], CFG)
    assert s.tolist() == [[1.0, 3.0]]  # point 6 is padding (valid 5); 0.0005 is under pre_nms_thresh
    assert sc.tolist() == pytest.approx([0.002])


def test_candidates_topk_per_level():
    a = _level(4, 1, 1, entries=[(0, 0, 0.9, (1, 1)), (1, 0, 0.8, (1, 1)), (2, 0, 0.7, (1, 1))])
    b = _level(4, 1, 2, entries=[(0, 0, 0.3, (1, 1)), (1, 0, 0.2, (1, 1)), (2, 0, 0.1, (1, 1))])
    s, sc, lab = candidates([a, b], replace(CFG, pre_nms_topk=2))
    # 0.7 (level 0's third) is above both of level 1's but the cut is per level
    assert sc.tolist() == pytest.approx([0.9, 0.8, 0.3, 0.2])
    assert s.tolist() == [[-1.0, 1.0], [0.0, 2.0], [-2.0, 2.0], [0.0, 4.0]]


def test_candidates_duration_thresh_and_plain_tuples():
    short = (*_level(3, 1, 1, entries=[(1, 0, 0.5, (0.01, 0.01))])[:2], 1, 3)  # length 0.02 grid: dropped
    long = (*_level(3, 1, 4, entries=[(1, 0, 0.5, (0.01, 0.01))])[:2], 4, 3)  # length 0.08 grid: kept
    s, sc, lab = candidates([short, long], CFG)
    assert s.flatten().tolist() == pytest.approx([3.96, 4.04])
    assert candidates([], CFG)[0].shape == (0, 2)


# --- seconds and the per-video output --------------------------------------------------------------------------

def test_to_seconds_unav_grid_and_clamp():
    grid = TimeGrid(0.96, 0.32)
    sec = to_seconds(torch.tensor([[0.0, 29.75], [-5.0, 1000.0]]), grid, 30.0)
    assert sec.shape == (2, 2)
    assert sec.flatten().tolist() == pytest.approx([0.48, 10.0, 0.0, 30.0])


def _video():
    lv0 = _level(12, 3, 1, entries=[(2, 0, 0.9, (1, 1)), (5, 2, 0.5, (2, 1)), (10, 1, 0.95, (1, 1))])
    lv1 = _level(6, 3, 2, entries=[(1, 1, 0.7, (0.5, 1)), (3, 0, 0.3, (0.5, 0.5))])
    return [lv0, lv1]


def test_postprocess_video_end_to_end():
    out = postprocess_video(_video(), TimeGrid(0.96, 0.32), 3.0)
    # the 0.95 one is grid [9, 11] = [3.36, 4.0] s, past the 3-s video: clamped flat and dropped
    assert out == [
        {"segment": [0.8, 1.44], "label_id": 0, "score": 0.9},
        {"segment": [0.8, 1.76], "label_id": 1, "score": 0.7},
        {"segment": [1.44, 2.4], "label_id": 2, "score": 0.5},
        {"segment": [2.08, 2.72], "label_id": 0, "score": 0.3},
    ]
    assert all(type(d["label_id"]) is int and type(d["score"]) is float for d in out)


def test_postprocess_video_max_segments():
    out = postprocess_video(_video(), TimeGrid(0.96, 0.32), 10.0, replace(CFG, max_segments=2))
    assert [d["score"] for d in out] == [0.95, 0.9]
    assert out[0]["segment"] == [3.36, 4.0] and out[0]["label_id"] == 1
