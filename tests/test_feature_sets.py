"""The released feature sets (`--feature-set ave|unav`) through the extraction engine: the decoding recipes (AVE's
frame indices, the 25-fps stream, the 16-bit waveform, in faithful and fast modes), the AVE and dense layouts they
write, their keys, and the readers that train on them.

The wiring runs with tiny registered encoders standing in for VGG-19, VGGish and I3D (seconds, not the minutes the
real ones take on 2 cores); the real encoders have their own tests (test_vgg19.py, test_vggish.py, test_i3d.py) and
one slow end-to-end test each here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from extractors import register_extractor
from extractors.base import ClipExtractor, Extractor
from extractors.weights import WeightsInfo
from pipeline.extraction import feature_sets as fsets
from pipeline.extraction import recipes


# ---- tiny stand-ins for the released sets' encoders ----------------------------------------------------------------
def _random(name: str, seed: int) -> WeightsInfo:
    return WeightsInfo(name, None, None, True, seed, "random init")


@register_extractor
class TinyFrames(Extractor):
    """Stands in for VGG-19: 16x16 thumbnails -> [2,2,8] per segment, the mean over its frames."""

    name, modality, output_file = "tiny-frames", "visual", "visual.h5"

    def __init__(self, weights=None, *, random_init=True, seed=0, device="cpu", precision="auto",
                 frames_per_segment=16, channels=8, **_):
        super().__init__(weights, random_init=random_init, seed=seed, device=device, precision=precision)
        self.weights = _random(self.name, seed)
        self.units_per_segment, self.segment_shape = frames_per_segment, (2, 2, channels)
        self.kernel = torch.randn(channels, 3, 8, 8, generator=torch.Generator().manual_seed(seed))

    def prepare(self, raw):
        x = torch.as_tensor(raw).permute(0, 3, 1, 2).float() / 255
        return F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)

    def encode(self, units):
        y = F.conv2d(units, self.kernel, stride=8)
        k = units.shape[0] // self.units_per_segment
        return y.reshape(k, self.units_per_segment, -1, 2, 2).mean(1).permute(0, 2, 3, 1).contiguous()


@register_extractor
class TinyClipAudio(ClipExtractor):
    """Stands in for VGGish: one row per `hop_s` of audio (mean |x| and RMS of the example), `examples` rows when
    asked (the last one repeated)."""

    name, modality = "tiny-clip-audio", "audio"

    def __init__(self, weights=None, *, random_init=True, seed=0, device="cpu", precision="auto", hop_s=0.96,
                 examples=None, width=4, **_):
        super().__init__(weights, random_init=random_init, seed=seed, device=device, precision=precision)
        self.weights, self.segment_shape = _random(self.name, seed), (width,)
        self.hop_s, self.examples = hop_s, examples
        self.last_padding = 0

    def encode_clip(self, source):
        samples, rate = source
        hop, win = int(round(self.hop_s * rate)), int(round(0.96 * rate))
        n = max(0, 1 + (len(samples) - win) // hop) if len(samples) >= win else 0
        rows = [[np.abs(samples[i * hop:i * hop + win]).mean(), np.sqrt((samples[i * hop:i * hop + win] ** 2).mean()),
                 rate / 1e5, i] for i in range(n)]
        self.last_padding = 0
        if self.examples is not None:
            self.last_padding = max(0, self.examples - len(rows))
            rows = (rows + [rows[-1]] * self.last_padding)[:self.examples]
        rows = np.asarray(rows, np.float32).reshape(-1, 4)
        return np.pad(rows, ((0, 0), (0, self.segment_shape[0] - 4)))


@register_extractor
class TinyClipVideo(ClipExtractor):
    """Stands in for I3D: one row per 24-frame window every 8 frames (a window needs frame 8k+24), holding the
    window's first frame index and mean pixel."""

    name, modality = "tiny-clip-video", "visual"

    def __init__(self, weights=None, *, random_init=True, seed=0, device="cpu", precision="auto", **_):
        super().__init__(weights, random_init=random_init, seed=seed, device=device, precision=precision)
        self.weights, self.segment_shape, self.hop_s = _random(self.name, seed), (3,), 0.32

    def encode_clip(self, frames):
        means = [float(np.asarray(f).mean()) for f in frames]
        n = len(means)
        t = (n - 25) // 8 + 1 if n >= 25 else 0
        return np.asarray([[8 * k, np.mean(means[8 * k:8 * k + 24]), n] for k in range(t)], np.float32).reshape(-1, 3)


def _tiny(fs: fsets.FeatureSet, names: dict[str, str], sizes: dict | None = None) -> fsets.FeatureSet:
    streams = tuple(fsets.Stream(s.name, s.modality, names[s.name], s.recipe, s.suffix,
                                 {**s.options, **(sizes or {}).get(s.name, {})}) for s in fs.streams)
    return fsets.FeatureSet(fs.name, streams, fs.tasks, fs.about)


@pytest.fixture
def tiny_sets(monkeypatch):
    monkeypatch.setitem(fsets.FEATURE_SETS, "ave", _tiny(fsets.FEATURE_SETS["ave"],
                                                         {"visual": "tiny-frames", "audio": "tiny-clip-audio"}))
    monkeypatch.setitem(fsets.FEATURE_SETS, "unav", _tiny(fsets.FEATURE_SETS["unav"], {
        "rgb": "tiny-clip-video", "flow": "tiny-clip-video", "audio": "tiny-clip-audio"}))


@pytest.fixture
def tiny_ave_at_released_sizes(monkeypatch):
    """The tiny stand-ins at VGG-19's 512 and VGGish's 128 channels: what a released-format checkpoint takes."""
    monkeypatch.setitem(fsets.FEATURE_SETS, "ave", _tiny(fsets.FEATURE_SETS["ave"], {
        "visual": "tiny-frames", "audio": "tiny-clip-audio"}, {"visual": {"channels": 512}, "audio": {"width": 128}}))


@pytest.fixture(scope="module")
def ave_ds(tmp_path_factory) -> Path:
    from pipeline.ave.synth import SynthConfig, generate_dataset

    out = tmp_path_factory.mktemp("ave-sets") / "ds"
    generate_dataset(out, SynthConfig(videos=3, classes=2, width=64, height=48, seed=5, split=(0.34, 0.33, 0.33)))
    return out


@pytest.fixture(scope="module")
def dense_ds(tmp_path_factory) -> Path:
    from pipeline.dense.videos import VideoSynthConfig, generate_video_dataset

    out = tmp_path_factory.mktemp("dense-sets") / "ds"
    generate_video_dataset(out, VideoSynthConfig(train=1, val=1, test=1, classes=2, min_length_s=8, max_length_s=10,
                                                 max_event_s=4, width=64, height=48))
    return out


# ---- recipes --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vid_len,fi,offsets", [
    (250, 25, [0, 1, 3, 4, 6, 7, 9, 10, 12, 14, 15, 17, 18, 20, 21, 23]),
    (251, 25, [0, 1, 3, 4, 6, 7, 9, 10, 12, 14, 15, 17, 18, 20, 21, 23]),
    (300, 30, [0, 1, 3, 5, 7, 9, 11, 13, 15, 16, 18, 20, 22, 24, 26, 28]),
    (301, 30, [0, 1, 3, 5, 7, 9, 11, 13, 15, 16, 18, 20, 22, 24, 26, 28]),
])
def test_ave_frame_indices_follow_the_scripts_formula(vid_len, fi, offsets):
    idx = recipes.ave_frame_indices(vid_len).reshape(10, 16)
    assert idx.shape == (10, 16)
    for second in range(10):
        assert (idx[second] - second * fi).tolist() == offsets  # spec §1.3's offset table
    assert idx.max() < 10 * fi  # the last frame of each second is never used


def test_ave_frame_count_is_imageios_round_of_banner_duration_times_fps():
    assert recipes.ave_vid_len(10.01, 25) == 250 and recipes.ave_vid_len(10.04, 25) == 251
    assert recipes.ave_vid_len(10.0, 29.97) == 300
    assert recipes.ave_vid_len(10.033, 29.97) == 301  # the banner's 10.03 x 29.97 = 300.6
    assert recipes.ave_frame_indices(241)[:3].tolist() == [0, 1, 3]  # fi = 24


@pytest.mark.parametrize("mode", recipes.MODES)
def test_recipes_decode_the_frames_and_the_16_bit_waveform(ave_ds, mode):
    video = sorted((ave_ds / "videos").glob("*.mp4"))[0]
    notes = []
    frames = recipes.ave_frames(video, mode, notes)
    assert frames.shape == (160, 48, 64, 3) and frames.dtype == np.uint8 and not notes
    samples, rate = recipes.waveform(video, mode)
    assert rate == 44100 and samples.dtype == np.float64 and abs(len(samples) / rate - 10) < 0.1
    assert np.all(samples * 32768 == np.round(samples * 32768))  # int16 / 32768 exactly
    n = sum(1 for _ in recipes.frames_25fps(video, mode))
    assert abs(n - 250) <= 1  # 10 s at 25 fps


def test_both_modes_pick_the_same_ave_frames(ave_ds):
    video = sorted((ave_ds / "videos").glob("*.mp4"))[1]
    assert np.array_equal(recipes.ave_frames(video, "faithful", []), recipes.ave_frames(video, "fast", []))


def test_a_set_that_does_not_fit_the_task_is_one_clear_error():
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="unav does not fit.*29 a 10-s clip.*cace or ave"):
        fsets.feature_set("unav", "ave")
    with pytest.raises(UserError, match="unknown feature set 'x'"):
        fsets.feature_set("x", "dense")


# ---- the AVE layout ---------------------------------------------------------------------------------------------
def test_ave_set_writes_the_ave_layout_that_training_reads(tiny_sets, ave_ds, tmp_path):
    from pipeline.ave.extract import ExtractConfig, extract, planned_key
    from pipeline.ave.features import from_dataset

    cfg = ExtractConfig(feature_set="ave", decode_mode="fast", random_init=True, precision="fp32", device="cpu")
    results = extract(ave_ds, cfg, tmp_path)
    rows = len((ave_ds / "Annotations.txt").read_text().splitlines())
    with h5py.File(results["visual"].path, "r") as f:
        assert f["avadataset"].shape == (rows, 10, 2, 2, 8) and f.attrs["feature_set"] == "ave"
        assert f.attrs["recipe"] == "ave_frames" and f.attrs["decode_mode"] == "fast"
    with h5py.File(results["audio"].path, "r") as f:
        audio = f["avadataset"][()]
        assert audio.shape == (rows, 10, 4) and f.attrs["hop_s"] == 0.96 and f.attrs["examples"] == 10
    assert np.allclose(audio[:, :, 2], 0.441)  # the source's 44.1 kHz reached the encoder unresampled
    assert audio[0, :, 3].tolist() == list(range(10))  # the first ten 0.96-s examples of the clip
    manifest = results["audio"].manifest
    assert manifest.metrics["recipe"]["resampy"] == "0.2.2" and manifest.metrics["recipe"]["decode_mode"] == "fast"
    cace = planned_key(ave_ds, ExtractConfig(random_init=True, precision="fp32", device="cpu"), "visual")
    assert results["visual"].key != cace  # the set is in the key; cace keys are pinned in test_stage_keys
    fs = from_dataset(ave_ds, results["visual"].path, results["audio"].path)
    assert (fs.video_dim, fs.audio_dim) == (8, 4)  # the localizer's widths come from the features
    from pipeline.ave.train import TrainConfig, train_stage
    from tests.features_fixture import TINY_MODEL

    trained = train_stage(fs, TrainConfig(epochs=1, batch_size=2, device="cpu", model=TINY_MODEL), tmp_path)
    assert (trained.dir / "best.pt").is_file()


def test_ave_set_faithful_mode_runs_ffmpeg_and_records_it(tiny_sets, ave_ds, tmp_path):
    from pipeline.ave.extract import ExtractConfig, extract

    cfg = ExtractConfig(feature_set="ave", random_init=True, precision="fp32", device="cpu", modality="visual")
    r = extract(ave_ds, cfg, tmp_path)["visual"]
    assert r.manifest.metrics["recipe"]["ffmpeg"]["version"].startswith("ffmpeg version")
    fast = extract(ave_ds, cfg.model_copy(update={"decode_mode": "fast"}), tmp_path)["visual"]
    assert fast.key != r.key
    with h5py.File(r.path, "r") as a, h5py.File(fast.path, "r") as b:
        assert np.array_equal(a["avadataset"][()], b["avadataset"][()])  # the same frames, either way


# ---- the UnAV layout --------------------------------------------------------------------------------------------
def test_unav_set_writes_unavs_three_files_that_the_dense_loader_reads(tiny_sets, dense_ds, tmp_path):
    from pipeline.dense.data import load_dense_features
    from pipeline.dense.extract import DenseExtractConfig, dense_extract

    cfg = DenseExtractConfig(feature_set="unav", decode_mode="fast", random_init=True, precision="fp32",
                             device="cpu")
    r = dense_extract(dense_ds, cfg, tmp_path)
    layout = json.loads((r.features / "features.json").read_text())
    assert layout["visual"] == ["_rgb.npy", "_flow.npy"] and layout["audio"] == ["_vggish.npy"]
    assert layout["grid"] == {"window_s": 0.96, "stride_s": 0.32}
    manifest = json.loads((r.dir / "manifest.json").read_text())
    for vid, item in manifest["items"].items():
        rgb, flow = np.load(r.features / f"{vid}_rgb.npy"), np.load(r.features / f"{vid}_flow.npy")
        audio = np.load(r.features / f"{vid}_vggish.npy")
        n = int(rgb[0, 2])  # frames the 25-fps recipe gave
        assert rgb.shape == flow.shape == ((n - 25) // 8 + 1, 3)  # T = floor((N - 25)/8) + 1
        assert rgb[:, 0].tolist() == [8 * k for k in range(len(rgb))]  # window k starts at frame 8k
        assert item["rows"] == {"rgb": len(rgb), "flow": len(flow), "audio": len(audio)}
        assert item["steps"] == min(len(rgb), len(audio))
        assert audio[:, 3].tolist() == list(range(len(audio)))  # the 0.32-s hop
    fs = load_dense_features(dense_ds, r.features)
    assert fs.dims() == (6, 4)  # rgb || flow, and the audio
    for video in fs.split("train") + fs.split("validation") + fs.split("test"):
        assert len(video.visual) == len(video.audio) == manifest["items"][video.id]["steps"]


def test_dense_cace_layout_is_unchanged_by_feature_sets():
    from pipeline.dense.extract import SUFFIXES, DenseExtractConfig

    cfg = DenseExtractConfig()
    assert cfg.streams() == SUFFIXES and "feature_set" not in cfg.key_fields()
    assert "feature_set" not in cfg.layout_config()
    unav = DenseExtractConfig(feature_set="unav")
    assert unav.key_fields()["feature_set"] == "unav" and unav.layout_config()["decode_mode"] == "faithful"


def test_vggish_rows_at_the_032_hop_contain_the_096_rows(tiny_sets, dense_ds):
    """The recipe's internal consistency (spec §5.2), through the grid: rows 0, 3, 6, ... at hop 0.32 are the
    hop-0.96 rows (the same examples)."""
    from pipeline.extraction.grids import RecipeGrid

    video = sorted((dense_ds / "videos").glob("*.mp4"))[0]
    grid = RecipeGrid((("audio", "waveform"),), "fast")
    raw = grid.decode(video, ("audio",)).inputs["audio"]
    fine = grid.encode(TinyClipAudio(hop_s=0.32), "audio", raw, {})
    coarse = grid.encode(TinyClipAudio(hop_s=0.96), "audio", raw, {})
    assert math.isclose(len(fine) / 3, len(coarse), abs_tol=1)
    assert np.array_equal(fine[::3, :3], coarse[:len(fine[::3]), :3])


# ---- predict: released checkpoints meet new videos --------------------------------------------------------------
def test_ave_predict_runs_a_released_format_checkpoint_with_the_ave_set(tiny_ave_at_released_sizes, ave_ds,
                                                                        tmp_path):
    """A checkpoint in the released CACE-Net format (a bare state dict, no encoder records) with `--feature-set ave`:
    the set's encoders are built (random here, and said so), and the per-second JSON/CSV/PNG are written."""
    from typer.testing import CliRunner

    from models import CACEConfig, CACENet
    from pipeline.cli import app

    bare = tmp_path / "model.pth.tar"
    torch.save(CACENet(CACEConfig(num_classes=3)).state_dict(), bare)  # the reference's sizes: 512 / 128
    video = sorted((ave_ds / "videos").glob("*.mp4"))[0]
    res = CliRunner().invoke(app, ["predict", str(video), "--model", str(bare), "--out", str(tmp_path / "out"),
                                   "--feature-set", "ave", "--random-init", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "RANDOM WEIGHTS" in res.output and "tiny-frames" in res.output
    out = tmp_path / "out"
    assert {p.suffix for p in out.iterdir()} >= {".json", ".csv", ".png"}
    rows = json.loads((out / f"{video.stem}.json").read_text())["rows"]
    assert len(rows) == 10
    without = CliRunner().invoke(app, ["predict", str(video), "--model", str(bare), "--out", str(tmp_path / "o2"),
                                       "--device", "cpu"])
    assert without.exit_code != 0 and "does not record the encoders" in str(without.exception)
    assert "--feature-set ave" in str(without.exception)


def test_dense_predict_runs_a_detector_trained_on_unav_layout_features(tiny_sets, dense_ds, tmp_path):
    """A detector trained on features in UnAV's released layout (no extraction record in its checkpoint) predicts on
    a new video with `--feature-set unav`, which computes the set's three streams for it."""
    from pipeline.dense.data import load_dense_features
    from pipeline.dense.extract import DenseExtractConfig, dense_extract
    from pipeline.dense.predict import predict_files
    from pipeline.dense.train import DenseTrainConfig, train_stage
    from tests.test_dense_train import TINY

    r = dense_extract(dense_ds, DenseExtractConfig(feature_set="unav", decode_mode="fast", random_init=True,
                                                   precision="fp32", device="cpu"), tmp_path / "store")
    released = tmp_path / "released"  # what UnAV-100 ships: the three .npy files per video, no features.json
    released.mkdir()
    for f in r.features.glob("*.npy"):
        (released / f.name).write_bytes(f.read_bytes())
    fs = load_dense_features(dense_ds, released)
    trained = train_stage(fs, DenseTrainConfig(**{**TINY, "epochs": 1, "batch_size": 2}), tmp_path / "store")
    video = sorted((dense_ds / "videos").glob("*.mp4"))[0]
    results = predict_files([video], trained.dir / "best.pt", tmp_path / "out", device="cpu", feature_set="unav",
                            decode_mode="fast", random_init=True)
    assert "error" not in results[0], results[0]
    assert results[0]["random_weights"] and Path(results[0]["json"]).is_file()
    assert Path(results[0]["timeline"]).is_file()
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="--feature-set unav"):
        predict_files([video], trained.dir / "best.pt", tmp_path / "out2", device="cpu")


# ---- the real encoders, end to end through the CLI (minutes on 2 cores: CI's slow pass) -------------------------
@pytest.mark.slow
def test_cli_ave_set_with_the_real_encoders_writes_released_shapes(tmp_path):
    from typer.testing import CliRunner

    from pipeline.ave.synth import SynthConfig, generate_dataset
    from pipeline.cli import app

    ds = tmp_path / "ds"
    generate_dataset(ds, SynthConfig(videos=1, classes=1, width=64, height=48, seed=2))
    res = CliRunner().invoke(app, ["extract", "--dataset", str(ds), "--root", str(tmp_path / "store"),
                                   "--feature-set", "ave", "--random-init"])
    assert res.exit_code == 0, res.output
    assert "RANDOM WEIGHTS" in res.output
    (visual,) = (tmp_path / "store" / "extract_visual").glob("*/visual.h5")
    (audio,) = (tmp_path / "store" / "extract_audio").glob("*/audio.h5")
    with h5py.File(visual, "r") as v, h5py.File(audio, "r") as a:
        assert v["avadataset"].shape[1:] == (10, 7, 7, 512) and a["avadataset"].shape[1:] == (10, 128)
        assert v.attrs["encoder"] == "vgg19" and a.attrs["encoder"] == "vggish" and v.attrs["random_init"]
        assert (a["avadataset"][()] >= 0).all()  # VGGish's embedding ends in a ReLU, as the released rows do


@pytest.mark.slow
def test_cli_unav_set_with_the_real_encoders_writes_unavs_files(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.dense.videos import VideoSynthConfig, generate_video_dataset

    generate_video_dataset(tmp_path / "ds", VideoSynthConfig(train=1, val=0, test=0, classes=2, min_length_s=4,
                                                             max_length_s=4, max_event_s=2, width=64, height=48))
    res = CliRunner().invoke(app, ["dense", "extract", "--dataset", str(tmp_path / "ds"), "--root",
                                   str(tmp_path / "store"), "--feature-set", "unav", "--random-init"])
    assert res.exit_code == 0, res.output
    (folder,) = (tmp_path / "store" / "dense_extract").glob("*/features")
    (rgb,) = folder.glob("*_rgb.npy")
    vid = rgb.name[:-len("_rgb.npy")]
    n = sum(1 for _ in recipes.frames_25fps(tmp_path / "ds" / "videos" / f"{vid}.mp4", "faithful"))
    t = (n - 25) // 8 + 1
    assert np.load(rgb).shape == np.load(folder / f"{vid}_flow.npy").shape == (t, 1024)
    audio = np.load(folder / f"{vid}_vggish.npy")
    assert audio.shape[1] == 128 and abs(len(audio) - t) <= 3  # its own count: 1 + floor((F - 96) / 32)
