"""AVE-CLIP's multi-window temporal transformer (WACV 2023), as a localizer on the project's features.

Only the paper's abstract and introduction could be read and no code is public
(``shared/reference/ave-clip-spec.md``). What the paper states [V]: fusion by a multi-window temporal
transformer (short windows for sharp changes at event transitions, long windows for global context), attention
over the temporal and the feature domain at each scale, event-guided temporal refining (inspired by joint binary
event/background plus multi-class prediction), a post-processing step that removes wrong predictions between event
transitions, and multi-scale training.

EVERYTHING BELOW THAT LEVEL IS OUR DESIGN [G], a concrete reading of those sentences (spec §§4-7), not the
paper's method:
- projection ``Linear(D -> d) + LayerNorm`` per modality and a learnable position embedding (linearly interpolated
  when a video has another number of segments than ``max_segments``); ResNet-50 maps ``[B, T, H, W, D]`` are
  spatially averaged first (AudioCLIP gives one global image vector, so the mean of the 7x7 map is the faithful
  analogue);
- where the modalities meet (``fusion``), see "Cross-modal windows" below: ``cross`` (the default) keeps the two
  projected streams apart until the windows and fuses them there by cross-modal attention; ``concat`` (``W [v; a]``)
  and ``concat_product`` (``W [v; a; v * a]``) fuse them before the windows, as the model did first (kept for the
  ablation; their parameters and outputs are what they were, so their checkpoints still load);
- window sizes ``(2, 5, 10)``, non-overlapping by default (``window_stride`` smaller than the window gives
  overlapping windows whose outputs are averaged per step); a window larger than the video is cut to the video,
  and the last window of a video whose length the stride does not divide is zero-padded and its padded steps
  MASKED (the spec suggests edge padding; masking keeps copied steps from voting twice);
- the multi-domain block: temporal multi-head self-attention over the window's steps, then feature-domain
  attention as transposed ("cross-covariance") attention over channels, whose tokens are each channel's temporal
  profile in the window (queries and keys L2-normalised along time, as in XCiT, with a learnable temperature per
  head), then an MLP; each with a residual and post-LayerNorm; its own weights per window size;
- fusion of the window branches by softmax-weighted sum (option: concatenation and a linear layer);
- refining: an event head ``e = sigmoid(MLP(h))`` supervised by BCE, and one attention layer whose logits get
  ``lambda * log(e_s + eps)`` on the keys (lambda learnable, 1 at the start), residual with ``h``, then
  ``r * (1 + e)``;
- heads: a (C + 1)-way segment classifier on ``r``, and one per window branch for the multi-scale auxiliary losses
  (weight ``0.5 / |windows|`` each); total loss ``CE + event_loss_weight * BCE + aux``;
- multi-scale training ``joint`` (all at once, the default), ``staged`` (the branches with their auxiliary heads
  first, then the fusion, refining and heads on detached branch outputs) or ``none`` (no auxiliary losses);
- the decision per second: the classifier's argmax (default) or the event head (``decision: event_head``, the
  class then from the classifier's event classes);
- post-processing (``postprocess``): class unification (one class per video: AVE's annotation gives each video
  one category), gap filling (background runs of at most ``max_gap`` seconds between event seconds become event),
  island removal (event runs shorter than ``min_run`` become background) and optionally one run per video.

Cross-modal windows (``fusion: cross``), OUR DESIGN [G], not the paper's published method. The paper calls the
multi-window transformer itself the audio-visual fusion; the early ``W [v; a]`` put the fusion before it, and on
features where an event second needs the class's picture AND its sound (background: one without the other, or
another class's) it fell far behind CACE (69.3 +- 5.9 vs 81.8 +- 5.0 % test accuracy, issue 29). So here each
window branch fuses:
- both streams get the same position embedding (a shared code for "the same second" helps a query find its own
  step in the other modality) and are cut into the branch's windows exactly as the self-attention's input is
  (same ``window_layout``, same stride, the same padded steps masked as keys);
- in each window, two multi-head cross-attentions: queries from the visual steps with keys and values from the
  audio steps, and queries from the audio steps with keys and values from the visual steps; each with a residual
  and a post-LayerNorm, giving a visual stream that has heard the window and an audio stream that has seen it;
- the two directions are combined per step by ``cross_combine``: ``concat_product`` (default) is
  ``Linear([v'; a'; v' * a'])``; ``concat`` drops the product, ``sum`` is ``v' + a'``. Why a product: an event is
  "picture of c AND sound of c"; a sum or a linear map of a concatenation is linear in each stream, so "both
  present" is representable only after the MLP's non-linearity, while the element-wise product of the two
  attended streams holds the bilinear agreement term directly (through the residuals it contains the same-second
  product ``v_t * a_t`` as well as the product with what each attended to in the window);
- the combined window tokens then go through the branch's multi-domain blocks as before, and the branch output
  feeds the window fusion, refining and heads unchanged.
Measured (issue 29; ``pipeline.ave.synth_features``, 4 classes, tiny models d_model 16, 30 epochs, seeds 1-3,
test accuracy %, mean +- std): with 200 videos at noise 0.6, CACE 83.5 +- 0.7, cross 85.5 +- 2.4 (combine ``sum``
85.3 +- 0.9, ``concat`` 85.0 +- 0.9), early ``concat`` 85.6 +- 1.0, ``concat_product`` 84.2 +- 1.1; with 80 videos
the same order within the seeds' spread. So on these features the cross-modal windows match the early fusions (and
CACE) but do not beat them, and the product in ``cross_combine`` is not measurably better than ``sum`` or
``concat``: it stays the default for the argument above, not for a measured gain. Neither modality is ignored: with
the audio replaced by matched noise the cross model drops from 80.4 +- 4.4 to 70.2 +- 3.2, with the visual replaced
to 66.2 +- 4.1 (80 videos, noise 0.6). ``cross`` is the default because it is where the paper puts the fusion and
it is never worse here; the early-fusion gap of issue 29 came from other features, where this should be re-run.

Everything runs batch-first ``[B, T, d]`` on any number of segments T >= 1.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .cace import Dropout
from .registry import LocalizerFamily, SegmentPrediction, strict_load

__all__ = ["AVECLIPConfig", "PostProcessConfig", "AVECLIPOutput", "AVECLIP", "aveclip_loss", "postprocess",
           "window_layout", "FAMILY"]


@dataclass
class PostProcessConfig:
    """The post-processing of spec §7 [G]; each step can be switched off."""

    enabled: bool = True
    unify_class: bool = True
    max_gap: int = 1  # background runs of at most this many seconds, with event seconds on both sides, become event
    min_run: int = 1  # event runs shorter than this become background (1: off)
    single_run: bool = False  # keep only the event run with the highest summed event probability
    # After training, choose enabled / unify_class / max_gap / min_run on the validation split (spec §7: never on
    # test), the weakest setting winning ties; False: use the values above as they are.
    select_on_val: bool = True

    def __post_init__(self) -> None:
        if self.max_gap < 0 or self.min_run < 1:
            raise ValueError(f"postprocess: max_gap must be >= 0 and min_run >= 1, got {self.max_gap}, "
                             f"{self.min_run}")


@dataclass
class AVECLIPConfig:
    """Every hyper-parameter of the AVE-CLIP localizer; defaults = spec §§4-8 [G]. Dims come from the features."""

    video_dim: int = 2048
    audio_dim: int = 2048
    num_classes: int = 28  # event classes; background index = num_classes
    d_model: int = 256
    num_heads: int = 4
    feature_heads: int = 4  # heads of the feature-domain (channel) attention
    ff_mult: int = 4
    dropout: float = 0.1
    depth: int = 1  # multi-domain blocks per window size
    max_segments: int = 10  # length of the learnable position embedding (interpolated for other T)
    # where the modalities meet: "cross" = cross-modal attention inside each window (our design, see the module
    # docstring); "concat" / "concat_product" = one linear layer before the windows (the first design, kept as is)
    fusion: Literal["cross", "concat", "concat_product"] = "cross"
    cross_combine: Literal["concat_product", "concat", "sum"] = "concat_product"  # fusion cross: the two directions
    window_sizes: tuple[int, ...] = (2, 5, 10)
    window_stride: Optional[int] = None  # None: = each window size (non-overlapping)
    feature_attention: Literal["xca", "se", "none"] = "xca"
    window_fusion: Literal["weighted", "concat"] = "weighted"
    refine: bool = True  # event-guided temporal refining
    event_loss_weight: float = 1.0  # alpha of L = CE + alpha * BCE + aux
    aux_loss_weight: float = 0.5  # shared by the window branches: each gets aux_loss_weight / len(window_sizes)
    multiscale: Literal["joint", "staged", "none"] = "joint"
    staged_fraction: float = 0.5  # staged: the share of the epochs that trains the branches alone
    decision: Literal["classifier", "event_head"] = "classifier"
    postprocess: PostProcessConfig = field(default_factory=PostProcessConfig)

    def __post_init__(self) -> None:
        if isinstance(self.postprocess, Mapping):
            self.postprocess = PostProcessConfig(**self.postprocess)
        self.window_sizes = tuple(int(w) for w in self.window_sizes)
        for name in ("video_dim", "audio_dim", "num_classes", "d_model", "num_heads", "feature_heads", "ff_mult",
                     "depth", "max_segments"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"AVECLIPConfig.{name} must be a positive int, got {value!r}")
        if not self.window_sizes or min(self.window_sizes) < 1:
            raise ValueError(f"window_sizes must be one or more positive ints, got {list(self.window_sizes)}")
        if len(set(self.window_sizes)) != len(self.window_sizes):
            raise ValueError(f"window_sizes repeat a size: {list(self.window_sizes)}")
        if self.window_stride is not None and self.window_stride < 1:
            raise ValueError(f"window_stride must be >= 1 or null, got {self.window_stride}")
        for heads in ("num_heads", "feature_heads"):
            if self.d_model % getattr(self, heads):
                raise ValueError(f"d_model={self.d_model} must be divisible by {heads}={getattr(self, heads)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.staged_fraction < 1.0:
            raise ValueError(f"staged_fraction must be in (0, 1), got {self.staged_fraction}")
        for name, allowed in (("fusion", ("cross", "concat", "concat_product")),
                              ("cross_combine", ("concat_product", "concat", "sum")),
                              ("feature_attention", ("xca", "se", "none")),
                              ("window_fusion", ("weighted", "concat")), ("multiscale", ("joint", "staged", "none")),
                              ("decision", ("classifier", "event_head"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    @property
    def background_index(self) -> int:
        return self.num_classes

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AVECLIPConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown AVECLIPConfig fields {unknown}; valid fields: {sorted(known)}")
        d = dict(d)
        if isinstance(d.get("postprocess"), Mapping):
            pp_known = {f.name for f in dataclasses.fields(PostProcessConfig)}
            pp_unknown = sorted(set(d["postprocess"]) - pp_known)
            if pp_unknown:
                raise ValueError(f"unknown postprocess fields {pp_unknown}; valid fields: {sorted(pp_known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["window_sizes"] = list(self.window_sizes)
        return d


class AVECLIPOutput(NamedTuple):
    class_logits: Tensor  # [B, T, C+1] segment classifier on the refined features
    event_logits: Tensor  # [B, T] event head (logit of e_t)
    branch_logits: Tensor  # [W, B, T, C+1] auxiliary classifier per window branch (W = 0 when multiscale none)


# ---- windows ------------------------------------------------------------------------------------------------------
def window_layout(T: int, size: int, stride: int) -> tuple[Tensor, Tensor]:
    """Windows covering T steps: index [n, w] of each window's steps and valid [n, w] (False for padded steps).

    The window is cut to T when larger; windows start every `stride` steps, and one more window is added when the
    last would not reach the end, so that every step is covered."""
    w = min(size, T)
    s = min(stride, w)
    starts = list(range(0, T - w + 1, s))
    if starts[-1] + w < T:
        starts.append(starts[-1] + s)
    idx = torch.tensor(starts)[:, None] + torch.arange(w)[None, :]
    return idx.clamp(max=T - 1), idx < T


class TemporalAttention(nn.Module):
    """Multi-head self-attention over the steps of each window (padded steps masked as keys)."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:  # x [N, w, d], valid [N, w]
        N, w, d = x.shape
        q, k, v = self.qkv(x).view(N, w, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)  # [N, h, w, w]
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
        out = self.drop(logits.softmax(-1)) @ v
        return self.proj(out.transpose(1, 2).reshape(N, w, d))


class CrossAttention(nn.Module):
    """Multi-head attention of one modality's window steps (queries) over the other's (keys, values; padded steps
    masked as keys), as TemporalAttention does within one modality."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor, other: Tensor, valid: Tensor) -> Tensor:  # x, other [N, w, d], valid [N, w]
        N, w, d = x.shape
        q = self.q(x).view(N, w, self.heads, d // self.heads).transpose(1, 2)  # [N, h, w, d/h]
        k, v = self.kv(other).view(N, w, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)  # [N, h, w, w]
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
        out = self.drop(logits.softmax(-1)) @ v
        return self.proj(out.transpose(1, 2).reshape(N, w, d))


class CrossModalWindow(nn.Module):
    """Both directions of cross-modal attention in a window, combined into one token per step [G] (module
    docstring, "Cross-modal windows")."""

    def __init__(self, cfg: AVECLIPConfig):
        super().__init__()
        d = cfg.d_model
        self.combine_mode = cfg.cross_combine
        self.visual_from_audio = CrossAttention(d, cfg.num_heads, cfg.dropout)
        self.audio_from_visual = CrossAttention(d, cfg.num_heads, cfg.dropout)
        self.norm_v, self.norm_a = nn.LayerNorm(d), nn.LayerNorm(d)
        parts = {"concat_product": 3, "concat": 2, "sum": 0}[cfg.cross_combine]
        self.combine = nn.Linear(parts * d, d) if parts else None
        self.drop = Dropout(cfg.dropout)

    def forward(self, v: Tensor, a: Tensor, valid: Tensor) -> Tensor:  # [N, w, d] each -> [N, w, d]
        v2 = self.norm_v(v + self.drop(self.visual_from_audio(v, a, valid)))
        a2 = self.norm_a(a + self.drop(self.audio_from_visual(a, v, valid)))
        if self.combine_mode == "sum":
            return v2 + a2
        parts = [v2, a2, v2 * a2] if self.combine_mode == "concat_product" else [v2, a2]
        return self.combine(torch.cat(parts, -1))


class FeatureAttention(nn.Module):
    """Transposed attention over channels [G]: per head, a (d/h x d/h) map between the channels' temporal profiles
    in the window, A = softmax(q^T k / tau) with q, k L2-normalised along time; output v A."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.log_tau = nn.Parameter(torch.zeros(heads))  # tau = exp(log_tau), 1 at the start
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        N, w, d = x.shape
        qkv = self.qkv(x) * valid[..., None].to(x.dtype)  # padded steps add nothing to any profile
        q, k, v = qkv.view(N, w, 3, self.heads, d // self.heads).permute(2, 0, 3, 4, 1)  # [N, h, d/h, w]
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-1, -2)) / self.log_tau.exp()[None, :, None, None]  # [N, h, d/h, d/h]
        out = self.drop(attn.softmax(-1)) @ v  # [N, h, d/h, w]
        return self.proj(out.permute(0, 3, 1, 2).reshape(N, w, d))


class SqueezeExcite(nn.Module):
    """The cheaper feature-domain option: channel gates from the window's mean over its valid steps."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(d, max(d // 4, 1)), nn.GELU(), nn.Linear(max(d // 4, 1), d), nn.Sigmoid())

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        m = valid[..., None].to(x.dtype)
        mean = (x * m).sum(1) / m.sum(1).clamp(min=1)
        return x * self.gate(mean)[:, None, :]


class MultiDomainBlock(nn.Module):
    """Temporal attention, feature-domain attention, MLP; each with a residual and a post-LayerNorm."""

    def __init__(self, cfg: AVECLIPConfig):
        super().__init__()
        d = cfg.d_model
        self.temporal = TemporalAttention(d, cfg.num_heads, cfg.dropout)
        self.norm_t = nn.LayerNorm(d)
        feature = {"xca": FeatureAttention, "se": SqueezeExcite}.get(cfg.feature_attention)
        self.feature = feature(d, cfg.feature_heads, cfg.dropout) if feature else None
        self.norm_f = nn.LayerNorm(d) if feature else None
        self.mlp = nn.Sequential(nn.Linear(d, cfg.ff_mult * d), nn.GELU(), Dropout(cfg.dropout),
                                 nn.Linear(cfg.ff_mult * d, d))
        self.norm_m = nn.LayerNorm(d)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        x = self.norm_t(x + self.drop(self.temporal(x, valid)))
        if self.feature is not None:
            x = self.norm_f(x + self.drop(self.feature(x, valid)))
        return self.norm_m(x + self.drop(self.mlp(x)))


class WindowBranch(nn.Module):
    """One time scale: the sequence cut into windows, the blocks applied in each, the outputs put back in place
    (averaged where windows overlap). With ``fusion: cross`` it takes both streams and fuses them in each window
    first (CrossModalWindow); otherwise the one early-fused stream."""

    def __init__(self, cfg: AVECLIPConfig, size: int):
        super().__init__()
        self.size = size
        self.stride = cfg.window_stride or size
        self.cross = CrossModalWindow(cfg) if cfg.fusion == "cross" else None
        self.blocks = nn.ModuleList(MultiDomainBlock(cfg) for _ in range(cfg.depth))

    def forward(self, x: Tensor, audio: Optional[Tensor] = None) -> Tensor:  # [B, T, d] (x2 when cross) -> [B, T, d]
        if (self.cross is None) != (audio is None):
            raise ValueError("a cross-modal window branch takes the visual and the audio stream; an early-fused one "
                             "takes the fused stream alone")
        B, T, d = x.shape
        idx, valid = window_layout(T, self.size, self.stride)
        idx, valid = idx.to(x.device), valid.to(x.device)
        n, w = idx.shape
        y = x[:, idx.flatten()].reshape(B * n, w, d)
        mask = valid[None].expand(B, n, w).reshape(B * n, w)
        if self.cross is not None:
            y = self.cross(y, audio[:, idx.flatten()].reshape(B * n, w, d), mask)
        for block in self.blocks:
            y = block(y, mask)
        y = y.reshape(B, n * w, d) * valid.flatten()[None, :, None].to(y.dtype)
        out = y.new_zeros(B, T, d).index_add_(1, idx.flatten(), y)  # y: bf16 under autocast when cross-fused
        count = torch.zeros(T, dtype=y.dtype, device=x.device).index_add_(0, idx.flatten(),
                                                                            valid.flatten().to(y.dtype))
        return out / count[None, :, None]


class EventGuidedRefining(nn.Module):
    """Attention whose keys are weighted by the event head's probability (logits + lambda * log(e_s + eps)), a
    residual with h, then r * (1 + e)."""

    EPS = 1e-4

    def __init__(self, d: int):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.lam = nn.Parameter(torch.ones(()))

    def forward(self, h: Tensor, e: Tensor) -> Tensor:  # h [B, T, d], e [B, T] in (0, 1)
        logits = self.q(h) @ self.k(h).transpose(1, 2) / math.sqrt(h.shape[-1])
        logits = logits + self.lam * torch.log(e + self.EPS)[:, None, :]
        r = h + logits.softmax(-1) @ self.v(h)
        return r * (1 + e)[..., None]


class AVECLIP(nn.Module):
    """The multi-window temporal transformer localizer: visual [B, T, D] or maps [B, T, H, W, D], audio [B, T, D]."""

    def __init__(self, cfg: Optional[AVECLIPConfig] = None):
        super().__init__()
        cfg = cfg if cfg is not None else AVECLIPConfig()
        self.cfg = cfg
        d, out = cfg.d_model, cfg.num_classes + 1
        self.stage = "all"  # multiscale staged: "branches" first, then "fusion" (set by the family per epoch)
        self.v_proj = nn.Sequential(nn.Linear(cfg.video_dim, d), nn.LayerNorm(d))
        self.a_proj = nn.Sequential(nn.Linear(cfg.audio_dim, d), nn.LayerNorm(d))
        if cfg.fusion != "cross":  # early fusion: one linear layer before the windows
            self.fuse = nn.Linear((3 if cfg.fusion == "concat_product" else 2) * d, d)
        self.pos = nn.Parameter(torch.randn(cfg.max_segments, d) * 0.02)
        self.input_drop = Dropout(cfg.dropout)
        self.branches = nn.ModuleList(WindowBranch(cfg, w) for w in cfg.window_sizes)
        W = len(cfg.window_sizes)
        if cfg.window_fusion == "weighted":
            self.branch_weights = nn.Parameter(torch.zeros(W))
        else:
            self.branch_mix = nn.Linear(W * d, d)
        self.branch_heads = nn.ModuleList(nn.Linear(d, out) for _ in range(W)) if cfg.multiscale != "none" else None
        self.event_head = nn.Sequential(nn.Linear(d, d // 2), nn.GELU(), nn.Linear(d // 2, 1))
        self.refining = EventGuidedRefining(d) if cfg.refine else None
        self.classifier = nn.Linear(d, out)

    def _inputs(self, visual: Tensor, audio: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        if not (isinstance(visual, Tensor) and isinstance(audio, Tensor)):
            raise ValueError("visual and audio features must be torch tensors")
        if visual.dim() == 5:  # ResNet-50 maps: the spatial mean is AudioCLIP's global image vector's analogue
            visual = visual.flatten(2, 3).mean(2)
        if visual.dim() != 3 or audio.dim() != 3:
            raise ValueError(f"visual features must be [B, T, D] or [B, T, H, W, D] and audio [B, T, D], got "
                             f"{tuple(visual.shape)} and {tuple(audio.shape)}")
        if visual.shape[-1] != cfg.video_dim or audio.shape[-1] != cfg.audio_dim:
            raise ValueError(f"features have {visual.shape[-1]} visual and {audio.shape[-1]} audio channels but "
                             f"the model was configured with video_dim={cfg.video_dim}, audio_dim={cfg.audio_dim}")
        if visual.shape[:2] != audio.shape[:2] or visual.shape[1] < 1:
            raise ValueError(f"visual [B, T] = {tuple(visual.shape[:2])} and audio [B, T] = "
                             f"{tuple(audio.shape[:2])} must match and T >= 1")
        dtype = self.classifier.weight.dtype
        return visual.to(dtype), audio.to(dtype)

    def _position(self, T: int) -> Tensor:
        if T == self.pos.shape[0]:
            return self.pos
        return F.interpolate(self.pos.T[None], size=T, mode="linear", align_corners=True)[0].T

    def forward(self, visual: Tensor, audio: Tensor) -> AVECLIPOutput:
        cfg = self.cfg
        visual, audio = self._inputs(visual, audio)
        v, a = self.v_proj(visual), self.a_proj(audio)
        pos = self._position(v.shape[1])
        if cfg.fusion == "cross":  # each stream its own until the windows, which fuse them
            x, a = self.input_drop(v + pos), self.input_drop(a + pos)
            hs = [branch(x, a) for branch in self.branches]  # one [B, T, d] per window size
        else:
            parts = [v, a, v * a] if cfg.fusion == "concat_product" else [v, a]
            x = self.input_drop(self.fuse(torch.cat(parts, -1)) + pos)
            hs = [branch(x) for branch in self.branches]
        branch_logits = (torch.stack([head(h) for head, h in zip(self.branch_heads, hs)]) if self.branch_heads
                         else x.new_zeros(0, *x.shape[:2], cfg.num_classes + 1))
        if self.stage == "fusion":  # staged multi-scale training, second part: the branches are fixed
            hs = [h.detach() for h in hs]
        if cfg.window_fusion == "weighted":
            h = torch.einsum("w,wbtd->btd", self.branch_weights.softmax(0), torch.stack(hs))
        else:
            h = self.branch_mix(torch.cat(hs, -1))
        event_logits = self.event_head(h).squeeze(-1)
        r = self.refining(h, torch.sigmoid(event_logits)) if self.refining is not None else h
        return AVECLIPOutput(self.classifier(r), event_logits, branch_logits)


# ---- loss ---------------------------------------------------------------------------------------------------------
def aveclip_loss(out: AVECLIPOutput, labels: Tensor, cfg: AVECLIPConfig,
                 stage: str = "all") -> tuple[Tensor, dict[str, Tensor]]:
    """CE on the (C+1)-way segment labels + alpha * BCE of the event head + the branches' auxiliary CEs.

    labels: one-hot [B, T, C+1] (background last). Stage "branches" (staged multi-scale training) trains only the
    auxiliary terms."""
    C1 = out.class_logits.shape[-1]
    if labels.shape != out.class_logits.shape:
        raise ValueError(f"labels must be one-hot [B, T, C+1] = {tuple(out.class_logits.shape)}, got "
                         f"{tuple(labels.shape)}")
    y = labels.argmax(-1)  # [B, T], background = C
    is_event = (y != C1 - 1).to(out.event_logits.dtype)
    terms = {"segment": F.cross_entropy(out.class_logits.reshape(-1, C1), y.reshape(-1)),
             "event": F.binary_cross_entropy_with_logits(out.event_logits, is_event)}
    W = out.branch_logits.shape[0]
    aux = sum((F.cross_entropy(bl.reshape(-1, C1), y.reshape(-1)) for bl in out.branch_logits),
              out.class_logits.new_zeros(()))
    terms["aux"] = aux / max(W, 1)
    weighted_aux = cfg.aux_loss_weight * terms["aux"]  # = sum over branches of (aux_loss_weight / W) * CE_w
    if stage == "branches":
        return weighted_aux, terms
    return terms["segment"] + cfg.event_loss_weight * terms["event"] + weighted_aux, terms


# ---- decisions and post-processing --------------------------------------------------------------------------------
def _runs(mask: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    runs, start = [], None
    for t, m in enumerate([*mask, False]):
        if m and start is None:
            start = t
        elif not m and start is not None:
            runs.append((start, t))
            start = None
    return runs


def postprocess(labels: Tensor, probs: Tensor, event_prob: Tensor, cfg: PostProcessConfig) -> Tensor:
    """Spec §7 [G] on each video's predicted labels [B, T] (background = C), with the segment class probabilities
    [B, T, C+1] and the event probability [B, T]. Returns new labels; the inputs are not changed."""
    if not cfg.enabled:
        return labels.clone()
    C = probs.shape[-1] - 1
    out = labels.clone().cpu()
    probs, event_prob = probs.float().cpu(), event_prob.float().cpu()
    for b in range(out.shape[0]):
        lab = out[b]
        event = lab != C
        if cfg.unify_class and event.any():  # one category per AVE video
            lab[event] = int(probs[b, event, :C].mean(0).argmax())
        for s, e in _runs((lab == C).tolist()):  # gap filling: short background runs inside an event
            if 0 < s and e < len(lab) and e - s <= cfg.max_gap:
                left, right = int(lab[s - 1]), int(lab[e])
                lab[s:e] = left if left == right or cfg.unify_class else (
                    left if probs[b, s:e, left].sum() >= probs[b, s:e, right].sum() else right)
        for s, e in _runs((lab != C).tolist()):  # island removal
            if e - s < cfg.min_run:
                lab[s:e] = C
        if cfg.single_run:
            runs = _runs((lab != C).tolist())
            if len(runs) > 1:
                keep = max(runs, key=lambda r: float(event_prob[b, r[0]:r[1]].sum()))
                for s, e in runs:
                    if (s, e) != keep:
                        lab[s:e] = C
    return out.to(labels.device)


def postprocess_grid(base: PostProcessConfig) -> list[PostProcessConfig]:
    """The settings validation chooses from, weakest first (so that a tie keeps the predictions as they are)."""
    grid = [dataclasses.replace(base, enabled=False)]
    for max_gap, min_run, unify in itertools.product((0, 1, 2), (1, 2), (False, True)):
        if max_gap or min_run > 1 or unify:
            grid.append(dataclasses.replace(base, enabled=True, unify_class=unify, max_gap=max_gap,
                                            min_run=min_run))
    return grid


def select_postprocess(raw: Tensor, probs: Tensor, event_prob: Tensor, targets: Tensor,
                       base: PostProcessConfig) -> tuple[PostProcessConfig, list[dict]]:
    """The grid setting with the best segment accuracy on (validation) predictions; ties: the weakest."""
    table, best, best_acc = [], None, -1.0
    for cfg in postprocess_grid(base):
        acc = 100.0 * float((postprocess(raw, probs, event_prob, cfg) == targets).double().mean())
        table.append({"enabled": cfg.enabled, "unify_class": cfg.unify_class, "max_gap": cfg.max_gap,
                      "min_run": cfg.min_run, "accuracy": acc})
        if acc > best_acc:
            best, best_acc = cfg, acc
    return dataclasses.replace(best, select_on_val=False), table


def decide(out: AVECLIPOutput, cfg: AVECLIPConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Raw per-second labels [B, T], class probabilities [B, T, C+1] and event probability [B, T]."""
    probs = out.class_logits.float().softmax(-1)
    event_prob = torch.sigmoid(out.event_logits.float())
    C = probs.shape[-1] - 1
    if cfg.decision == "event_head":
        labels = torch.where(event_prob > 0.5, probs[..., :C].argmax(-1), torch.full_like(event_prob, C).long())
    else:
        labels = probs.argmax(-1)
    return labels, probs, event_prob


def video_class(labels: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
    """Per video: the class with the highest mean probability over its event seconds (all seconds when there are
    none), and that probability."""
    C = probs.shape[-1] - 1
    event = (labels != C).to(probs.dtype)
    weights = torch.where(event.sum(1, keepdim=True) > 0, event, torch.ones_like(event))
    mean = (probs[..., :C] * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
    prob, cls = mean.max(-1)
    return cls, prob


# ---- the family: what the training harness, evaluate and predict call --------------------------------------------
class AVECLIPFamily(LocalizerFamily):
    name = "aveclip"
    # 2: `fusion` defaults to "cross" (issue 29): a config that did not spell `fusion` out builds another model now
    # (configs and checkpoints that name "concat" / "concat_product" build exactly the model they did)
    version = "2"
    summary = "AVE-CLIP multi-window temporal transformer (WACV 2023); internals our design [G], see models/aveclip.py"
    config_cls = AVECLIPConfig
    model_cls = AVECLIP
    has_postprocess = True

    def begin_epoch(self, model: AVECLIP, epoch: int, options: Mapping[str, Any]) -> None:
        if model.cfg.multiscale == "staged" and model.branch_heads is not None:
            switch = max(1, math.ceil(options.get("epochs", 1) * model.cfg.staged_fraction))
            model.stage = "branches" if epoch < switch else "fusion"
        else:
            model.stage = "all"

    def epoch_flags(self, model: AVECLIP) -> dict:
        return {"stage": model.stage} if model.cfg.multiscale == "staged" else {}

    def loss(self, model: AVECLIP, out: AVECLIPOutput, labels: Tensor, options: Mapping[str, Any]):
        return aveclip_loss(out, labels, model.cfg, model.stage)

    def predict(self, model: AVECLIP, out: AVECLIPOutput, postprocessed: bool = True) -> SegmentPrediction:
        raw, probs, event_prob = decide(out, model.cfg)
        labels = postprocess(raw, probs, event_prob, model.cfg.postprocess) if postprocessed else raw
        cls, cls_prob = video_class(labels, probs)
        return SegmentPrediction(labels, event_prob, cls, cls_prob)

    def tune_on_val(self, model: AVECLIP, outputs: list[tuple[AVECLIPOutput, Tensor]]) -> dict | None:
        """Choose the post-processing on validation outputs [(output, targets [B, T])]; sets it on the model."""
        pp = model.cfg.postprocess
        if not pp.select_on_val or not outputs:
            return None
        decided = [decide(o, model.cfg) for o, _ in outputs]
        raw, probs, event_prob = (torch.cat([d[i] for d in decided]) for i in range(3))
        targets = torch.cat([t for _, t in outputs]).to(raw.device)
        chosen, table = select_postprocess(raw, probs, event_prob, targets, pp)
        model.cfg.postprocess = chosen
        return {"postprocess_selected": dataclasses.asdict(chosen), "postprocess_val_grid": table}

    def load_weights(self, model: AVECLIP, obj: Any) -> AVECLIP:
        return strict_load(model, obj)


FAMILY = AVECLIPFamily()
