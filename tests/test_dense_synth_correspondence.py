"""Issue 29 (dense): generated data that needs both modalities, and the single-modality controls that show it.

- The generators (feature files and real MP4s) plan distractors a single modality takes for events (a picture
  without its sound, a sound without its picture, one class's picture with another's sound), record their version
  and every distractor, stay byte-deterministic per seed, and still write version 1 when asked.
- `inputs: audio|visual` replaces the other modality by matched noise, fixed per video, in every split; "both"
  keeps the stage key of before.
- `avel dense compare` runs (variant, inputs, seed) as ordinary train stages and writes one table with the gaps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.dense.annotations import load_annotations
from pipeline.dense.data import ModalityControl, load_dense_features
from pipeline.dense.synthetic import (
    AUDIBLE_UNSEEN,
    DISTRACTOR_GAP_S,
    DISTRACTOR_KINDS,
    MISMATCHED,
    PICTURE_WITHOUT_SOUND,
    SOUND_WITHOUT_PICTURE,
    VISIBLE_SILENT,
    FeatureSynthConfig,
    generate_feature_dataset,
    plan_distractors,
)
from pipeline.dense.train import DenseTrainConfig
from pipeline.errors import UserError

TINY = dict(size="cpu", epochs=1, warmup_epochs=0, batch_size=4, lr=1e-3, ema_decay=0.9, device="cpu",
            precision="fp32", model_args={"embd_dim": 16, "head_dim": 16, "dependency_dim": 8, "max_seq_len": 64})
SMALL = FeatureSynthConfig(train=4, val=2, test=2, classes=3, seed=5, min_length_s=12, max_length_s=18)


def _check_distractors(record: dict, ds) -> None:
    """Every distractor is what its kind says, and keeps 1 s away from the events of its classes."""
    for vid, items in record["distractors"].items():
        events = ds.videos[vid].events
        for d in items:
            v, a, (s, e) = d["visual_label_id"], d["audio_label_id"], d["segment"]
            assert d["kind"] in DISTRACTOR_KINDS and 1.0 - 1e-3 <= e - s
            assert (v is not None) == (d["kind"] in PICTURE_WITHOUT_SOUND)
            assert (a is not None) == (d["kind"] in SOUND_WITHOUT_PICTURE)
            if d["kind"] == MISMATCHED:
                assert v != a
            for ev in events:
                if ev.label_id in (v, a):
                    assert e + DISTRACTOR_GAP_S <= ev.start + 1e-3 or s - DISTRACTOR_GAP_S >= ev.end - 1e-3


def test_feature_generator_plans_distractors_records_its_version_and_is_deterministic(tmp_path):
    a = generate_feature_dataset(tmp_path / "a", FeatureSynthConfig(train=20, val=4, test=4, seed=7))
    b = generate_feature_dataset(tmp_path / "b", FeatureSynthConfig(train=20, val=4, test=4, seed=7))
    assert a.read_bytes() == b.read_bytes()
    for f in (tmp_path / "a" / "features").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / "features" / f.name).read_bytes()
    ds = load_annotations(a)
    assert ds.problems == [] and ds.generator_version == 2 and ds.summary()["generator"]["version"] == 2
    record = json.loads(a.read_text())["generator"]
    assert record["name"] == "avel.dense.synthetic" and record["config"]["seed"] == 7
    counts = record["distractor_counts"]
    assert all(counts[k] > 0 for k in DISTRACTOR_KINDS), counts
    _check_distractors(record, ds)
    events = sum(len(v.events) for v in ds.videos.values())
    for side in (PICTURE_WITHOUT_SOUND, SOUND_WITHOUT_PICTURE):  # about one false event per event, each modality
        n = sum(counts[k] for k in side)
        assert 0.6 * events <= n <= 1.3 * events, (n, events)


def test_version_1_is_still_written_and_reads_as_unversioned(tmp_path):
    path = generate_feature_dataset(tmp_path, FeatureSynthConfig(train=2, val=1, test=1, seed=7, version=1))
    assert "generator" not in json.loads(path.read_text())
    assert load_annotations(path).generator_version is None
    with pytest.raises(UserError, match="version must be one of 1, 2"):
        FeatureSynthConfig(version=3)


def test_distractor_plan_matches_the_events_lengths_and_share():
    rng = np.random.default_rng(0)
    events = [(10.0, 14.0, 0), (30.0, 60.0, 1), (70.0, 71.5, 2)]
    counts, lengths = {k: 0 for k in DISTRACTOR_KINDS}, []
    for _ in range(200):
        for d in plan_distractors(rng, 400.0, events, 4, 1.0, 40.0, 0.3):  # room for all: none left out
            counts[d.kind] += 1
            lengths.append(d.end - d.start)
            assert 0 <= d.start < d.end <= 400 and abs(d.offset) <= 0.3
    assert sum(counts[k] for k in PICTURE_WITHOUT_SOUND) == pytest.approx(600, rel=0.1)
    assert sum(counts[k] for k in SOUND_WITHOUT_PICTURE) == pytest.approx(600, rel=0.1)
    assert min(lengths) >= 1.0 - 1e-9 and max(lengths) > 30  # short and long, as the events
    assert plan_distractors(rng, 400.0, events, 4, 0.0, 40.0, 0.3) == []


def test_video_generator_v2_is_byte_deterministic_and_records_its_distractors(tmp_path):
    from pipeline.dense.videos import VideoSynthConfig, generate_video_dataset

    cfg = VideoSynthConfig(train=3, val=0, test=1, classes=3, seed=1, min_length_s=10, max_length_s=14,
                           max_event_s=5, fps=4, width=64, height=48)
    path = generate_video_dataset(tmp_path / "a", cfg)
    again = generate_video_dataset(tmp_path / "b", cfg)
    assert path.read_bytes() == again.read_bytes()
    for f in (tmp_path / "a" / "videos").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / "videos" / f.name).read_bytes()
    ds = load_annotations(path)
    record = json.loads(path.read_text())["generator"]
    assert ds.problems == [] and ds.generator_version == 2 and record["name"] == "avel.dense.videos"
    assert record["config"]["distractors_per_event"] == 1.0 and sum(record["distractor_counts"].values()) > 0
    _check_distractors(record, ds)
    assert {VISIBLE_SILENT, AUDIBLE_UNSEEN, MISMATCHED} == set(DISTRACTOR_KINDS)


def test_noise_control_is_matched_fixed_per_video_and_keeps_the_joint_key(tmp_path):
    generate_feature_dataset(tmp_path, SMALL)
    fs = load_dense_features(tmp_path)
    train = fs.split("train")
    assert ModalityControl.of("both", train, 3) is None
    control = ModalityControl.of("audio", train, 3)  # sees audio: the visual features become noise
    assert control.replaced == "visual"
    noisy = [control.apply(v) for v in train]
    for raw, v in zip(train, noisy):
        assert v.visual.shape == raw.visual.shape and v.visual.dtype == np.float32
        np.testing.assert_array_equal(v.audio, raw.audio)  # the seen modality untouched
    x, y = np.concatenate([v.visual for v in train]), np.concatenate([v.visual for v in noisy])
    se = x.std(0) / np.sqrt(len(x))  # a sample's mean and std land within 4 standard errors
    assert np.all(np.abs(y.mean(0) - x.mean(0)) < 4 * se)
    assert np.all(np.abs(y.std(0) - x.std(0)) < 4 * se * np.sqrt(0.5) + 1e-6)
    np.testing.assert_allclose(control.mean, x.mean(0), rtol=1e-5, atol=1e-6)  # what the noise was made from
    np.testing.assert_allclose(control.std, x.std(0), rtol=1e-5)
    # the same video gets the same noise alone, in its split, or in another order; another seed, other noise
    test = fs.split("test", control=control)
    alone = control.apply(fs.split("test")[1])
    np.testing.assert_array_equal(test[1].visual, alone.visual)
    np.testing.assert_array_equal(control.apply(train[2]).visual, noisy[2].visual)
    other = ModalityControl.of("audio", train, 4).apply(train[2])
    assert not np.array_equal(other.visual, noisy[2].visual)
    assert ModalityControl.from_dict(control.to_dict()).apply(train[0]).visual.tobytes() == noisy[0].visual.tobytes()
    visual_only = ModalityControl.of("visual", train, 3).apply(train[0])
    np.testing.assert_array_equal(visual_only.visual, train[0].visual)
    assert not np.array_equal(visual_only.audio, train[0].audio)
    # stage keys: "both" is the key of before the field existed; a control has its own
    joint = DenseTrainConfig(**TINY)
    assert "inputs" not in joint.key_fields() and joint.key_fields() == {
        k: v for k, v in DenseTrainConfig(**TINY, inputs="both").key_fields().items()}
    assert DenseTrainConfig(**TINY, inputs="audio").key_fields()["inputs"] == "audio"


def test_dense_compare_cli_runs_each_row_as_a_cached_train_stage(tmp_path):
    import yaml

    from pipeline.cli import app
    from pipeline.dense.train import evaluate_checkpoint

    data = tmp_path / "data"
    generate_feature_dataset(data, SMALL)
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({"train": TINY}))
    args = ["dense", "compare", "--annotations", str(data), "--root", str(tmp_path / "store"), "--config",
            str(config), "--variants", "baseline", "--inputs", "both,visual", "--seeds", "1,2", "--out",
            str(tmp_path / "report")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "run 4/4: baseline (visual only) seed 2" in r.output and "run 1/4: baseline seed 1" in r.output
    report = json.loads((tmp_path / "report" / "comparison.json").read_text())
    rows = {row["label"]: row for row in report["rows"]}
    assert list(rows) == ["baseline", "baseline (visual only)"]
    assert rows["baseline"]["gap_to_both"] is None and rows["baseline"]["seeds"] == [1, 2]
    gap = rows["baseline (visual only)"]["gap_to_both"]
    both, seen = rows["baseline"]["test_avg_map"]["values"], rows["baseline (visual only)"]["test_avg_map"]["values"]
    assert gap["values"]["2"] == pytest.approx(seen["2"] - both["2"])
    assert gap["mean"] == pytest.approx(np.mean([seen[s] - both[s] for s in ("1", "2")]))
    assert "gap to both (points)" in (tmp_path / "report" / "comparison.md").read_text()
    runs = sorted((tmp_path / "store" / "dense_train").iterdir())
    assert len(runs) == 4
    # a control's checkpoint carries its noise: evaluating it later scores what its training scored
    control_run = rows["baseline (visual only)"]["runs"][0]
    metrics = json.loads((tmp_path / "store" / "dense_train" / control_run.split("/")[-1] / "metrics.json")
                         .read_text())
    again = evaluate_checkpoint(tmp_path / "store" / "dense_train" / control_run.split("/")[-1] / "best.pt",
                                load_dense_features(data), "test", device="cpu", precision="fp32")
    assert again["average_mAP"] == pytest.approx(metrics["test_avg_map"], abs=1e-9)
    r2 = CliRunner().invoke(app, args)  # every run reused from the store
    assert r2.exit_code == 0 and r2.output.count("(reused") == 4, r2.output
    bad = CliRunner().invoke(app, [*args[:8], "--variants", "baseline,nope"])
    assert bad.exit_code != 0 and "not one of baseline, lcf, lac, loco" in str(bad.exception)
    bad = CliRunner().invoke(app, [*args[:8], "--inputs", "both,nose"])
    assert bad.exit_code != 0 and "--inputs" in str(bad.exception)
