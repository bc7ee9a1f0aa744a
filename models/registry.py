"""One interface for every AVE localizer, and the registry that finds one by name (timm's way).

A localizer family is a model module that defines, besides its ``nn.Module`` and config dataclass, a
``FAMILY = <LocalizerFamily subclass>()``: how to build the model, its loss, how its outputs become per-second
labels, and how to load weights. The training harness, evaluate and predict only talk to this interface.

Adding a localizer: write ``models/<name>.py`` with its ``FAMILY`` and add one line to ``_MODULES`` below.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any, Mapping, NamedTuple

import torch.nn as nn
from torch import Tensor

__all__ = ["SegmentPrediction", "LocalizerFamily", "strict_load", "get_family", "list_localizers",
           "create_localizer", "family_of"]

# name -> module defining FAMILY (imported on first use, so `models` costs nothing for families never used)
_MODULES = {
    "cace": "models.cace",
    "aveclip": "models.aveclip",
}


class SegmentPrediction(NamedTuple):
    labels: Tensor  # [B, T] long: class index, or num_classes for background
    event_prob: Tensor  # [B, T] probability that the second is an event
    video_class: Tensor  # [B] long: the video's predicted event class
    class_prob: Tensor  # [B] probability of that class


class LocalizerFamily(ABC):
    """What the harness needs from a localizer. Subclasses set the class attributes and override what differs.

    `options` is the training config as a plain mapping (epochs, the CACE-only contrastive switches, ...): a
    family reads what concerns it and ignores the rest."""

    name: str = ""
    version: str = "1"  # bump when the family's results change for the same config (it enters the train stage key)
    summary: str = ""
    config_cls: type = object  # dataclass with from_dict / to_dict and video_dim, audio_dim, num_classes
    model_cls: type[nn.Module] = nn.Module
    has_postprocess = False  # predict(..., postprocessed=False) gives the raw decisions

    def make_config(self, d: Mapping[str, Any]):
        return self.config_cls.from_dict(d)

    def build(self, cfg) -> nn.Module:
        return self.model_cls(cfg)

    def begin_epoch(self, model: nn.Module, epoch: int, options: Mapping[str, Any]) -> None:
        """Switch what changes with the epoch (CACE: the BECE phase; AVE-CLIP: staged multi-scale training)."""

    def epoch_flags(self, model: nn.Module) -> dict:
        """What begin_epoch switched, for the per-epoch metrics (CACE: whether BECE is on)."""
        return {}

    @abstractmethod
    def loss(self, model: nn.Module, out: Any, labels: Tensor, options: Mapping[str, Any]):
        """(total loss, {term: value}) from the model's output and one-hot labels [B, T, C+1]."""

    @abstractmethod
    def predict(self, model: nn.Module, out: Any, postprocessed: bool = True) -> SegmentPrediction:
        """Per-second labels, event probability and the video's class from the model's output."""

    def tune_on_val(self, model: nn.Module, outputs: list[tuple[Any, Tensor]]) -> dict | None:
        """After training: settle what is chosen on validation outputs [(output, targets)] (AVE-CLIP: its
        post-processing), changing model.cfg; returns what was chosen, for the report (None: nothing to tune)."""
        return None

    def runtime_state(self, model: nn.Module) -> dict:
        """Plain attributes (not in the state dict) that evaluation needs, saved in the checkpoint."""
        return {}

    def restore_runtime_state(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        pass

    def load_weights(self, model: nn.Module, obj: Any) -> nn.Module:
        return strict_load(model, obj)

    def foreign_config(self, obj: Any):
        """The config of a checkpoint not written by this project (None: such checkpoints are not supported)."""
        return None

    def parameter_count(self, model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())


def strict_load(model: nn.Module, obj: Any) -> nn.Module:
    """Load a state dict (raw, or under 'state_dict') strictly; a mismatch is a ValueError naming the keys."""
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(state, Mapping):
        raise ValueError(f"no state dict in the checkpoint (got {type(state).__name__})")
    missing, unexpected = (sorted(set(model.state_dict()) - set(state)), sorted(set(state) - set(model.state_dict())))
    if missing or unexpected:
        raise ValueError(f"the weights do not fit the {type(model).__name__} config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"the weights do not fit the {type(model).__name__} config: {str(e).splitlines()[-1]}")
    return model


def list_localizers() -> list[str]:
    return list(_MODULES)


def get_family(name: str) -> LocalizerFamily:
    if name not in _MODULES:
        raise ValueError(f"unknown localizer {name!r}; known: {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name]).FAMILY


def create_localizer(name: str, **config: Any) -> nn.Module:
    family = get_family(name)
    return family.build(family.make_config(config))


def family_of(model: nn.Module) -> LocalizerFamily:
    for name in _MODULES:
        family = get_family(name)
        if isinstance(model, family.model_cls):
            return family
    raise ValueError(f"{type(model).__name__} is not a registered localizer ({', '.join(_MODULES)})")
