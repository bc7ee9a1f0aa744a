"""Building blocks of the dense (untrimmed-video) detectors: masked 1-D convolutions, channel LayerNorm, the
pre-LN transformer block with strided depthwise projections, and its attention.

Tensors are [B, C, T] (channels first, as 1-D convolutions want); masks are [B, 1, T] bool, true on real steps.
Every block multiplies its output by the (possibly downsampled) mask, so padding stays exactly zero and results do
not depend on how much padding a batch carries. The block follows `shared/reference/dense-avel-spec.md` §3.4:
queries from `y`, keys/values and the residual from `x` (TB(x, x) is self-attention). `attention_bias` lets a
subclass add a prior to the attention logits (LoCo's LAC window, `models.dense.loco`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MaskedConv1d(nn.Conv1d):
    """Conv1d whose output is zeroed on padded steps; with a stride the mask is downsampled by taking every
    stride-th step (nearest neighbour, as the pyramid's lengths are multiples of the stride)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stride[0] > 1:
            mask = mask[..., ::self.stride[0]]
        return super().forward(x) * mask.to(x.dtype), mask


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, T] tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class DropPath(nn.Module):
    """Stochastic depth per sample (a residual branch dropped for a whole video), identity in eval mode."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, dtype=x.dtype, device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)


class Projection(nn.Module):
    """Depthwise conv (k3, stride s) -> LayerNorm -> 1x1 conv: how q, k and v are made from a stream."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.conv = MaskedConv1d(dim, dim, 3, stride=stride, padding=1, groups=dim, bias=False)
        self.norm = ChannelNorm(dim)
        self.proj = nn.Conv1d(dim, dim, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask = self.conv(x, mask)
        return self.proj(self.norm(x)), mask


class TransformerBlock(nn.Module):
    """TB(x, y): Out = Skip(x) + DropPath(g1 * Attn(q=y, kv=x)); Out += DropPath(g2 * MLP(LN(Out))).

    `stride` 2 halves the length (strided depthwise projections, max-pooled residual). LayerScale g initialised to
    1e-4 as in the reference. `x` and `y` share one mask (both modalities of a video are cut to one length).
    """

    def __init__(self, dim: int, n_head: int = 4, stride: int = 1, mlp_hidden: int | None = None,
                 drop_path: float = 0.0, layer_scale: float = 1e-4):
        super().__init__()
        if dim % n_head:
            raise ValueError(f"width {dim} is not a multiple of n_head {n_head}")
        self.n_head, self.stride = n_head, stride
        self.norm_x, self.norm_y = ChannelNorm(dim), ChannelNorm(dim)
        self.q, self.k, self.v = Projection(dim, stride), Projection(dim, stride), Projection(dim, stride)
        self.out = nn.Conv1d(dim, dim, 1)
        self.skip = nn.MaxPool1d(3, stride=stride, padding=1) if stride > 1 else nn.Identity()
        self.norm_mlp = ChannelNorm(dim)
        hidden = mlp_hidden or 4 * dim
        self.mlp = nn.Sequential(nn.Conv1d(dim, hidden, 1), nn.GELU(), nn.Conv1d(hidden, dim, 1))
        self.gamma_attn = nn.Parameter(torch.full((1, dim, 1), layer_scale))
        self.gamma_mlp = nn.Parameter(torch.full((1, dim, 1), layer_scale))
        self.drop_path = DropPath(drop_path)

    def attention_bias(self, xn: torch.Tensor, yn: torch.Tensor, length: int) -> torch.Tensor | None:
        """An additive prior on the logits [B, heads, T_q, T_k]; None for plain (global) attention."""
        return None

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xn, yn = self.norm_x(x), self.norm_y(y)
        q, out_mask = self.q(yn, mask)
        k, _ = self.k(xn, mask)
        v, _ = self.v(xn, mask)
        b, c, t = q.shape
        h, d = self.n_head, c // self.n_head
        q, k, v = (z.view(b, h, d, t).transpose(2, 3) for z in (q, k, v))  # [B, h, T, d]
        logits = (q @ k.transpose(2, 3)) / math.sqrt(d)
        bias = self.attention_bias(xn, yn, t)
        if bias is not None:
            logits = logits + bias
        logits = logits.masked_fill(~out_mask[:, :, None, :], float("-inf"))  # padded keys
        attn = torch.softmax(logits, dim=-1)
        a = (attn @ v).transpose(2, 3).reshape(b, c, t)
        m = out_mask.to(x.dtype)
        a = self.out(a) * m
        out = self.skip(x) * m + self.drop_path(self.gamma_attn * a)
        out = out + self.drop_path(self.gamma_mlp * self.mlp(self.norm_mlp(out)) * m)
        return out, out_mask


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    """[dim, length] sinusoidal position embedding (sin on even channels, cos on odd)."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table.t().float()


def position_embedding(table: torch.Tensor, length: int) -> torch.Tensor:
    """The table at `length` steps: as is, cut, or linearly interpolated for longer inputs (long videos)."""
    if length <= table.shape[1]:
        return table[:, :length]
    return F.interpolate(table[None], size=length, mode="linear", align_corners=False)[0]
