"""The interface every encoder implements, so the extraction stage can drive any of them the same way.

An extractor turns one video's decoded input into per-second features in two steps:
- `prepare(raw)`: one video's raw input (visual: uint8 frames [S*F, H, W, 3]; audio: float32 samples [S*sr])
  -> a tensor of *units* on the device, `units_per_segment` units per 1-s segment (visual: F frames, audio: one
  1-s chunk). Per-video work (resizing frames of that video's size) happens here, batched over the video.
- `encode(units)`: units of any number of whole segments, from any number of videos, concatenated
  -> float32 [segments, *segment_shape] on the CPU. This is the batched forward pass.

So the stage can batch across videos: prepare each video as it arrives, concatenate units, encode in batches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from extractors.weights import WeightsInfo
from pipeline.runtime import resolve_device, resolve_precision


class Extractor(ABC):
    name: ClassVar[str]
    modality: ClassVar[str]  # "visual" or "audio": which decoded input it takes and which feature file it fills
    output_file: ClassVar[str]  # "visual.h5" / "audio.h5"

    weights: WeightsInfo
    units_per_segment: int
    segment_shape: tuple[int, ...]
    precision: str  # how the forward runs ("fp32", or "bf16" autocast); it changes the numbers: part of the key

    def __init__(self, weights: Path | None = None, *, random_init: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", precision: str = "auto"):
        self.device = device if isinstance(device, torch.device) else resolve_device(str(device))
        self.precision = resolve_precision(precision, self.device)  # "fp32" or "bf16" (autocast)
        self.seed = seed

    @abstractmethod
    def prepare(self, raw: np.ndarray | torch.Tensor) -> torch.Tensor:
        """One video's raw input -> units on the device ([S*units_per_segment, ...])."""

    @abstractmethod
    def encode(self, units: torch.Tensor) -> torch.Tensor:
        """[k*units_per_segment, ...] units -> float32 [k, *segment_shape] features on the CPU."""

    def describe(self) -> dict:
        return {"encoder": self.name, "modality": self.modality, "weights": self.weights.to_dict(),
                "segment_shape": list(self.segment_shape), "units_per_segment": self.units_per_segment,
                "device": str(self.device), "precision": self.precision}

    def extract(self, raw: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Convenience: one video -> [S, *segment_shape]."""
        return self.encode(self.prepare(raw))


class ClipExtractor(ABC):
    """An encoder that windows a whole clip itself, as the released feature sets' recipes do (VGGish: 0.96-s examples
    every `hop_s`; I3D: 24-frame windows every 8 frames at 25 fps). Its rows do not follow a grid the engine
    imposes: `encode_clip` returns however many rows the recipe gives ([T, *segment_shape] float32), and the
    task's writer stores them as they are (the public layouts do).

    `source` is what the feature set's decoding recipe produced for the clip (see `pipeline.extraction.recipes`):
    visual: an iterable of uint8 RGB frames [H, W, 3] at the recipe's frame rate; audio: (samples float64 mono in
    [-1, 1), sample rate)."""

    name: ClassVar[str]
    modality: ClassVar[str]
    weights: WeightsInfo
    segment_shape: tuple[int, ...]
    hop_s: float  # seconds between consecutive rows
    precision: str

    def __init__(self, weights: Path | None = None, *, random_init: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", precision: str = "auto"):
        self.device = device if isinstance(device, torch.device) else resolve_device(str(device))
        self.precision = resolve_precision(precision, self.device)
        self.seed = seed

    @abstractmethod
    def encode_clip(self, source) -> np.ndarray:
        """The whole clip -> float32 rows [T, *segment_shape]."""

    def describe(self) -> dict:
        return {"encoder": self.name, "modality": self.modality, "weights": self.weights.to_dict(),
                "segment_shape": list(self.segment_shape), "hop_s": self.hop_s, "device": str(self.device),
                "precision": self.precision}
