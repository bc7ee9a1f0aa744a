"""Training and evaluating the dense detector: the stage (reuse, resume after an interruption), the commands, a
feature folder in UnAV-100's released layout, and the Prefect flow from raw untrimmed videos to mAP, then
`avel dense predict` on one of those videos."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.dense.data import load_dense_features
from pipeline.dense.synthetic import ANNOTATIONS, FeatureSynthConfig, generate_feature_dataset
from pipeline.dense.train import DenseTrainConfig, load_detector, train_detector, train_stage

TINY = dict(size="cpu", epochs=3, warmup_epochs=1, batch_size=4, lr=1e-3, ema_decay=0.9, device="cpu",
            model_args={"embd_dim": 32, "head_dim": 32, "dependency_dim": 8, "max_seq_len": 128})
CLI = [sys.executable, "-m", "pipeline.cli", "dense"]


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dense-features")
    generate_feature_dataset(out, FeatureSynthConfig(train=8, val=3, test=3, classes=3, seed=2, min_length_s=20,
                                                     max_length_s=40))
    return out


def test_stage_is_reused_and_a_killed_run_resumes_to_the_same_weights(features, tmp_path):
    fs = load_dense_features(features)
    cfg = DenseTrainConfig(**TINY)
    whole = train_stage(fs, cfg, tmp_path / "a")
    assert not whole.reused and train_stage(fs, cfg, tmp_path / "a").reused
    assert whole.metrics["best_epoch"] >= 0 and 0.0 <= whole.metrics["test_avg_map"] <= 1.0

    out = tmp_path / "b"
    out.mkdir()

    def stop_after_first(record):
        if record["epoch"] == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_detector(fs, cfg, out, on_epoch=stop_after_first)
    resumed = train_detector(fs, cfg, out)
    a = torch.load(whole.dir / "last.pt", weights_only=True)
    b = torch.load(out / "last.pt", weights_only=True)
    assert [r["epoch"] for r in b["history"]] == [0, 1, 2]
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=1e-6, rtol=0)
    for k, v in a["ema_state_dict"].items():
        torch.testing.assert_close(b["ema_state_dict"][k], v, atol=1e-6, rtol=0)
    assert resumed["test_avg_map"] == pytest.approx(whole.metrics["test_avg_map"], abs=1e-9)


def test_cli_train_then_evaluate_the_checkpoint_gives_the_same_map(features, tmp_path):
    cfg = tmp_path / "dense.yaml"
    cfg.write_text(yaml.safe_dump({"train": {**TINY, "epochs": 2}}))
    r = subprocess.run([*CLI, "train", "--annotations", str(features), "--config", str(cfg), "--root",
                        str(tmp_path / "store"), "--lcf", "--lac"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "dense detector: baseline+LCF+LAC" in r.stdout
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("test average mAP:")]
    assert line and line[0].endswith("% (tIoU 0.1:0.9)")
    checkpoint = next((tmp_path / "store" / "dense_train").glob("*/best.pt"))
    model, info = load_detector(checkpoint)
    assert model.cfg.lcf and model.cfg.lac and info["classes"] == ["syn_00", "syn_01", "syn_02"]
    e = subprocess.run([*CLI, "evaluate", "--annotations", str(features), "--checkpoint", str(checkpoint)],
                       capture_output=True, text=True)
    assert e.returncode == 0, e.stderr
    assert "0.9" in e.stdout and "mean mAP over tIoU 0.5:0.9" in e.stdout
    avg = [ln for ln in e.stdout.splitlines() if ln.startswith("average mAP:")][0]
    assert avg.split(":")[1].split("%")[0].strip() == line[0].split(":")[1].split("%")[0].strip()
    bad = subprocess.run([*CLI, "train", "--annotations", str(features), "--set", "model_args.lcf_tau=0.1",
                          "--set", "model_args.no_such=1", "--root", str(tmp_path / "store")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no_such" in bad.stderr and "Traceback" not in bad.stderr


def test_a_folder_in_unav100s_released_layout_is_accepted(tmp_path):
    """YouTube-like ids, `fps` fields, rgb 1024 + flow 1024 + vggish 128 per video, no features.json, one visual
    file a step longer than its audio: train and evaluate read it as UnAV-100's own loader would."""
    src = tmp_path / "gen"
    generate_feature_dataset(src, FeatureSynthConfig(train=2, val=1, test=1, classes=2, seed=4, rgb_dim=1024,
                                                     flow_dim=1024, audio_dim=128, min_length_s=15, max_length_s=25))
    db = json.loads((src / ANNOTATIONS).read_text())["database"]
    out = tmp_path / "unav"
    (out / "features").mkdir(parents=True)
    ids = ["__2MwJ2uHu0", "-abc123XYZ_", "Zz9_-Qw3rTy", "0123456789a"]
    released = {}
    for new, (old, rec) in zip(ids, sorted(db.items())):
        released[new] = {**rec, "fps": 29.97}
        for suffix in ("_rgb.npy", "_flow.npy", "_vggish.npy"):
            x = np.load(src / "features" / f"{old}{suffix}")
            if new == ids[0] and suffix != "_vggish.npy":
                x = np.concatenate([x, x[-1:]])  # one step longer: cut to the shorter modality
            np.save(out / "features" / f"{new}{suffix}", x)
    (out / ANNOTATIONS).write_text(json.dumps({"version": "UnAV-100", "database": released}))
    fs = load_dense_features(out / ANNOTATIONS, out / "features")
    assert fs.dims() == (2048, 128) and fs.grid.stride_s == 0.32
    r = subprocess.run([*CLI, "train", "--annotations", str(out / ANNOTATIONS), "--features", str(out / "features"),
                        "--size", "cpu", "--set", "epochs=1", "--set", "batch_size=2", "--set", "device=cpu",
                        "--root", str(tmp_path / "store")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    checkpoint = next((tmp_path / "store" / "dense_train").glob("*/best.pt"))
    model, _ = load_detector(checkpoint)
    assert (model.cfg.visual_dim, model.cfg.audio_dim, model.cfg.num_classes) == (2048, 128, 2)
    e = subprocess.run([*CLI, "evaluate", "--annotations", str(out), "--features", str(out / "features"),
                        "--checkpoint", str(checkpoint), "--split", "validation"], capture_output=True, text=True)
    assert e.returncode == 0 and "average mAP:" in e.stdout, e.stderr
    # features of other widths than the checkpoint's: one clear error
    other = tmp_path / "other"
    generate_feature_dataset(other, FeatureSynthConfig(train=1, val=1, test=1, classes=2, seed=5))
    e = subprocess.run([*CLI, "evaluate", "--annotations", str(other), "--checkpoint", str(checkpoint)],
                       capture_output=True, text=True)
    assert e.returncode == 2 and "visual_dim=2048" in e.stderr and "Traceback" not in e.stderr


def test_flow_from_raw_videos_reuses_and_predict_recomputes_the_same_features(prefect_harness, tmp_path):
    from flows.dense import dense_pipeline
    from pipeline.dense.predict import predict_files

    cfg = {"root": str(tmp_path / "store"),
           "dataset": {"synth": {"train": 2, "val": 1, "test": 1, "classes": 2, "seed": 1, "min_length_s": 8,
                                 "max_length_s": 12}},
           "extract": {"random_init": True, "frames_per_window": 1, "crop_size": 64, "device": "cpu"},
           "train": {**TINY, "epochs": 1, "batch_size": 2, "test_weights": "val", "standardize_features": True}}
    path = tmp_path / "dense.yaml"
    path.write_text(yaml.safe_dump(cfg))
    first = dense_pipeline(config_path=str(path))
    assert [o["stage"] for o in first["stages"]] == ["dense_extract", "dense_train", "dense_evaluate"]
    assert not any(o["reused"] for o in first["stages"]) and first["random_init"]
    assert any("RANDOM WEIGHTS" in w for w in first["warnings"])
    from tests.test_flow_artifacts import assert_embeds_pictures, latest_markdown_artifacts

    evaluation = next(t for t in latest_markdown_artifacts("dense-evaluation") if str(tmp_path) in t)
    assert "_timeline.png" in evaluation and assert_embeds_pictures(evaluation)  # the test video's timeline
    second = dense_pipeline(config_path=str(path))
    assert all(o["reused"] for o in second["stages"]) and second["average_mAP"] == first["average_mAP"]
    third = dense_pipeline(config_path=str(path), overrides=["train.lr=0.002"])
    reused = {o["stage"]: o["reused"] for o in third["stages"]}
    assert reused == {"dense_extract": True, "dense_train": False, "dense_evaluate": False}

    dataset = Path(first["annotations"]).parent
    video = sorted((dataset / "videos").glob("*.mp4"))[0]
    db = json.loads(Path(first["annotations"]).read_text())["database"]
    gt = {vid: [{"segment": e["segment"], "label_id": e["label_id"]} for e in rec["annotations"]]
          for vid, rec in db.items()}
    results = predict_files([video, tmp_path / "missing.mp4"], Path(first["checkpoint"]), tmp_path / "pred",
                            ground_truth=gt, min_score=0.0, device="cpu", keep_features=True)
    ok, failed = results
    assert "error" in failed and ok["random_weights"] and ok["ground_truth"]
    assert (tmp_path / "pred" / f"{video.stem}_timeline.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "pred" / f"{video.stem}.json").read_text())
    assert all(0 <= e["start"] < e["end"] <= saved["duration_s"] + 1e-6 for e in saved["events"])
    # the checkpoint says how its features were made: predict's features are the training features
    for suffix in ("_resnet50.npy", "_cnn14.npy"):
        trained_on = np.load(Path(first["features"]) / f"{video.stem}{suffix}")
        again = np.load(tmp_path / "pred" / "features" / f"{video.stem}{suffix}")
        assert again.shape == trained_on.shape == (ok["steps"], 2048)
        np.testing.assert_allclose(again, trained_on, rtol=1e-5, atol=1e-6)
