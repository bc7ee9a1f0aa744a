"""The AVE data layer against the real metadata files in ../shared/ave (all 4143 rows)."""

import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from pipeline.ave import SEGMENTS, load_dataset, parse_annotations, write_labels
from pipeline.errors import UserError


def test_classes_in_first_appearance_order(ave_meta):
    assert len(ave_meta) == 4143
    assert len(ave_meta.classes) == 28 and ave_meta.background == 28
    assert ave_meta.classes[0] == "Church bell" and ave_meta.classes[27] == "Mandolin"
    assert ave_meta.classes[1] == "Male speech, man speaking"


def test_labels_match_the_real_ave_files(ave_meta, shared):
    with h5py.File(shared / "ave" / "labels_closs.h5") as f:
        closs = f["avadataset"][()]
    with h5py.File(shared / "ave" / "mil_labels.h5") as f:
        mil = f["avadataset"][()]
    np.testing.assert_array_equal(ave_meta.event_mask(), closs)
    np.testing.assert_array_equal(ave_meta.video_labels(), mil)
    labels = ave_meta.segment_labels()
    assert labels.shape == (4143, SEGMENTS, 29) and labels.dtype == np.float32
    assert np.all(labels.sum(-1) == 1)  # exactly one-hot everywhere
    np.testing.assert_array_equal(labels[:, :, :28].max(-1), closs)  # event where the mask says
    assert np.all(labels[26, :, 28] == 1)  # row 26 (start = end = 0) has no event segment


def test_splits(ave_meta):
    rows = {s: ave_meta.split_rows(s) for s in ("train", "val", "test")}
    assert [len(r) for r in rows.values()] == [3339, 402, 402]
    assert sorted(np.concatenate(list(rows.values())).tolist()) == list(range(4143))
    test_mask = ave_meta.event_mask()[rows["test"]]
    assert test_mask.size == 4020 and int(test_mask.sum()) == 3305
    assert int(test_mask.size - test_mask.sum()) == 715
    assert round(100 * 715 / 4020, 2) == 17.79  # the all-background baseline


def test_duplicate_video_ids(ave_meta):
    assert len(ave_meta.video_ids()) == 4097
    shared_ids = {v: r for v, r in ave_meta.rows_by_video().items() if len(r) > 1}
    assert len(shared_ids) == 45 and all(2 <= len(r) <= 3 for r in shared_ids.values())


def test_write_labels_round_trip(ave_meta, tmp_path):
    out = write_labels(ave_meta, tmp_path / "labels.h5")
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["avadataset"][()], ave_meta.segment_labels())
    assert [p.name for p in tmp_path.iterdir()] == ["labels.h5"]  # no temporary left behind


def _copy_meta(shared, dst):
    dst.mkdir()
    for name in ("Annotations.txt", "train_order.h5", "val_order.h5", "test_order.h5"):
        shutil.copy(shared / "ave" / name, dst / name)
    return dst


def test_malformed_annotation_line_names_file_and_line(tmp_path):
    (tmp_path / "Annotations.txt").write_text("Bark&abc&good&0&10\nBark&def&good&zero&10\n")
    with pytest.raises(UserError, match=r"Annotations.txt:2: start and end must be whole seconds"):
        parse_annotations(tmp_path / "Annotations.txt")
    (tmp_path / "Annotations.txt").write_text("Bark&abc&good&0\n")
    with pytest.raises(UserError, match=r"Annotations.txt:1: expected 5"):
        parse_annotations(tmp_path / "Annotations.txt")
    (tmp_path / "Annotations.txt").write_text("Bark&abc&good&3&11\n")
    with pytest.raises(UserError, match=r":1: need 0 <= start <= end <= 10"):
        parse_annotations(tmp_path / "Annotations.txt")


def test_split_index_out_of_range(shared, tmp_path):
    root = _copy_meta(shared, tmp_path / "ds")
    with h5py.File(root / "val_order.h5", "w") as f:
        f.create_dataset("order", data=np.array([0, 5000]))
    with pytest.raises(UserError, match=r"val_order.h5: entry 1 is row 5000, outside"):
        load_dataset(root).split_rows("val")


def test_missing_folder_and_split(tmp_path):
    with pytest.raises(UserError, match="dataset folder not found"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "Annotations.txt").write_text("Bark&abc&good&0&10\n")
    with pytest.raises(UserError, match="test_order.h5: split file not found"):
        load_dataset(tmp_path).split_rows("test")


def test_set_files_match_rows_by_line(tmp_path):
    lines = ["Bark&a&good&0&10", "Cat&b&good&2&5", "Male speech, man speaking&a&good&0&10"]
    (tmp_path / "Annotations.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "testSet.txt").write_text(lines[2] + "\n" + lines[0] + "\n")
    ds = load_dataset(tmp_path)
    assert ds.set_file_rows("test").tolist() == [2, 0]
    assert ds.set_file_rows("train") is None
    assert ds.rows_by_video() == {"a": [0, 2], "b": [1]}


def test_check_reports_missing_and_unreadable(tmp_path):
    (tmp_path / "Annotations.txt").write_text("Bark&a&good&0&10\nCat&b&good&2&5\nCat&c&good&2&5\n")
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "b.mp4").write_bytes(b"this is not an mp4 file" * 10)
    (tmp_path / "videos" / "c.mp4").write_bytes(b"")
    report = load_dataset(tmp_path).check()
    assert report.missing == ["a"] and set(report.unreadable) == {"b", "c"} and not report.ok


def test_cli_bad_input_is_one_line_not_a_traceback(tmp_path):
    (tmp_path / "Annotations.txt").write_text("Bark&abc&good&0&10\nbroken line\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "labels", "--dataset", str(tmp_path),
                           "--out", str(tmp_path / "labels.h5")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Annotations.txt:2" in proc.stderr
