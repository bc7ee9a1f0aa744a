"""The extraction stages on generated videos: shapes, row order with duplicate IDs, batched == one video at a time,
resume after an interruption (exception and SIGKILL), corrupt / silent / missing videos, weights and their errors.

The real encoders (random init, 1 frame per segment) run once on 3 tiny videos; the rest uses tiny registered
extractors so the stage's machinery is tested in seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from extractors import create_extractor, list_extractors, register_extractor
from extractors.base import Extractor
from extractors.weights import WeightsInfo
from pipeline import media
from pipeline.ave import extract as ex
from pipeline.ave import load_dataset
from pipeline.ave.synth import SynthConfig, generate_dataset, write_video
from pipeline.errors import UserError
from pipeline.extraction import engine
from pipeline.runtime import pinned_threads
from pipeline.store import file_sha256

TESTS = Path(__file__).resolve().parent


# ---- tiny extractors: the stage's machinery without ResNet-50's cost --------------------------------------------
def _tiny_weights(name: str, seed: int) -> WeightsInfo:
    return WeightsInfo(name, None, None, True, seed, "random init")


@register_extractor
class TinyVisual(Extractor):
    """16x16 thumbnails -> a fixed random 8x8-stride conv -> [2,2,8] per segment (mean over its frames)."""

    name, modality, output_file = "tiny-visual", "visual", "visual.h5"

    def __init__(self, weights=None, *, random_init=True, seed=0, device="cpu", precision="auto", frames_per_segment=2):
        super().__init__(weights, random_init=random_init, seed=seed, device=device, precision=precision)
        self.weights = _tiny_weights(self.name, seed)
        self.units_per_segment, self.segment_shape = frames_per_segment, (2, 2, 8)
        self.kernel = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(seed))

    def prepare(self, raw):
        x = torch.as_tensor(raw).permute(0, 3, 1, 2).float() / 255
        return F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)

    def encode(self, units):
        delay = float(os.environ.get("AVEL_TEST_DELAY", "0"))
        if delay:
            time.sleep(delay)
        y = F.conv2d(units, self.kernel, stride=8)  # [n,8,2,2]
        k = units.shape[0] // self.units_per_segment
        return y.reshape(k, self.units_per_segment, 8, 2, 2).mean(1).permute(0, 2, 3, 1).contiguous()


@register_extractor
class TinyAudio(Extractor):
    """Per 1-s chunk: mean |x| over 32 blocks -> a fixed random linear map -> [16]."""

    name, modality, output_file = "tiny-audio", "audio", "audio.h5"

    def __init__(self, weights=None, *, random_init=True, seed=0, device="cpu", precision="auto", **_):
        super().__init__(weights, random_init=random_init, seed=seed, device=device, precision=precision)
        self.weights = _tiny_weights(self.name, seed)
        self.units_per_segment, self.segment_shape = 1, (16,)
        self.w = torch.randn(32, 16, generator=torch.Generator().manual_seed(seed + 1))

    def prepare(self, raw):
        return torch.as_tensor(raw, dtype=torch.float32).reshape(-1, 32000)

    def encode(self, units):
        return units.abs().reshape(units.shape[0], 32, 1000).mean(2) @ self.w + 1.0


TINY = dict(visual_encoder="tiny-visual", audio_encoder="tiny-audio", random_init=True, frames_per_segment=2,
            workers=0)


def read(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {"data": f["avadataset"][()], "valid": f["valid"][()], "done": f["done"][()],
                "attrs": {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()},
                "chunks": f["avadataset"].chunks, "dtype": f["avadataset"].dtype}


# ---- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_ds(tmp_path_factory) -> Path:
    """3 videos of 10 s, 64x48 at 4 fps, plus one row re-using a video (AVE has 45 such IDs)."""
    out = tmp_path_factory.mktemp("ds") / "synth"
    generate_dataset(out, SynthConfig(videos=3, classes=2, seed=0, duplicates=1, fps=4, width=64, height=48),
                     workers=1)
    return out


@pytest.fixture(scope="module")
def real_run(small_ds, tmp_path_factory):
    """The real encoders, random init, 1 frame per segment."""
    root = tmp_path_factory.mktemp("art")
    cfg = ex.ExtractConfig(frames_per_segment=1, random_init=True, workers=0)
    return root, cfg, ex.extract(small_ds, cfg, root)


@pytest.fixture(scope="module")
def many_ds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "synth5"
    generate_dataset(out, SynthConfig(videos=5, classes=2, seed=1, duplicates=1, fps=2, width=32, height=32),
                     workers=1)
    return out


# ---- registry and encoders --------------------------------------------------------------------------------------
def test_registry():
    assert {"resnet50", "cnn14"} <= set(list_extractors())
    assert "resnet50" in list_extractors("visual") and "cnn14" in list_extractors("audio")
    assert {"vgg19", "i3d_rgb", "i3d_flow"} <= set(list_extractors("visual")) and "vggish" in list_extractors("audio")
    with pytest.raises(ValueError, match="unknown extractor 'vgg16'.*cnn14.*resnet50"):
        create_extractor("vgg16")


def test_preprocessing_is_the_weights_own_transform():
    from PIL import Image

    from extractors.resnet50 import ResNet50Extractor, reference_transform

    enc = ResNet50Extractor(random_init=True, frames_per_segment=1)
    ref = reference_transform()
    assert (enc.resize_size, enc.crop_size, enc.mean, enc.std) == (ref.resize_size, ref.crop_size, ref.mean, ref.std)
    img = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    ours = enc.normalize(enc.prepare(img[None]))[0]
    diff = (ours - ref(Image.fromarray(img))).abs()  # batched tensor path vs the reference's per-frame PIL path
    assert diff.max() <= 1 / 255 / min(ref.std) + 1e-6  # at most one uint8 level (PIL's fixed-point rounding)
    assert (diff > 1e-6).float().mean() < 0.02


# ---- the real encoders ------------------------------------------------------------------------------------------
def test_shapes_rows_and_marks(real_run, small_ds):
    root, cfg, results = real_run
    ds = load_dataset(small_ds)
    rows = ds.rows_by_video()
    dup = [r for r in rows.values() if len(r) > 1]
    assert dup, "the dataset should have a video serving two rows"
    n = len(ds)
    v, a = read(results["visual"].path), read(results["audio"].path)
    assert v["data"].shape == (n, 10, 7, 7, 2048) and a["data"].shape == (n, 10, 2048)
    assert v["dtype"] == np.float32 and v["chunks"] == (1, 10, 7, 7, 2048) and a["chunks"] == (1, 10, 2048)
    assert v["valid"].all() and a["valid"].all() and v["done"].all()
    for x in (v["data"], a["data"]):
        i, j = dup[0]
        assert np.array_equal(x[i], x[j])  # one decode serves both rows
        firsts = [r[0] for r in rows.values()]
        assert len({x[r].tobytes() for r in firsts}) == len(firsts)  # different videos, different rows
        assert np.isfinite(x).all() and np.abs(x).sum() > 0
    assert v["attrs"]["weights_sha256"] == "RANDOM-INIT" and v["attrs"]["random_init"] is True
    assert v["attrs"]["encoder"] == "resnet50" and v["attrs"]["frames_per_segment"] == 1
    assert a["attrs"]["encoder"] == "cnn14" and a["attrs"]["dtype"] == "float32"
    for m, r in results.items():
        man = r.manifest
        assert man.status == "complete" and man.warnings[0].startswith("RANDOM WEIGHTS")
        assert set(man.items) == set(ds.video_ids()) and all(it["status"] == "ok" for it in man.items.values())
        assert man.outputs[m].shape == list(read(r.path)["data"].shape)
        assert r.dir.name == r.key and r.dir.parent.name == f"extract_{m}" and r.path.name == f"{m}.h5"
    item = results["visual"].manifest.items[ds.video_ids()[0]]
    assert item["decoder"] == "decord" and item["frames_decoded"] == 40 and item["length_rule"] == "exact"
    assert results["audio"].manifest.items[ds.video_ids()[0]]["audio_status"] == "ok"
    assert not list(results["visual"].dir.glob(".*partial*")) and not (results["visual"].dir / ex.ITEMS_LOG).exists()


def test_finished_stage_is_reused(real_run, small_ds):
    root, cfg, results = real_run
    t = time.perf_counter()
    again = ex.extract(small_ds, cfg.model_copy(update={"workers": 3, "threads": 1}), root)
    assert time.perf_counter() - t < 5
    for m in ("visual", "audio"):
        assert again[m].reused and again[m].key == results[m].key and again[m].path == results[m].path
    assert {m: ex.planned_key(small_ds, cfg, m) for m in results} == {m: r.key for m, r in results.items()}


def test_stage_rows_equal_one_video_alone(real_run, small_ds):
    """A row of the stage's file is exactly what the encoder gives for its video alone (one forward per video)."""
    root, cfg, results = real_run
    ds = load_dataset(small_ds)
    vid = ds.video_ids()[1]
    row = ds.rows_by_video()[vid][0]
    d = media.decode(ds.video_path(vid), frames_per_segment=1)
    visual = create_extractor("resnet50", random_init=True, seed=0, frames_per_segment=1)
    audio = create_extractor("cnn14", random_init=True, seed=0)
    threads = results["visual"].manifest.metrics["run"]["torch_threads"]
    with pinned_threads(threads):
        alone_v = visual.extract(d.frames).numpy()
    with pinned_threads(results["audio"].manifest.metrics["run"]["torch_threads"]):
        alone_a = audio.extract(d.audio).numpy()
    assert np.array_equal(read(results["visual"].path)["data"][row], alone_v)
    assert np.array_equal(read(results["audio"].path)["data"][row], alone_a)
    # and the Cnn14 forward we run is panns' own forward (compared in fp32: panns' forward knows no autocast)
    audio32 = create_extractor("cnn14", random_init=True, seed=0, precision="fp32")
    with torch.inference_mode():
        ref = audio32.model(audio32.prepare(d.audio))["embedding"]
    np.testing.assert_allclose(audio32.extract(d.audio).numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)


def test_cli_prints_paths_and_random_banner(real_run, small_ds):
    from typer.testing import CliRunner

    from pipeline.cli import app

    root, cfg, results = real_run
    res = CliRunner().invoke(app, ["extract", "--dataset", str(small_ds), "--root", str(root), "--random-init",
                                   "--frames-per-segment", "1", "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert "RANDOM WEIGHTS" in res.output
    for r in results.values():
        assert str(r.path) in res.output.replace("\n", "")


# ---- the machinery (tiny extractors) ----------------------------------------------------------------------------
@pytest.mark.parametrize("workers,stop_at", [(0, 1), (2, 5), (1, 9)])
def test_resume_after_interruption_gives_the_same_file(many_ds, tmp_path, monkeypatch, workers, stop_at):
    """Uninterrupted with 2 decoding workers; interrupted after `stop_at` video writes with `workers`, then
    resumed with yet another worker count: byte-identical files."""
    cfg = ex.ExtractConfig(**TINY)
    monkeypatch.setattr(engine, "WORKER_VIDEOS", 2)  # decoding processes replaced every 2 videos
    whole = ex.extract(many_ds, cfg.model_copy(update={"workers": 2}), tmp_path / "a")

    real_write, calls = ex.RowWriter.write, {"n": 0}

    def failing_write(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(ex.RowWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        ex.extract(many_ds, cfg.model_copy(update={"workers": workers}), tmp_path / "b")
    monkeypatch.setattr(ex.RowWriter, "write", real_write)
    for m in ("visual", "audio"):
        d = tmp_path / "b" / ex.STAGES[m] / whole[m].key
        assert not (d / ex.OUTPUT_FILES[m]).exists() and (d / f".{m}.h5.partial").exists()
        assert json.loads((d / "manifest.json").read_text())["status"] == "failed"
    resumed = ex.extract(many_ds, cfg.model_copy(update={"workers": 1 - min(workers, 1)}), tmp_path / "b")
    n_videos = len(load_dataset(many_ds).video_ids())
    for m in ("visual", "audio"):
        assert resumed[m].key == whole[m].key and not resumed[m].reused
        assert 0 < resumed[m].manifest.metrics["videos_this_run"] <= n_videos  # only what was missing
        a, b = read(whole[m].path), read(resumed[m].path)
        assert np.array_equal(a["data"], b["data"]) and np.array_equal(a["valid"], b["valid"])
        assert a["attrs"] == b["attrs"]
        assert file_sha256(whole[m].path) == file_sha256(resumed[m].path)
        assert set(resumed[m].manifest.items) == set(whole[m].manifest.items)
    assert resumed["visual"].manifest.metrics["videos_this_run"] < n_videos or stop_at == 1


def test_resume_takes_the_thread_count_the_partial_file_recorded(many_ds, tmp_path, monkeypatch):
    cfg = ex.ExtractConfig(**{**TINY, "modality": "visual"}, threads=1)
    real_write, calls = ex.RowWriter.write, {"n": 0}

    def failing_write(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(ex.RowWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        ex.extract(many_ds, cfg, tmp_path)
    monkeypatch.setattr(ex.RowWriter, "write", real_write)
    seen = []
    real_encode = TinyVisual.encode
    monkeypatch.setattr(TinyVisual, "encode", lambda self, u: seen.append(torch.get_num_threads()) or
                        real_encode(self, u))
    resumed = ex.extract(many_ds, cfg.model_copy(update={"threads": 2}), tmp_path)["visual"]
    assert seen and set(seen) == {1}
    assert read(resumed.path)["attrs"]["torch_threads"] == 1
    assert any("resumed with 1 CPU threads" in w for w in resumed.manifest.warnings)


def test_killed_process_resumes(many_ds, tmp_path):
    """SIGKILL in the middle of a run (no cleanup at all), then a normal run finishes the same file."""
    cfg = ex.ExtractConfig(**{**TINY, "modality": "visual"})
    whole = ex.extract(many_ds, cfg, tmp_path / "a")["visual"]
    root = tmp_path / "b"
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_extract as t; "
            f"from pipeline.ave import extract as ex; "
            f"ex.extract({str(many_ds)!r}, ex.ExtractConfig.model_validate_json({cfg.model_dump_json()!r}), "
            f"{str(root)!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "AVEL_TEST_DELAY": "0.4"},
                            cwd=TESTS.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = root / "extract_visual" / whole.key / ex.ITEMS_LOG
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the child ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "extract_visual" / whole.key / "visual.h5").exists()
    resumed = ex.extract(many_ds, cfg, root)["visual"]
    assert 0 < resumed.manifest.metrics["videos_this_run"] < len(load_dataset(many_ds).video_ids())
    assert np.array_equal(read(whole.path)["data"], read(resumed.path)["data"])
    assert file_sha256(whole.path) == file_sha256(resumed.path)


def test_unreadable_silent_and_missing_videos(tmp_path):
    ds = tmp_path / "ds"
    (ds / "videos").mkdir(parents=True)
    write_video(ds / "videos" / "good.mp4", [0] * 10, [0] * 10, fps=2, width=32, height=32)
    (ds / "videos" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000))
    write_video(ds / "videos" / "silent.mp4", [1] * 10, None, fps=2, width=32, height=32)
    (ds / "Annotations.txt").write_text("Church bell&good&good&0&10\nBark&corrupt&good&0&10\n"
                                        "Bark&silent&good&2&5\nChurch bell&gone&good&0&10\n")
    cfg = ex.ExtractConfig(**TINY, dtype="float16", max_failure_share=0.25)
    with pytest.raises(ex.TooManyFailures, match="2 of 4 rows failed") as info:
        ex.extract(ds, cfg, tmp_path / "art")
    for m, r in info.value.results.items():
        assert r.manifest.status == "failed" and not r.path.exists() and r.failed_rows == [1, 3]
        items = r.manifest.items
        assert items["corrupt"]["status"] == "failed" and "decord" in items["corrupt"]["reason"]
        assert items["gone"]["status"] == "failed" and "not found" in items["gone"]["reason"]
        assert items["good"]["status"] == items["silent"]["status"] == "ok"
    audio_items = info.value.results["audio"].manifest.items
    assert audio_items["silent"]["audio_status"] == "missing"

    # the CLI reports the failed rows and exits 1 (finishing from the partial files: nothing is decoded again)
    from typer.testing import CliRunner

    from pipeline.cli import app

    args = ["extract", "--dataset", str(ds), "--root", str(tmp_path / "art"), "--random-init", "--workers", "0",
            "--frames-per-segment", "2", "--dtype", "float16", "--max-failure-share", "0.25",
            "--set", "visual_encoder=tiny-visual", "--set", "audio_encoder=tiny-audio"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and "2 of 4 rows failed" in res.output.replace("\n", " "), res.output

    # the same work with a tolerant threshold: finished from the partial files, nothing decoded again
    results = ex.extract(ds, cfg.model_copy(update={"max_failure_share": 0.5}), tmp_path / "art")
    for m, r in results.items():
        assert r.manifest.status == "complete" and r.manifest.metrics["videos_this_run"] == 0
        f = read(r.path)
        assert f["dtype"] == np.float16 and f["attrs"]["dtype"] == "float16"
        assert f["valid"].tolist() == [True, False, True, False]
        assert not f["data"][[1, 3]].any() and f["data"][[0, 2]].any()
    assert any("no audio track" in w and "silent" in w for w in results["audio"].manifest.warnings)
    silent = read(results["audio"].path)["data"][2].astype(np.float32)
    expected = TinyAudio().extract(np.zeros(320000, np.float32)).numpy()
    np.testing.assert_allclose(silent, expected, rtol=1e-3)  # silence, encoded


def test_missing_video_folder_is_a_user_error(tmp_path):
    (tmp_path / "Annotations.txt").write_text("Bark&x&good&0&10\n")
    with pytest.raises(UserError, match="video folder not found"):
        ex.extract(tmp_path, ex.ExtractConfig(**TINY), tmp_path / "art")


# ---- weights ----------------------------------------------------------------------------------------------------
def test_missing_weights_say_where_to_put_them(small_ds, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(UserError, match=r"resnet50-11ad3fa6\.pth.*torch/hub/checkpoints.*--resnet-weights.*"
                                        r"--random-init"):
        ex.extract(small_ds, ex.ExtractConfig(modality="visual"), tmp_path / "art")
    with pytest.raises(UserError, match=r"Cnn14_mAP=0\.431\.pth.*home/panns_data.*--cnn14-weights"):
        ex.extract(small_ds, ex.ExtractConfig(modality="audio"), tmp_path / "art")
    with pytest.raises(UserError, match="weight file not found"):
        ex.extract(small_ds, ex.ExtractConfig(resnet_weights=tmp_path / "nope.pth"), tmp_path / "art")
    with pytest.raises(UserError, match="choose one"):
        ex.extract(small_ds, ex.ExtractConfig(resnet_weights=tmp_path / "x.pth", random_init=True), tmp_path / "art")
    assert not (tmp_path / "art").exists()  # nothing started


def test_wrong_weight_files_are_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(1000))
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        create_extractor("resnet50", weights=garbage)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(3, 3), "layer9.x": torch.zeros(1)}, wrong)
    with pytest.raises(UserError, match="does not fit ResNet-50.*missing.*unexpected.*wrong shape"):
        create_extractor("resnet50", weights=wrong)
    no_model = tmp_path / "cnn14.pth"
    torch.save({"iteration": torch.tensor(1), "state": {"a": torch.zeros(1)}}, no_model)
    with pytest.raises(UserError, match="no 'model' entry"):
        create_extractor("cnn14", weights=no_model)
    empty = tmp_path / "empty.pth"
    empty.touch()
    with pytest.raises(UserError, match="empty file"):
        create_extractor("cnn14", weights=empty)


def test_resnet_weight_formats_load_and_key_the_stage(small_ds, tmp_path):
    import torchvision

    from extractors.weights import TRUNK_FORMAT, save_resnet50_trunk

    torch.manual_seed(1)
    src = torchvision.models.resnet50()
    files = {"torchvision": tmp_path / "tv.pth", "reference": tmp_path / "ref.pth", "ours": tmp_path / "ours.pth"}
    torch.save(src.state_dict(), files["torchvision"])
    torch.save({"I_state_dict": torch.nn.Sequential(*list(src.children())[:-2]).state_dict()}, files["reference"])
    save_resnet50_trunk(src, files["ours"], {"epoch": 3})
    saved = torch.load(files["ours"], weights_only=True)
    assert saved["format"] == TRUNK_FORMAT and saved["meta"] == {"epoch": 3}
    assert not any(k.startswith("fc.") for k in saved["state_dict"])
    expected = src.layer4[2].conv3.weight
    for fmt, path in files.items():
        enc = create_extractor("resnet50", weights=path, frames_per_segment=1)
        assert torch.equal(enc.model.layer4[2].conv3.weight, expected), fmt
        assert torch.equal(enc.model.bn1.running_var, src.bn1.running_var), fmt
        assert enc.weights.sha256 == file_sha256(path) and not enc.weights.random_init
    keys = {fmt: ex.planned_key(small_ds, ex.ExtractConfig(modality="visual", resnet_weights=p), "visual")
            for fmt, p in files.items()}
    assert len(set(keys.values())) == 3  # the file's sha256 is in the key
    random_key = ex.planned_key(small_ds, ex.ExtractConfig(modality="visual", random_init=True), "visual")
    assert random_key not in keys.values()
    fp = ex.planned_key(small_ds, ex.ExtractConfig(modality="visual", resnet_weights=files["ours"],
                                                    threads=1, workers=7), "visual")
    assert fp == keys["ours"]  # threads and workers are not in the key


def test_panns_labels_file_is_created_but_never_overwritten(tmp_path):
    from extractors.cnn14 import ensure_panns_labels, packaged_labels_csv

    target = ensure_panns_labels(tmp_path)
    assert target == tmp_path / "panns_data" / "class_labels_indices.csv"
    assert target.read_bytes() == packaged_labels_csv().read_bytes()
    assert len(target.read_text().splitlines()) == 528
    target.write_text("")  # what panns' failed wget leaves behind
    ensure_panns_labels(tmp_path)
    assert target.stat().st_size > 0
    target.write_text("index,mid,display_name\n0,/m/x,mine\n")  # a user's own file
    ensure_panns_labels(tmp_path)
    assert target.read_text() == "index,mid,display_name\n0,/m/x,mine\n"


@pytest.mark.slow
def test_cnn14_checkpoint_loads(tmp_path):
    """A full-size {"model": state_dict} file (330 MB) loads; the wrong architecture is a clear error."""
    src = create_extractor("cnn14", random_init=True, seed=3)
    path = tmp_path / "Cnn14_mAP=0.431.pth"
    torch.save({"model": src.model.state_dict(), "iteration": 1}, path)
    enc = create_extractor("cnn14", weights=path)
    assert torch.equal(enc.model.fc1.weight, src.model.fc1.weight)
    bad = tmp_path / "bad.pth"
    torch.save({"model": {k: v for k, v in src.model.state_dict().items() if not k.startswith("fc1.")}}, bad)
    with pytest.raises(UserError, match="does not fit Cnn14.*missing.*fc1"):
        create_extractor("cnn14", weights=bad)


def test_smaller_crops_give_smaller_maps_and_their_own_key():
    from extractors.resnet50 import ResNet50Extractor
    from pipeline.ave.extract import ExtractConfig, key_config

    ext = ResNet50Extractor(random_init=True, device="cpu", frames_per_segment=1, crop_size=64)
    assert ext.segment_shape == (2, 2, 2048) and ext.resize_size == [66] and ext.crop_size == [64, 64]
    frames = np.zeros((2, 120, 160, 3), np.uint8)
    assert ext.extract(frames).shape == (2, 2, 2, 2048)
    cpu = torch.device("cpu")
    assert key_config(ExtractConfig(crop_size=64), "visual", cpu) != key_config(ExtractConfig(), "visual", cpu)
    assert key_config(ExtractConfig(crop_size=64), "audio", cpu) == key_config(ExtractConfig(), "audio", cpu)
    with pytest.raises(ValueError, match="at least 32"):
        ResNet50Extractor(random_init=True, device="cpu", crop_size=16)
