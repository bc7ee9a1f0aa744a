"""Dense extraction from raw untrimmed videos (random-init encoders, tiny videos): grid, files, resume, failures."""

import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.dense.extract import DenseExtractConfig, dense_extract
from pipeline.dense.features import load_video_features
from pipeline.dense.videos import VideoSynthConfig, generate_video_dataset
from pipeline.extraction.grids import TIME_GRIDS as GRIDS
from pipeline.extraction.grids import window_frame_times

CFG = DenseExtractConfig(random_init=True, frames_per_window=1, crop_size=32, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense") / "ds"
    generate_video_dataset(out, VideoSynthConfig(train=1, val=0, test=1, classes=2, min_length_s=20, max_length_s=24,
                                                 fps=4, width=64, height=48))
    return out


def test_window_frame_times_sit_inside_their_windows():
    g = GRIDS["unav"]
    t = window_frame_times(g, 0, 3, 4).reshape(3, 4)
    assert np.allclose(t[:, 0], [0.12, 0.44, 0.76]) and np.all(np.diff(t, axis=1) > 0)
    assert np.all(t[:, -1] < np.arange(3) * 0.32 + 0.96)


def test_features_on_the_grid_resume_and_reuse(ds, tmp_path):
    root = tmp_path / "store"
    r = dense_extract(ds, CFG, root)
    ann = json.loads((ds / "unav100_annotations.json").read_text())["database"]
    for vid, rec in ann.items():
        v, a = load_video_features(r.features, vid)  # the layout file says which files are which
        assert v.shape == (GRIDS["unav"].steps(rec["duration"]), 2048) and a.shape == v.shape
        assert np.isfinite(v).all() and np.isfinite(a).all()
    manifest = json.loads((r.dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and "RANDOM WEIGHTS" in manifest["warnings"][0]
    first = {f.name: f.read_bytes() for f in r.features.glob("*.npy")}
    # a run cut after one video: the next one computes only the other, and the files are the same
    vid = sorted(ann)[1]
    manifest["status"], manifest["items"][vid] = "running", {}
    (r.dir / "manifest.json").write_text(json.dumps(manifest))
    (r.features / f"{vid}_resnet50.npy").unlink()
    seen = []
    again = dense_extract(ds, CFG, root, progress=lambda done, total, v: seen.append(v))
    assert seen == [vid] and not again.reused
    assert {f.name: f.read_bytes() for f in again.features.glob("*.npy")} == first
    assert dense_extract(ds, CFG, root).reused


def test_a_broken_video_is_recorded_and_the_cli_says_so(ds, tmp_path):
    import shutil

    broken = tmp_path / "ds"
    shutil.copytree(ds, broken)
    vid = sorted(json.loads((broken / "unav100_annotations.json").read_text())["database"])[0]
    (broken / "videos" / f"{vid}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    cli = [sys.executable, "-m", "pipeline.cli", "dense", "extract", "--dataset", str(broken), "--root",
           str(tmp_path / "store"), "--random-init", "--frames-per-window", "1", "--crop-size", "32", "--device", "cpu",
           "--precision", "fp32"]
    r = subprocess.run(cli, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: 1 of 2 videos could not be read")
    r = subprocess.run([*cli, "--max-failure-share", "0.5"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"failed: {vid}" in r.stdout and "wrote 1 of 2 videos" in r.stdout
