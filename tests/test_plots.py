"""The pictures and the report: training curves and evaluation charts written by the stages (and registered as
their outputs), the prediction timeline for short, long and partly annotated videos, the Prefect report artifact.
Every PNG is checked to be a real PNG of sensible size; the markdown report's images must exist."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.ave import plots
from pipeline.ave.metrics import localization_metrics
from pipeline.synth_engine import AVE_CATEGORIES
from tests.features_fixture import CLASSES, TINY_MODEL, write_feature_folder


def png_size(path: Path) -> tuple[int, int]:
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def assert_png(path: Path, width=(600, 4000), height=(200, 4000)) -> tuple[int, int]:
    import matplotlib.image

    w, h = png_size(path)
    assert width[0] <= w <= width[1] and height[0] <= h <= height[1], (path.name, w, h)
    assert matplotlib.image.imread(path).shape[:2] == (h, w)  # decodes, not just a header
    return w, h


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """A tiny training run and its evaluation in a store: what the hooks in pipeline/ave/train.py write."""
    from pipeline.ave.features import from_public_folder
    from pipeline.ave.train import TrainConfig, evaluate_stage, train_stage

    d = tmp_path_factory.mktemp("plots")
    fs = from_public_folder(write_feature_folder(d / "feats"))
    cfg = TrainConfig(epochs=3, batch_size=4, lr=3e-3, milestones=[100], device="cpu", model=TINY_MODEL, seed=1)
    trained = train_stage(fs, cfg, d / "root")
    evaluated = evaluate_stage(trained.dir / "best.pt", fs, d / "root", "test", device="cpu")
    return d, fs, trained, evaluated


def test_training_writes_curves_beside_its_metrics(stages):
    from pipeline.store import read_manifest

    _, _, trained, _ = stages
    assert (trained.dir / "metrics.csv").is_file()
    assert_png(trained.dir / "curves.png", width=(1000, 2000), height=(300, 800))
    assert read_manifest(trained.dir / "manifest.json").outputs["curves"].path == "curves.png"


def test_evaluation_writes_charts_and_a_report_that_embeds_them(stages):
    from pipeline.store import read_manifest

    _, _, _, evaluated = stages
    outputs = read_manifest(evaluated.dir / "manifest.json").outputs
    assert {"confusion", "per_class", "report"} <= set(outputs)
    assert_png(evaluated.dir / outputs["confusion"].path)
    assert_png(evaluated.dir / outputs["per_class"].path)
    report = (evaluated.dir / "report_test.md").read_text()
    assert report.startswith("# Evaluation on the test split") and "segment accuracy" in report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert sorted(images) == ["confusion_test.png", "per_class_test.png"]  # relative: the folder can move
    assert all((evaluated.dir / i).is_file() for i in images)
    per_class = json.loads((evaluated.dir / "metrics_test.json").read_text())["per_class"]
    assert per_class and all(f"| {name} |" in report for name in per_class)


def test_prefect_report_artifact_names_the_pictures(stages, monkeypatch):
    pytest.importorskip("prefect")
    from flows import tasks

    d, fs, trained, evaluated = stages
    made = {}
    monkeypatch.setattr(tasks, "create_markdown_artifact", lambda text, key, **kw: made.setdefault(key, text))
    monkeypatch.setattr(tasks, "publish", lambda *a, **kw: {"ok": True})
    folder = d / "feats"
    out = tasks.evaluate_task.fn(str(trained.dir / "best.pt"), str(folder), str(folder / "visual_feature.h5"),
                                 str(folder / "audio_feature.h5"), str(d / "root"), "test")
    assert out == {"ok": True}
    text = made["evaluation-report"]
    assert text.count("](data:image/png;base64,") == 2  # the UI shows embedded pictures, not local files
    named = re.findall(r"\(PNG\): `([^`]+)`", text)
    assert [Path(p).name for p in named] == ["confusion_test.png", "per_class_test.png"]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in named)


def test_confusion_and_per_class_charts_scale_to_ave_classes(tmp_path):
    rng = np.random.default_rng(0)
    names = list(AVE_CATEGORIES)  # 28 classes with long names
    target = rng.integers(0, 29, size=(300, 10))
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, 29, size=target.shape))
    m = localization_metrics(pred, target, 28, names) | {"split": "test"}
    w, h = assert_png(plots.confusion_png(m, tmp_path / "c.png"), width=(1200, 3000), height=(1200, 3000))
    assert_png(plots.per_class_png(m, tmp_path / "p.png"), width=(800, 1600), height=(800, 1600))
    small = localization_metrics(target % 3, target % 3, 2, ["a", "b"]) | {"split": "val"}
    assert png_size(plots.confusion_png(small, tmp_path / "s.png"))[0] < w


def test_timeline_for_short_long_and_partly_annotated_videos(tmp_path):
    rng = np.random.default_rng(1)
    names = CLASSES

    def rows(n):
        labels = rng.choice([*names, "background"], size=n)
        return [{"second": s, "label": str(lab), "event_prob": float(rng.random()), "class_prob": 0.6,
                 "window": s // 10} for s, lab in enumerate(labels)]

    frames = rng.integers(0, 255, size=(125, 48, 64, 3), dtype=np.uint8)
    audio = rng.normal(size=125 * 8000).astype(np.float32) * 0.1
    gt = [*(["Bark"] * 4 + ["background"] * 6), *([None] * 115)]  # AVE labels cover 10 s only
    long = plots.timeline_png(tmp_path / "long.png", frames, audio, 8000, rows(125), names, gt, title="long",
                              notes=["RANDOM WEIGHTS: test"], duration_s=124.6)
    wl, _ = assert_png(long, width=(2000, 4000), height=(500, 1500))
    one = plots.timeline_png(tmp_path / "one.png", frames[:1], None, 8000, rows(1), names, duration_s=0.4,
                             audio_note="no audio track: silence used")
    wo, _ = assert_png(one, width=(1000, 1500), height=(400, 1200))
    assert wl > wo
    with pytest.raises(ValueError, match="no rows"):
        plots.timeline_png(tmp_path / "none.png", frames, audio, 8000, [], names)


def test_training_curves_of_one_epoch_and_a_missing_csv(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,lr,bece,loss,is_event,train_acc,val_acc,test_acc,train_s,eval_s\n"
                        "0,0.0007,False,2.5,0.7,40,35,30,1.0,0.1\n")
    assert_png(plots.training_curves_png(csv_path, tmp_path / "curves.png"), width=(1000, 2000), height=(300, 800))
    with pytest.raises(FileNotFoundError):
        plots.training_curves_png(tmp_path / "nope.csv", tmp_path / "x.png")
