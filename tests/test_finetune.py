"""Targeted fine-tuning (pipeline/ave/finetune.py, models/finetune.py) on generated videos, random-initialised
ResNet-50.

Small on purpose (crop 64, 2 frames per video, layer4 trainable, batch 4): a stage epoch takes a few seconds on
2 CPU cores. The audio features are written directly (random [N,10,D] + valid): the audio encoder is frozen and
never re-run by this stage, so its numbers only need to be fixed per video.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision

from extractors.weights import load_resnet50_weights, seeded
from models.finetune import AudioVisualContrastive, resolve_stages
from models.losses import info_nce_loss
from pipeline import ave
from pipeline.ave.finetune import (
    FinetuneConfig,
    Normalizer,
    VideoPairs,
    collate,
    eligible_videos,
    epoch_batches,
    finetune_stage,
    heldout_count,
    ids_in_test_split,
    pair_loss,
    prepare_data,
    recall_at,
)
from pipeline.ave.synth import SynthConfig, generate_dataset
from pipeline.errors import UserError
from pipeline.store import file_sha256, read_manifest

AUDIO_DIM = 64  # not Cnn14's 2048: the dims come from the feature file
CFG = FinetuneConfig(epochs=3, batch_size=4, lr=0.05, milestones=[1, 2], crop_size=64, frames_per_video=2,
                     trainable_stages=["layer4"], workers=0, seed=1, precision="fp32")  # fp32 on any CPU


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("ft") / "ds",
                            SynthConfig(videos=12, classes=4, seed=3, fps=8, width=128, height=96))


@pytest.fixture(scope="module")
def audio_h5(dataset, tmp_path_factory) -> Path:
    ds = ave.load_dataset(dataset)
    path = tmp_path_factory.mktemp("audio") / "audio.h5"
    with h5py.File(path, "w") as f:
        f["avadataset"] = np.random.default_rng(0).normal(size=(len(ds), 10, AUDIO_DIM)).astype(np.float32)
        f["valid"] = np.ones(len(ds), bool)
    return path


@pytest.fixture(scope="module")
def finished(dataset, audio_h5, tmp_path_factory):
    """One uninterrupted run (3 epochs, LR x0.1 at epochs 1 and 2)."""
    root = tmp_path_factory.mktemp("store")
    return finetune_stage(dataset, audio_h5, CFG, root, random_init=True), root


def synth_duplicates(dataset: Path) -> list[str]:
    rows = json.loads((dataset / "synth.json").read_text())["rows"]
    return [r["video_id"] for r in rows if r["duplicate_of"] is not None]


# ---- the model ----------------------------------------------------------------------------------------------------
def test_loss_decreases_on_a_fixed_batch(dataset, audio_h5):
    data = prepare_data(ave.load_dataset(dataset), audio_h5, CFG)
    pairs = VideoPairs(data.train_paths[:4], data.train_audio[:4], frames_per_video=2, crop_size=64,
                       resize_size=CFG.resize_size, seed=0)
    batch = collate([pairs[i] for i in range(4)])
    assert batch["frames"].shape == (4, 2, 3, 64, 64) and batch["frames"].dtype == torch.uint8
    with seeded(0):
        resnet = torchvision.models.resnet50(weights=None)
    torch.manual_seed(0)
    model = AudioVisualContrastive(resnet, resnet.fc.in_features, AUDIO_DIM, embed_dim=16,
                                   trainable_stages=["layer4"])
    frozen_before = model.trunk.layer3[0].conv1.weight.clone()
    bn_before = model.trunk.layer3[0].bn1.running_mean.clone()
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.05, momentum=0.9)
    frames = Normalizer(torch.device("cpu"))(batch["frames"])
    losses = []
    for _ in range(5):
        v, a, scale = model(frames, batch["audio"])
        assert v.shape == a.shape == (4, 16) and torch.allclose(v.norm(dim=1), torch.ones(4))
        loss = info_nce_loss(v, a, temperature=1 / scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1, losses
    assert torch.equal(model.trunk.layer3[0].conv1.weight, frozen_before)  # frozen stage: no update
    assert torch.equal(model.trunk.layer3[0].bn1.running_mean, bn_before)  # ... and its BatchNorm stays in eval
    assert model.trunk.layer3[0].conv1.weight.grad is None
    assert float(scale) == pytest.approx(1 / 0.2)


def test_learnable_temperature_gets_a_gradient():
    with seeded(0):
        resnet = torchvision.models.resnet50(weights=None)
    model = AudioVisualContrastive(resnet, 2048, 8, embed_dim=4, learnable_temperature=True,
                                   trainable_stages=["layer4"])
    v, a, scale = model(torch.randn(3, 1, 3, 32, 32), torch.randn(3, 8))
    learn = CFG.model_copy(update={"learnable_temperature": True})
    loss = pair_loss(v, a, scale, learn)
    fixed = info_nce_loss(v.detach(), a.detach(), temperature=float(1 / scale.detach()))
    assert float(loss.detach()) == pytest.approx(float(fixed), rel=1e-5)
    loss.backward()
    assert model.log_temperature.grad is not None and "log_temperature" in dict(model.named_parameters())
    with pytest.raises(ValueError, match="unknown ResNet-50 stage"):
        resolve_stages(["layer5"])


# ---- which videos -------------------------------------------------------------------------------------------------
def test_no_test_video_reaches_finetuning(dataset, audio_h5, finished, tmp_path):
    ds = ave.load_dataset(dataset)
    test_ids = {ds.annotations[r].video_id for r in ds.split_rows("test")}
    dups = synth_duplicates(dataset)
    assert dups and all(d in test_ids for d in dups)  # the generator put a train video into test too
    train_ids, excluded = eligible_videos(ds)
    assert not set(train_ids) & test_ids
    assert excluded == sorted(dups)
    data = prepare_data(ds, audio_h5, CFG)
    used = set(data.train_ids) | set(data.heldout_ids)
    assert not used & test_ids
    assert {p.stem for p in data.train_paths + data.heldout_paths} == used
    assert len(data.heldout_ids) == 2 and not set(data.heldout_ids) & set(data.train_ids)

    result, root = finished
    m = read_manifest(result.dir / "manifest.json")
    assert m.metrics["excluded_test_overlap"] == sorted(dups)
    assert all(m.items[d]["status"] == "excluded" for d in dups)
    assert m.metrics["train_videos"] == len(data.train_ids)
    ckpt = torch.load(result.dir / "last.pt", weights_only=True)
    assert not set(ckpt["train_ids"]) & test_ids

    # testSet.txt disagreeing with test_order.h5 (as AVE's do): a video listed there is kept out too
    copy = tmp_path / "ds"
    copy.mkdir()
    for name in ["Annotations.txt", *(f"{s}_order.h5" for s in ave.SPLITS)]:
        shutil.copy(dataset / name, copy / name)
    other = ave.load_dataset(copy)
    extra = other.annotations[int(other.split_rows("train")[0])]
    (copy / "testSet.txt").write_text(extra.line() + "\n")
    assert extra.video_id in ids_in_test_split(other)
    assert extra.video_id in eligible_videos(other)[1]


def test_audio_rows_marked_invalid_are_skipped(dataset, tmp_path):
    ds = ave.load_dataset(dataset)
    train_ids, _ = eligible_videos(ds)
    victim = train_ids[0]
    path = tmp_path / "audio.h5"
    with h5py.File(path, "w") as f:
        f["avadataset"] = np.ones((len(ds), 10, 8), np.float32)
        valid = np.ones(len(ds), bool)
        valid[ds.rows_by_video()[victim]] = False
        f["valid"] = valid
    data = prepare_data(ds, path, CFG)
    assert victim not in data.train_ids + data.heldout_ids and "no valid audio" in data.excluded[victim]
    with h5py.File(path, "w") as f:
        f["avadataset"] = np.ones((len(ds) - 1, 10, 8), np.float32)
    with pytest.raises(UserError, match="expected"):
        prepare_data(ds, path, CFG)


def test_holdout_and_batches():
    assert heldout_count(9, 0.1) == 2 and heldout_count(100, 0.1) == 10 and heldout_count(5, 0.1) == 0
    assert heldout_count(100, 0.0) == 0
    big = CFG.model_copy(update={"batch_size": 128})
    assert epoch_batches(7, big, 0) and len(epoch_batches(7, big, 0)[0]) == 7  # fewer than a batch: one of all
    assert [len(b) for b in epoch_batches(10, CFG, 0)] == [4, 4]  # drop_last
    assert epoch_batches(10, CFG, 0) != epoch_batches(10, CFG, 1)
    assert CFG.resize_size == 66  # 232/224 of the crop


def test_config():
    from pipeline.config import load_config

    cfg = load_config(FinetuneConfig, None, ["trainable_stages=layer3,layer4", "epochs=2"])
    assert cfg.trainable_stages == ["layer3", "layer4"] and cfg.epochs == 2
    assert FinetuneConfig().trainable_stages == "all" and FinetuneConfig().milestones == [15, 30]
    with pytest.raises(UserError, match="layer5"):
        load_config(FinetuneConfig, None, ["trainable_stages=[layer5]"])
    with pytest.raises(UserError, match="milestones"):
        load_config(FinetuneConfig, None, ["milestones=[30,15]"])


def test_recall():
    e = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    r = recall_at(e, e)
    assert r["audio_to_visual"]["R@1"] == r["visual_to_audio"]["R@1"] == 100.0
    shifted = recall_at(e, e.roll(1, 0))
    assert shifted["audio_to_visual"]["R@1"] == 0.0 and shifted["chance"]["R@5"] == pytest.approx(500 / 6)


# ---- the stage ----------------------------------------------------------------------------------------------------
def test_stage_outputs_and_reuse(dataset, audio_h5, finished):
    result, root = finished
    assert not result.reused
    m = read_manifest(result.dir / "manifest.json")
    assert m.status == "complete" and m.warnings[0].startswith("RANDOM WEIGHTS")
    assert m.outputs["weights"].sha256 == file_sha256(result.weights) == result.sha256
    assert "device" not in m.config and "workers" not in m.config
    with open(result.dir / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert list(rows[0]) == ["epoch", "lr", "loss", "temperature", "seconds"]
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.05, 0.005, 0.0005])
    for when in ("before", "after"):
        r = result.retrieval[when]
        assert r["n"] == 2 and set(r["audio_to_visual"]) == {"R@1", "R@5"}
    assert m.metrics["retrieval_after"]["visual_to_audio"]["R@1"] in (0.0, 50.0, 100.0)
    again = finetune_stage(dataset, audio_h5, CFG.model_copy(update={"workers": 2, "device": "cpu"}), root,
                           random_init=True)
    assert again.reused and again.key == result.key and again.sha256 == result.sha256


def test_saved_weights_load_into_the_extractor_and_change_its_output(finished):
    from extractors.resnet50 import ResNet50Extractor

    result, _ = finished
    frames = np.random.default_rng(0).integers(0, 256, size=(2, 80, 96, 3), dtype=np.uint8)
    tuned = ResNet50Extractor(weights=result.weights, frames_per_segment=2)
    initial = ResNet50Extractor(random_init=True, seed=CFG.seed, frames_per_segment=2)
    assert tuned.weights.sha256 == result.sha256
    out_t, out_i = tuned.extract(frames), initial.extract(frames)
    assert out_t.shape == out_i.shape == (1, 7, 7, 2048)
    assert not torch.allclose(out_t, out_i, atol=1e-4)
    # only layer4 trained: the rest of the trunk is the initial random trunk
    assert torch.equal(tuned.model.layer3[2].conv3.weight, initial.model.layer3[2].conv3.weight)
    assert not torch.equal(tuned.model.layer4[2].conv3.weight, initial.model.layer4[2].conv3.weight)
    # the reference's I_state_dict file holds the same trunk
    ref = torch.load(result.reference_weights, weights_only=True)
    assert "0.weight" in ref["I_state_dict"] and "7.2.conv3.weight" in ref["I_state_dict"]
    with seeded(123):
        resnet = torchvision.models.resnet50(weights=None)
    assert load_resnet50_weights(resnet, result.reference_weights) == "cace-net I_state_dict"
    assert torch.equal(resnet.layer4[2].conv3.weight, tuned.model.layer4[2].conv3.weight)


class Interrupt(Exception):
    pass


def test_resume_continues_the_schedule(dataset, audio_h5, finished, tmp_path):
    reference, _ = finished
    seen = []

    def stop_after_epoch_1(record):
        seen.append(record["epoch"])
        if record["epoch"] == 1:
            raise Interrupt  # as if killed right after the epoch-1 checkpoint

    with pytest.raises(Interrupt):
        finetune_stage(dataset, audio_h5, CFG, tmp_path, random_init=True, on_epoch=stop_after_epoch_1)
    run_dir = tmp_path / "finetune" / reference.key
    assert read_manifest(run_dir / "manifest.json").status == "failed"
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1
    assert not (run_dir / "resnet50_finetuned.pt").exists()

    resumed = finetune_stage(dataset, audio_h5, CFG, tmp_path, random_init=True,
                             on_epoch=lambda r: seen.append(r["epoch"]))
    assert seen == [0, 1, 2]  # epoch 2 only after the restart
    a = torch.load(reference.dir / "last.pt", weights_only=True)
    b = torch.load(resumed.dir / "last.pt", weights_only=True)
    assert [r["epoch"] for r in b["history"]] == [0, 1, 2]
    assert [r["lr"] for r in b["history"]] == pytest.approx([r["lr"] for r in a["history"]])
    assert [r["loss"] for r in b["history"]] == pytest.approx([r["loss"] for r in a["history"]], rel=1e-4)
    assert b["scheduler"]["last_epoch"] == a["scheduler"]["last_epoch"] == 3
    wa = torch.load(reference.weights, weights_only=True)["state_dict"]
    wb = torch.load(resumed.weights, weights_only=True)["state_dict"]
    for k in wa:  # bitwise equal when checked (workers=0, CPU); a tolerance in case BLAS threads reorder sums
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    for direction in ("audio_to_visual", "visual_to_audio"):  # "before" survived the interruption (in last.pt)
        assert resumed.retrieval["before"][direction] == reference.retrieval["before"][direction]


@pytest.mark.slow
def test_reextraction_uses_the_new_weights_and_reuses_audio(dataset, finished):
    from pipeline.ave.extract import ExtractConfig, extract, extract_visual

    result, root = finished
    cfg = ExtractConfig(random_init=True, frames_per_segment=1, workers=0, seed=CFG.seed)
    first = extract(dataset, cfg, root)
    # the fine-tuned weights as the visual extraction's encoder (what the pipeline flow does after fine-tuning)
    again = extract_visual(dataset, cfg.model_copy(update={"resnet_weights": result.weights, "random_init": False}),
                           root)
    assert again.key != first["visual"].key and not again.reused
    audio = extract(dataset, cfg.model_copy(update={"modality": "audio"}), root)["audio"]
    assert audio.reused and audio.key == first["audio"].key
    with h5py.File(again.path) as f, h5py.File(first["visual"].path) as g:
        assert not np.allclose(f["avadataset"][0], g["avadataset"][0])


# ---- starting from random encoders: the knobs that let InfoNCE learn ----------------------------------------------
def test_random_start_knobs_standardize_normalise_and_record_the_recall_curve(dataset, audio_h5, tmp_path):
    from pipeline.ave.finetune import retrieval_line

    assert "standardize_audio" not in CFG.key_fields() and "head_norm" not in CFG.key_fields()  # old keys stay
    knobs = CFG.model_copy(update={"standardize_audio": True, "head_norm": True, "retrieval_every": 1,
                                   "holdout_fraction": 0.25, "epochs": 2, "milestones": [10]})
    assert knobs.key_fields()["standardize_audio"] and "retrieval_every" not in knobs.key_fields()
    data = prepare_data(ave.load_dataset(dataset), audio_h5, knobs)
    assert np.allclose(data.train_audio.mean(0), 0, atol=1e-5) and np.allclose(data.train_audio.std(0), 1, atol=1e-4)
    raw = prepare_data(ave.load_dataset(dataset), audio_h5, CFG.model_copy(update={"holdout_fraction": 0.25}))
    assert not np.allclose(data.heldout_audio, raw.heldout_audio)  # scaled with the training videos' statistics
    r = finetune_stage(dataset, audio_h5, knobs, tmp_path, random_init=True)
    curve = r.retrieval["curve"]  # epoch 0 is `before`, then every epoch; the last one is `after`
    assert [c["epoch"] for c in curve] == [0, 1, 2]
    assert curve[0]["audio_to_visual"] == r.retrieval["before"]["audio_to_visual"]
    assert curve[-1]["audio_to_visual"] == r.retrieval["after"]["audio_to_visual"]
    line = retrieval_line(r.retrieval["before"], r.retrieval["after"])
    n = r.retrieval["after"]["n"]
    assert line.startswith("retrieval a->v R@1: before ") and f"(chance {100 / n:.1f} %, {n} held-out videos)" in line
    # the head's BatchNorm has running statistics: retrieval in eval mode scores each video alone
    weights = torch.load(r.dir / "last.pt", weights_only=True)["model"]
    assert weights["visual_head.norm.running_var"].shape == (2048,)
    assert retrieval_line({"n": 1, "skipped": "x"}, {"n": 1, "skipped": "x"}) is None


def test_head_norm_removes_the_common_component():
    from models.finetune import ProjectionHead

    torch.manual_seed(0)
    common = torch.full((1, 32), 50.0)
    x = common + 0.01 * torch.randn(16, 32)  # what random encoders give: one vector plus a little
    plain, normed = ProjectionHead(32, 8), ProjectionHead(32, 8, norm=True)
    normed.proj.weight.data.copy_(plain.proj.weight.data)
    cos = lambda e: (e @ e.T)[~torch.eye(16, dtype=bool)].mean()  # noqa: E731
    assert cos(plain(x)) > 0.999 and cos(normed(x)) < 0.2


def test_cli_ends_with_the_retrieval_line(dataset, audio_h5, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "finetune", "--dataset", str(dataset), "--root",
                        str(tmp_path), "--audio", str(audio_h5), "--random-init", "--precision", "fp32",
                        "--set", "epochs=1", "--set", "batch_size=4", "--set", "trainable_stages=[layer4]",
                        "--set", "frames_per_video=2", "--set", "crop_size=32", "--set", "workers=0",
                        "--set", "holdout_fraction=0.25", "--set", "head_norm=true"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"retrieval a->v R@1: before \d+\.\d % after \d+\.\d % \(chance \d+\.\d %, \d+ held-out "
                        r"videos\); v->a R@1: before \d+\.\d % after \d+\.\d %", last), last
