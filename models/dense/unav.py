"""The dense audio-visual event detector: UnAV-100's baseline (an ActionFormer-style multimodal temporal pyramid,
`shared/reference/dense-avel-spec.md` §3) with LoCo's LCF and LAC switchable on (`models.dense.loco`, our design).

Data path, per video, [B, C, T] tensors with a [B, 1, T] mask:
  embed (2 x masked conv k3 + LN + ReLU per modality) -> + sinusoidal position embedding (interpolated for long
  inputs) -> stem: self-attention blocks per modality -> [LCF modulation] -> one full-resolution cross-modal pair
  V0 = TB(V, A), A0 = TB(A, V) -> pyramid: V_{l+1} = TB_s2(V_l, A_l), A_{l+1} = TB_s2(A_l, V_l) -> F_l = [V_l; A_l]
  -> class-dependency block (temporal + class co-occurrence attention over C x H channels; replaces F_l) ->
  shared heads: class logits [B, T_l, C], class-aware offsets [B, T_l, C, 2] (in level strides).
With `lac`, the cross blocks producing levels 0..L-2 get LoCo's learned window (the coarsest level stays global).
Sizes come from `DenseModelConfig`: the paper's by default (139.5 M parameters at C = 100), `cpu_config()` for tests
and the demo. Nothing is sized for a maximum length: any T that is a multiple of the coarsest stride runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from models.dense.blocks import ChannelNorm, MaskedConv1d, TransformerBlock, position_embedding, sinusoid_table
from models.dense.loco import LocalAdaptiveBlock, LocalCorrespondence

# Regression ranges per level in grid steps (max(left, right) of a point inside an event), from the UnAV config.
REGRESSION_RANGES = ((0, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 10000))


@dataclass
class DenseModelConfig:
    visual_dim: int = 2048
    audio_dim: int = 128
    num_classes: int = 100
    embd_dim: int = 512
    n_head: int = 4
    arch: tuple[int, int, int] = (2, 3, 5)  # embedding convs, stem blocks + 1, pyramid (stride-2) levels
    head_dim: int = 512
    head_layers: int = 3
    dependency: bool = True
    dependency_dim: int = 128  # H: channels per class in the dependency block
    abs_pe: bool = True
    max_seq_len: int = 224
    drop_path: float = 0.1
    prior_prob: float = 0.01
    regression_ranges: tuple[tuple[float, float], ...] = REGRESSION_RANGES
    # LoCo (our design, see models.dense.loco)
    lcf: bool = False
    lcf_dim: int = 128
    lcf_tau: float = 0.1
    lcf_window: int = 2
    lcf_guard: int = 8
    lcf_modulation: str = "attend"
    lac: bool = False
    lac_r_max: float = 8.0
    lac_delta_max: float = 2.0
    absent_classes: list[int] = field(default_factory=list)  # classes with no training event: a near-zero prior

    def __post_init__(self) -> None:
        self.arch = tuple(int(a) for a in self.arch)
        self.regression_ranges = tuple(tuple(float(x) for x in r) for r in self.regression_ranges)
        if len(self.arch) != 3 or self.arch[0] < 1 or self.arch[1] < 1 or self.arch[2] < 0:
            raise ValueError(f"arch {self.arch}: (embedding convs >= 1, stem blocks + 1 >= 1, levels >= 0)")
        if len(self.regression_ranges) != self.levels:
            raise ValueError(f"{len(self.regression_ranges)} regression ranges for {self.levels} pyramid levels")
        if self.max_seq_len % self.max_stride:
            raise ValueError(f"max_seq_len {self.max_seq_len} is not a multiple of the coarsest stride "
                             f"{self.max_stride}")

    @property
    def levels(self) -> int:
        return self.arch[2] + 1

    @property
    def max_stride(self) -> int:
        return 2 ** self.arch[2]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DenseModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown dense model field(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**d)


def cpu_config(**overrides) -> DenseModelConfig:
    """The small size of spec §8 (embd 64, head 64, 4 heads, dependency H 16) for 2-core runs."""
    return DenseModelConfig(**{"embd_dim": 64, "head_dim": 64, "dependency_dim": 16, "drop_path": 0.0, **overrides})


class Embedding(nn.Module):
    def __init__(self, in_dim: int, dim: int, layers: int):
        super().__init__()
        # no bias before a LayerNorm (it would be removed by the norm's centring), as in the reference
        self.convs = nn.ModuleList(MaskedConv1d(in_dim if i == 0 else dim, dim, 3, padding=1, bias=False)
                                   for i in range(layers))
        self.norms = nn.ModuleList(ChannelNorm(dim) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(x.dtype)
        for conv, norm in zip(self.convs, self.norms):
            x, _ = conv(x, mask)
            x = torch.relu(norm(x)) * m
        return x


class DependencyBlock(nn.Module):
    """Temporal and class co-occurrence attention over C x H channels (UnAV's dependency block, §3.8)."""

    def __init__(self, in_dim: int, num_classes: int, h: int):
        super().__init__()
        self.c, self.h = num_classes, h
        self.expand = nn.Conv1d(in_dim, num_classes * h, 3, padding=1, bias=False)
        self.temporal = TransformerBlock(h, n_head=1, mlp_hidden=h)
        self.cooccurrence = TransformerBlock(h, n_head=1, mlp_hidden=h)
        self.reduce = nn.Conv1d(num_classes * h, in_dim, 3, padding=1, bias=False)

    def forward(self, f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, _, t = f.shape
        m = mask.to(f.dtype)
        e = torch.relu(self.expand(f)) * m  # [B, C*H, T]
        e = e.view(b, self.c, self.h, t)
        tm = mask.repeat_interleave(self.c, dim=0)  # [B*C, 1, T]
        temporal, _ = self.temporal(*(2 * [e.reshape(b * self.c, self.h, t)]), tm)
        tokens = e.permute(0, 3, 2, 1).reshape(b * t, self.h, self.c)  # the C classes as tokens, per step
        all_classes = torch.ones(b * t, 1, self.c, dtype=torch.bool, device=f.device)
        co, _ = self.cooccurrence(tokens, tokens, all_classes)
        co = co.view(b, t, self.h, self.c).permute(0, 3, 2, 1) * m[:, :, None, :]  # padded steps: zero
        o = temporal.view(b, self.c, self.h, t) + co
        return self.reduce(o.reshape(b, self.c * self.h, t)) * m


class Head(nn.Module):
    """(layers - 1) x (masked conv k3 + LN + ReLU), then a conv k3 to `out` channels; shared by all levels."""

    def __init__(self, in_dim: int, dim: int, layers: int, out: int):
        super().__init__()
        self.trunk = nn.ModuleList(MaskedConv1d(in_dim if i == 0 else dim, dim, 3, padding=1, bias=False)
                                   for i in range(layers - 1))
        self.norms = nn.ModuleList(ChannelNorm(dim) for _ in range(layers - 1))
        self.out = MaskedConv1d(dim if layers > 1 else in_dim, out, 3, padding=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(x.dtype)
        for conv, norm in zip(self.trunk, self.norms):
            x, _ = conv(x, mask)
            x = torch.relu(norm(x)) * m
        return self.out(x, mask)[0]


@dataclass
class DenseOutput:
    logits: list[torch.Tensor]  # per level [B, T_l, C]
    offsets: list[torch.Tensor]  # per level [B, T_l, C, 2], >= 0, in units of the level's stride
    masks: list[torch.Tensor]  # per level [B, T_l] bool
    lcf_loss: torch.Tensor | None = None


class DenseDetector(nn.Module):
    def __init__(self, cfg: DenseModelConfig):
        super().__init__()
        self.cfg = cfg
        d, n_emb, n_stem, n_pyr = cfg.embd_dim, cfg.arch[0], cfg.arch[1] - 1, cfg.arch[2]
        self.embed_v, self.embed_a = Embedding(cfg.visual_dim, d, n_emb), Embedding(cfg.audio_dim, d, n_emb)
        self.register_buffer("pe", sinusoid_table(cfg.max_seq_len, d) / math.sqrt(d), persistent=False)
        block = dict(n_head=cfg.n_head, drop_path=cfg.drop_path)
        self.stem_v = nn.ModuleList(TransformerBlock(d, **block) for _ in range(n_stem))
        self.stem_a = nn.ModuleList(TransformerBlock(d, **block) for _ in range(n_stem))
        self.lcf = (LocalCorrespondence(d, cfg.lcf_dim, cfg.lcf_tau, cfg.lcf_window, cfg.lcf_guard,
                                        cfg.lcf_modulation) if cfg.lcf else None)

        def cross(stride: int, level: int) -> TransformerBlock:
            if cfg.lac and level < cfg.levels - 1:  # the coarsest level stays global
                return LocalAdaptiveBlock(d, stride=stride, r_max=cfg.lac_r_max, delta_max=cfg.lac_delta_max,
                                          **block)
            return TransformerBlock(d, stride=stride, **block)

        self.cross_v = nn.ModuleList(cross(1 if i == 0 else 2, i) for i in range(n_pyr + 1))
        self.cross_a = nn.ModuleList(cross(1 if i == 0 else 2, i) for i in range(n_pyr + 1))
        fused = 2 * d
        self.dependency = DependencyBlock(fused, cfg.num_classes, cfg.dependency_dim) if cfg.dependency else None
        self.cls_head = Head(fused, cfg.head_dim, cfg.head_layers, cfg.num_classes)
        self.reg_head = Head(fused, cfg.head_dim, cfg.head_layers, 2 * cfg.num_classes)
        self.scales = nn.Parameter(torch.ones(cfg.levels))
        prior = -math.log((1 - cfg.prior_prob) / cfg.prior_prob)
        nn.init.constant_(self.cls_head.out.bias, prior)
        if cfg.absent_classes:
            with torch.no_grad():
                self.cls_head.out.bias[cfg.absent_classes] = -math.log((1 - 1e-6) / 1e-6)

    def padded_length(self, t: int) -> int:
        """Inference length of a T-step video: max(max_seq_len, the next multiple of the coarsest stride)."""
        s = self.cfg.max_stride
        return max(self.cfg.max_seq_len, -(-t // s) * s)

    def forward(self, visual: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor) -> DenseOutput:
        """visual [B, Dv, T], audio [B, Da, T], mask [B, 1, T] bool; T a multiple of the coarsest stride."""
        t = visual.shape[-1]
        if t % self.cfg.max_stride:
            raise ValueError(f"length {t} is not a multiple of the coarsest stride {self.cfg.max_stride}: pad it "
                             f"(DenseDetector.padded_length)")
        m = mask.to(visual.dtype)
        v, a = self.embed_v(visual, mask), self.embed_a(audio, mask)
        if self.cfg.abs_pe:
            pe = position_embedding(self.pe, t).to(v.dtype)[None]
            v, a = v + pe * m, a + pe * m
        for bv, ba in zip(self.stem_v, self.stem_a):
            v, _ = bv(v, v, mask)
            a, _ = ba(a, a, mask)
        lcf_loss = None
        if self.lcf is not None:
            v, a, lcf_loss = self.lcf(v, a, mask)
        feats, masks = [], []
        for bv, ba in zip(self.cross_v, self.cross_a):
            v_next, _ = bv(v, a, mask)  # both directions read the level-l streams
            a_next, mask = ba(a, v, mask)
            v, a = v_next, a_next
            feats.append(torch.cat([v, a], dim=1))
            masks.append(mask)
        logits, offsets = [], []
        for level, (f, lm) in enumerate(zip(feats, masks)):
            if self.dependency is not None:
                f = self.dependency(f, lm)
            logits.append(self.cls_head(f, lm).transpose(1, 2))
            reg = torch.relu(self.scales[level] * self.reg_head(f, lm))  # [B, 2C, T_l]
            b, _, tl = reg.shape
            offsets.append(reg.view(b, self.cfg.num_classes, 2, tl).permute(0, 3, 1, 2))
        return DenseOutput(logits, offsets, [lm[:, 0] for lm in masks], lcf_loss)
