"""Features where an event needs both modalities (pipeline.ave.synth_features), and AVE-CLIP learning them (issue 29).

The done-when check trains CACE and AVE-CLIP (default fusion: the cross-modal windows) with three seeds each on
such a set through `compare` and asks AVE-CLIP to be no worse than CACE beyond the seeds' spread. Tiny models, one
intra-op thread (they gain nothing from more, and on a shared 2-core machine more threads only oversubscribe it).
"""

import json

import h5py
import numpy as np
import pytest
import torch

from pipeline.ave.compare import compare
from pipeline.ave.features import from_public_folder
from pipeline.ave.synth_features import (
    BACKGROUND_KINDS,
    EVENT,
    TRUTH_FILE,
    CorrespondenceConfig,
    build_correspondence_features,
)
from pipeline.ave.train import TrainConfig
from pipeline.errors import UserError
from tests.features_fixture import TINY_MODEL

SMALL = CorrespondenceConfig(videos=40, classes=3, seed=5)


def test_the_folder_loads_in_the_public_layout_with_the_configured_truth(tmp_path):
    truth = build_correspondence_features(tmp_path / "f", SMALL)
    fs = from_public_folder(tmp_path / "f")
    n = SMALL.videos
    assert fs.visual.shape == (n, 10, 2, 2, 32) and fs.audio.shape == (n, 10, 16)
    assert fs.num_classes == 3 and fs.class_names == ["class 0", "class 1", "class 2"]
    assert np.array_equal(fs.labels.argmax(-1), truth.segment_labels(3))
    rows = np.concatenate([fs.rows(s) for s in ("train", "val", "test")])
    assert sorted(rows.tolist()) == list(range(n)) and len(fs.rows("test")) == 8 and len(fs.rows("val")) == 8
    assert sorted(set(truth.classes)) == [0, 1, 2]
    lengths = [e - s for s, e in truth.spans]
    assert 10 in lengths and min(lengths) < 5  # full-length videos and short events
    kinds = {k for row in truth.kinds for k in row}
    assert kinds == {EVENT, *BACKGROUND_KINDS}
    for i, (s, e) in enumerate(truth.spans):
        assert [k == EVENT for k in truth.kinds[i]] == [s <= t < e for t in range(10)]
    saved = json.loads((tmp_path / "f" / TRUTH_FILE).read_text())
    assert saved["config"]["videos"] == n and saved["kinds"] == truth.kinds


def test_each_modality_carries_the_class_exactly_where_the_kind_says(tmp_path):
    """The mean visual map of seconds that show a class's picture has a norm near 1 (the unit prototype); seconds
    with noise for picture average to near 0. The same for the sounds."""
    truth = build_correspondence_features(tmp_path / "f", SMALL)
    with h5py.File(tmp_path / "f" / "visual_feature.h5") as f:
        visual = f["avadataset"][()].mean((2, 3))
    with h5py.File(tmp_path / "f" / "audio_feature.h5") as f:
        audio = f["avadataset"][()]
    kinds = np.array(truth.kinds)
    cls = np.repeat(np.array(truth.classes)[:, None], 10, 1)
    for feats, present, absent in ((visual, ("event", "visual_only", "other_sound"), "audio_only"),
                                   (audio, ("event", "audio_only", "other_picture"), "visual_only")):
        for c in range(3):
            shows = np.isin(kinds, present) & (cls == c)
            assert np.linalg.norm(feats[shows].mean(0)) == pytest.approx(1.0, abs=0.15)
        assert np.linalg.norm(feats[kinds == absent].mean(0)) < 0.3
        assert np.linalg.norm(feats[kinds == "empty"].mean(0)) < 0.4  # fewer seconds: a noisier mean


def test_same_seed_same_numbers_and_config_errors(tmp_path):
    build_correspondence_features(tmp_path / "a", SMALL)
    build_correspondence_features(tmp_path / "b", SMALL)
    build_correspondence_features(tmp_path / "c", CorrespondenceConfig(videos=40, classes=3, seed=6))
    for name in ("visual_feature.h5", "audio_feature.h5", "labels.h5", "test_order.h5"):
        with h5py.File(tmp_path / "a" / name) as fa, h5py.File(tmp_path / "b" / name) as fb:
            key = list(fa)[0]
            assert np.array_equal(fa[key][()], fb[key][()])
    with h5py.File(tmp_path / "a" / "audio_feature.h5") as fa, h5py.File(tmp_path / "c" / "audio_feature.h5") as fc:
        assert not np.array_equal(fa["avadataset"][()], fc["avadataset"][()])
    with pytest.raises(UserError, match="classes must be >= 2"):
        CorrespondenceConfig(classes=1)
    with pytest.raises(UserError, match="background_mix"):
        CorrespondenceConfig(background_mix={"silence": 1.0})


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_AVECLIP = {"d_model": 16, "num_heads": 2, "feature_heads": 2, "ff_mult": 2}


def test_aveclip_learns_the_correspondence_as_well_as_cace(tmp_path, one_thread):
    """Done when (issue 29): AVE-CLIP's mean test accuracy over seeds 1-3 >= CACE's mean minus the larger of the
    two seed standard deviations, both trained with the same recipe on the same correspondence-needing set."""
    folder = tmp_path / "feats"
    build_correspondence_features(folder, CorrespondenceConfig(videos=80, classes=4, seed=0))
    fs = from_public_folder(folder)
    recipe = dict(epochs=20, batch_size=8, lr=3e-3, milestones=[100], device="cpu", precision="fp32",
                  standardize_features=True)
    (cace,) = compare(fs, TrainConfig(model="cace", model_args=TINY_MODEL, **recipe), ["cace"], [1, 2, 3],
                      tmp_path / "store")
    (aveclip,) = compare(fs, TrainConfig(model="aveclip", model_args=TINY_AVECLIP, **recipe), ["aveclip"],
                         [1, 2, 3], tmp_path / "store")
    assert aveclip.runs[0].metrics["model"] == "aveclip"
    (c_mean, c_std), (a_mean, a_std) = cace.mean_std("test_accuracy"), aveclip.mean_std("test_accuracy")
    assert a_mean >= c_mean - max(c_std, a_std), (f"AVE-CLIP {a_mean:.1f} +- {a_std:.1f} vs CACE {c_mean:.1f} +- "
                                                  f"{c_std:.1f}")
