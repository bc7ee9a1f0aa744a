"""I3D RGB / flow (UnAV-100's recipe) and RAFT: windowing, flow post-processing, strict weight loading, the head.

Random weights and tiny frames only (feature-sets-spec §5.2: tests that need no weights); synthetic weight files are
generated from the models' own state dicts, renamed to the public layouts.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from extractors.i3d import (
    BN_EPS,
    FEATURE_DIM,
    I3D,
    I3DFlowExtractor,
    I3DRGBExtractor,
    MaxPool3dSame,
    Unit3D,
    git_blob_id,
    pool_features,
    resize_short_side,
    tf_same_padding,
)
from extractors.raft import RaftFlow, center_crop, quantize_flow, sintel_padding
from extractors.weights import locate_weights
from pipeline.errors import UserError

TINY = dict(short_side=32, crop=32, precision="fp32")  # stack 24, step 8 as in UnAV


def frames_by_index(n: int, h: int = 32, w: int = 40) -> list[np.ndarray]:
    """Frame i is constant i (resizing keeps a constant frame constant)."""
    return [np.full((h, w, 3), i, np.uint8) for i in range(n)]


def levels(x: torch.Tensor) -> torch.Tensor:
    """Undo 2v/255 - 1."""
    return torch.round((x.double() + 1) * 255 / 2).long()


@pytest.fixture(scope="module")
def rgb():
    return I3DRGBExtractor(random_init=True, seed=0, **TINY)


# ---- windowing ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 24, 25, 32, 33, 100])
def test_window_count_and_frames(rgb, monkeypatch, n):
    seen = []

    def fake_features(x):
        seen.append(x.clone())
        return torch.zeros(1, FEATURE_DIM)

    monkeypatch.setattr(rgb, "features", fake_features)
    out = rgb.encode_clip(iter(frames_by_index(n, 48, 60)))  # resized to 32 x 40
    expected = (n - 25) // 8 + 1 if n >= 25 else 0
    assert out.shape == (expected, FEATURE_DIM) and out.dtype == np.float32
    assert len(seen) == expected
    for k, x in enumerate(seen):
        assert x.shape == (1, 3, 24, 32, 32)
        v = levels(x)
        assert torch.equal(v[0, :, :, 0, 0], (8 * k + torch.arange(24)).expand(3, 24))  # frames 8k .. 8k+23
        assert torch.equal(v, v[:, :, :, :1, :1].expand_as(v))


def test_rgb_features_real_network(rgb):
    rng = np.random.default_rng(0)
    clip = [rng.integers(0, 256, (32, 40, 3), dtype=np.uint8) for _ in range(57)]
    out8 = rgb.encode_clip(clip)
    assert out8.shape == (5, FEATURE_DIM) and out8.dtype == np.float32 and np.isfinite(out8).all()
    # spec §5.2: rows 0, 3, 6, ... at step 8 equal the step-24 rows (same frames)
    step24 = I3DRGBExtractor(random_init=True, seed=0, step=24, **TINY)
    out24 = step24.encode_clip(clip)
    assert out24.shape == (2, FEATURE_DIM)
    np.testing.assert_allclose(out8[::3], out24, rtol=1e-5, atol=1e-6)
    assert rgb.encode_clip([]).shape == (0, FEATURE_DIM)


def test_describe_and_rules(rgb):
    d = rgb.describe()
    assert (d["encoder"], d["modality"], d["segment_shape"], d["hop_s"]) == ("i3d_rgb", "visual", [1024], 0.32)
    assert d["recipe"]["stack"] == 24 and d["recipe"]["step"] == 8 and d["bn_eps"] == 1e-5
    assert all(m.eps == BN_EPS for m in rgb.model.modules() if isinstance(m, torch.nn.BatchNorm3d))


def test_missing_weights_message(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UserError, match=r"i3d_rgb\.pt.*--i3d-rgb-weights"):
        locate_weights("i3d_rgb")
    with pytest.raises(UserError, match=r"i3d_flow\.pt.*--i3d-flow-weights"):
        locate_weights("i3d_flow")
    with pytest.raises(UserError, match=r"raft_large_C_T_SKHT_V1-0b8c9e55\.pth.*--raft-weights"):
        locate_weights("raft")


def test_resize_short_side():
    f = np.random.default_rng(1).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    assert resize_short_side(f, 256).shape == (256, 341, 3)  # int(256 * 320/240) = 341
    assert resize_short_side(f.transpose(1, 0, 2), 256).shape == (341, 256, 3)
    g = np.zeros((256, 300, 3), np.uint8)
    assert resize_short_side(g, 256) is g  # already 256: unchanged
    from PIL import Image

    assert np.array_equal(resize_short_side(f, 256), np.asarray(Image.fromarray(f).resize((341, 256),
                                                                                          Image.BILINEAR)))


# ---- flow path ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flow_ex():
    return I3DFlowExtractor(random_init=True, seed=0, short_side=128, crop=32, precision="fp32")  # RAFT: >= 128


def fake_estimate(images, consecutive):
    """Encodes the pair in the flow: u = (a - 64)/6.375, v = (b - a)/6.375, so the quantized levels are a + 64 and
    128 + b - a (a, b = the frames' values)."""
    v = levels(images[:, 0, 0, 0]).double()
    a, b = (v[:-1], v[1:]) if consecutive else v.chunk(2)
    n, _, h, w = images.shape
    u = ((a - 64) / 6.375).float()
    d = ((b - a) / 6.375).float()
    return torch.stack([u, d], 1)[:, :, None, None].expand(len(a), 2, h, w).clone()


def test_flow_pairs_once_and_windows(flow_ex, monkeypatch):
    seen = []
    real = flow_ex.features

    def record(x):
        seen.append(x.clone())
        return real(x)

    kept = []
    window_input = flow_ex.window_input

    def window(buffer, start, state):
        x = window_input(buffer, start, state)
        kept.append(sorted(state["flows"]))
        return x

    monkeypatch.setattr(flow_ex.raft, "_estimate", fake_estimate)
    monkeypatch.setattr(flow_ex, "features", record)
    monkeypatch.setattr(flow_ex, "window_input", window)
    pairs0, calls0 = flow_ex.raft.pairs, flow_ex.raft.calls
    out = flow_ex.encode_clip(frames_by_index(49, 128, 136))  # 4 windows
    assert out.shape == (4, FEATURE_DIM) and np.isfinite(out).all()
    assert flow_ex.raft.pairs - pairs0 == 48  # not 4 x 24 = 96
    assert flow_ex.raft.calls - calls0 == 4  # one batch per window: its new pairs
    for k, x in enumerate(seen):
        assert x.shape == (1, 2, 24, 32, 32)
        q = levels(x)[0, :, :, 0, 0]
        assert torch.equal(q[0] - 64, 8 * k + torch.arange(24))  # pair j of window k starts at frame 8k+j ...
        assert torch.equal(q[1], torch.full((24,), 129))  # ... and ends at the next frame (8k+24 for j = 23)
    assert kept == [list(range(8 * k + 8, 8 * k + 24)) for k in range(4)]  # only what the next window reuses


def test_flow_real_raft_end_to_end():
    with pytest.raises(ValueError, match="too small for RAFT"):
        I3DFlowExtractor(random_init=True, short_side=64, crop=32)
    # RAFT needs >= 128 px; a 16-frame stack (17 frames, 16 pairs) keeps it to seconds on a CPU
    ex = I3DFlowExtractor(random_init=True, seed=0, short_side=128, crop=64, stack=16, precision="fp32", updates=1)
    rng = np.random.default_rng(2)
    base = rng.integers(0, 256, (128, 140, 3), dtype=np.uint8)
    clip = [np.roll(base, i, axis=1) for i in range(17)]
    out = ex.encode_clip(clip)
    assert out.shape == (1, FEATURE_DIM) and np.isfinite(out).all()
    assert (ex.raft.pairs, ex.raft.calls) == (16, 1)
    d = ex.describe()
    assert d["encoder"] == "i3d_flow" and d["recipe"]["flow"]["weights"]["random_init"]


def test_quantize_flow():
    v = torch.tensor([-20.1, -20.0, -4.0, 0.0, 0.0784, 4.0, 12.0, 20.0, 25.0])
    q = torch.tensor([0, 0, 102, 128, 128, 154, 204, 256, 256])  # 0.5, 102.5, 153.5, 204.5, 255.5: half to even
    out = quantize_flow(v)
    assert out.dtype == torch.float32
    assert torch.equal(out, 2 * q.float() / 255 - 1)
    assert out.max().item() == pytest.approx(2 * 256 / 255 - 1)  # 256 is reachable: > 1


def test_center_crop_offsets_padded_vs_unpadded():
    assert sintel_padding(256, 341) == (1, 2, 0, 0)
    assert sintel_padding(250, 341) == (1, 2, 3, 3)
    xs = torch.arange(341.0).expand(1, 256, 341)
    padded = F.pad(xs[None], sintel_padding(256, 341), mode="replicate")[0]
    assert padded.shape == (1, 256, 344)
    assert center_crop(torch.arange(344).expand(256, 344), 224)[0, 0] == 60  # padded coordinates
    assert center_crop(padded, 224)[0, 0, 0] == 59  # image x of the flow crop
    assert center_crop(xs, 224)[0, 0, 0] == 58  # the RGB crop
    rows = torch.arange(257).unsqueeze(1).expand(257, 300)
    assert center_crop(rows, 224)[0, 0] == 16  # floor(33/2)


def test_raft_input_scaling_and_padding(monkeypatch):
    r = RaftFlow(random_init=True, precision="fp32")
    got = {}

    def capture(images, consecutive):
        got["x"], got["consecutive"] = images, consecutive
        n = images.shape[0] - 1 if consecutive else images.shape[0] // 2
        return torch.zeros(n, 2, *images.shape[-2:])

    monkeypatch.setattr(r, "_estimate", capture)
    frames = torch.randint(0, 256, (3, 3, 130, 141), dtype=torch.uint8)
    out = r.flow_sequence(frames)
    assert out.shape == (2, 2, 136, 144) and got["consecutive"]  # padded size, not unpadded
    expected = F.pad(2 * (frames.float() / 255) - 1, (1, 2, 3, 3), mode="replicate")
    assert torch.equal(got["x"], expected)
    r.flow(frames[:2], frames[1:])
    assert not got["consecutive"] and got["x"].shape == (4, 3, 136, 144)
    assert (r.pairs, r.calls) == (4, 2)


def test_raft_loop_equals_torchvision_forward():
    r = RaftFlow(random_init=True, seed=3, precision="fp32", updates=2)
    frames = torch.randint(0, 256, (3, 3, 128, 130), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = r._images(frames)
    with torch.inference_mode():
        ref = r.model(x[:-1], x[1:], num_flow_updates=2)[-1]
    assert ref.shape == (2, 2, 128, 136)
    torch.testing.assert_close(r.flow_sequence(frames), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r.flow(frames[:-1], frames[1:]), ref, rtol=1e-4, atol=1e-4)


# ---- the network --------------------------------------------------------------------------------------------------
def test_i3d_layout_matches_spec():
    for cin, values in ((3, 12_711_824), (2, 12_689_872)):  # spec §3.3, counted from the released files
        sd = I3D(cin).state_dict()
        assert len(sd) == 344 and sum(k.endswith("num_batches_tracked") for k in sd) == 57
        assert sum(v.numel() for k, v in sd.items() if not k.endswith("num_batches_tracked")) == values
    assert tuple(sd["mixed_5c.branch_1.1.conv3d.weight"].shape) == (384, 192, 3, 3, 3)
    assert tuple(sd["conv3d_0c_1x1.conv3d.bias"].shape) == (400,)


def test_static_padding_is_tf_same_at_224():
    model = I3D(3).to("meta")
    seen = []
    for m in model.modules():
        if isinstance(m, (Unit3D, MaxPool3dSame)):
            m.register_forward_pre_hook(lambda mod, inp: seen.append((mod, tuple(inp[0].shape[2:]))))
    out = model.mixed_5c_maps(torch.empty(1, 3, 24, 224, 224, device="meta"))
    assert tuple(out.shape) == (1, 1024, 3, 7, 7) and len(seen) == 3 + 4 + 9 * 7
    for mod, size in seen:
        for d, (n, k, s) in enumerate(zip(size, mod.kernel, mod.stride)):
            assert (mod.pad[4 - 2 * d], mod.pad[5 - 2 * d]) == tf_same_padding(n, k, s), (mod, size)
    assert model.conv3d_1a_7x7.pad == (2, 3, 2, 3, 2, 3)


def test_pooling_head():
    x = torch.randn(2, 1024, 3, 7, 7, dtype=torch.float64)
    m = x.mean(dim=(3, 4))
    expected = (m[..., 0] + 2 * m[..., 1] + m[..., 2]) / 4
    torch.testing.assert_close(pool_features(x), expected)
    torch.testing.assert_close(pool_features(x), torch.nn.AvgPool3d((2, 7, 7), stride=1)(x).mean(dim=2).flatten(1))
    assert not torch.allclose(pool_features(x), m.mean(-1))  # not a plain temporal mean
    small = torch.randn(1, 1024, 3, 2, 2, dtype=torch.float64)
    s = small.mean(dim=(3, 4))
    torch.testing.assert_close(pool_features(small), (s[..., 0] + 2 * s[..., 1] + s[..., 2]) / 4)


# ---- weight files -------------------------------------------------------------------------------------------------
_TO_PIERGIAJ = {"branch_0": "b0", "branch_1.0": "b1a", "branch_1.1": "b1b", "branch_2.0": "b2a", "branch_2.1": "b2b",
                "branch_3.1": "b3b"}


def to_piergiaj(key: str) -> str:
    key = key.replace("conv3d_0c_1x1.conv3d.", "logits.conv3d.").replace(".batch3d.", ".bn.")
    key = re.sub(r"^conv3d_", "Conv3d_", key)
    m = re.fullmatch(r"mixed_(\w+?)\.(branch_\d(?:\.\d)?)\.(.+)", key)
    return f"Mixed_{m.group(1)}.{_TO_PIERGIAJ[m.group(2)]}.{m.group(3)}" if m else key


def random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            out[k] = v.clone()
        elif k.endswith("running_var") or (k.endswith(".weight") and v.ndim == 1):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            out[k] = torch.randn(v.shape, generator=g) * (0.05 if v.ndim > 1 else 0.1)
    return out


@pytest.fixture(scope="module")
def i3d_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("i3d")
    sd = random_state(I3D(3), 7)
    torch.save(sd, d / "i3d_rgb.pt")
    pier = {to_piergiaj(k): v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert any(k.startswith("Mixed_5c.b3b.") for k in pier) and "logits.conv3d.weight" in pier
    torch.save(pier, d / "rgb_imagenet.pt")
    return d, sd


def test_i3d_hassony2_and_piergiaj_files_load(i3d_files, rgb):
    d, sd = i3d_files
    a = I3DRGBExtractor(d / "i3d_rgb.pt", **TINY)
    b = I3DRGBExtractor(d / "rgb_imagenet.pt", **TINY)
    assert a.weights_format.startswith("video_features") and b.weights_format == "piergiaj"
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, sd[k]), k
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert a.weights.sha256 and a.weights.identity == ""  # nothing published to compare with
    x = torch.rand(1, 3, 24, 32, 32) * 2 - 1
    fa, fb, fr = a.features(x), b.features(x), rgb.features(x)
    assert torch.equal(fa, fb) and not torch.allclose(fa, fr)
    assert len(git_blob_id(d / "i3d_rgb.pt")) == 40


def test_i3d_strict_errors(i3d_files, tmp_path):
    d, sd = i3d_files
    missing = {k: v for k, v in sd.items() if k != "mixed_4d.branch_2.1.conv3d.weight"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(UserError, match=r"1 missing \(e\.g\. mixed_4d\.branch_2\.1\.conv3d\.weight\)"):
        I3DRGBExtractor(tmp_path / "missing.pt", **TINY)
    wrong = dict(sd, **{"mixed_5b.branch_0.batch3d.bias": torch.zeros(255)})
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(UserError, match=r"wrong shape \(e\.g\. mixed_5b\.branch_0\.batch3d\.bias \[255\]"):
        I3DRGBExtractor(tmp_path / "wrong.pt", **TINY)
    with pytest.raises(UserError, match=r"conv3d_1a_7x7\.conv3d\.weight \[64, 3, 7, 7, 7\] \(expected \[64, 2"):
        I3DFlowExtractor(d / "i3d_rgb.pt", short_side=128, crop=32)  # an RGB file for the flow stream
    charades = dict(sd, **{"conv3d_0c_1x1.conv3d.weight": torch.zeros(157, 1024, 1, 1, 1),
                           "conv3d_0c_1x1.conv3d.bias": torch.zeros(157)})
    torch.save(charades, tmp_path / "charades.pt")
    with pytest.raises(UserError, match=r"conv3d_0c_1x1\.conv3d\.(weight|bias)"):
        I3DRGBExtractor(tmp_path / "charades.pt", **TINY)


# ---- RAFT weight files --------------------------------------------------------------------------------------------
def to_princeton(key: str) -> str:
    """torchvision RAFT-large key -> princeton-vl key (spec §3.4's table read backwards)."""
    key = re.sub(r"^feature_encoder\.", "fnet.", key)
    key = re.sub(r"^context_encoder\.", "cnet.", key)
    for tv, pv in (("convnormrelu1.0", "conv1"), ("convnormrelu1.1", "norm1"), ("convnormrelu2.0", "conv2"),
                   ("convnormrelu2.1", "norm2")):
        key = key.replace(f".{tv}.", f".{pv}.")
    key = re.sub(r"^(fnet|cnet)\.convnormrelu\.0\.", r"\1.conv1.", key)
    key = re.sub(r"^(fnet|cnet)\.convnormrelu\.1\.", r"\1.norm1.", key)
    key = re.sub(r"^(fnet|cnet)\.conv\.", r"\1.conv2.", key)
    for tv, pv in (("convcorr1.0", "convc1"), ("convcorr2.0", "convc2"), ("convflow1.0", "convf1"),
                   ("convflow2.0", "convf2"), ("conv.0", "conv")):
        key = key.replace(f"update_block.motion_encoder.{tv}.", f"update_block.encoder.{pv}.")
    key = re.sub(r"^update_block\.recurrent_block\.convgru(\d)\.conv(\w)\.", r"update_block.gru.conv\2\1.", key)
    key = key.replace("mask_predictor.convrelu.0.", "update_block.mask.0.")
    return key.replace("mask_predictor.conv.", "update_block.mask.2.")


@pytest.fixture(scope="module")
def raft_files(tmp_path_factory):
    from torchvision.models.optical_flow import raft_large

    d = tmp_path_factory.mktemp("raft")
    sd = random_state(raft_large(weights=None), 11)
    torch.save(sd, d / "raft_large_C_T_SKHT_V1-0b8c9e55.pth")
    princeton = {}
    for k, v in sd.items():
        pk = to_princeton(k)
        princeton["module." + pk] = v
        if ".downsample.1." in pk and pk.startswith("cnet."):
            princeton["module." + pk.replace(".downsample.1.", ".norm3.")] = v  # the same module, saved twice
    assert len(princeton) == 179 and sum(k.endswith("num_batches_tracked") for k in princeton) == 17  # spec §3.4
    assert "module.update_block.gru.convq2.weight" in princeton and "module.cnet.layer3.0.norm3.weight" in princeton
    torch.save(princeton, d / "raft-sintel.pth")
    return d, sd, princeton


def test_raft_both_layouts_load(raft_files, tmp_path, monkeypatch):
    d, sd, _ = raft_files
    tv = RaftFlow(d / "raft_large_C_T_SKHT_V1-0b8c9e55.pth", precision="fp32")
    pv = RaftFlow(d / "raft-sintel.pth", precision="fp32")
    assert (tv.weights_format, pv.weights_format) == ("torchvision", "princeton-vl")
    for k, v in tv.model.state_dict().items():
        assert torch.equal(v, sd[k]) and torch.equal(pv.model.state_dict()[k], v), k
    assert tv.weights.identity.startswith("unknown")  # sha256 does not start with the published 0b8c9e55
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(d))
    (d / "checkpoints").mkdir(exist_ok=True)
    (d / "checkpoints" / "raft_large_C_T_SKHT_V1-0b8c9e55.pth").write_bytes(
        (d / "raft_large_C_T_SKHT_V1-0b8c9e55.pth").read_bytes())
    assert RaftFlow(precision="fp32").weights.source == "default location"


def test_raft_strict_errors(raft_files, tmp_path):
    d, sd, princeton = raft_files
    bad = {k: v for k, v in sd.items() if k != "update_block.recurrent_block.convgru2.convz.weight"}
    torch.save(bad, tmp_path / "missing.pth")
    with pytest.raises(UserError, match=r"missing \(e\.g\. update_block\.recurrent_block\.convgru2\.convz\.weight"):
        RaftFlow(tmp_path / "missing.pth")
    bad = dict(princeton, **{"module.update_block.mask.2.weight": torch.zeros(577, 256, 1, 1)})
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(UserError, match=r"mask_predictor\.conv\.weight \[577, 256, 1, 1\]"):
        RaftFlow(tmp_path / "shape.pth")
    bad = dict(princeton, **{"module.cnet.layer2.0.norm3.bias": torch.ones(96)})
    torch.save(bad, tmp_path / "norm3.pth")
    with pytest.raises(UserError, match=r"cnet\.layer2\.0\.norm3\.bias differs"):
        RaftFlow(tmp_path / "norm3.pth")
    bad = dict(princeton, **{"module.fnet.norm1.weight": torch.ones(64)})  # instance norm has no parameters
    torch.save(bad, tmp_path / "extra.pth")
    with pytest.raises(UserError, match=r"unexpected \(e\.g\. feature_encoder\.convnormrelu\.1\.weight"):
        RaftFlow(tmp_path / "extra.pth")
    with pytest.raises(UserError, match="choose one"):
        RaftFlow(d / "raft-sintel.pth", random_init=True)
