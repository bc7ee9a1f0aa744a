"""Training and evaluation of the localizer on tiny generated features (CPU, seconds)."""

import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from models import CACEConfig, CACENet
from pipeline.ave.features import from_public_folder
from pipeline.ave.metrics import localization_metrics
from pipeline.ave.train import TrainConfig, evaluate, load_model, save_checkpoint, train_model, train_stage
from pipeline.errors import UserError
from tests.features_fixture import TINY_MODEL, write_feature_folder


def tiny_cfg(**kw):
    base = dict(epochs=4, batch_size=4, lr=3e-3, milestones=[100], device="cpu", model=TINY_MODEL, seed=1,
                precision="fp32")  # exact expectations below hold in fp32 on any CPU (auto is bf16 on AMX ones)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def folder(tmp_path):
    return write_feature_folder(tmp_path / "feats")


def test_overfits_a_tiny_feature_set_to_full_training_accuracy(tmp_path, folder):
    fs = from_public_folder(folder)
    out = tmp_path / "run"
    out.mkdir()
    history = []
    train_model(fs, tiny_cfg(epochs=40, clip_grad=None), out, on_epoch=history.append)
    assert history[-1]["bece"] and not history[0]["bece"]  # BECE switches on at ceil(40/8) = 5
    assert max(r["train_acc"] for r in history[-5:]) == 100.0
    # the trained model, re-evaluated in eval mode on the train split, is also perfect
    model, _ = load_model(out / "last.pt")
    fs.splits["test"] = fs.splits["train"]
    assert evaluate(out / "last.pt", fs, "test", device="cpu")["accuracy"] == 100.0


def test_metrics_of_a_known_prediction():
    target = np.array([[0, 0, 3, 3], [1, 1, 1, 3]])  # 3 = background
    pred = np.array([[0, 3, 3, 3], [1, 1, 2, 0]])
    m = localization_metrics(pred, target, background=3, class_names=["a", "b", "c"])
    assert m["accuracy"] == 62.5 and m["correct_segments"] == 5 and m["segments"] == 8
    assert m["all_background_accuracy"] == 37.5
    assert m["per_class"]["a"]["accuracy"] == 50.0
    assert m["per_class"]["background"]["accuracy"] == pytest.approx(200 / 3)
    # event detection: 5 segments predicted as events, 4 of them are events (TP); 1 true event missed (FN)
    assert m["event"]["precision"] == 80.0 and m["event"]["recall"] == 80.0
    assert m["background"]["precision"] == pytest.approx(100 * 2 / 3)
    assert m["background"]["recall"] == pytest.approx(200 / 3)
    assert np.array(m["confusion"]).sum() == 8 and m["confusion"][3][3] == 2


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, folder):
    fs = from_public_folder(folder)
    cfg = tiny_cfg(epochs=4)
    full, cut = tmp_path / "full", tmp_path / "cut"
    full.mkdir(), cut.mkdir()
    train_model(fs, cfg, full)

    def die(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_model(fs, cfg, cut, on_epoch=die)
    train_model(fs, cfg, cut)
    a, b = torch.load(full / "last.pt", weights_only=True), torch.load(cut / "last.pt", weights_only=True)
    assert [r["test_acc"] for r in a["history"]] == [r["test_acc"] for r in b["history"]]
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=0)


def test_stage_is_reused_and_labels_its_numbers(tmp_path, folder):
    fs = from_public_folder(folder)
    first = train_stage(fs, tiny_cfg(epochs=2), tmp_path / "root")
    again = train_stage(fs, tiny_cfg(epochs=2), tmp_path / "root")
    assert not first.reused and again.reused and again.key == first.key
    assert first.metrics["test_accuracy_label"].startswith("test accuracy of the val-selected")
    on_test = train_stage(fs, tiny_cfg(epochs=2, select_on="test"), tmp_path / "root")
    assert on_test.key != first.key and "optimistic" in on_test.metrics["test_accuracy_label"]
    assert on_test.metrics["test_accuracy"] == on_test.metrics["best_on_test_accuracy"]
    ckpt = torch.load(first.dir / "best.pt", weights_only=True)
    assert ckpt["seed"] == 1 and ckpt["features"] == fs.digests and ckpt["classes"] == fs.class_names
    assert (first.dir / "predictions_test.csv").read_text().count("\n") == 1 + 3 * 10


def test_bad_feature_shapes_give_clear_errors(tmp_path, folder):
    with h5py.File(folder / "audio_feature.h5", "w") as f:
        f.create_dataset("avadataset", data=np.zeros((15, 10, 2, 6)))
    with pytest.raises(UserError, match=r"audio features must be \[N,T,C\]"):
        from_public_folder(folder)
    with h5py.File(folder / "audio_feature.h5", "w") as f:
        f.create_dataset("avadataset", data=np.zeros((14, 10, 6)))
    with pytest.raises(UserError, match="has 14 rows x 10 segments but the labels have 15 x 10"):
        from_public_folder(folder)
    with h5py.File(folder / "audio_feature.h5", "w") as f:
        f.create_dataset("dataset", data=np.zeros((15, 10, 6)))
    with pytest.raises(UserError, match="no dataset 'avadataset'.*rename it"):
        from_public_folder(folder)


def test_dims_conflict_and_checkpoint_mismatch(tmp_path, folder):
    fs = from_public_folder(folder)
    with pytest.raises(UserError, match=r"model.video_dim=512 but the features give 12"):
        train_model(fs, tiny_cfg(model={**TINY_MODEL, "video_dim": 512}), tmp_path)
    other = tmp_path / "other.pt"
    save_checkpoint(other, CACENet(CACEConfig(video_dim=7, audio_dim=6, num_classes=3, **TINY_MODEL)))
    with pytest.raises(UserError, match="video_dim=7 but the features give 12"):
        evaluate(other, fs, device="cpu")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        evaluate(tmp_path / "junk.pt", fs, device="cpu")


def test_evaluate_cli_loads_a_reference_format_checkpoint(tmp_path):
    """The released CACE-Net file: VGG dims 512/128, DataParallel 'module.' keys, full-size model."""
    folder = write_feature_folder(tmp_path / "vgg", n_train=2, n_val=1, n_test=3, video_dim=512, audio_dim=128,
                                  hw=7)
    torch.manual_seed(0)
    model = CACENet(CACEConfig(num_classes=3)).double()  # the 3 classes of the fixture
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "model.pth.tar")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "evaluate", "--checkpoint",
                           str(tmp_path / "model.pth.tar"), "--features", str(folder), "--root", str(tmp_path / "a"),
                           "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("test accuracy: ") and last.endswith(" %")


def test_standardized_features_travel_in_the_checkpoint(tmp_path):
    """Tiny-scale, offset features (as random encoders give): z-scored with train statistics saved in best.pt."""
    folder = write_feature_folder(tmp_path / "f", seed=2)
    for name in ("visual_feature.h5", "audio_feature.h5"):
        with h5py.File(folder / name, "r+") as f:
            f["avadataset"][...] = f["avadataset"][()] * 1e-3 + 5.0
    fs = from_public_folder(folder)
    result = train_stage(fs, tiny_cfg(epochs=3, standardize_features=True), tmp_path / "root")
    ckpt = torch.load(result.dir / "best.pt", weights_only=True)
    norm = ckpt["feature_norm"]
    assert norm["visual_mean"].shape == (12,) and norm["audio_std"].shape == (6,)
    assert torch.allclose(norm["visual_mean"], torch.full((12,), 5.0), atol=0.01)
    again = evaluate(result.dir / "best.pt", fs, "test", device="cpu")
    assert again["accuracy"] == result.metrics["test_accuracy"]


def _write_labels(folder, width, shift=0):
    from pipeline.ave import load_dataset
    from pipeline.synth_engine import AVE_CATEGORIES

    ds = load_dataset(folder)
    small = ds.segment_labels()  # [N,10,len(ds.classes)+1]
    out = np.zeros((*small.shape[:2], width + 1), np.float32)
    for k, name in enumerate(ds.classes):
        col = (AVE_CATEGORIES.index(name) + shift) % width if width == len(AVE_CATEGORIES) else k
        out[..., col] = small[..., k]
    out[..., width] = small[..., -1]
    with h5py.File(folder / "labels.h5", "w") as f:
        f.create_dataset("avadataset", data=out)


def test_ave_width_labels_with_a_subset_of_classes_train_end_to_end(tmp_path, folder):
    """labels.h5 with AVE's 29 columns, Annotations.txt naming 3 classes: AVE's class list, checked, and a run
    that writes its predictions (this combination once crashed in write_predictions after all epochs)."""
    from pipeline.synth_engine import AVE_CATEGORIES

    _write_labels(folder, len(AVE_CATEGORIES))
    fs = from_public_folder(folder)
    assert fs.class_names == list(AVE_CATEGORIES) and fs.num_classes == 28
    cfg = TrainConfig(epochs=1, batch_size=4, model=TINY_MODEL, device="cpu")
    result = train_stage(fs, cfg, tmp_path / "art")
    assert (result.dir / "predictions_test.csv").is_file()


def test_labels_and_annotations_that_disagree_fail_before_training(folder):
    _write_labels(folder, 28, shift=1)  # AVE's width, every class in the wrong column
    with pytest.raises(UserError, match="row .* labels its events with column.*disagree"):
        from_public_folder(folder)
    _write_labels(folder, 5)  # 5 classes in labels.h5, 3 named in Annotations.txt
    with pytest.raises(UserError, match="5 classes \\+ background, but .*Annotations.txt names 3"):
        from_public_folder(folder)


def test_bf16_autocast_training_learns_and_records_its_precision(tmp_path, folder):
    fs = from_public_folder(folder)
    out = tmp_path / "run"
    out.mkdir()
    history = []
    summary = train_model(fs, tiny_cfg(epochs=40, clip_grad=None, precision="bf16"), out, on_epoch=history.append)
    assert summary["precision"] == "bf16"
    assert max(r["train_acc"] for r in history[-5:]) >= 95.0
