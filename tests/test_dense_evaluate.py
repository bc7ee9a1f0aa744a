"""The dense AVEL evaluator against hand-computed values (spec §1, §8 e), and its input checks."""

import json
import subprocess
import sys

import pytest

from pipeline.dense.annotations import load_annotations
from pipeline.dense.evaluate import Prediction, average_precision, evaluate, load_predictions, tiou
from pipeline.errors import UserError

GT = {"database": {
    "vidA": {"subset": "test", "duration": 30.0, "annotations": [
        {"segment": [2.0, 6.0], "label": "dog", "label_id": 0},
        {"segment": [4.0, 20.0], "label": "speech", "label_id": 1}]},
    "vidB": {"subset": "test", "duration": 40.0, "annotations": [
        {"segment": [10.0, 30.0], "label": "speech", "label_id": 1}]},
    "vidC": {"subset": "train", "duration": 10.0, "annotations": [
        {"segment": [1.0, 2.0], "label": "dog", "label_id": 0}]},
}}


@pytest.fixture
def ds(tmp_path):
    path = tmp_path / "unav.json"
    path.write_text(json.dumps(GT))
    return load_annotations(path)


def P(video, s, e, label, score):
    return Prediction(video, s, e, label, score)


def test_tiou():
    import numpy as np

    assert tiou(8, 20, np.array([4.0]), np.array([20.0]))[0] == pytest.approx(0.75)
    assert tiou(0, 1, np.array([2.0]), np.array([3.0]))[0] == 0.0


def test_perfect_predictions_score_one_everywhere(ds):
    preds = [P("vidA", 2, 6, 0, 0.9), P("vidA", 4, 20, 1, 0.8), P("vidB", 10, 30, 1, 0.7)]
    r = evaluate(ds, preds)
    assert all(v == pytest.approx(1.0) for v in r["mAP"].values()) and r["average_mAP"] == pytest.approx(1.0)


def test_the_spec_example_gives_avg_0_9167(ds):
    """c0 [2,6] .9; c1 vidA [8,20] .8 (tIoU .75); c1 vidB [10,30] .7; c1 vidB [10.5,30] .6 (a duplicate: FP)."""
    preds = [P("vidA", 2, 6, 0, 0.9), P("vidA", 8, 20, 1, 0.8), P("vidB", 10, 30, 1, 0.7), P("vidB", 10.5, 30, 1, 0.6)]
    r = evaluate(ds, preds)
    for th in ("0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7"):
        assert r["mAP"][th] == pytest.approx(1.0), th
    # at 0.8: class 1 sorted .8 FP (tIoU .75), .7 TP, .6 FP (its GT is matched): AP = 0.5 * 0.5 = 0.25
    assert r["mAP"]["0.8"] == pytest.approx(0.625) and r["mAP"]["0.9"] == pytest.approx(0.625)
    assert r["average_mAP"] == pytest.approx(8.25 / 9) and round(r["average_mAP"], 4) == 0.9167
    assert r["average_mAP_0.5:0.9"] == pytest.approx((3 + 1.25) / 5)


def test_average_precision_by_hand():
    assert average_precision([True, False, True], 2) == pytest.approx(1 * 0.5 + (2 / 3) * 0.5)  # envelope
    assert average_precision([False, True], 2) == pytest.approx(0.5 * 0.5)
    assert average_precision([], 3) == 0.0


def test_several_classes_missing_class_and_videos_without_ground_truth(ds):
    # class 0 never predicted: AP 0 and still counted in the mean; predictions in vidC (train) are not evaluated;
    # a class-0 prediction in vidB (no class-0 event there) is a false positive
    preds = [P("vidA", 4, 20, 1, 0.8), P("vidB", 10, 30, 1, 0.7), P("vidC", 1, 2, 0, 0.99)]
    r = evaluate(ds, preds)
    assert r["mAP"]["0.5"] == pytest.approx(0.5) and r["predictions_outside_split"] == 1
    preds.append(P("vidB", 1, 3, 0, 0.95))  # FP ranked first for class 0, then nothing: AP 0
    assert evaluate(ds, preds)["mAP"]["0.5"] == pytest.approx(0.5)
    preds.append(P("vidA", 2, 6, 0, 0.5))  # a TP after the FP: class 0 AP = 0.5
    assert evaluate(ds, preds)["mAP"]["0.5"] == pytest.approx((0.5 + 1.0) / 2)


def test_ties_in_score_keep_file_order(ds):
    """Two predictions of one score: the one listed first ranks first (a stable sort, on any machine)."""
    tp_first = [P("vidA", 4, 20, 1, 0.5), P("vidA", 30, 31, 1, 0.5), P("vidB", 10, 30, 1, 0.4)]
    fp_first = [tp_first[1], tp_first[0], tp_first[2]]
    a = evaluate(ds, tp_first)["per_class_AP"]["speech"]["0.5"]
    b = evaluate(ds, fp_first)["per_class_AP"]["speech"]["0.5"]
    assert a == pytest.approx(0.5 * 1 + 0.5 * 2 / 3) and b == pytest.approx(0.5 * 2 / 3 + 0.5 * 2 / 3)  # envelope


def test_duplicate_ground_truth_counts_once(tmp_path):
    gt = json.loads(json.dumps(GT))
    gt["database"]["vidB"]["annotations"].append({"segment": [10.0005, 30.0], "label": "speech", "label_id": 1})
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(gt))
    ds = load_annotations(path)
    assert any("duplicate" in p for p in ds.problems)
    preds = [P("vidA", 2, 6, 0, 0.9), P("vidA", 4, 20, 1, 0.8), P("vidB", 10, 30, 1, 0.7)]
    assert evaluate(ds, preds)["average_mAP"] == pytest.approx(1.0)


def write_preds(tmp_path, results):
    path = tmp_path / "preds.json"
    path.write_text(json.dumps({"results": results}))
    return path


@pytest.mark.parametrize("results,message", [
    ({"nope": []}, "video 'nope' is not in"),
    ({"vidA": [{"segment": [5, 2], "label": 0, "score": 0.5}]}, "video 'vidA', prediction 0: segment ends at 2"),
    ({"vidA": [{"segment": [1, 2], "score": 0.5}]}, "video 'vidA', prediction 0: missing label"),
    ({"vidA": [{"segment": [1, 2], "label": "cat", "score": 0.5}]}, "label 'cat' is not a class name"),
    ({"vidA": [{"segment": [1, 2], "label": 7, "score": 0.5}]}, "label id 7 is not a class"),
    ({"vidA": [{"segment": [1], "label": 0, "score": 0.5}]}, "segment must be [start_s, end_s]"),
])
def test_bad_predictions_name_the_video_and_the_problem(ds, tmp_path, results, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_predictions(write_preds(tmp_path, results), ds)


def test_labels_by_name_or_id(ds, tmp_path):
    preds = load_predictions(write_preds(tmp_path, {"vidA": [{"segment": [2, 6], "label": "dog", "score": 0.9},
                                                             {"segment": [4, 20], "label": 1, "score": 0.8}]}), ds)
    assert [p.label_id for p in preds] == [0, 1]


def test_annotation_problems_are_collected(tmp_path):
    gt = {"database": {"v": {"subset": "test", "duration": 10.0, "annotations": [
        {"segment": [5, 12], "label": "dog", "label_id": 0},
        {"segment": [3, 2], "label": "dog", "label_id": 0},
        {"segment": [1, 2], "label": "bark", "label_id": 0}]}}}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(gt))
    problems = " | ".join(load_annotations(path).problems)
    assert "outside the video" in problems and "not after its start" in problems and "several names" in problems
    path.write_text(json.dumps({"database": {"v": {"subset": "dev", "annotations": []}}}))
    with pytest.raises(UserError, match="subset 'dev' is not one of"):
        load_annotations(path)


def test_cli_prints_the_table_and_ends_with_the_average_line(ds, tmp_path):
    preds = write_preds(tmp_path, {"vidA": [{"segment": [2, 6], "label": 0, "score": 0.9},
                                            {"segment": [8, 20], "label": 1, "score": 0.8}],
                                   "vidB": [{"segment": [10, 30], "label": "speech", "score": 0.7},
                                            {"segment": [10.5, 30], "label": 1, "score": 0.6}]})
    cli = [sys.executable, "-m", "pipeline.cli", "dense", "evaluate", "--annotations", str(ds.path),
           "--predictions", str(preds)]
    r = subprocess.run(cli, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "average mAP: 91.67 % (tIoU 0.1:0.9)"
    assert any("0.8" in ln and "62.50" in ln for ln in lines) and any("0.5:0.9" in ln for ln in lines)
    bad = write_preds(tmp_path, {"vidA": [{"segment": [6, 2], "label": 0, "score": 0.9}]})
    r = subprocess.run(cli[:-1] + [str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in r.stderr
    assert "'vidA'" in r.stderr
