"""VGG-19 pool5 (Keras/Caffe ImageNet weights): [F,512,7,7] per segment, mean over the F frames -> [7,7,512].

The visual half of AVE's released features (feature-sets-spec §1.3): each frame is squashed to 224x224 with
`cv2.resize` (OpenCV's default INTER_LINEAR, on the RGB uint8 frame; no crop, no antialias), turned to float32,
flipped RGB -> BGR and the Caffe means (B 103.939, G 116.779, R 123.68) are subtracted (no /255, no std), then the
VGG-19 conv trunk runs up to the fifth max-pool (`block5_pool`; torchvision's `features[0:37]`) and the maps of the
segment's frames are averaged. Rows come out channels-last, [k,7,7,512], the AVE layout.

Weights: the Keras file AVE's script loaded, `vgg19_weights_tf_dim_ordering_tf_kernels.h5` (with top) or its
`_notop.h5` sibling (the conv layers are the same), looked for in `~/.keras/models/` unless one is given, and read
with h5py (spec §3.1): HWIO kernels -> OIHW, biases copied, every one of the 16 conv layers strictly checked. The
first layer takes B,G,R channels, which is what the preprocessing feeds. torchvision's own VGG-19 file is refused:
it is a different network (trained from scratch on RGB, [0,1], mean/std input) and cannot reproduce AVE.

Random weights (`random_init=True`) give features for testing the plumbing only: they mean nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Mapping

import cv2
import h5py
import numpy as np
import torch
from torch import nn

from extractors import register_extractor
from extractors.base import Extractor
from extractors.weights import WeightRules, check_state_dict, locate_weights, register_weight_rules, seeded
from pipeline.errors import UserError
from pipeline.runtime import autocast as autocast_ctx

log = logging.getLogger(__name__)

KERAS_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels.h5"
KERAS_NOTOP_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
KERAS_MD5 = "cbe5617147190e668d6c5d5026f83318"
KERAS_NOTOP_MD5 = "253f8cb515780f3b799900260a226db6"
TORCHVISION_FILE = "vgg19-dcbb9e9d.pth"

INPUT_SIZE = 224
FEATURE_DIM = 512
MAP_SIZE = 7  # 224 / 2**5
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # keras.applications "caffe" mode, subtracted from B, G, R

# the conv blocks of VGG-19 ("E"): output channels per conv layer, a max-pool after each block
BLOCKS = ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512))
POOL5_INDEX = 36  # features[36] is the fifth max-pool


def _conv_layers() -> list[tuple[str, int, int, int]]:
    """(Keras layer name, torchvision `features` index, in channels, out channels) of the 16 conv layers."""
    out, index, channels = [], 0, 3
    for b, widths in enumerate(BLOCKS, start=1):
        for c, width in enumerate(widths, start=1):
            out.append((f"block{b}_conv{c}", index, channels, width))
            index += 2  # conv, relu
            channels = width
        index += 1  # max-pool
    return out


CONV_LAYERS = _conv_layers()  # block1_conv1 -> 0, block1_conv2 -> 2, block2_conv1 -> 5, ..., block5_conv4 -> 34


def build_trunk() -> nn.Sequential:
    """VGG-19's conv trunk in torchvision's `features` numbering, up to and including pool5 (37 modules)."""
    layers: list[nn.Module] = []
    channels = 3
    for widths in BLOCKS:
        for width in widths:
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = width
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def init_trunk(trunk: nn.Sequential) -> None:
    """torchvision's VGG init for convolutions (He normal, fan-out, zero bias): activations keep their scale through
    the 16 layers, so random-weight features are not vanishingly small."""
    for m in trunk.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)


# ---- weight files ------------------------------------------------------------------------------------------------
def default_vgg19_path() -> Path:
    """`~/.keras/models/<with-top file>`, or the notop file there when only that one exists."""
    folder = Path.home() / ".keras" / "models"
    top, notop = folder / KERAS_FILE, folder / KERAS_NOTOP_FILE
    if not top.is_file() and notop.is_file():
        return notop
    return top


def _how(path: Path) -> str:
    return (f"VGG-19 weights not found: put Keras's ImageNet file {KERAS_FILE} (md5 {KERAS_MD5}) or "
            f"{KERAS_NOTOP_FILE} (md5 {KERAS_NOTOP_MD5}) in {path.parent}/ (where keras.applications.VGG19 "
            f"keeps it), or pass --vgg19-weights FILE, or --random-init to test with random weights")


register_weight_rules("vgg19", WeightRules(
    default_vgg19_path, "--vgg19-weights", _how,
    published={KERAS_MD5: f"Keras VGG-19 with top ({KERAS_FILE})",
               KERAS_NOTOP_MD5: f"Keras VGG-19 without top ({KERAS_NOTOP_FILE})"}))


def _refuse_torch_file(path: Path) -> None:
    """A file that is not HDF5: say why a torchvision VGG-19 cannot stand in, or that it is no weight file at all."""
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file either
        obj = None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, Mapping) and any("features." in str(k) for k in obj):
        raise UserError(
            f"{path}: this is a PyTorch/torchvision VGG state dict (features.0.weight ...), which AVE's features "
            f"cannot come from: torchvision's VGG-19 ({TORCHVISION_FILE}) was trained from scratch with torchvision's "
            f"recipe on RGB input scaled to [0,1] and normalized with the ImageNet mean/std; AVE used the Caffe VGG-19 "
            f"(ported to Keras: BGR, 0-255 minus the Caffe means), a different network whose features it cannot "
            f"reproduce. Use the Keras file {KERAS_FILE} (md5 {KERAS_MD5}) or {KERAS_NOTOP_FILE} "
            f"(md5 {KERAS_NOTOP_MD5}) via --vgg19-weights")
    raise UserError(f"{path}: not an HDF5 file; VGG-19 needs Keras's ImageNet weights, {KERAS_FILE} "
                    f"(md5 {KERAS_MD5}) or {KERAS_NOTOP_FILE} (md5 {KERAS_NOTOP_MD5})")


def _names(attr: Any) -> list[str]:
    return [n.decode("utf8") if isinstance(n, bytes) else str(n) for n in np.atleast_1d(attr)]


def _layer_arrays(group: h5py.Group, layer: str) -> list[np.ndarray]:
    """A layer group's weight arrays in `weight_names` order, wherever they sit under the group (Keras 1 keeps
    them in the group itself, Keras 2 in a nested group of the layer's name and names them `<layer>/kernel:0`)."""
    datasets: dict[str, h5py.Dataset] = {}

    def keep(name: str, obj: Any) -> None:  # visititems stops at the first callback that returns something
        if isinstance(obj, h5py.Dataset):
            datasets[name] = obj

    group.visititems(keep)
    if "weight_names" not in group.attrs:  # no list: take the group's arrays, kernel (4-d) before bias
        return [datasets[k][()] for k in sorted(datasets, key=lambda k: -datasets[k].ndim)]
    out = []
    for name in _names(group.attrs["weight_names"]):
        candidates = [name, f"{layer}/{name}"] + sorted(k for k in datasets if k.endswith("/" + name))
        found = next((datasets[c] for c in candidates if c in datasets), None)
        if found is None:
            raise UserError(f"layer {layer}: weight {name!r} listed in weight_names is not in the file (found "
                            f"{sorted(datasets)[:4]})")
        out.append(found[()])
    return out


def read_keras_vgg19(path: Path) -> dict[str, torch.Tensor]:
    """The 16 conv layers of a Keras VGG-19 h5 as a `features.<i>.weight/bias` state dict (OIHW float32). Strict:
    a missing layer or a shape that is not VGG-19's is a UserError naming the layer. fc1, fc2 and predictions (the
    with-top file) and anything else in the file are ignored."""
    path = Path(path)
    if not h5py.is_hdf5(path):
        _refuse_torch_file(path)
    sd: dict[str, torch.Tensor] = {}
    with h5py.File(path, "r") as f:
        root: h5py.Group = f["model_weights"] if "model_weights" in f and "block1_conv1" not in f else f
        present = [k for k in root if isinstance(root[k], h5py.Group)]
        for layer, index, cin, cout in CONV_LAYERS:
            if layer not in root or not isinstance(root[layer], h5py.Group):
                raise UserError(f"{path}: layer {layer} is missing; not a Keras VGG-19 weight file (layers found: "
                                f"{', '.join(present[:8])}{' ...' if len(present) > 8 else ''}). Expected {KERAS_FILE} "
                                f"or {KERAS_NOTOP_FILE}")
            try:
                arrays = _layer_arrays(root[layer], layer)
            except UserError as e:
                raise UserError(f"{path}: {e}") from None
            want = [(3, 3, cin, cout), (cout,)]
            got = [tuple(a.shape) for a in arrays]
            if got != want:
                raise UserError(f"{path}: layer {layer} has weights of shape {got}, expected {want} (kernel HWIO, "
                                f"bias); not the Keras VGG-19 file?")
            kernel, bias = (np.asarray(a, dtype=np.float32) for a in arrays)
            sd[f"features.{index}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
            sd[f"features.{index}.bias"] = torch.from_numpy(np.ascontiguousarray(bias))
    return sd


def load_vgg19_weights(trunk: nn.Sequential, path: Path) -> None:
    sd = read_keras_vgg19(path)
    check_state_dict(trunk, {k.removeprefix("features."): v for k, v in sd.items()}, path, "VGG-19 conv trunk")
    trunk.load_state_dict({k.removeprefix("features."): v for k, v in sd.items()})


# ---- the extractor -----------------------------------------------------------------------------------------------
def caffe_preprocess(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB [n,H,W,3] -> float32 BGR-minus-Caffe-means [n,224,224,3] (cv2 INTER_LINEAR squash to 224)."""
    out = np.empty((frames.shape[0], INPUT_SIZE, INPUT_SIZE, 3), dtype=np.float32)
    mean = np.asarray(CAFFE_MEAN_BGR, dtype=np.float32)
    for i, frame in enumerate(frames):
        resized = cv2.resize(np.ascontiguousarray(frame), (INPUT_SIZE, INPUT_SIZE))  # default INTER_LINEAR
        np.subtract(resized[..., ::-1], mean, out=out[i], dtype=np.float32)  # BGR, float32 - float32
    return out


@register_extractor
class VGG19Extractor(Extractor):
    """AVE's visual encoder: VGG-19 block5_pool on 16 frames a second, averaged -> [7,7,512] per segment.

    `weights`: the Keras h5 (with or without top); None looks in ~/.keras/models. `random_init=True` builds
    seeded He-normal random weights instead: their features are for testing only. `frames_per_segment`: frames
    averaged into one row (AVE: 16). `precision`: "fp32", or "bf16" autocast ("auto" picks bf16 where the device has
    native bf16 arithmetic; the released features are fp32)."""

    name: ClassVar[str] = "vgg19"
    modality: ClassVar[str] = "visual"
    output_file: ClassVar[str] = "visual.h5"

    def __init__(self, weights: Path | None = None, *, random_init: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", precision: str = "auto", frames_per_segment: int = 16,
                 **_ignored):
        super().__init__(weights, random_init=random_init, seed=seed, device=device, precision=precision)
        if frames_per_segment < 1:
            raise ValueError(f"frames_per_segment must be >= 1, got {frames_per_segment}")
        self.weights = locate_weights("vgg19", weights, random_init=random_init, seed=seed)
        with seeded(seed):
            trunk = build_trunk()
            init_trunk(trunk)
        if random_init:
            self.weights_format = "random-init"
        else:
            load_vgg19_weights(trunk, self.weights.path)
            self.weights_format = "keras-h5"
            if self.weights.identity.startswith("unknown"):
                log.warning("%s: not one of Keras's published VGG-19 files (md5 %s / %s); using it anyway, and the "
                            "manifest records it as unknown. Features match AVE's only with the published weights",
                            self.weights.path, KERAS_MD5, KERAS_NOTOP_MD5)
        self.model = trunk.eval().to(self.device)
        self.model.requires_grad_(False)
        self.model.to(memory_format=torch.channels_last)  # as resnet50.py: what oneDNN and tensor cores want
        self.units_per_segment = frames_per_segment
        self.segment_shape = (MAP_SIZE, MAP_SIZE, FEATURE_DIM)

    # ---- per video ----------------------------------------------------------------------------------------------
    def prepare(self, raw: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 RGB frames [n,H,W,3] -> float32 [n,3,224,224] on the device: cv2 squash-resize, BGR, minus the
        Caffe means."""
        x = raw.cpu().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 RGB frames [n,H,W,3], got {tuple(x.shape)} {x.dtype}")
        pre = torch.from_numpy(caffe_preprocess(x))
        return pre.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()

    # ---- batched ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed [n,3,224,224] -> pool5 maps [n,512,7,7] (float32)."""
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        with autocast_ctx(self.device, self.precision):
            x = self.model(x)
        return x.float()

    @torch.inference_mode()
    def encode(self, units: torch.Tensor) -> torch.Tensor:
        f = self.units_per_segment
        if units.shape[0] % f:
            raise ValueError(f"{units.shape[0]} frames is not a whole number of {f}-frame segments")
        maps = self.forward_maps(units)
        k = units.shape[0] // f
        seg = maps.reshape(k, f, *maps.shape[1:]).mean(dim=1)  # [k,512,7,7]: mean over the segment's frames
        return seg.permute(0, 2, 3, 1).contiguous().cpu()  # [k,7,7,512], the AVE layout

    def describe(self) -> dict:
        return {**super().describe(), "weights_format": self.weights_format,
                "weights_identity": "random-init" if self.weights.random_init else self.weights.identity,
                "layer": f"block5_pool (features[{POOL5_INDEX}])",
                "preprocessing": {"resize": [INPUT_SIZE, INPUT_SIZE], "resize_with": "cv2.resize INTER_LINEAR",
                                  "resize_on": "RGB uint8", "aspect": "squashed, no crop, no antialias",
                                  "channel_order": "BGR", "mean_bgr": list(CAFFE_MEAN_BGR), "scale": 1.0,
                                  "opencv": cv2.__version__, "from": "keras.applications.vgg19 caffe mode"}}
