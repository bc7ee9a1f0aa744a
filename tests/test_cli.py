"""The `avel` command line as a whole (pipeline/cli/): `avel dense extract --config/--set` layered as `avel extract`
layers them (the file's `extract:` section, then --set, then the options given), and a bad setting is one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.dense.videos import VideoSynthConfig, generate_video_dataset
from pipeline.errors import UserError

STAGE_KEYS = Path(__file__).parent / "data" / "stage_keys.json"
FILE_EXTRACT = {"frames_per_window": 1, "crop_size": 32, "device": "cpu", "precision": "fp32"}


@pytest.fixture(scope="module")
def dense_ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense") / "ds"
    generate_video_dataset(out, VideoSynthConfig(train=1, val=0, test=1, classes=2, min_length_s=8, max_length_s=10,
                                                 max_event_s=4, width=64, height=48, version=1))  # the pinned key's
    return out


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "C.yaml"
    path.write_text(yaml.safe_dump({"extract": FILE_EXTRACT}))
    return path


def _manifests(root):
    return [json.loads(p.read_text()) for p in sorted((root / "dense_extract").glob("*/manifest.json"))]


def test_dense_extract_reads_the_config_file_then_set_then_options(dense_ds, config_file, tmp_path):
    root = tmp_path / "store"
    base = ["dense", "extract", "--dataset", str(dense_ds), "--root", str(root), "--config", str(config_file)]
    res = CliRunner().invoke(app, [*base, "--set", "random_init=true"])
    assert res.exit_code == 0, res.output
    assert "RANDOM WEIGHTS" in res.output and "wrote 2 of 2 videos' features" in res.output
    [manifest] = _manifests(root)
    assert manifest["status"] == "complete"
    recorded = {k: manifest["config"][k] for k in ("frames_per_window", "crop_size", "precision")}
    assert recorded == {k: FILE_EXTRACT[k] for k in recorded}  # the file's values (the device is not in the key)
    assert manifest["config"]["random_init"] is True  # and the --set
    # the same settings as options (tests/test_stage_keys.py's command): the same artifact
    assert manifest["key"] == json.loads(STAGE_KEYS.read_text())["dense_extract"]["dense_extract"]
    features = next((root / "dense_extract").glob("*/features"))
    videos = json.loads((dense_ds / "unav100_annotations.json").read_text())["database"]
    for vid in videos:
        assert len(list(features.glob(f"{vid}_*.npy"))) == 2  # ResNet-50 and Cnn14
    # an option given beats --set (which beats the file): the same settings, so the same features, reused
    res = CliRunner().invoke(app, [*base, "--set", "random_init=true", "--set", "frames_per_window=3",
                                   "--frames-per-window", "1"])
    assert res.exit_code == 0, res.output
    assert "reused 2 of 2 videos' features" in res.output and len(_manifests(root)) == 1
    # and --set beats the file (its crop_size 32 replaced by one too small, which the file's section is blamed for)
    res = CliRunner().invoke(app, [*base, "--set", "crop_size=16"])
    assert isinstance(res.exception, UserError) and f"{config_file} [extract]: crop_size" in str(res.exception)


def test_dense_extract_a_bad_set_field_is_one_error_line(dense_ds, config_file, tmp_path):
    args = ["dense", "extract", "--dataset", str(dense_ds), "--root", str(tmp_path / "store"), "--config",
            str(config_file), "--set", "random_init=true", "--set", "frame_per_window=2"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0 and isinstance(res.exception, UserError)
    message = str(res.exception)
    assert "\n" not in message and "frame_per_window" in message and str(config_file) in message
    # as `avel` shows it: one `error:` line, exit status 2, no traceback, nothing extracted
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "store" / "dense_extract").exists()
