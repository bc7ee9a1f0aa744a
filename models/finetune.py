"""Targeted fine-tuning modules (spec §5): a trainable ResNet-50 trunk, two bias-free projection heads, a temperature.

The reference (AVELCLIP `clip/model.py`) pairs a video-level visual embedding (the encoder's layer4 output,
averaged over one frame per second and pooled) with the video's mean audio embedding, projects both with a
bias-free Linear to a shared space, L2-normalises, and compares them with logits = I_f . A_f^T / T. The paper's
version uses ResNet-50 (`Sequential(children[:-2])`) and frozen Cnn14 embeddings; the audio encoder is not here at
all, its embeddings come in precomputed.

No file I/O and no literal feature sizes: the trunk comes in built (and loaded) by the caller, the dims are
arguments. Stages that do not train are frozen (requires_grad False), run without autograd when nothing before
them trains, and keep their BatchNorm layers in eval mode (running statistics untouched).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The trunk's parts that can train (the parameter-free relu / maxpool follow their neighbours).
RESNET_STAGES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
TRUNK_CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
MAX_LOGIT_SCALE = 100.0  # as CLIP: a learnable temperature may not go below 0.01


def resolve_stages(trainable: str | Sequence[str]) -> tuple[str, ...]:
    """"all" or a list of names among RESNET_STAGES -> the tuple of trainable stage names (ValueError otherwise)."""
    if isinstance(trainable, str):
        if trainable != "all":
            raise ValueError(f"trainable stages must be 'all' or a list of names among {', '.join(RESNET_STAGES)}, "
                             f"got {trainable!r}")
        return RESNET_STAGES
    names = list(trainable)
    unknown = [n for n in names if n not in RESNET_STAGES]
    if unknown:
        raise ValueError(f"unknown ResNet-50 stage(s) {unknown}; known: {', '.join(RESNET_STAGES)} (or 'all')")
    if not names:
        raise ValueError("no trainable stage: training the projection heads alone leaves the encoder unchanged; "
                         "name at least one of " + ", ".join(RESNET_STAGES))
    return tuple(n for n in RESNET_STAGES if n in names)


def resnet_trunk(resnet: nn.Module) -> nn.Sequential:
    """A torchvision ResNet's children up to layer4, named as torchvision names them (so the trunk's state dict keys
    are torchvision's, without fc.*). Shares the modules (and parameters) with `resnet`."""
    missing = [n for n in TRUNK_CHILDREN if not hasattr(resnet, n)]
    if missing:
        raise ValueError(f"not a torchvision ResNet: no {', '.join(missing)}")
    return nn.Sequential(OrderedDict((n, getattr(resnet, n)) for n in TRUNK_CHILDREN))


def reference_trunk(trunk: nn.Sequential) -> nn.Sequential:
    """The same modules as `nn.Sequential(*resnet.children()[:-2])`: the reference's `I_state_dict` numbering
    (0 = conv1, 1 = bn1, 4..7 = layer1..layer4)."""
    return nn.Sequential(*trunk.children())


class ProjectionHead(nn.Module):
    """Linear without bias to the shared space, then L2 normalisation (the reference's alignment_I / alignment_A).

    `norm` (our design, not the reference's): a BatchNorm1d without affine parameters before the Linear. Embeddings
    of random encoders share one large common component (cosine ~0.998 between videos); centring and scaling each
    dimension over the batch leaves what differs between videos for the projection to align. In eval mode it uses
    its running statistics, so retrieval scores each video on its own."""

    def __init__(self, in_dim: int, out_dim: int, norm: bool = False):
        super().__init__()
        # momentum None: running statistics are the average over every training batch. With the default 0.1 the
        # running mean kept ~20 % of its zero start after 16 steps, which against a common component ~100x larger
        # than what differs between videos left eval-mode embeddings almost constant (held-out recall at chance)
        self.norm = nn.BatchNorm1d(in_dim, affine=False, momentum=None) if norm else None
        self.proj = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.norm is not None:
            x = self.norm(x.float()).to(self.proj.weight.dtype)  # statistics in float32 under autocast too
        return F.normalize(self.proj(x), dim=-1)


class AudioVisualContrastive(nn.Module):
    """Trainable ResNet-50 trunk + projection heads + temperature.

    forward(frames [B,F,3,h,w] normalised, audio_emb [B,audio_dim]) -> (v_emb [B,E], a_emb [B,E], logit_scale)
    with v_emb / a_emb L2-normalised and logit_scale = 1 / temperature (a 0-dim tensor; it carries a gradient when
    the temperature is learnable). The visual embedding is the trunk's layer4 map, average-pooled over space and
    averaged over the F frames (pooling and the frame mean commute: the reference averages the maps first).
    """

    def __init__(self, resnet: nn.Module, visual_dim: int, audio_dim: int, embed_dim: int = 128,
                 temperature: float = 0.2, learnable_temperature: bool = False,
                 trainable_stages: str | Sequence[str] = "all", head_norm: bool = False):
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be positive, got {temperature}")
        for name, dim in (("visual_dim", visual_dim), ("audio_dim", audio_dim), ("embed_dim", embed_dim)):
            if dim < 1:
                raise ValueError(f"{name} must be >= 1, got {dim}")
        self.trunk = resnet_trunk(resnet)
        self.visual_head = ProjectionHead(visual_dim, embed_dim, norm=head_norm)
        self.audio_head = ProjectionHead(audio_dim, embed_dim, norm=head_norm)
        log_t = torch.tensor(math.log(temperature), dtype=torch.float32)
        if learnable_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)
        self.trainable_stages = resolve_stages(trainable_stages)
        for name in RESNET_STAGES:
            getattr(self.trunk, name).requires_grad_(name in self.trainable_stages)
        # the first trunk child that trains: everything before it runs without autograd
        self._first_trainable = min(TRUNK_CHILDREN.index(n) for n in self.trainable_stages)
        self.channels_last = False  # set True (and convert the trunk) for NHWC convolutions (the stage does)
        self.train()

    # ---- modes --------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "AudioVisualContrastive":
        super().train(mode)
        for name in RESNET_STAGES:  # frozen stages keep their BatchNorm statistics
            if name not in self.trainable_stages:
                getattr(self.trunk, name).eval()
        return self

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        """Trunk and head parameters that train (not the temperature: it gets no weight decay)."""
        return [p for n, p in self.named_parameters() if p.requires_grad and n != "log_temperature"]

    @property
    def temperature(self) -> Tensor:
        return 1.0 / self.logit_scale()

    def logit_scale(self) -> Tensor:
        return torch.exp(-self.log_temperature).clamp(max=MAX_LOGIT_SCALE)

    # ---- forward ------------------------------------------------------------------------------------------------
    def visual_features(self, frames: Tensor) -> Tensor:
        """[B,F,3,h,w] -> [B,visual_dim]: pooled layer4 output, mean over the F frames."""
        if frames.ndim != 5:
            raise ValueError(f"frames must be [B,F,3,h,w], got {tuple(frames.shape)}")
        b, f = frames.shape[:2]
        x = frames.flatten(0, 1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        grad = torch.is_grad_enabled()
        for i, child in enumerate(self.trunk):
            with torch.set_grad_enabled(grad and i >= self._first_trainable):
                x = child(x)
        x = x.mean(dim=(2, 3))  # AdaptiveAvgPool2d(1)
        return x.reshape(b, f, -1).mean(dim=1)

    def forward(self, frames: Tensor, audio_emb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        v = self.visual_head(self.visual_features(frames))
        a = self.audio_head(audio_emb.to(self.audio_head.proj.weight.dtype))  # float64 audio meets a float32 Linear
        return v, a, self.logit_scale()
