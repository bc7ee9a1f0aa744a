"""Single-modality controls: a localizer trained and tested with one modality replaced by noise (both tasks).

An audio-visual result means something only beside the rows where the model sees one modality: if "audio only"
scores as well as "both", the benchmark is an audio-classification task. The control keeps everything else equal
(same features, splits, seeds, recipe, model size) and replaces the *other* modality's features by Gaussian noise
with the same per-channel mean and standard deviation as that modality's training features, so the model's input
scale, and any normalisation it does, are what they would be; only the information is gone.

The noise of a video is fixed by (seed, the video's row or id) alone: the same numbers whichever batch, order,
split or number of threads reads it (numpy's PCG64 with a SeedSequence, bit-exact on every machine), and the same
in every epoch, so a model cannot learn anything from its change either.

This module owns the vocabulary (`INPUTS`, `parse_inputs`, `replaced_modality`, how a control row is named and
explained in a table) and the noise itself (`matched_noise`); each task's data loader decides where to call it.
"""

from __future__ import annotations

import zlib

import numpy as np

from pipeline.config import parse_choices
from pipeline.errors import UserError

BOTH, AUDIO, VISUAL = "both", "audio", "visual"
INPUTS = (BOTH, AUDIO, VISUAL)  # what the localizer sees
_NOISE_TAG = 0x5C0E  # separates this generator's streams from any other seeded from the same numbers


CONTROL_NOTE = ("(audio only): the visual features replaced by Gaussian noise with their per-channel mean and std over "
                "the train split, fixed per video; (visual only): the audio features alike.")


def control_label(name: str, inputs: str) -> str:
    """A table row's name: `cace`, `cace (audio only)`. Parentheses, not brackets: rich would take those for markup."""
    return name if inputs == BOTH else f"{name} ({inputs} only)"


def replaced_modality(inputs: str) -> str | None:
    """The modality replaced by noise when the model sees `inputs`: "audio" -> "visual", "visual" -> "audio"."""
    if inputs not in INPUTS:
        raise UserError(f"inputs must be one of {', '.join(INPUTS)}, got {inputs!r}")
    return {BOTH: None, AUDIO: VISUAL, VISUAL: AUDIO}[inputs]


def parse_inputs(text: str) -> list[str]:
    """`both,audio,visual` -> ["both", "audio", "visual"] (order kept, repeats dropped); a clear error otherwise."""
    return parse_choices("--inputs", text, INPUTS, "both,audio,visual: the joint model and the two single-modality "
                                                   "controls")


def row_seed(seed: int, row: int | str) -> np.random.SeedSequence:
    """The seed of one video's noise: (seed, row index) or (seed, a video id's CRC32)."""
    key = zlib.crc32(row.encode("utf-8")) if isinstance(row, str) else int(row)
    return np.random.SeedSequence([_NOISE_TAG, int(seed), key])


def matched_noise(shape: tuple[int, ...], mean: np.ndarray, std: np.ndarray, seed: int,
                  row: int | str) -> np.ndarray:
    """float32 noise of `shape` (channels last) with per-channel `mean` and `std`, fixed by (seed, row)."""
    mean = np.asarray(mean, np.float32).reshape(-1)
    std = np.asarray(std, np.float32).reshape(-1)
    if shape[-1] != mean.size or mean.size != std.size:
        raise ValueError(f"noise of shape {shape} needs {shape[-1]} channel statistics, got {mean.size}, {std.size}")
    z = np.random.Generator(np.random.PCG64(row_seed(seed, row))).standard_normal(shape, dtype=np.float32)
    return z * std + mean
