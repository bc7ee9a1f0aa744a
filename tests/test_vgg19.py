"""VGG-19 (AVE visual): Keras h5 loading, refusal of torchvision's file, Caffe preprocessing, pool5 averaging.

The weight files here are synthetic (random kernels of the right shapes written with h5py in the public Keras
layouts); the forward runs on random weights and few frames (VGG-19 at 224 px costs ~0.5 s a frame on a 2-core CPU).
"""

from __future__ import annotations

import logging

import cv2
import h5py
import numpy as np
import pytest
import torch

from extractors import create_extractor
from extractors import weights as weights_mod
from extractors.vgg19 import (
    CAFFE_MEAN_BGR,
    CONV_LAYERS,
    KERAS_FILE,
    KERAS_MD5,
    KERAS_NOTOP_FILE,
    KERAS_NOTOP_MD5,
    VGG19Extractor,
    build_trunk,
    default_vgg19_path,
    read_keras_vgg19,
)
from extractors.weights import locate_weights
from pipeline.errors import UserError

# the table of feature-sets-spec §3.1: Keras layer -> torchvision features index
SPEC_INDEX = {"block1_conv1": 0, "block1_conv2": 2, "block2_conv1": 5, "block2_conv2": 7, "block3_conv1": 10,
              "block3_conv2": 12, "block3_conv3": 14, "block3_conv4": 16, "block4_conv1": 19, "block4_conv2": 21,
              "block4_conv3": 23, "block4_conv4": 25, "block5_conv1": 28, "block5_conv2": 30, "block5_conv3": 32,
              "block5_conv4": 34}
POOLS = ("block1_pool", "block2_pool", "block3_pool", "block4_pool", "block5_pool")


@pytest.fixture(scope="module")
def kernels() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random HWIO kernels and biases of VGG-19's 16 conv layers (float32, as in the Keras files)."""
    rng = np.random.default_rng(19)
    return {layer: (rng.standard_normal((3, 3, cin, cout), dtype=np.float32) * 0.05,
                    rng.standard_normal(cout, dtype=np.float32))
            for layer, _, cin, cout in CONV_LAYERS}


def write_keras_h5(path, kernels, *, layout="keras1", top=False, drop=(), shapes=None, lazy=False):
    """A Keras VGG-19 weight file. keras1: the public files' layout (datasets `<layer>_W_1:0`, `<layer>_b_1:0` in
    the layer group); keras2: `save_weights` of Keras 2 (a nested group of the layer's name holding `kernel:0`,
    `bias:0`; weight_names `<layer>/kernel:0`). Weightless layers get groups with empty weight_names, as Keras
    writes them. `shapes`: {layer: (kernel shape, bias shape)} overrides; `lazy`: datasets with shapes only (the
    loader's errors come before any value matters)."""
    order = ["input_1"]
    for b in range(1, 6):
        order += [layer for layer, *_ in CONV_LAYERS if layer.startswith(f"block{b}_")] + [POOLS[b - 1]]
    if top:
        order += ["flatten", "fc1", "fc2", "predictions"]
    order = [name for name in order if name not in drop]
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([n.encode() for n in order])
        if layout == "keras2":
            f.attrs["keras_version"] = b"2.2.4"
            f.attrs["backend"] = b"tensorflow"
        for name in order:
            g = f.create_group(name)
            if name in kernels:
                arrays = kernels[name]
            elif name in ("fc1", "fc2", "predictions"):  # ignored by the loader: small stand-ins
                arrays = (np.ones((4, 2), np.float32), np.zeros(2, np.float32))
            else:
                g.attrs["weight_names"] = np.array([], dtype="S1")
                continue
            if shapes and name in shapes:
                arrays = tuple(np.zeros(s, np.float32) for s in shapes[name])
            # keras2: "<layer>/kernel:0" makes h5py create the nested group <layer> inside the layer's group
            names = [f"{name}_W_1:0", f"{name}_b_1:0"] if layout == "keras1" else [f"{name}/kernel:0",
                                                                                    f"{name}/bias:0"]
            g.attrs["weight_names"] = np.array([n.encode() for n in names])
            for n, a in zip(names, arrays):
                if lazy:
                    g.create_dataset(n, shape=a.shape, dtype="f4")
                else:
                    g.create_dataset(n, data=a)
    return path


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory, kernels):
    return write_keras_h5(tmp_path_factory.mktemp("vgg19") / KERAS_FILE, kernels, top=True)


def test_trunk_is_torchvisions_features_layout():
    from torchvision.models import vgg

    ref = vgg.make_layers(vgg.cfgs["E"])  # torchvision's VGG-19 `features` (no weights)
    ours = build_trunk()
    assert len(ours) == len(ref) == 37
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert isinstance(ours[36], torch.nn.MaxPool2d)
    assert {layer: index for layer, index, *_ in CONV_LAYERS} == SPEC_INDEX


@pytest.mark.parametrize("layout,top", [("keras1", True), ("keras1", False), ("keras2", False)])
def test_keras_file_loads_strictly(tmp_path, kernels, layout, top):
    path = write_keras_h5(tmp_path / "w.h5", kernels, layout=layout, top=top)
    sd = read_keras_vgg19(path)
    assert len(sd) == 32 and all(v.dtype == torch.float32 for v in sd.values())
    for layer, index in (("block1_conv1", 0), ("block5_conv4", 34), ("block3_conv2", 12)):
        kernel, bias = kernels[layer]
        assert torch.equal(sd[f"features.{index}.weight"], torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
        assert torch.equal(sd[f"features.{index}.bias"], torch.from_numpy(bias))
    # first layer: input channel c of the torch weight is channel c of the Keras kernel (B,G,R: no reordering)
    assert torch.equal(sd["features.0.weight"][5, 2, 1, 0], torch.tensor(kernels["block1_conv1"][0][1, 0, 2, 5]))


def test_weight_names_are_followed_not_guessed(tmp_path, kernels):
    """Datasets named anything, found through weight_names; also a plain name inside a nested group."""
    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as f:
        for i, (layer, *_) in enumerate(CONV_LAYERS):
            g = f.create_group(layer)
            kernel, bias = kernels[layer]
            names = ["w_odd", "b_odd"] if i % 2 else ["param_0", "param_1"]
            where = g.create_group(layer) if i % 3 == 0 else g  # nested group, weight_names without the prefix
            g.attrs["weight_names"] = np.array([n.encode() for n in names])
            where.create_dataset(names[0], data=kernel)
            where.create_dataset(names[1], data=bias)
    sd = read_keras_vgg19(path)
    assert torch.equal(sd["features.0.weight"], torch.from_numpy(kernels["block1_conv1"][0].transpose(3, 2, 0, 1)))
    assert torch.equal(sd["features.34.bias"], torch.from_numpy(kernels["block5_conv4"][1]))


def test_missing_layer_is_a_user_error(tmp_path, kernels):
    path = write_keras_h5(tmp_path / "w.h5", kernels, drop=("block4_conv3",), lazy=True)
    with pytest.raises(UserError, match="block4_conv3"):
        read_keras_vgg19(path)


def test_wrong_shape_is_a_user_error(tmp_path, kernels):
    path = write_keras_h5(tmp_path / "w.h5", kernels, lazy=True,
                          shapes={"block5_conv4": ((3, 3, 512, 256), (256,))})
    with pytest.raises(UserError, match="block5_conv4") as e:
        read_keras_vgg19(path)
    assert "(3, 3, 512, 256)" in str(e.value) and "(3, 3, 512, 512)" in str(e.value)


def test_torchvision_state_dict_is_refused(tmp_path):
    path = tmp_path / "vgg19-dcbb9e9d.pth"
    sd = {f"features.{i}.{p}": torch.zeros(1) for i in (0, 2, 5) for p in ("weight", "bias")}
    sd["classifier.0.weight"] = torch.zeros(1)
    torch.save(sd, path)
    for call in (lambda: read_keras_vgg19(path),
                 lambda: VGG19Extractor(weights=path, precision="fp32")):
        with pytest.raises(UserError, match="trained from scratch") as e:
            call()
        msg = str(e.value)
        assert KERAS_FILE in msg and KERAS_NOTOP_FILE in msg and KERAS_MD5 in msg and KERAS_NOTOP_MD5 in msg
        assert "[0,1]" in msg and "Caffe" in msg
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not weights at all")
    with pytest.raises(UserError, match="not an HDF5 file"):
        read_keras_vgg19(junk)


def test_extractor_loads_file_records_unknown_identity_and_warns(keras_file, kernels, caplog):
    info = locate_weights("vgg19", keras_file)
    assert info.identity.startswith("unknown")
    with caplog.at_level(logging.WARNING, logger="extractors.vgg19"):
        enc = VGG19Extractor(weights=keras_file, precision="fp32")
    assert any("published" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert enc.weights.identity.startswith("unknown")
    assert torch.equal(enc.model[0].weight, torch.from_numpy(kernels["block1_conv1"][0].transpose(3, 2, 0, 1)))
    assert torch.equal(enc.model[34].weight, torch.from_numpy(kernels["block5_conv4"][0].transpose(3, 2, 0, 1)))
    d = enc.describe()
    assert d["weights_identity"].startswith("unknown") and d["weights"]["identity"].startswith("unknown")
    assert d["weights_format"] == "keras-h5" and d["preprocessing"]["channel_order"] == "BGR"


def test_published_digests_and_default_location(tmp_path, monkeypatch):
    published = weights_mod._RULES["vgg19"].published
    assert set(published) == {KERAS_MD5, KERAS_NOTOP_MD5}
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = tmp_path / ".keras" / "models"
    assert default_vgg19_path() == folder / KERAS_FILE
    with pytest.raises(UserError) as e:
        locate_weights("vgg19")
    msg = str(e.value)
    assert KERAS_FILE in msg and KERAS_NOTOP_FILE in msg and str(folder) in msg and "--random-init" in msg
    folder.mkdir(parents=True)
    (folder / KERAS_NOTOP_FILE).write_bytes(b"x")
    assert default_vgg19_path() == folder / KERAS_NOTOP_FILE  # only the notop file: that one
    assert locate_weights("vgg19").path == folder / KERAS_NOTOP_FILE
    (folder / KERAS_FILE).write_bytes(b"y")
    assert default_vgg19_path() == folder / KERAS_FILE  # both: the with-top file, as AVE's script used


@pytest.fixture(scope="module")
def random_encoder():
    return VGG19Extractor(random_init=True, frames_per_segment=2, precision="fp32")


def test_prepare_constant_frame_is_bgr_minus_caffe_means(random_encoder):
    frame = np.empty((1, 120, 160, 3), np.uint8)
    frame[..., 0], frame[..., 1], frame[..., 2] = 200, 100, 50  # R, G, B
    x = random_encoder.prepare(frame)
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    for c, v in enumerate((50, 100, 200)):  # B, G, R
        expected = np.float32(v) - np.float32(CAFFE_MEAN_BGR[c])
        assert torch.all(x[0, c] == torch.tensor(expected)), c
    assert CAFFE_MEAN_BGR == (103.939, 116.779, 123.68)


def test_prepare_resizes_with_opencv_itself(random_encoder):
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (2, 120, 160, 3), dtype=np.uint8)
    x = random_encoder.prepare(torch.from_numpy(frames))  # a tensor works too
    mean = np.asarray(CAFFE_MEAN_BGR, np.float32)
    for i, frame in enumerate(frames):
        resized = cv2.resize(frame, (224, 224))  # INTER_LINEAR on the RGB uint8 frame
        expected = resized[..., ::-1].astype(np.float32) - mean
        assert np.array_equal(x[i].permute(1, 2, 0).numpy(), expected)
    with pytest.raises(ValueError):
        random_encoder.prepare(frames.astype(np.float32))


def test_encode_averages_each_segments_pool5_maps(random_encoder):
    rng = np.random.default_rng(7)
    frames = rng.integers(0, 256, (4, 48, 64, 3), dtype=np.uint8)  # 2 segments x 2 frames of 64x48
    units = random_encoder.prepare(frames)
    out = random_encoder.encode(units)
    assert out.shape == (2, 7, 7, 512) and out.dtype == torch.float32 and out.device.type == "cpu"
    maps = [random_encoder.forward_maps(units[i:i + 1])[0] for i in range(4)]  # each frame on its own
    assert maps[0].shape == (512, 7, 7)
    for s in range(2):
        expected = ((maps[2 * s] + maps[2 * s + 1]) / 2).permute(1, 2, 0)
        assert torch.allclose(out[s], expected, atol=1e-5, rtol=0)
    assert out.abs().mean() > 0.1  # random features of a usable scale, not vanishing
    with pytest.raises(ValueError, match="whole number"):
        random_encoder.encode(units[:3])


def test_bf16_autocast_runs_and_returns_float32(random_encoder):
    enc = VGG19Extractor(random_init=True, frames_per_segment=1, precision="bf16")
    units = enc.prepare(np.random.default_rng(1).integers(0, 256, (1, 48, 64, 3), dtype=np.uint8))
    out = enc.encode(units)
    ref = random_encoder.forward_maps(units)[0].permute(1, 2, 0)
    assert out.shape == (1, 7, 7, 512) and out.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.98


def test_defaults_and_random_init():
    enc = create_extractor("vgg19", random_init=True, seed=0, crop_size=112)  # unknown options are ignored
    assert isinstance(enc, VGG19Extractor)
    assert (enc.name, enc.modality, enc.output_file) == ("vgg19", "visual", "visual.h5")
    assert enc.units_per_segment == 16 and enc.segment_shape == (7, 7, 512)
    assert enc.weights.random_init and enc.describe()["weights_identity"] == "random-init"
    same = VGG19Extractor(random_init=True, seed=0, precision="fp32")
    other = VGG19Extractor(random_init=True, seed=1, precision="fp32")
    assert torch.equal(enc.model[0].weight, same.model[0].weight)
    assert not torch.equal(enc.model[0].weight, other.model[0].weight)
    with pytest.raises(ValueError):
        VGG19Extractor(random_init=True, frames_per_segment=0)
