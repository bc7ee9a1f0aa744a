"""The dense detector (UnAV baseline + LoCo's LCF and LAC): label assignment, shapes on long videos, the LoCo
modules' limits, overfitting a few videos, the checkpoint round trip (spec §8 tests c, f, g, h, i)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.dense.blocks import TransformerBlock
from models.dense.loco import LocalAdaptiveBlock, LocalCorrespondence
from models.dense.targets import assign, detector_loss, diou_loss, make_points
from models.dense.unav import DenseDetector, DenseModelConfig, cpu_config
from pipeline.extraction.grids import UNAV_GRID


def test_label_assignment_matches_the_spec_example():
    """Events (2-6 s, c0) and (4-20 s, c1) at T = 224: the positives of spec §3.10, and nothing else."""
    points = make_points(224, DenseModelConfig().regression_ranges)
    assert points.t.shape[0] == 441
    segs = torch.tensor([[UNAV_GRID.to_grid(2.0), UNAV_GRID.to_grid(6.0)],
                         [UNAV_GRID.to_grid(4.0), UNAV_GRID.to_grid(20.0)]])
    assert segs.tolist() == [[4.75, 17.25], [11.0, 61.0]]
    cls, reg = assign(points, segs, torch.tensor([0, 1]), 2)
    starts = np.cumsum([0, *points.level_sizes])
    found = {}
    for row in cls.nonzero().tolist():
        p, c = row
        level = int(np.searchsorted(starts, p, side="right") - 1)
        found.setdefault(c, set()).add((level, int(points.t[p])))
    assert found == {0: {(1, 10), (1, 12), (2, 8), (2, 16)}, 1: {(3, 32), (3, 40), (4, 16), (4, 48)}}
    p = int(((points.t == 8) & (points.stride == 4)).nonzero())
    assert reg[p, 0].tolist() == pytest.approx([(8 - 4.75) / 4, (17.25 - 8) / 4])
    assert reg[p, 1].tolist() == [0.0, 0.0]


def test_the_paper_size_has_the_reference_parameter_count():
    """139,544,114 parameters at C = 100 (spec §3, counted by running the reference): backbone, dependency block
    and heads the same size, part by part."""
    model = DenseDetector(DenseModelConfig())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) == 139_544_114
    assert count(model.dependency) == 78_847_232
    assert count(model.cls_head) == 2_515_044
    assert count(model.reg_head) + model.scales.numel() == 2_668_750


def test_same_class_events_at_one_point_the_later_wins():
    points = make_points(32, ((0, 10000),))
    cls, reg = assign(points, torch.tensor([[0.0, 20.0], [5.0, 30.0]]), torch.tensor([0, 0]), 1)
    assert reg[10, 0].tolist() == [5.0, 20.0]  # t = 10: both events match; the second is kept
    assert cls[10, 0] == 1


def test_diou_is_zero_for_a_perfect_prediction_and_grows_with_shift():
    target = torch.tensor([[2.0, 3.0]])
    assert float(diou_loss(target.clone(), target)) == pytest.approx(0.0, abs=1e-7)
    assert float(diou_loss(torch.tensor([[1.0, 4.0]]), target)) > float(diou_loss(torch.tensor([[2.0, 3.5]]), target))


def _inputs(cfg: DenseModelConfig, t: int, valid: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(1, cfg.visual_dim, t, generator=g)
    a = torch.randn(1, cfg.audio_dim, t, generator=g)
    mask = torch.zeros(1, 1, t, dtype=torch.bool)
    mask[..., : valid or t] = True
    return v * mask, a * mask, mask


@pytest.mark.parametrize("lcf,lac", [(False, False), (True, True)])
def test_a_120_s_video_runs_at_384_steps_with_an_interpolated_position_embedding(lcf, lac):
    cfg = cpu_config(visual_dim=12, audio_dim=8, num_classes=3, lcf=lcf, lac=lac)
    model = DenseDetector(cfg).eval()
    steps = UNAV_GRID.steps(120.0)
    assert steps == 373 and model.padded_length(steps) == 384
    with torch.no_grad():
        out = model(*_inputs(cfg, 384, steps))
    assert [x.shape[1] for x in out.logits] == [384, 192, 96, 48, 24, 12]
    assert out.offsets[0].shape == (1, 384, 3, 2) and bool((out.offsets[0] >= 0).all())
    assert [int(m.sum()) for m in out.masks] == [373, 187, 94, 47, 24, 12]
    assert (out.lcf_loss is not None) == lcf


def test_padding_does_not_change_the_real_steps():
    """Masked convs, masked keys, zeroed padding: one video padded to 224 or to 256 steps gives the same outputs on
    its real steps (position embedding off: past max_seq_len it is interpolated, which changes it on purpose)."""
    cfg = cpu_config(visual_dim=6, audio_dim=5, num_classes=2, abs_pe=False)
    model = DenseDetector(cfg).eval()
    v, a, m = _inputs(cfg, 224, 150)
    pad = lambda x: torch.nn.functional.pad(x, (0, 32))  # noqa: E731
    with torch.no_grad():
        short, long = model(v, a, m), model(pad(v), pad(a), pad(m))
    for level in range(cfg.levels):
        n = int(short.masks[level].sum())
        torch.testing.assert_close(short.logits[level][0, :n], long.logits[level][0, :n], atol=1e-5, rtol=1e-5)
    assert long.logits[0].shape[1] == 256


def test_lac_with_an_unbounded_window_is_global_attention_and_its_window_learns():
    torch.manual_seed(0)
    glob = TransformerBlock(16, n_head=4, stride=2)
    lac = LocalAdaptiveBlock(16, n_head=4, stride=2, r_max=1e7, delta_max=2.0)
    missing = lac.load_state_dict(glob.state_dict(), strict=False)
    assert set(missing.missing_keys) == {"window.weight", "window.bias"}
    for blk in (glob, lac):
        torch.nn.init.constant_(blk.gamma_attn, 1.0)
    x, y = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    mask = torch.ones(2, 1, 32, dtype=torch.bool)
    mask[1, :, 20:] = False
    torch.testing.assert_close(lac(x, y, mask)[0], glob(x, y, mask)[0], atol=1e-5, rtol=1e-5)
    local = LocalAdaptiveBlock(16, n_head=4, stride=1, r_max=4.0)
    torch.nn.init.constant_(local.gamma_attn, 1.0)
    torch.nn.init.normal_(local.window.weight, std=0.1)
    local(x, y, mask)[0].square().sum().backward()
    assert float(local.window.weight.grad.abs().sum()) > 0
    r, delta = local.window_params(local.norm_x(x), local.norm_y(y))
    r, delta = r.detach(), delta.detach()
    assert float(r.min()) >= 1.0 and float(r.max()) <= 4.0 and float(delta.abs().max()) <= 2.0


def test_lcf_loss_is_lower_for_synchronised_than_for_shuffled_audio():
    torch.manual_seed(0)
    lcf = LocalCorrespondence(16, proj_dim=16)
    with torch.no_grad():  # identical projections: a step's audio matches its own visual step
        lcf.proj_a.weight.copy_(lcf.proj_v.weight)
        lcf.proj_a.bias.copy_(lcf.proj_v.bias)
    t = 64
    base = torch.randn(2, 16, t)
    smooth = torch.nn.functional.avg_pool1d(base, 3, 1, 1)  # locally coherent streams
    mask = torch.ones(2, 1, t, dtype=torch.bool)
    with torch.no_grad():
        _, _, synced = lcf(smooth, smooth.clone(), mask)
    shuffled = smooth[:, :, torch.randperm(t)]
    with torch.no_grad():
        _, _, broken = lcf(smooth, shuffled, mask)
    assert torch.isfinite(synced) and torch.isfinite(broken)
    assert float(synced) < float(broken) - 0.5
    v2, a2, _ = lcf(smooth, smooth, mask)  # W starts at zero: an untrained LCF leaves the streams as they are
    torch.testing.assert_close(v2, smooth)


def test_overfitting_four_videos_reaches_map_at_0_5_of_0_9(tmp_path):
    """Spec §8 (g): 200 steps on 4 synthetic videos, evaluated on those videos."""
    from pipeline.dense.data import load_dense_features, training_batch
    from pipeline.dense.evaluate import evaluate
    from pipeline.dense.infer import predict_videos
    from pipeline.dense.synthetic import FeatureSynthConfig, generate_feature_dataset
    from pipeline.dense.train import EMA, parameter_groups  # noqa: F401  (the harness' optimiser groups)

    generate_feature_dataset(tmp_path, FeatureSynthConfig(train=4, val=0, test=0, classes=3, seed=1,
                                                          min_length_s=20, max_length_s=40))
    fs = load_dense_features(tmp_path)
    videos = fs.split("train")
    torch.manual_seed(0)
    cfg = cpu_config(visual_dim=32, audio_dim=16, num_classes=fs.num_classes, max_seq_len=128)
    model = DenseDetector(cfg)
    opt = torch.optim.AdamW(parameter_groups(model, 1e-4), lr=2e-3)
    points = make_points(128, cfg.regression_ranges)
    rng = np.random.default_rng(0)
    losses = []
    for step in range(200):
        b = training_batch(videos, 128, points, cfg.num_classes, rng, crop_ratio=(1.0, 1.0))
        out = model(b.visual, b.audio, b.mask)
        valid = torch.cat(out.masks, 1)
        c, r = detector_loss(torch.cat(out.logits, 1), torch.cat(out.offsets, 1), valid, b.cls_targets,
                             b.reg_targets, 20.0)
        opt.zero_grad()
        (c + r).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float((c + r).detach()))
    assert np.mean(losses[-20:]) < 0.3 * np.mean(losses[:10])
    metrics = evaluate(fs.dataset, predict_videos(model, videos, fs.grid), "train")
    assert metrics["mAP"]["0.5"] >= 0.9, metrics["mAP"]
