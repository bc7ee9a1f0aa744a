"""The dense data layer: the UnAV-100 annotation layout, the time grid, feature files, the synthetic generator."""

import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.dense.annotations import has_overlap_of_classes, load_annotations
from pipeline.dense.features import check_folder, feature_paths, load_video_features
from pipeline.dense.synthetic import FeatureSynthConfig, generate_feature_dataset
from pipeline.errors import UserError
from pipeline.extraction.grids import UNAV_GRID

SMALL = FeatureSynthConfig(train=12, val=4, test=4, seed=3)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    return out, generate_feature_dataset(out, SMALL)


def test_grid_conversion_both_ways():
    assert UNAV_GRID.to_grid(10.0) == pytest.approx(29.75) and UNAV_GRID.to_grid(20.0) == pytest.approx(61.0)
    assert UNAV_GRID.to_seconds(29.75) == pytest.approx(10.0) and UNAV_GRID.to_seconds(0) == pytest.approx(0.48)
    assert UNAV_GRID.steps(60.0) == 185 and UNAV_GRID.steps(120.0) == 373


def test_schema_round_trip_and_what_the_generator_promises(synth):
    out, path = synth
    ds = load_annotations(path)
    assert ds.problems == []
    assert [len(ds.split(s)) for s in ("train", "validation", "test")] == [12, 4, 4]
    assert ds.classes == {c: f"syn_{c:02d}" for c in range(6)} or set(ds.classes) <= set(range(6))
    lengths = [v.duration for v in ds.videos.values()]
    assert 20 <= min(lengths) and max(lengths) <= 120
    for v in ds.videos.values():
        assert 1 <= len(v.events) and all(0 <= e.start < e.end <= v.duration + 1e-3 for e in v.events)
        same = {}
        for e in v.events:  # same-class events never overlap
            for s, t in same.get(e.label_id, []):
                assert e.start >= t or e.end <= s
            same.setdefault(e.label_id, []).append((e.start, e.end))
    assert any(has_overlap_of_classes(v.events) for v in ds.videos.values())
    raw = json.loads(path.read_text())
    first = next(iter(raw["database"].values()))
    # UnAV's layout, plus the generator's record (version, distractors) that the UnAV loader does not read
    assert set(raw) == {"database", "generator"} and {"subset", "duration", "annotations"} <= set(first)
    assert raw["generator"]["version"] == ds.generator_version == 2


def test_features_load_as_the_unav_loader_does(synth):
    out, path = synth
    ds = load_annotations(path)
    steps = []
    for vid, v in ds.videos.items():
        visual, audio = load_video_features(out / "features", vid)
        assert visual.shape[1] == 32 and audio.shape[1] == 16 and visual.shape[0] == audio.shape[0]
        assert visual.dtype == np.float32 and visual.shape[0] == UNAV_GRID.steps(v.duration)
        steps.append(np.load(feature_paths(out / "features", vid)["_rgb.npy"]).shape[0] - visual.shape[0])
    assert set(steps) <= {0, 1}
    assert check_folder(out / "features", list(ds.videos)) == []


def test_events_are_in_the_features_where_the_labels_say(synth):
    """A class prototype's projection is larger inside that class's events than outside events and distractors (the
    signal is real), and as large inside a visible distractor as inside an event (it is a real picture)."""
    out, path = synth
    ds = load_annotations(path)
    inside, outside, distracting = [], [], []
    for vid, v in ds.videos.items():
        visual, _ = load_video_features(out / "features", vid)
        t = UNAV_GRID.centres(visual.shape[0])
        norm = np.linalg.norm(visual, axis=1)
        on, near = np.zeros(len(t), bool), np.zeros(len(t), bool)
        for e in v.events:
            on |= (t > e.start + 0.5) & (t < e.end - 0.5)
        for d in ds.generator["distractors"][vid]:
            near |= (t > d["segment"][0] - 1.0) & (t < d["segment"][1] + 1.0)
            if d["visual_label_id"] is not None:
                distracting += norm[(t > d["segment"][0] + 0.5) & (t < d["segment"][1] - 0.5) & ~on].tolist()
        inside += norm[on].tolist()
        outside += norm[~on & ~near].tolist()
    assert np.mean(inside) > np.mean(outside) + 0.5
    assert np.mean(distracting) > np.mean(outside) + 0.5


def test_deterministic_per_seed(tmp_path):
    a = generate_feature_dataset(tmp_path / "a", FeatureSynthConfig(train=2, val=1, test=1, seed=7))
    b = generate_feature_dataset(tmp_path / "b", FeatureSynthConfig(train=2, val=1, test=1, seed=7))
    assert a.read_bytes() == b.read_bytes()
    for f in (tmp_path / "a" / "features").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / "features" / f.name).read_bytes()


def test_bad_feature_files_are_named(synth, tmp_path):
    out, path = synth
    with pytest.raises(UserError, match="feature file of video 'nope' not found"):
        load_video_features(out / "features", "nope")
    (tmp_path / "v_rgb.npy").write_bytes(b"not numpy")
    np.save(tmp_path / "v_flow.npy", np.zeros((5, 4), np.float32))
    np.save(tmp_path / "v_vggish.npy", np.zeros((9, 4), np.float32))
    with pytest.raises(UserError, match="v_rgb.npy: not a readable .npy"):
        load_video_features(tmp_path, "v")
    problems = " | ".join(check_folder(tmp_path, ["v", "w"]))
    assert "v_rgb.npy unreadable" in problems and "'w': w_rgb.npy missing" in problems


def test_dataset_commands(synth, tmp_path):
    out, path = synth
    cli = [sys.executable, "-m", "pipeline.cli", "dense", "dataset"]
    r = subprocess.run([*cli, "summary", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and "validation" in r.stdout, r.stderr
    r = subprocess.run([*cli, "check", str(path), "--features", str(out / "features")], capture_output=True, text=True)
    assert r.returncode == 0 and "0 problem(s)" in r.stdout, r.stdout + r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"database": {"v": {"subset": "test", "duration": 5.0, "annotations": [
        {"segment": [4, 9], "label": "dog", "label_id": 0}]}}}))
    r = subprocess.run([*cli, "check", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1 and "outside the video" in r.stdout


def test_untrimmed_videos_are_real_mp4s_with_overlapping_events(tmp_path):
    from pipeline import media
    from pipeline.dense.videos import VideoSynthConfig, generate_video_dataset

    cfg = VideoSynthConfig(train=2, val=0, test=1, classes=3, seed=2, min_length_s=20, max_length_s=24, fps=4,
                           width=64, height=48, overlap_share=1.0)
    path = generate_video_dataset(tmp_path / "a", cfg)
    ds = load_annotations(path)
    assert ds.problems == [] and len(ds.videos) == 3
    assert all(has_overlap_of_classes(v.events) for v in ds.videos.values())  # overlap_share 1: every video
    for v in ds.videos.values():
        d = media.decode(tmp_path / "a" / "videos" / f"{v.id}.mp4", segments=int(v.duration), frames_per_segment=1)
        assert abs(d.info.duration_s - v.duration) < 0.3 and d.info.audio_status != "missing"
        assert d.frames.shape[1:] == (48, 64, 3) and float(np.abs(d.audio).max()) > 0.05  # events are audible
    again = generate_video_dataset(tmp_path / "b", cfg)  # deterministic per seed, to the byte
    assert path.read_bytes() == again.read_bytes()
    for f in (tmp_path / "a" / "videos").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / "videos" / f.name).read_bytes()
