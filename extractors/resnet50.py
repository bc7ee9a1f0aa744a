"""ResNet-50 (torchvision) up to layer4: [F,2048,7,7] per segment, mean over the F frames -> [7,7,2048].

This is the CACE-Net reference's visual encoder (spec §4.1): `Sequential(resnet50.children()[:-2])`, frames
preprocessed as `ResNet50_Weights.IMAGENET1K_V2.transforms()` defines (resize the short side to 232, bilinear with
antialias; center crop 224; scale to [0,1]; normalize with the ImageNet mean/std). The numbers are read from that
transform object, not retyped, and applied with torchvision.transforms.v2.functional to a whole video's uint8
frames at once on the device (the reference does it per frame on PIL images in a thread pool). Cropping happens
in `prepare` (uint8, 4x smaller than float), scaling and normalizing in `encode` (on the batch). Against the
reference's per-frame PIL path the result differs by at most one uint8 level in under 1 % of the pixels (PIL's
fixed-point resize rounding; tests/test_extract.py checks it).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torchvision
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from extractors import register_extractor
from extractors.base import Extractor
from extractors.weights import load_resnet50_weights, locate_weights, seeded
from pipeline.runtime import autocast as autocast_ctx

WEIGHTS_ENUM = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
FEATURE_DIM = 2048
STRIDE = 32  # layer4's output stride


def preprocessing_spec() -> dict:
    """Resize/crop/normalize parameters of the ImageNet V2 weights' own transform (works offline)."""
    t = WEIGHTS_ENUM.transforms()
    interpolation = t.interpolation
    return {"resize_size": list(t.resize_size), "crop_size": list(t.crop_size), "mean": list(t.mean),
            "std": list(t.std), "interpolation": interpolation, "antialias": bool(getattr(t, "antialias", True))}


@register_extractor
class ResNet50Extractor(Extractor):
    name: ClassVar[str] = "resnet50"
    modality: ClassVar[str] = "visual"
    output_file: ClassVar[str] = "visual.h5"

    def __init__(self, weights: Path | None = None, *, random_init: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", precision: str = "auto", frames_per_segment: int = 16,
                 crop_size: int | None = None, prepare_chunk: int = 64):
        """`crop_size`: None = the weights' own 224-px center crop after a 232-px resize; a smaller crop (a CPU
        demo's knob, not the paper's) resizes in proportion (crop * 232/224) and gives ceil(crop/32)^2 maps."""
        super().__init__(weights, random_init=random_init, seed=seed, device=device, precision=precision)
        if frames_per_segment < 1:
            raise ValueError(f"frames_per_segment must be >= 1, got {frames_per_segment}")
        self.weights = locate_weights("resnet50", weights, random_init=random_init, seed=seed)
        with seeded(seed):
            model = torchvision.models.resnet50(weights=None)
        if not random_init:
            self.weights_format = load_resnet50_weights(model, self.weights.path)
        else:
            self.weights_format = "random-init"
        model.fc = torch.nn.Identity()  # never used; keeps no 2048x1000 matrix on the device
        self.model = model.eval().to(self.device)
        self.model.requires_grad_(False)
        # channels_last always: 17.0 vs 14.6 frames/s in fp32 on a 2-core AVX2 CPU (measured), and what oneDNN's
        # AMX/bf16 kernels and CUDA's tensor cores want
        self.model.to(memory_format=torch.channels_last)
        spec = preprocessing_spec()
        self.resize_size, self.crop_size = spec["resize_size"], spec["crop_size"]
        if crop_size is not None:
            if crop_size < STRIDE:
                raise ValueError(f"crop_size must be at least {STRIDE} px, got {crop_size}")
            scale = spec["resize_size"][0] / spec["crop_size"][0]
            self.resize_size, self.crop_size = [int(round(crop_size * scale))], [crop_size, crop_size]
        self.interpolation, self.antialias = spec["interpolation"], spec["antialias"]
        self.mean, self.std = spec["mean"], spec["std"]
        self.units_per_segment = frames_per_segment
        self.prepare_chunk = prepare_chunk
        side = -(-self.crop_size[0] // STRIDE)
        self.segment_shape = (side, side, FEATURE_DIM)

    # ---- per video ----------------------------------------------------------------------------------------------
    def prepare(self, raw: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 RGB frames [n,H,W,3] -> uint8 [n,3,224,224] on the device (resized + center-cropped)."""
        x = torch.as_tensor(raw)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames [n,H,W,3], got {tuple(x.shape)} {x.dtype}")
        out = []
        for i in range(0, x.shape[0], self.prepare_chunk):  # bounds the intermediate size for large frames
            chunk = x[i:i + self.prepare_chunk].to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            chunk = TF.resize(chunk, self.resize_size, interpolation=self.interpolation, antialias=self.antialias)
            out.append(TF.center_crop(chunk, self.crop_size))
        return torch.cat(out).contiguous()

    # ---- batched ------------------------------------------------------------------------------------------------
    def normalize(self, units: torch.Tensor) -> torch.Tensor:
        x = TF.to_dtype(units.to(self.device), torch.float32, scale=True)
        return TF.normalize(x, self.mean, self.std)

    @torch.inference_mode()
    def forward_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized [n,3,224,224] -> layer4 maps [n,2048,7,7] (float32)."""
        m = self.model
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast_ctx(self.device, self.precision):
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
        return x.float()

    @torch.inference_mode()
    def encode(self, units: torch.Tensor) -> torch.Tensor:
        f = self.units_per_segment
        if units.shape[0] % f:
            raise ValueError(f"{units.shape[0]} frames is not a whole number of {f}-frame segments")
        maps = self.forward_maps(self.normalize(units))
        k = units.shape[0] // f
        seg = maps.reshape(k, f, *maps.shape[1:]).mean(dim=1)  # [k,2048,7,7]: mean over the segment's frames
        return seg.permute(0, 2, 3, 1).contiguous().cpu()  # [k,7,7,2048], the AVE layout

    def describe(self) -> dict:
        return {**super().describe(), "weights_format": self.weights_format,
                "preprocessing": {"resize_size": self.resize_size, "crop_size": self.crop_size,
                                  "interpolation": str(self.interpolation), "antialias": self.antialias,
                                  "mean": self.mean, "std": self.std, "from": "ResNet50_Weights.IMAGENET1K_V2"}}


def reference_transform() -> v2.Compose | torch.nn.Module:
    """The per-frame PIL transform the reference uses (for comparisons in benchmarks and tests)."""
    return WEIGHTS_ENUM.transforms()
