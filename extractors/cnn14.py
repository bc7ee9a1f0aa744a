"""Cnn14 (PANNs, AudioSet) per-second embeddings: each 1-s chunk of 32 kHz audio is one batch item -> [2048].

As in the CACE-Net reference (spec §4.2): `Cnn14(sample_rate=32000, window_size=1024, hop_size=320, mel_bins=64,
fmin=50, fmax=14000, classes_num=527)` in eval mode; the waveform's 320000 samples are cut into 10 chunks of 32000,
each gets its own log-mel (101 frames x 64 bins), and the 2048-d `embedding` (fc1 + ReLU) is kept.

panns-inference workarounds (../shared/notes/stack.md): importing the package runs `wget` for
`~/panns_data/class_labels_indices.csv` when that file is missing (offline it leaves an empty file, or fails when
wget is absent), and `AudioTagging(checkpoint_path=X)` re-downloads over a user's X when X is under 300 MB. So:
before the import we make sure the CSV exists with content (a packaged copy is written only when the file is
missing or empty; a user's non-empty file is never touched), we build `panns_inference.models.Cnn14` ourselves,
load the checkpoint's "model" entry, and never create an AudioTagging.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from extractors import register_extractor
from extractors.base import Extractor
from extractors.weights import load_cnn14_weights, locate_weights, read_cnn14_state_dict, seeded
from pipeline.errors import UserError
from pipeline.runtime import autocast as autocast_ctx
from pipeline.store import atomic_path

SAMPLE_RATE = 32000
CNN14_ARGS = dict(sample_rate=SAMPLE_RATE, window_size=1024, hop_size=320, mel_bins=64, fmin=50, fmax=14000,
                  classes_num=527)
EMBEDDING_DIM = 2048
LABELS_CSV = "class_labels_indices.csv"


def packaged_labels_csv() -> Path:
    return Path(str(resources.files("extractors") / "data" / LABELS_CSV))


def ensure_panns_labels(home: Path | None = None) -> Path:
    """Make `<home>/panns_data/class_labels_indices.csv` exist with content, so importing panns_inference does not
    run wget. Writes the packaged copy only if the file is missing or empty; returns the path."""
    target = Path(home if home is not None else Path.home()) / "panns_data" / LABELS_CSV
    try:
        if target.is_file() and target.stat().st_size > 0:
            return target  # the user's file (or ours from before): never overwritten
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(packaged_labels_csv(), tmp)
    except OSError as e:
        raise UserError(f"panns-inference needs {target} (it runs wget for it at import time) and it could not be "
                        f"written ({e}); copy {packaged_labels_csv()} there") from None
    return target


def import_cnn14_class():
    ensure_panns_labels()
    from panns_inference.models import Cnn14

    return Cnn14


def cnn14_embedding(model: torch.nn.Module, x: torch.Tensor, precision: str = "fp32",
                    channels_last: bool = False) -> torch.Tensor:
    """Cnn14's eval-mode forward up to `embedding` (what `model(x)["embedding"]` returns, without the 527-class
    head). The log-mel front end always runs in float32; only the conv stack runs under bf16 autocast when
    `precision` is bf16. `channels_last`: the conv stack in that layout (the model's weights must be too)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        spec = model.logmel_extractor(model.spectrogram_extractor(x.float()))  # [B,1,T,64]
    with autocast_ctx(x.device, precision):
        h = model.bn0(spec.transpose(1, 3)).transpose(1, 3)
        if channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        for i, block in enumerate((model.conv_block1, model.conv_block2, model.conv_block3, model.conv_block4,
                                   model.conv_block5, model.conv_block6)):
            h = block(h, pool_size=(1, 1) if i == 5 else (2, 2), pool_type="avg")
        h = torch.mean(h, dim=3)
        h = torch.max(h, dim=2)[0] + torch.mean(h, dim=2)
        h = F.relu_(model.fc1(h))
    return h.float()


@register_extractor
class Cnn14Extractor(Extractor):
    name: ClassVar[str] = "cnn14"
    modality: ClassVar[str] = "audio"
    output_file: ClassVar[str] = "audio.h5"

    def __init__(self, weights: Path | None = None, *, random_init: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", precision: str = "auto", **_ignored):
        super().__init__(weights, random_init=random_init, seed=seed, device=device, precision=precision)
        self.weights = locate_weights("cnn14", weights, random_init=random_init, seed=seed)
        state_dict = None if random_init else read_cnn14_state_dict(self.weights.path)
        Cnn14 = import_cnn14_class()
        with seeded(seed):
            model = Cnn14(**CNN14_ARGS)
        if state_dict is not None:
            load_cnn14_weights(model, self.weights.path, state_dict)
            del state_dict
        # channels_last: 0.41 vs 0.43 s per 10 s of audio in fp32 on a 2-core AVX2 CPU (measured); what bf16/AMX
        # and CUDA kernels want
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.model.requires_grad_(False)
        self.units_per_segment = 1
        self.segment_shape = (EMBEDDING_DIM,)

    def prepare(self, raw: np.ndarray | torch.Tensor) -> torch.Tensor:
        """float32 samples [S*32000] at 32 kHz -> [S, 32000] on the device (one 1-s chunk per segment)."""
        x = torch.as_tensor(raw, dtype=torch.float32).reshape(-1)
        if x.numel() % SAMPLE_RATE:
            raise ValueError(f"{x.numel()} samples is not a whole number of seconds at {SAMPLE_RATE} Hz")
        return x.reshape(-1, SAMPLE_RATE).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def encode(self, units: torch.Tensor) -> torch.Tensor:
        return cnn14_embedding(self.model, units.to(self.device), self.precision, channels_last=True).cpu()

    def describe(self) -> dict:
        return {**super().describe(), "cnn14_args": CNN14_ARGS}
