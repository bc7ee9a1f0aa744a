"""Single-modality controls (pipeline/controls.py): matched noise, fixed per video, in training, evaluation and
`avel compare --inputs`."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.ave import compare as cmp
from pipeline.ave.features import channel_stats, from_public_folder, input_noise
from pipeline.ave.train import TrainConfig, evaluate
from pipeline.controls import matched_noise, parse_inputs, replaced_modality
from pipeline.errors import UserError
from tests.features_fixture import TINY_MODEL, write_feature_folder


def test_noise_is_fixed_per_row_and_matches_the_statistics():
    mean, std = np.array([0.0, 5.0, -2.0]), np.array([1.0, 0.1, 3.0])
    a = matched_noise((4000, 3), mean, std, seed=1, row=7)
    assert a.dtype == np.float32 and np.array_equal(a, matched_noise((4000, 3), mean, std, seed=1, row=7))
    assert not np.array_equal(a, matched_noise((4000, 3), mean, std, seed=1, row=8))
    assert not np.array_equal(a, matched_noise((4000, 3), mean, std, seed=2, row=7))
    assert np.array_equal(matched_noise((2, 3), mean, std, 1, "vid_a"), matched_noise((2, 3), mean, std, 1, "vid_a"))
    np.testing.assert_allclose(a.mean(0), mean, atol=0.1)
    np.testing.assert_allclose(a.std(0), std, rtol=0.05)
    with pytest.raises(ValueError, match="needs 4 channel statistics, got 3"):
        matched_noise((2, 4), mean, std, 1, 0)


def test_inputs_parse_with_a_clear_error():
    assert parse_inputs("both, audio,visual,audio") == ["both", "audio", "visual"]
    assert (replaced_modality("audio"), replaced_modality("visual"), replaced_modality("both")) == \
        ("visual", "audio", None)
    with pytest.raises(UserError, match="'video' is not one of both, audio, visual"):
        parse_inputs("both,video")


def test_the_replaced_modality_is_noise_the_same_in_any_batch_and_memory_mode(tmp_path):
    fs = from_public_folder(write_feature_folder(tmp_path / "feats", n_train=12))
    stats = channel_stats(fs, fs.rows("train"))
    noise = input_noise(fs, "audio", seed=3)  # the model sees audio: the visual features are replaced
    assert noise.modality == "visual" and torch.equal(noise.mean, stats.visual_mean)
    cpu = torch.device("cpu")
    held = fs.split("test", cpu, noise=noise)
    streamed = fs.split("test", cpu, memory_budget=0, noise=noise)
    plain = fs.split("test", cpu)
    assert held.in_memory and not streamed.in_memory
    v_all, a_all, _ = held.batch(np.arange(len(held)))
    v_one, a_one, _ = streamed.batch(np.array([2]))
    assert torch.equal(v_all[2:3], v_one) and torch.equal(a_all[2:3], a_one)
    v_real, a_real, _ = plain.batch(np.arange(len(plain)))
    assert torch.equal(a_all, a_real)  # the modality the model sees is untouched
    assert not torch.allclose(v_all, v_real, atol=0.1)
    # the train split's noise has the train features' per-channel statistics
    train = fs.split("train", cpu, noise=noise).batch(np.arange(len(fs.rows("train"))))[0]
    flat = train.reshape(-1, train.shape[-1]).double()
    np.testing.assert_allclose(flat.mean(0), stats.visual_mean, atol=0.35)
    np.testing.assert_allclose(flat.std(0), stats.visual_std, rtol=0.25)


def test_inputs_both_leaves_the_stage_key_as_it_was():
    both, audio = TrainConfig(device="cpu", precision="fp32"), TrainConfig(device="cpu", precision="fp32",
                                                                         inputs="audio")
    assert "inputs" not in both.key_fields()  # keys from before the knob stay valid
    assert audio.key_fields()["inputs"] == "audio"


def test_compare_inputs_makes_control_rows_and_evaluate_feeds_the_same_noise(tmp_path):
    fs = from_public_folder(write_feature_folder(tmp_path / "feats"))
    base = TrainConfig(epochs=2, batch_size=4, lr=3e-3, milestones=[100], device="cpu", precision="fp32",
                       model_args=TINY_MODEL, standardize_features=True)
    rows = cmp.compare(fs, base, ["cace"], [1, 2], tmp_path / "store", inputs=["both", "audio", "visual"])
    assert [r.label for r in rows] == ["cace", "cace (audio only)", "cace (visual only)"]
    assert len({r.dir for row in rows for r in row.runs}) == 6
    gap = cmp.gap_to_both(rows, rows[1])
    assert gap == pytest.approx(rows[1].mean_std("test_accuracy")[0] - rows[0].mean_std("test_accuracy")[0])
    assert cmp.gap_to_both(rows, rows[0]) is None
    table = cmp.markdown_table(rows)
    assert "| cace (visual only) |" in table and "gap to both" in table and "replaced by Gaussian noise" in table
    run = rows[1].runs[0]
    checkpoint = torch.load(run.dir / "best.pt", weights_only=False)
    assert checkpoint["inputs"] == "audio" and checkpoint["input_noise"]["modality"] == "visual"
    assert evaluate(run.dir / "best.pt", fs, device="cpu", precision="fp32")["accuracy"] == \
        pytest.approx(run.metrics["test_accuracy"])  # the checkpoint carries its noise


def test_the_compare_command_takes_inputs(tmp_path):
    from pipeline.cli import app

    feats = write_feature_folder(tmp_path / "feats")
    args = ["compare", "--features", feats, "--root", tmp_path / "store", "--models", "cace", "--seeds", "1",
            "--inputs", "both,visual", "--epochs", "1", "--device", "cpu", "--precision", "fp32",
            "--set", "batch_size=4", "--set", "standardize_features=true"]
    args += [f"--set=model_args.{k}={json.dumps(v)}" for k, v in TINY_MODEL.items()]
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    assert "| cace (visual only) |" in res.output and "gap to both" in res.output
    bad = CliRunner().invoke(app, [str(a) for a in args] + ["--inputs", "sound"])  # the last --inputs counts
    assert isinstance(bad.exception, UserError) and "'sound' is not one of both, audio, visual" in str(bad.exception)
