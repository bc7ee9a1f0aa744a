"""`avel predict` on generated videos of any length: one row per real second, windows stitched, padding and missing
audio said, unreadable files and wrong checkpoints reported clearly, and a timeline picture per video.

The real encoders (ResNet-50 and Cnn14, random init, 1 frame per second) run on tiny videos (64x48, 4 fps); the
localizer is a tiny CACE-Net saved with the encoder records a trained checkpoint carries. One slow test goes the
whole way: dataset -> extraction -> training -> predict from the run folder, with ground truth.
"""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from models import CACEConfig, CACENet
from pipeline.ave import predict as pr
from pipeline.ave.synth import write_video
from pipeline.ave.train import save_checkpoint
from pipeline.errors import UserError
from pipeline.store import file_sha256, write_json_atomic
from tests.features_fixture import CLASSES, TINY_MODEL

RANDOM_ATTRS = {
    "visual": {"encoder": "resnet50", "weights_sha256": "RANDOM-INIT", "random_init": True, "frames_per_segment": 1,
               "dtype": "float32", "precision": "fp32", "stage": "extract_visual", "stage_key": "0" * 16},
    "audio": {"encoder": "cnn14", "weights_sha256": "RANDOM-INIT", "random_init": True, "sample_rate": 32000,
              "dtype": "float32", "precision": "fp32", "stage": "extract_audio", "stage_key": "1" * 16},
}
VIDEO = dict(fps=4, width=64, height=48, num_classes=3)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR, after checking the signature."""
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def checkpoint(path: Path, encoders=RANDOM_ATTRS, video_dim=2048, audio_dim=2048, seed=0, **info) -> Path:
    torch.manual_seed(seed)
    model = CACENet(CACEConfig(video_dim=video_dim, audio_dim=audio_dim, num_classes=len(CLASSES), **TINY_MODEL))
    save_checkpoint(path, model, encoders=encoders, classes=CLASSES, feature_norm=None, epoch=0, **info)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    plan = {"ten": [0, 0, 0, None, None, 1, 1, 1, 1, None], "long": [2] * 12 + [None] * 5 + [0] * 6,
            "short": [1] * 4, "mute": [0] * 5}
    out = {}
    for name, visual in plan.items():
        out[name] = d / f"{name}.mp4"
        write_video(out[name], visual, None if name == "mute" else visual, seed=len(out), **VIDEO)
    out["broken"] = d / "broken.mp4"
    out["broken"].write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)  # an MP4 header, then garbage
    return out


@pytest.fixture(scope="module")
def run(videos, tmp_path_factory):
    """One predict_videos call over every video (the encoders are built once for all)."""
    d = tmp_path_factory.mktemp("predict")
    ck = checkpoint(d / "ck.pt")
    order = ["ten", "long", "broken", "short", "mute"]
    (d / "ds").mkdir()  # an AVE-format dataset that holds the 10-s video: its ground truth is shown
    (d / "ds" / "Annotations.txt").write_text("Bark&ten&good&0&3\n")
    seen = []
    results = pr.predict_videos([videos[k] for k in order], ck, d / "out", device="cpu", dataset=d / "ds",
                                on_video=seen.append)
    return {k: r for k, r in zip(order, results)}, d / "out", seen


def test_one_row_per_real_second_with_valid_classes(run):
    results, out, seen = run
    assert [r.name for r in seen] == ["ten", "long", "broken", "short", "mute"]  # reported as they finish
    expected = {"ten": (10, 1), "long": (23, 3), "short": (4, 1), "mute": (5, 1)}
    valid = set(CLASSES) | {"background"}
    for name, (seconds, windows) in expected.items():
        r = results[name]
        assert r.ok and (r.seconds, r.windows) == (seconds, windows), (name, r.error)
        assert [row["second"] for row in r.rows] == list(range(seconds))
        for row in r.rows:
            assert row["label"] in valid and row["class"] in CLASSES
            assert 0 <= row["event_prob"] <= 1 and 0 <= row["class_prob"] <= 1
            assert row["is_event"] == (row["label"] != "background")
            assert row["window"] == row["second"] // 10
        with open(out / f"{name}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == seconds and rows[-1]["second"] == str(seconds - 1)
        saved = json.loads((out / f"{name}.json").read_text())
        assert len(saved["rows"]) == seconds and saved["model"]["encoders"]["visual"]["random_init"]
        assert "random-weights" in r.flags


def test_long_video_is_stitched_from_windows_and_short_one_padded(run):
    results, out, _ = run
    long, short, ten = results["long"], results["short"], results["ten"]
    assert [w["start_s"] for w in long.window_classes] == [0, 10, 20]
    assert [w["padded"] for w in long.window_classes] == [False, False, True]
    assert long.padded and long.padded_s == pytest.approx(7.0, abs=0.05)
    assert any("3 windows" in n and "stitched" in n for n in long.notes)
    assert short.padded and short.padded_s == pytest.approx(6.0, abs=0.05) and "padded" in short.flags
    assert any(n.startswith("padded") and "6.00 s" in n for n in short.notes)
    assert not ten.padded and "padded" not in ten.flags and ten.status == "ok"


def test_ground_truth_when_the_video_is_in_the_dataset(run):
    results, out, _ = run
    ten = results["ten"]
    assert ten.ground_truth == ["Bark"] * 3 + ["background"] * 7
    assert ten.ground_truth_accuracy == pytest.approx(
        100 * np.mean([r["label"] == g for r, g in zip(ten.rows, ten.ground_truth)]))
    with open(out / "ten.csv", newline="") as f:
        assert [r["ground_truth"] for r in csv.DictReader(f)] == ten.ground_truth
    assert results["long"].ground_truth is None  # not in the dataset
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 4 and summary["failed"] == 1
    assert any(n.startswith("RANDOM WEIGHTS") for n in summary["model"]["notes"])


def test_video_without_audio_is_predicted_with_silence_and_flagged(run):
    mute = run[0]["mute"]
    assert mute.ok and mute.status == "warning" and mute.audio_status == "missing"
    assert "no-audio" in mute.flags and any("no audio track" in n for n in mute.notes)
    assert len(mute.rows) == 5


def test_unreadable_file_is_reported_and_the_others_go_on(run):
    results, out, _ = run
    broken = results["broken"]
    assert broken.status == "failed" and "unreadable" in broken.error and not broken.rows
    assert not (out / "broken.csv").exists()
    assert all(results[k].ok for k in ("ten", "long", "short", "mute"))
    with open(out / "summary.csv", newline="") as f:
        statuses = {Path(r["video"]).stem: r["status"] for r in csv.DictReader(f)}
    assert statuses == {"ten": "ok", "long": "ok", "broken": "failed", "short": "ok", "mute": "warning"}


def test_timeline_pictures_are_valid_pngs_of_sensible_size(run):
    import matplotlib.image

    results, out, _ = run
    for name in ("ten", "long", "short", "mute"):
        png = Path(results[name].files["png"])
        w, h = png_size(png)
        assert 1000 <= w <= 4000 and 500 <= h <= 1500, (name, w, h)
        assert matplotlib.image.imread(png).shape[:2] == (h, w)
    assert png_size(out / "long.png")[0] > png_size(out / "short.png")[0]  # wider for a longer timeline


def test_checkpoint_that_does_not_fit_its_encoders_is_one_clear_error(videos, tmp_path):
    ck = checkpoint(tmp_path / "small.pt", video_dim=12, audio_dim=6)  # trained on other features
    with pytest.raises(UserError, match=r"does not match its encoders.*visual features of 12 channels.*resnet50.*"
                                        r"gives 2048"):
        pr.predict_videos([videos["short"]], ck, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out" / "short.csv").exists()
    bare = tmp_path / "bare.pt"  # no encoder records and sizes no encoder of ours gives (VGG-19 / VGGish)
    torch.save(CACENet(CACEConfig(num_classes=3)).state_dict(), bare)  # the reference's sizes: 512 / 128
    with pytest.raises(UserError, match="does not record the encoders"):
        pr.predict_videos([videos["short"]], bare, tmp_path / "out", device="cpu")


def test_weight_files_are_found_by_sha256_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no default ResNet-50 file
    weights = tmp_path / "finetuned.pt"
    weights.write_bytes(b"not really weights")
    sha = file_sha256(weights)
    attrs = {**RANDOM_ATTRS["visual"], "weights_sha256": sha, "random_init": False}
    # nowhere to be found: say which sha256 and which flag
    with pytest.raises(UserError, match=rf"sha256 {sha}.*--resnet-weights"):
        pr.plan_encoder("visual", attrs, None, [])
    # an explicit file with another sha256
    other = tmp_path / "imagenet.pth"
    other.write_bytes(b"other weights")
    with pytest.raises(UserError, match=rf"trained on features from weights {sha}, this file is "
                                        rf"{file_sha256(other)}"):
        pr.plan_encoder("visual", attrs, other, [])
    assert pr.plan_encoder("visual", attrs, weights, []).weights == weights
    # the fine-tuning stage's manifest in the store records it
    root = tmp_path / "art"
    stage = root / "finetune" / "abcd"
    stage.mkdir(parents=True)
    (stage / "resnet50_finetuned.pt").write_bytes(weights.read_bytes())
    write_json_atomic(stage / "manifest.json", {
        "stage": "finetune", "key": "abcd", "version": "1", "status": "complete", "created": "2024-01-01T00:00:00",
        "outputs": {"weights": {"path": "resnet50_finetuned.pt", "bytes": 18, "sha256": sha}}})
    plan = pr.plan_encoder("visual", attrs, None, [root])
    assert plan.weights == stage / "resnet50_finetuned.pt" and plan.source == "artifact store"
    # random-init features: an explicit weight file would change them
    with pytest.raises(UserError, match="RANDOMLY INITIALISED resnet50"):
        pr.plan_encoder("visual", RANDOM_ATTRS["visual"], weights, [])
    # the extraction seed comes from the extraction's manifest
    ext = root / "extract_visual" / ("0" * 16)
    ext.mkdir(parents=True)
    write_json_atomic(ext / "manifest.json", {"stage": "extract_visual", "key": "0" * 16, "version": "1",
                                              "created": "2024-01-01T00:00:00", "inputs": {"weights": "random-init:7"}})
    assert pr.plan_encoder("visual", RANDOM_ATTRS["visual"], None, [root]).seed == 7
    assert pr.plan_encoder("visual", RANDOM_ATTRS["visual"], None, []).seed == 0


def test_model_reference_resolution(tmp_path):
    ck = checkpoint(tmp_path / "run" / "best.pt")
    assert pr.resolve_checkpoint(tmp_path / "run") == ck
    assert pr.resolve_checkpoint(ck) == ck
    with pytest.raises(UserError, match="no best.pt"):
        pr.resolve_checkpoint(tmp_path)
    with pytest.raises(UserError, match="no such checkpoint"):
        pr.resolve_checkpoint(tmp_path / "nope.pt", tmp_path)
    assert pr.timeline_seconds(4.0) == 4 and pr.timeline_seconds(4.02) == 4 and pr.timeline_seconds(4.5) == 5
    assert pr.timeline_seconds(0.3) == 1


def test_cli_prints_per_second_table_and_fails_only_when_every_video_failed(videos, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app

    ck = checkpoint(tmp_path / "ck.pt")
    res = CliRunner().invoke(app, ["predict", str(videos["short"]), str(videos["broken"]), "--model", str(ck),
                                   "--out", str(tmp_path / "out"), "--device", "cpu", "--root", str(tmp_path)])
    assert res.exit_code == 0, res.output
    text = res.output
    assert "RANDOM WEIGHTS" in text and "1 of 2 video(s) localized" in text and "unreadable" in text
    assert text.count("background") + sum(text.count(c) for c in CLASSES) >= 4  # one line per second
    assert str(tmp_path / "out" / "short.png") in text.replace("\n", "")

    def all_failed(videos, *args, **kwargs):  # the exit status logic alone (building the encoders costs seconds)
        failed = [pr.VideoPrediction(video=str(v), name=Path(v).stem, error="unreadable video: test") for v in videos]
        for vp in failed:
            kwargs["on_video"](vp)
        return failed

    monkeypatch.setattr(pr, "predict_videos", all_failed)
    res = CliRunner().invoke(app, ["predict", str(videos["broken"]), "--model", str(ck), "--out",
                                   str(tmp_path / "out2")])
    assert res.exit_code == 1 and "0 of 1 video(s) localized" in res.output and "unreadable" in res.output


@pytest.mark.slow
def test_end_to_end_from_a_trained_run_with_ground_truth(tmp_path):
    """Generate -> extract (random init, seed 5) -> train -> predict with `train/<key>`: the encoders are rebuilt
    from the records (seed found in the store), features equal the extracted ones, ground truth is shown."""
    from pipeline import media
    from pipeline.ave import extract as ex
    from pipeline.ave import load_dataset
    from pipeline.ave.features import from_dataset
    from pipeline.ave.synth import SynthConfig, generate_dataset
    from pipeline.ave.train import TrainConfig, train_stage

    ds_dir = tmp_path / "ds"
    generate_dataset(ds_dir, SynthConfig(videos=3, classes=2, seed=0, duplicates=0, fps=4, width=64, height=48),
                     workers=1)
    root = tmp_path / "art"
    res = ex.extract(ds_dir, ex.ExtractConfig(frames_per_segment=1, random_init=True, seed=5, workers=0), root)
    fs = from_dataset(ds_dir, res["visual"].path, res["audio"].path)
    cfg = TrainConfig(epochs=2, batch_size=2, device="cpu", model=TINY_MODEL, standardize_features=True,
                      select_on="test")
    trained = train_stage(fs, cfg, root)
    assert (trained.dir / "curves.png").is_file()

    ds = load_dataset(ds_dir)
    vid = ds.video_ids()[0]
    results = pr.predict_videos([ds.video_path(vid)], f"train/{trained.key}", tmp_path / "out", device="cpu",
                                dataset=ds_dir, root=root)
    r = results[0]
    assert r.ok and r.seconds == 10 and r.ground_truth is not None and len(r.ground_truth) == 10
    assert set(r.ground_truth) <= set(ds.classes) | {"background"} and r.ground_truth_accuracy is not None
    assert all("ground_truth" in row for row in r.rows)
    loc = pr.Localizer(trained.dir / "best.pt", device="cpu", root=root)
    assert loc.plans["visual"].seed == 5 and loc.norm is not None
    d = media.decode(ds.video_path(vid), frames_per_segment=1)
    v, a = loc.features(d.frames, d.audio)
    import h5py

    row = ds.rows_by_video()[vid][0]
    with h5py.File(res["visual"].path) as f:
        np.testing.assert_allclose(v.numpy(), f["avadataset"][row], rtol=1e-4, atol=1e-5)
    with h5py.File(res["audio"].path) as f:
        np.testing.assert_allclose(a.numpy(), f["avadataset"][row], rtol=1e-4, atol=1e-5)
    assert png_size(tmp_path / "out" / f"{vid}.png")[0] >= 1000


def test_an_aveclip_checkpoint_predicts_without_naming_its_model(videos, tmp_path):
    from models.aveclip import AVECLIP, AVECLIPConfig

    torch.manual_seed(0)
    model = AVECLIP(AVECLIPConfig(video_dim=2048, audio_dim=2048, num_classes=len(CLASSES), d_model=16,
                                  num_heads=2, feature_heads=2, ff_mult=2))
    save_checkpoint(tmp_path / "av.pt", model, encoders=RANDOM_ATTRS, classes=CLASSES, feature_norm=None, epoch=0)
    (result,) = pr.predict_videos([videos["ten"]], tmp_path / "av.pt", tmp_path / "out", device="cpu")
    assert result.ok and [row["second"] for row in result.rows] == list(range(10))
    assert all(row["label"] in {*CLASSES, "background"} for row in result.rows)
    saved = json.loads((tmp_path / "out" / "ten.json").read_text())
    assert saved["model"]["model"] == "aveclip"
