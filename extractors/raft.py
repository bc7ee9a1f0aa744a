"""RAFT optical flow for the I3D flow stream (feature-sets-spec §2.4, §3.4), and the flow post-processing.

The network is torchvision's RAFT-large (`torchvision.models.optical_flow.raft_large(weights=None)`), loaded from the
user's file. Two layouts load, strictly (every key, every shape; a mismatch is a `UserError` naming it):
- torchvision's own file, `raft_large_C_T_SKHT_V1-0b8c9e55.pth` (`Raft_Large_Weights.C_T_SKHT_V1`, documented by
  torchvision as ported from princeton-vl's `raft-sintel.pth`); looked for in `torch.hub.get_dir()/checkpoints/`;
- princeton-vl's `raft-sintel.pth` (the file video_features ships, git blob e9ace903040d51abc4e0e6463a4072da78cedb9b:
  check with `git hash-object raft-sintel.pth`): the `module.` prefix is stripped and the keys are renamed by spec
  §3.4's table; `cnet.*.norm3` is dropped as the duplicate of `downsample.1` (the same module in that code, so the
  file holds its tensors twice; they must be equal).
Whether torchvision's forward equals princeton-vl's to float noise is [U] in the spec.

The recipe (video_features' RAFT path, §2.4): frames 0..255 -> 2v/255 - 1; 'sintel' padding (replicate-pad each side
to a multiple of 8, floor(p/2) left/top and the rest right/bottom); 20 flow updates; the last, convex-upsampled flow.
The flow is NOT unpadded: video_features center-crops the padded flow, so its 224 crop is offset from the RGB crop
by up to 1 px (320x240 -> 341x256, padded to 344x256: the flow crop starts at x = 60 of the padded frame, image
x = 59, while the RGB crop starts at x = 58).

`RaftFlow` runs torchvision's modules with its own loop, equal to `RAFT.forward(...)[-1]` (tests/test_i3d.py checks)
but cheaper where only the last flow is wanted: the mask predictor and convex upsampling run once, not after every
update (about 11 % of the multiply-adds at 20 updates, by a count of the layers), and for consecutive pairs
(`flow_sequence`) each frame's features are computed once, not twice (about 6 %). The feature encoder normalizes per
image (instance norm), so sharing changes nothing but float rounding.

The post-processing is pure functions: `center_crop` (top = floor((H-size)/2), left = floor((W-size)/2)) and
`quantize_flow` (clamp to +-20, round(128 + 255/40 v) half-to-even and not clipped, then 2v/255 - 1).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torchvision.models.optical_flow import raft as tv_raft

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
from pipeline.runtime import resolve_device, resolve_precision

RAFT_FILE = "raft_large_C_T_SKHT_V1-0b8c9e55.pth"  # torchvision's name: sha256 starts 0b8c9e55
FLOW_UPDATES = 20  # video_features: iters=20
FLOW_CLAMP = 20.0  # video_features' Clamp(-20, 20) before ToUInt8
PAD_MULTIPLE = 8


def default_raft_path() -> Path:
    return hub_checkpoint(RAFT_FILE)


register_weight_rules("raft", WeightRules(
    default_raft_path, "--raft-weights",
    lambda p: (f"RAFT weights not found: put {RAFT_FILE} (torchvision's Raft_Large_Weights.C_T_SKHT_V1, ported from "
               f"princeton-vl's raft-sintel.pth) in {p.parent}/ (torch.hub.get_dir()/checkpoints), or pass "
               f"--raft-weights FILE (that file or princeton-vl's raft-sintel.pth), or --random-init to test with "
               f"random weights"),
    published={"0b8c9e55": "torchvision raft_large C_T_SKHT_V1 (ported from raft-sintel.pth)"}))


# ---- weights ------------------------------------------------------------------------------------------------------
_ENCODERS = {"fnet": "feature_encoder", "cnet": "context_encoder"}
_BLOCK = {"conv1": "convnormrelu1.0", "norm1": "convnormrelu1.1", "conv2": "convnormrelu2.0",
          "norm2": "convnormrelu2.1"}
_TOP = {"conv1": "convnormrelu.0", "norm1": "convnormrelu.1", "conv2": "conv"}
_MOTION = {"convc1": "convcorr1.0", "convc2": "convcorr2.0", "convf1": "convflow1.0", "convf2": "convflow2.0",
           "conv": "conv.0"}


def princeton_key(key: str) -> str | None:
    """princeton-vl RAFT key (without `module.`) -> torchvision key; None for `norm3` (the duplicate of
    `downsample.1`). A key no rule knows is returned unchanged (the strict check then names it)."""
    m = re.fullmatch(r"(fnet|cnet)\.(layer\d)\.(\d+)\.(\w+)\.(.+)", key)
    if m:
        enc, layer, block, name, rest = m.groups()
        if name == "norm3":
            return None
        name = _BLOCK.get(name, name)  # downsample.{0,1} keep their names
        return f"{_ENCODERS[enc]}.{layer}.{block}.{name}.{rest}"
    m = re.fullmatch(r"(fnet|cnet)\.(\w+)\.(.+)", key)
    if m:
        enc, name, rest = m.groups()
        return f"{_ENCODERS[enc]}.{_TOP.get(name, name)}.{rest}"
    m = re.fullmatch(r"update_block\.encoder\.(\w+)\.(.+)", key)
    if m and m.group(1) in _MOTION:
        return f"update_block.motion_encoder.{_MOTION[m.group(1)]}.{m.group(2)}"
    m = re.fullmatch(r"update_block\.gru\.conv([zrq])([12])\.(.+)", key)
    if m:
        return f"update_block.recurrent_block.convgru{m.group(2)}.conv{m.group(1)}.{m.group(3)}"
    m = re.fullmatch(r"update_block\.mask\.([02])\.(.+)", key)
    if m:
        return f"mask_predictor.{'convrelu.0' if m.group(1) == '0' else 'conv'}.{m.group(2)}"
    return key


def is_princeton_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("fnet.", "cnet.", "update_block.encoder.", "update_block.gru.", "update_block.mask."))
               for k in sd)


def raft_state_dict(obj, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """torchvision-named RAFT-large state dict from either layout, and the layout's name."""
    if isinstance(obj, Mapping) and not is_tensor_dict(obj) and is_tensor_dict(obj.get("state_dict")):
        obj = obj["state_dict"]
    if not is_tensor_dict(obj):
        found = list(obj.keys())[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise UserError(f"{path}: not a RAFT state dict (found {found}); expected torchvision's {RAFT_FILE} or "
                        f"princeton-vl's raft-sintel.pth")
    sd = strip_prefix(obj)
    if not is_princeton_layout(sd):
        return sd, "torchvision"
    out: dict[str, torch.Tensor] = {}
    duplicates: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        new = princeton_key(k)
        if new is None:
            duplicates[k] = v
        else:
            out[new] = v
    for k, v in duplicates.items():  # cnet.layerX.0.norm3.* must equal cnet.layerX.0.downsample.1.*
        twin = princeton_key(k.replace(".norm3.", ".downsample.1."))
        if twin not in out:
            raise UserError(f"{path}: {k} has no downsample.1 twin; not a princeton-vl RAFT file?")
        if out[twin].shape != v.shape or not torch.equal(out[twin], v):
            raise UserError(f"{path}: {k} differs from its downsample.1 twin (the same module in princeton-vl's RAFT "
                            f"code); the file is corrupt or not a RAFT checkpoint")
    return out, "princeton-vl"


def load_raft_weights(model: torch.nn.Module, path: Path) -> str:
    """Load torchvision's or princeton-vl's RAFT-large file into `model` (strict); returns the layout's name."""
    sd, fmt = raft_state_dict(read_checkpoint(path, "RAFT"), path)
    check_state_dict(model, sd, path, f"torchvision RAFT-large ({fmt} layout)")
    model.load_state_dict(sd, strict=False)  # strict above; num_batches_tracked may be absent
    return fmt


# ---- pure functions -----------------------------------------------------------------------------------------------
def sintel_padding(h: int, w: int, multiple: int = PAD_MULTIPLE) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) replicate padding to multiples of 8: floor(p/2) left/top, the rest right/bottom."""
    ph, pw = (-h) % multiple, (-w) % multiple
    return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central size x size of [..., H, W]: top = floor((H-size)/2), left = floor((W-size)/2)."""
    h, w = x.shape[-2:]
    if size > h or size > w:
        raise ValueError(f"crop {size} is larger than the frame {h}x{w}")
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def quantize_flow(flow: torch.Tensor) -> torch.Tensor:
    """video_features' Clamp(-20, 20) -> ToUInt8 -> ScaleTo1_1: round(128 + (255/40) v) with torch.round (half to
    even; not clipped, so +20 gives 256) -> 2v/255 - 1. Float32 in, float32 out."""
    q = torch.round(128 + (255 / 40) * flow.float().clamp(-FLOW_CLAMP, FLOW_CLAMP))
    return 2 * q / 255 - 1


# ---- the estimator ------------------------------------------------------------------------------------------------
class RaftFlow:
    """torchvision RAFT-large with video_features' recipe. `flow(a, b)`: frames [n,3,H,W] (uint8 or float, 0..255
    RGB) -> flow [n,2,Hp,Wp] float32 on `device`, at the PADDED size (Hp, Wp = H, W rounded up to multiples of 8),
    channel 0 = u (horizontal, +x), 1 = v (vertical, +y). `pairs` counts the pairs estimated, `calls` the batches."""

    def __init__(self, weights: WeightsInfo | Path | str | None = None, *, random_init: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", precision: str = "auto", updates: int = FLOW_UPDATES):
        if updates < 1:
            raise ValueError(f"updates must be >= 1, got {updates}")
        self.device = device if isinstance(device, torch.device) else resolve_device(str(device))
        self.precision = resolve_precision(precision, self.device)
        if isinstance(weights, WeightsInfo):
            if random_init and not weights.random_init:
                raise UserError(f"both RAFT weights {weights.path} and --random-init were given; choose one")
            self.weights = weights
        else:
            self.weights = locate_weights("raft", Path(weights) if weights is not None else None,
                                          random_init=random_init, seed=seed)
        with seeded(seed if self.weights.seed is None else self.weights.seed):
            model = tv_raft.raft_large(weights=None, progress=False)
        self.weights_format = "random-init" if self.weights.random_init else load_raft_weights(model,
                                                                                               self.weights.path)
        self.model = model.eval().to(self.device)
        self.model.requires_grad_(False)
        self.updates = updates
        self.pairs = 0
        self.calls = 0
        # torchvision's CorrBlock keeps the correlation pyramid on the module between build and lookups, so one
        # estimate runs at a time (threads sharing an extractor would otherwise read each other's volumes)
        self._lock = threading.Lock()

    def describe(self) -> dict:
        return {"weights": self.weights.to_dict(), "weights_format": self.weights_format, "updates": self.updates,
                "padding": "sintel (replicate, not unpadded)", "precision": self.precision,
                "model": "torchvision raft_large"}

    def _images(self, frames: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(frames)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected RGB frames [n,3,H,W], got {tuple(x.shape)}")
        x = x.to(self.device, non_blocking=True).float()
        x = 2 * (x / 255.0) - 1.0
        return F.pad(x, sintel_padding(*x.shape[-2:]), mode="replicate")

    @torch.inference_mode()
    def flow(self, frames_a: torch.Tensor, frames_b: torch.Tensor) -> torch.Tensor:
        """Flow from each frame of `frames_a` to the same-index frame of `frames_b`: [n,2,Hp,Wp]."""
        if tuple(frames_a.shape) != tuple(frames_b.shape):
            raise ValueError(f"frame batches differ: {tuple(frames_a.shape)} vs {tuple(frames_b.shape)}")
        images = self._images(torch.cat([torch.as_tensor(frames_a), torch.as_tensor(frames_b)]))
        with self._lock:
            self.pairs += frames_a.shape[0]
            self.calls += 1
            return self._estimate(images, consecutive=False)

    @torch.inference_mode()
    def flow_sequence(self, frames: torch.Tensor) -> torch.Tensor:
        """Flows of consecutive pairs (f0,f1), (f1,f2), ...: [n-1,2,Hp,Wp]; each frame's features computed once."""
        if frames.shape[0] < 2:
            raise ValueError(f"need at least 2 frames, got {frames.shape[0]}")
        images = self._images(frames)
        with self._lock:
            self.pairs += frames.shape[0] - 1
            self.calls += 1
            return self._estimate(images, consecutive=True)

    def _estimate(self, images: torch.Tensor, consecutive: bool) -> torch.Tensor:
        """Padded, scaled images -> the last upsampled flows: of (images[i], images[i+1]) when `consecutive`, else of
        (first half[i], second half[i]). RAFT.forward's steps, with the convex upsampling only after the last update."""
        m = self.model
        with autocast_ctx(self.device, self.precision):
            fmaps = m.feature_encoder(images).float()
            if consecutive:
                image1, fmap1, fmap2 = images[:-1], fmaps[:-1], fmaps[1:]
            else:
                image1, _ = images.chunk(2)
                fmap1, fmap2 = fmaps.chunk(2)
            n, _, h, w = image1.shape
            m.corr_block.build_pyramid(fmap1, fmap2)
            context_out = m.context_encoder(image1)
            hsize = m.update_block.hidden_state_size
            hidden, context = torch.split(context_out, [hsize, context_out.shape[1] - hsize], dim=1)
            hidden, context = torch.tanh(hidden), F.relu(context)
            coords0 = tv_raft.make_coords_grid(n, h // 8, w // 8).to(image1.device)
            coords1 = coords0.clone()
            for _ in range(self.updates):
                corr = m.corr_block.index_pyramid(centroids_coords=coords1)
                hidden, delta = m.update_block(hidden, context, corr, coords1 - coords0)
                coords1 = coords1 + delta
            up_mask = m.mask_predictor(hidden)
            flow = tv_raft.upsample_flow(flow=coords1 - coords0, up_mask=up_mask)
        m.corr_block.corr_pyramid = None  # frees the correlation volumes
        return flow.float()
