"""Dense-task pictures (pipeline/dense/plots.py): lane assignment rules (overlap never shares a lane, touching does,
nested and identical spans split, deterministic), the timeline PNG with and without ground truth, with no events
and with many overlapping ones (taller), and the training curves with and without validation mAP."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from pipeline.dense.plots import assign_lanes, curves_png, timeline_png

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ["dog barking", "man speaking", "car engine", "guitar", "baby crying"]


def ev(start, end, label_id=0, score=None):
    e = {"segment": [start, end], "label_id": label_id}
    if score is not None:
        e["score"] = score
    return e


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header, after checking the magic bytes; and it must decode to that size."""
    import matplotlib.image

    data = Path(path).read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    w, h = struct.unpack(">II", data[16:24])
    assert matplotlib.image.imread(path).shape[:2] == (h, w)
    return w, h


def no_shared_overlap(events, lanes) -> bool:
    for i in range(len(events)):
        for j in range(i + 1, len(events)):
            (a0, a1), (b0, b1) = sorted(events[i]["segment"]), sorted(events[j]["segment"])
            if lanes[i] == lanes[j] and min(a1, b1) > max(a0, b0):
                return False
    return True


# ---- lanes --------------------------------------------------------------------------------------------------------
def test_lanes_overlapping_events_split():
    events = [ev(0, 5), ev(3, 8), ev(6, 10)]
    assert assign_lanes(events) == [0, 1, 0]  # the third is free of the first (ends at 5) but not of the second


def test_lanes_touching_events_share_a_lane():
    assert assign_lanes([ev(0, 5), ev(5, 10), ev(10, 12.5)]) == [0, 0, 0]
    assert assign_lanes([ev(5, 10), ev(0, 5)]) == [0, 0]  # input order does not matter for touching


def test_lanes_zero_length_event_kept_apart_from_what_it_touches():
    assert assign_lanes([ev(0, 5), ev(5, 5)]) == [0, 1]
    assert assign_lanes([ev(2, 2), ev(2, 2)]) == [0, 1]


def test_lanes_nested_and_identical_events():
    assert assign_lanes([ev(0, 10), ev(2, 4), ev(5, 7)]) == [0, 1, 1]
    assert assign_lanes([ev(1, 3)] * 4) == [0, 1, 2, 3]  # identical: input order decides
    assert assign_lanes([ev(2, 4), ev(0, 10)]) == [1, 0]  # earlier start first, whatever the input order


def test_lanes_greedy_order_and_lowest_free_lane():
    # ties on start go by end: the short one gets lane 0, and lane 0 is reused as soon as it is free
    assert assign_lanes([ev(0, 9), ev(0, 2), ev(2, 3)]) == [1, 0, 0]
    assert assign_lanes([]) == []
    assert assign_lanes([ev(4, 1)]) == [0]  # end-first read as its span
    with pytest.raises(ValueError):
        assign_lanes([ev(0, float("nan"))])


def test_lanes_random_events_never_overlap_in_a_lane_and_are_deterministic():
    rng = random.Random(7)
    events = []
    for _ in range(60):
        a = round(rng.uniform(0, 60), 1)
        events.append(ev(a, round(a + rng.choice([0.5, 1, 3, 10, 25]), 1)))
    lanes = assign_lanes(events)
    assert no_shared_overlap(events, lanes)
    assert assign_lanes(events) == lanes
    assert assign_lanes([dict(e) for e in events]) == lanes
    # greedy packing is optimal for intervals: lanes == the most events covering one instant
    depth = max(sum(1 for e in events if e["segment"][0] <= t < e["segment"][1])
                for t in {e["segment"][0] for e in events})
    assert max(lanes) + 1 == depth


# ---- the timeline -------------------------------------------------------------------------------------------------
PREDICTIONS = [ev(0.5, 12.0, 0, 0.92), ev(3.0, 9.0, 1, 0.55), ev(20.0, 41.0, 2, 0.81), ev(30.0, 33.0, 3, 0.12)]
GROUND_TRUTH = [ev(0.0, 11.5, 0), ev(2.0, 10.0, 1), ev(21.0, 40.0, 2)]


def test_timeline_with_and_without_ground_truth(tmp_path):
    without = timeline_png(tmp_path / "a" / "pred.png", 42.0, PREDICTIONS, CLASSES, title="video_1")
    assert without == tmp_path / "a" / "pred.png"
    w1, h1 = png_size(without)
    with_gt = timeline_png(tmp_path / "gt.png", 42.0, PREDICTIONS, CLASSES, ground_truth=GROUND_TRUTH,
                           title="video_1", min_score=0.3)
    w2, h2 = png_size(with_gt)
    assert w1 == w2 and h2 > h1  # the ground-truth panel adds height
    assert not list(tmp_path.rglob("*.tmp-*"))  # atomic write leaves no temporary file
    # class names as the dataset gives them (label_id -> name) work too, and an unknown id does not fail
    png_size(timeline_png(tmp_path / "m.png", 42.0, PREDICTIONS + [ev(1, 2, 77, 0.5)], dict(enumerate(CLASSES))))


def test_timeline_with_no_predictions(tmp_path):
    png_size(timeline_png(tmp_path / "empty.png", 10.0, [], CLASSES))
    png_size(timeline_png(tmp_path / "empty_gt.png", 10.0, [], CLASSES, ground_truth=GROUND_TRUTH))
    # everything below min_score: also an empty panel
    png_size(timeline_png(tmp_path / "filtered.png", 42.0, PREDICTIONS, CLASSES, min_score=0.99))
    with pytest.raises(ValueError):
        timeline_png(tmp_path / "bad.png", 0.0, PREDICTIONS, CLASSES)


def test_timeline_grows_with_lanes(tmp_path):
    one = png_size(timeline_png(tmp_path / "one.png", 30.0, [ev(1, 29, 0, 0.9)], CLASSES))
    many = [ev(0.5 * k, 20 + 0.5 * k, k % len(CLASSES), 1 - k / 25) for k in range(20)]
    assert max(assign_lanes(many)) == 19  # all 20 overlap
    twenty = png_size(timeline_png(tmp_path / "twenty.png", 30.0, many, CLASSES))
    assert twenty[0] == one[0]
    assert twenty[1] > one[1] + 19 * 20  # at least ~0.2 in per extra lane at 100 dpi
    # a pile far larger than fits stays within bounds
    huge = png_size(timeline_png(tmp_path / "huge.png", 30.0, [ev(1, 29, 0, 0.5)] * 400, CLASSES))
    assert twenty[1] < huge[1] < 4000


def test_timeline_event_past_the_video_end(tmp_path):
    png_size(timeline_png(tmp_path / "past.png", 10.0, [ev(8, 14, 1, 0.7)], CLASSES))


# ---- training curves ----------------------------------------------------------------------------------------------
def history(with_map: bool):
    rows = []
    for e in range(1, 7):
        row = {"epoch": e, "loss": 3.0 / e, "cls_loss": 2.0 / e, "reg_loss": 1.0 / e, "lr": 1e-4 * (0.8 ** e)}
        if e > 2:
            row["lcf_loss"] = 0.1 / e
        if with_map:
            row["val_avg_map"] = None if e % 2 else 0.05 * e
        rows.append(row)
    return rows


def test_curves_with_and_without_validation(tmp_path):
    a = curves_png(history(True), tmp_path / "curves.png")
    b = curves_png(history(False), tmp_path / "curves_nomap.png")
    assert a == tmp_path / "curves.png"
    assert png_size(a) == png_size(b)
    assert a.read_bytes() != b.read_bytes()  # the mAP panel has content in one and not the other
    png_size(curves_png([{"epoch": 1, "loss": 1.0}], tmp_path / "one.png"))  # one epoch, most keys missing
    with pytest.raises(ValueError):
        curves_png([], tmp_path / "none.png")
