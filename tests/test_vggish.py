"""VGGish as AVE / UnAV-100 released it (extractors/vggish.py): the frontend's test vectors from feature-sets-spec §4,
torchvggish's state-dict layout (§3.2), the hop-0.32 / hop-0.96 identity (§5.2), AVE's 10-row rule, weight-file
errors and the optional PCA. CPU only, random or synthetic weights."""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pytest
import torch

from extractors import get_extractor_class
from extractors.vggish import (
    VGGish,
    VGGishExtractor,
    example_count,
    frame_count,
    hann_window,
    log_mel_examples,
    mel_matrix,
    pca_quantize,
    resample_to_16k,
)
from pipeline.errors import UserError

RATE = 16000

# spec §3.2, retyped: torchvggish's strict-load keys and weight shapes (each with a bias of the first size)
SPEC_WEIGHTS = {
    "features.0.weight": (64, 1, 3, 3), "features.3.weight": (128, 64, 3, 3),
    "features.6.weight": (256, 128, 3, 3), "features.8.weight": (256, 256, 3, 3),
    "features.11.weight": (512, 256, 3, 3), "features.13.weight": (512, 512, 3, 3),
    "embeddings.0.weight": (4096, 12288), "embeddings.2.weight": (4096, 4096), "embeddings.4.weight": (128, 4096)}


def spec_shapes() -> dict[str, tuple[int, ...]]:
    out = {}
    for k, s in SPEC_WEIGHTS.items():
        out[k] = s
        out[k.replace(".weight", ".bias")] = (s[0],)
    return out


def synthetic_state_dict(seed: int = 1) -> dict[str, torch.Tensor]:
    """Random tensors of the spec's shapes, He-scaled so the signal survives the nine layers (random default-init
    outputs are mostly the last biases)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in spec_shapes().items():
        if k.endswith(".weight"):
            sd[k] = torch.randn(shape, generator=g) * math.sqrt(2.0 / math.prod(shape[1:]))
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.01
    return sd


def make_signal(seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """A chirp, a gated tone and some noise, in [-1, 1)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * rate))) / rate
    x = (0.3 * np.sin(2 * np.pi * (300 + 150 * t) * t) + 0.2 * np.sin(2 * np.pi * 2500 * t) * ((t % 1.3) < 0.6)
         + 0.05 * rng.standard_normal(t.size))
    return x


@pytest.fixture(scope="module")
def he_weights() -> dict[str, torch.Tensor]:
    return synthetic_state_dict()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, he_weights):
    path = tmp_path_factory.mktemp("vggish") / "synthetic-vggish.pth"
    torch.save(he_weights, path)
    return path


def with_weights(sd: dict[str, torch.Tensor], **kwargs) -> VGGishExtractor:
    """An extractor running `sd` (loaded in memory: writing and reading 289 MB per test would dominate the run)."""
    enc = VGGishExtractor(random_init=True, **kwargs)
    enc.model.load_state_dict(sd, strict=True)
    return enc


# ---- frontend -----------------------------------------------------------------------------------------------------
def test_hann_window():
    w = hann_window()
    assert w.shape == (400,)
    assert w[0] == 0.0 and w[200] == 1.0
    assert w.sum() == pytest.approx(200.0, abs=1e-9)
    assert np.allclose(w[1:200], w[399:200:-1])  # periodic: symmetric about n = 200, not about 199.5


def test_mel_matrix_test_vectors():
    w = mel_matrix()
    assert w.shape == (257, 64)
    assert w.sum() == pytest.approx(230.9135991608, abs=1e-6)
    assert np.count_nonzero(w) == 461
    assert w.max() == pytest.approx(0.996191, abs=1e-6)
    assert not w[0].any()  # DC row
    assert np.flatnonzero(w[:, 0]).tolist() == [5]  # 156.25 Hz
    band63 = np.flatnonzero(w[:, 63])
    assert band63.tolist() == list(range(223, 240))


@pytest.mark.parametrize("seconds,frames,hop96,hop32", [(9.6, 958, 9, 27), (9.615, 960, 10, 28),
                                                        (10.0, 998, 10, 29), (10.575, 1056, 11, 31)])
def test_example_counts(seconds, frames, hop96, hop32):
    n = int(round(seconds * RATE))
    assert frame_count(n) == frames
    assert example_count(frames, 96) == hop96 and example_count(frames, 32) == hop32
    x = make_signal(seconds)
    assert log_mel_examples(x, RATE, 0.96).shape == (hop96, 96, 64)
    ex32 = log_mel_examples(x, RATE, 0.32)
    assert ex32.shape == (hop32, 96, 64) and ex32.dtype == np.float32


def test_short_input_counts():
    assert frame_count(399) == 0 and frame_count(400) == 1 and frame_count(559) == 1 and frame_count(560) == 2
    one = 400 + 95 * 160  # 15600 samples: exactly one example
    assert log_mel_examples(np.zeros(one), RATE).shape == (1, 96, 64)
    assert log_mel_examples(np.zeros(one - 1), RATE).shape == (0, 96, 64)
    assert np.allclose(log_mel_examples(np.zeros(one), RATE), np.log(0.01))  # silence: log of the offset


def test_resample_44k1_keeps_frequency_and_length():
    sr, f0 = 44100, 3000.0
    n = int(1.5 * sr)
    x = 0.5 * np.sin(2 * np.pi * f0 * np.arange(n) / sr)
    y = resample_to_16k(x, sr)
    assert y.dtype == np.float64
    assert abs(len(y) - round(n * RATE / sr)) <= 1
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    peak_hz = np.argmax(spectrum) * RATE / len(y)
    assert abs(peak_hz - f0) <= RATE / len(y)
    assert np.abs(y[1000:-1000]).max() == pytest.approx(0.5, abs=0.01)
    if importlib.util.find_spec("pkg_resources") is None:  # the stand-in lent to resampy's import did not stay
        assert "pkg_resources" not in sys.modules


def test_resample_is_a_noop_at_16k():
    x = make_signal(0.5)
    y = resample_to_16k(x.astype(np.float32), 16000)
    assert y.dtype == np.float64 and np.array_equal(y, x.astype(np.float32).astype(np.float64))
    with pytest.raises(ValueError, match="mono"):
        resample_to_16k(np.zeros((100, 2)), 16000)


# ---- network layout -----------------------------------------------------------------------------------------------
def test_state_dict_layout_is_the_spec_table():
    sd = VGGish().state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == spec_shapes()
    assert len(sd) == 18 and sum(v.numel() for v in sd.values()) == 72_141_184


def test_flatten_is_nhwc_and_final_relu():
    model = VGGish().eval()
    seen = {}
    model.features.register_forward_hook(lambda m, i, o: seen.__setitem__("maps", o.clone()))
    model.embeddings[0].register_forward_hook(lambda m, i, o: seen.__setitem__("flat", i[0].clone()))
    with torch.no_grad():
        out = model(torch.randn(2, 1, 96, 64))
    assert seen["maps"].shape == (2, 512, 6, 4)
    assert torch.equal(seen["flat"], seen["maps"].permute(0, 2, 3, 1).reshape(2, -1))  # (6, 4, 512) order
    assert isinstance(model.embeddings[-1], torch.nn.ReLU) and out.shape == (2, 128) and (out >= 0).all()


# ---- the extractor ------------------------------------------------------------------------------------------------
def test_registry_and_describe():
    assert get_extractor_class("vggish") is VGGishExtractor
    enc = VGGishExtractor(random_init=True, precision="fp32", hop_s=0.32, examples=None)
    d = enc.describe()
    assert d["encoder"] == "vggish" and d["modality"] == "audio" and d["segment_shape"] == [128]
    assert d["hop_s"] == 0.32 and d["example_hop_frames"] == 32 and d["pca"] is None and d["final_relu"]
    assert d["weights"]["random_init"] and d["resampler"].startswith("resampy ")


def test_hop_032_rows_every_third_equal_hop_096_rows(he_weights):
    x = make_signal(10.0)
    # the frontend: the same frames, so example 3k at hop 32 is example k at hop 96, bit for bit
    ex96, ex32 = log_mel_examples(x, RATE, 0.96), log_mel_examples(x, RATE, 0.32)
    assert ex96.shape[0] == 10 and ex32.shape[0] == 29
    assert np.array_equal(ex32[::3], ex96)
    # the network: batch=1 makes every forward the same op on the same shape, so equal inputs give equal bits on
    # any CPU (within one batch, the batch size and a row's position can change the last bits of a GEMM)
    r96 = with_weights(he_weights, precision="fp32", hop_s=0.96, batch=1).encode_clip((x, RATE))
    r32 = with_weights(he_weights, precision="fp32", hop_s=0.32, batch=1).encode_clip((x, RATE))
    assert r96.shape == (10, 128) and r32.shape == (29, 128) and r96.dtype == np.float32
    assert np.array_equal(r32[::3], r96)
    assert not np.array_equal(r32[0], r32[1])  # the rows do depend on the audio
    # default batching (one batch of 29 vs one of 10): oneDNN may pick other kernels or blockings for another batch
    # shape, so only float32 rounding noise is allowed (seen: 1.2e-5 on rows whose largest value is about 6)
    b32 = with_weights(he_weights, precision="fp32", hop_s=0.32).encode_clip((x, RATE))
    assert np.abs(b32[::3] - r96).max() <= 1e-4 * np.abs(r96).max()


def test_random_init_rows_are_non_negative_and_examples_10():
    enc = VGGishExtractor(random_init=True, precision="fp32", examples=10, batch=5)
    full = VGGishExtractor(random_init=True, precision="fp32", batch=5)
    short, long = make_signal(9.0, seed=1), make_signal(12.0, seed=2)

    rows = enc.encode_clip((short, RATE))  # 9 examples: the 9th row repeated once
    assert rows.shape == (10, 128) and rows.dtype == np.float32
    assert enc.last_padding == 1 and enc.last_examples == 9
    assert np.array_equal(rows[9], rows[8])
    assert np.array_equal(rows[:9], full.encode_clip((short, RATE)))
    assert (rows >= 0).all() and (rows > 0).any()

    rows = enc.encode_clip((long, RATE))  # 12 examples: the first 10 (batches of 5 and 5 in both runs: exact)
    assert rows.shape == (10, 128) and enc.last_padding == 0 and enc.last_examples == 12
    all_rows = full.encode_clip((long, RATE))
    assert all_rows.shape == (12, 128) and (all_rows >= 0).all()
    assert np.array_equal(rows, all_rows[:10])
    _, info = enc.encode_clip_info((make_signal(9.6), RATE))
    assert info == {"examples": 9, "padded": 1} and enc.last_padding == 0  # the stateless form leaves it alone

    with pytest.raises(UserError, match="too short"):
        enc.encode_clip((np.zeros(15599), RATE))
    assert full.encode_clip((np.zeros(15599), RATE)).shape == (0, 128)


def test_44k1_input_goes_through_the_resampler():
    enc = VGGishExtractor(random_init=True, precision="fp32")
    x = make_signal(3.0, rate=44100)
    rows = enc.encode_clip((x, 44100))
    assert rows.shape == (3, 128)  # 48000 samples at 16 kHz -> 298 frames -> 3 examples


def test_synthetic_weights_load_strictly_and_change_the_output(weights_file):
    enc = VGGishExtractor(weights_file, precision="fp32")
    sd = torch.load(weights_file, weights_only=True)
    assert all(torch.equal(enc.model.state_dict()[k], v) for k, v in sd.items())
    x = make_signal(3.0)
    loaded = enc.encode_clip((x, RATE))
    random = VGGishExtractor(random_init=True, precision="fp32").encode_clip((x, RATE))
    assert loaded.shape == random.shape == (3, 128) and (loaded >= 0).all()
    assert not np.allclose(loaded, random)
    w = enc.describe()["weights"]
    assert w["sha256"] and not w["random_init"] and w["identity"].startswith("unknown")


def test_bf16_autocast_runs_close_to_fp32(he_weights):
    x = make_signal(2.0)
    fp32 = with_weights(he_weights, precision="fp32").encode_clip((x, RATE))
    bf16 = with_weights(he_weights, precision="bf16").encode_clip((x, RATE))
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    assert np.linalg.norm(bf16 - fp32) <= 0.05 * np.linalg.norm(fp32)


def _bad_file(tmp_path, name, change):
    """A file with every key at its spec shape but one change. The tensors are one value broadcast to the shape
    (stride 0: torch.save stores one element): a file rejected for its keys or shapes needs no real values."""
    sd = {k: torch.zeros(1).expand(shape) for k, shape in spec_shapes().items()}
    change(sd)
    path = tmp_path / name
    torch.save(sd, path)
    return path


def test_missing_key_is_a_user_error_naming_it(tmp_path):
    path = _bad_file(tmp_path, "missing.pth", lambda sd: sd.pop("embeddings.4.bias"))
    with pytest.raises(UserError, match=r"missing.*embeddings\.4\.bias"):
        VGGishExtractor(path)


def test_wrong_shape_is_a_user_error_naming_it(tmp_path):
    def change(sd):
        sd["features.6.weight"] = torch.zeros(1).expand(256, 128, 5, 5)

    path = _bad_file(tmp_path, "shape.pth", change)
    with pytest.raises(UserError, match=r"wrong shape.*features\.6\.weight \[256, 128, 5, 5\] "
                                        r"\(expected \[256, 128, 3, 3\]\)"):
        VGGishExtractor(path)


def test_unexpected_key_is_a_user_error(tmp_path):
    path = _bad_file(tmp_path, "extra.pth", lambda sd: sd.__setitem__("pproc.pca_means", torch.zeros(128, 1)))
    with pytest.raises(UserError, match=r"unexpected.*pproc\.pca_means"):
        VGGishExtractor(path)


def test_tf_named_file_says_how_to_convert(tmp_path):
    path = tmp_path / "vggish_tf_names.pth"
    torch.save({"vggish/conv1/weights": torch.zeros(3, 3, 1, 64), "vggish/conv1/biases": torch.zeros(64),
                "vggish/fc2/weights": torch.zeros(4096, 128)}, path)
    with pytest.raises(UserError) as e:
        VGGishExtractor(path)
    msg = str(e.value)
    assert "TensorFlow variable names" in msg and "vggish/conv1/weights" in msg
    assert "transpose(3, 2, 0, 1)" in msg and "vggish/conv1/{weights,biases} -> features.0.{weight,bias}" in msg
    assert "vggish/fc1/fc1_1/{weights,biases} -> embeddings.0.{weight,bias}" in msg

    ckpt = tmp_path / "vggish_model.ckpt"
    ckpt.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match=r"TensorFlow checkpoint.*transpose\(3, 2, 0, 1\)"):
        VGGishExtractor(ckpt)


def test_missing_default_file_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError) as e:
        VGGishExtractor()
    msg = str(e.value)
    assert "vggish-10086976.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert "--vggish-weights" in msg and "--random-init" in msg


# ---- PCA + quantisation -------------------------------------------------------------------------------------------
def test_pca_quantize_hand_computed():
    eye, zero = np.eye(128), np.zeros(128)
    x = np.zeros((1, 128))
    x[0, :7] = [0.0, 0.5, 1.0, 1.99, 2.5, -1.0, -3.0]
    q = pca_quantize(x, eye, zero)
    assert q.dtype == np.float32
    # (clip(y) + 2) * 63.75, truncated: 127.5, 159.375, 191.25, 254.3625, 255, 63.75, 0
    assert q[0, :7].tolist() == [127, 159, 191, 254, 255, 63, 0]
    assert (q[0, 7:] == 127).all()
    # E's rows are the output dimensions: y_i = sum_j E[i, j] (x_j - mu_j)
    shift = np.roll(np.eye(128), 1, axis=1)  # E[i, i+1] = 1 -> y_i = x_{i+1} - mu_{i+1}
    q = pca_quantize(x, shift, np.full(128, 0.5))
    # y = x_{i+1} - 0.5: 0, 0.5, 1.49, 2.0, -1.5, -3.5 (clipped to -2), -0.5 -> 127.5, 159.375, 222.4875, 255, 31.875,
    # 0, 95.625; and y_127 = x_0 - 0.5 = -0.5 -> 95
    assert q[0, :7].tolist() == [127, 159, 222, 255, 31, 0, 95] and q[0, 127] == 95


def test_pca_option_in_the_extractor(tmp_path):
    params = tmp_path / "vggish_pca_params.npz"
    np.savez(params, pca_eigen_vectors=np.eye(128), pca_means=np.zeros(128))
    x = make_signal(2.0)
    raw = VGGishExtractor(random_init=True, precision="fp32").encode_clip((x, RATE))
    enc = VGGishExtractor(random_init=True, precision="fp32", pca_params=params)
    q = enc.encode_clip((x, RATE))
    assert np.array_equal(q, np.floor((np.clip(raw.astype(np.float64), -2, 2) + 2) * 63.75).astype(np.float32))
    assert q.min() >= 127 and q.max() <= 255  # raw rows are >= 0
    pca = enc.describe()["pca"]
    assert pca["path"] == str(params) and len(pca["sha256"]) == 64 and pca["identity"].startswith("unknown")

    bad = tmp_path / "bad.npz"
    np.savez(bad, pca_eigen_vectors=np.eye(64), pca_means=np.zeros(64))
    with pytest.raises(UserError, match=r"\[128, 128\]"):
        VGGishExtractor(random_init=True, pca_params=bad)
    np.savez(bad, eigen=np.eye(128))
    with pytest.raises(UserError, match="missing pca_eigen_vectors"):
        VGGishExtractor(random_init=True, pca_params=bad)


def test_bad_options():
    with pytest.raises(ValueError, match="examples"):
        VGGishExtractor(random_init=True, examples=0)
    with pytest.raises(ValueError, match="batch"):
        VGGishExtractor(random_init=True, batch=0)
    with pytest.raises(ValueError, match="hop_s"):
        VGGishExtractor(random_init=True, hop_s=0.001)
