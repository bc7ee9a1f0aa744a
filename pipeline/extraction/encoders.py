"""Encoders for an extraction: which registered extractor serves each modality, its weights located and checked, and
the extractor built (once per stage; kept between shards on a Dask worker).

Every path that turns videos into features (the AVE and dense stages, their shards, AVE and dense predict) builds
its encoders here, so a new encoder is one module in `extractors/` plus its weight rules, never a new code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.errors import UserError


@dataclass(frozen=True)
class EncoderSpec:
    """One modality's encoder: registry name, the user's weight file (None: its default location) and the options
    its constructor takes beyond weights / seed / device / precision (frames per step, crop size)."""

    name: str
    modality: str
    weights_file: Path | None = None
    options: dict = field(default_factory=dict)


def locate(spec: EncoderSpec, *, random_init: bool, seed: int):
    """The `WeightsInfo` of `spec`: its weight file found and hashed (a UserError naming the file and where it goes
    when missing), or random init when asked. Registered extractors without weight rules (tests' tiny ones) run
    only with random init."""
    from extractors import get_extractor_class
    from extractors.weights import WeightsInfo, has_weight_rules, locate_weights

    cls = get_extractor_class(spec.name)
    if cls.modality != spec.modality:
        raise UserError(f"extractor {spec.name!r} is a {cls.modality} encoder, not a {spec.modality} one")
    if has_weight_rules(spec.name):
        return locate_weights(spec.name, spec.weights_file, random_init=random_init, seed=seed)
    if not random_init:
        raise UserError(f"extractor {spec.name!r} has no weight files; use --random-init")
    return WeightsInfo(spec.name, None, None, True, seed, "random init")


def build(spec: EncoderSpec, weights, *, seed: int, device: torch.device, precision: str, keep: bool = False):
    """The extractor of `spec` with the located `weights`. `keep`: kept for this process's next call with the same
    weights (a Dask worker's next shard: building ResNet-50 or Cnn14 costs more than a shard's videos on a CPU)."""
    from extractors import create_extractor, kept_extractor

    kwargs = dict(weights=weights.path, random_init=weights.random_init, seed=seed, device=device,
                  precision=precision, **spec.options)
    extractor = kept_extractor(spec.name, weights.id, **kwargs) if keep else create_extractor(spec.name, **kwargs)
    if extractor.modality != spec.modality:
        raise UserError(f"the {spec.modality} encoder {spec.name!r} is a {extractor.modality} encoder")
    return extractor
