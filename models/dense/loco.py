"""LoCo's two additions to the UnAV baseline, as this project designs them (`shared/reference/dense-avel-spec.md` §4).

OUR DESIGN, NOT THE PAPER'S: LoCo's code is not public and only its abstracts were read. What is known: LCF
("local correspondence feature" modulation) acts on the unimodal features with a coherence-based contrastive
objective (audio-visual steps close in time correspond), and LAC ("local adaptive cross-modal" interaction)
replaces dense cross-modal attention by window attention whose window is data-driven. Every equation here is ours:

- `LocalCorrespondence` (LCF): z_v = norm(P_v V), z_a = norm(P_a A) (Linear -> 128), S = z_v . z_a / tau (tau 0.1).
  Positives of step t: audio steps |s - t| <= w (w = 2, +-0.64 s on UnAV's grid: small AV offsets); negatives:
  same-video steps beyond a guard band g = 8 and every step of the other videos; padding excluded. Loss: multi-
  positive InfoNCE, both directions, averaged over real steps. Modulation: gate g_t = sigmoid(kappa (c_t - mu)) from
  the local coherence c_t = max_{s in P_t} z_v_t . z_a_s, and V'_t = V_t + g_t W_v sum_{s in P_t} softmax(S_t)_s A_s
  (A' the same way round); `modulation="scale"` is the ablation V' = (1 + g) V. W_v, W_a start at zero, so an
  untrained LCF is the identity (our choice: the baseline is where training starts).
- `LocalAdaptiveBlock` (LAC): the transformer block of the pyramid with a Gaussian window prior on its logits,
  e_ts = q_t . k_s / sqrt(d) - (s - t - delta_t)^2 / (2 r_t^2), radius r_t = 1 + (r_max - 1) sigmoid(.) and offset
  delta_t = delta_max tanh(.) per query and head, predicted by a k3 conv on [LN(x); LN(y)]. Soft, so r and delta
  get gradients; with r -> infinity and delta = 0 it is the global block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.dense.blocks import TransformerBlock

# Excluded pairs get this logit instead of -inf: a row with nothing allowed (a padded step) stays finite, and so do
# its gradients (logsumexp of all -inf is -inf, and its backward NaN even when the row is later dropped).
EXCLUDED = -1e4


def _band(t: int, width: float, device) -> torch.Tensor:
    """[T, T] bool: |s - t| <= width."""
    idx = torch.arange(t, device=device)
    return (idx[:, None] - idx[None, :]).abs() <= width


class LocalCorrespondence(nn.Module):
    """LCF: the local audio-visual correspondence loss and the modulation of both unimodal streams (our design)."""

    def __init__(self, dim: int, proj_dim: int = 128, tau: float = 0.1, window: int = 2, guard: int = 8,
                 modulation: str = "attend"):
        super().__init__()
        if modulation not in ("attend", "scale"):
            raise ValueError(f"LCF modulation {modulation!r}: attend or scale")
        self.tau, self.window, self.guard, self.modulation = tau, window, guard, modulation
        self.proj_v, self.proj_a = nn.Linear(dim, proj_dim), nn.Linear(dim, proj_dim)
        self.kappa, self.mu = nn.Parameter(torch.tensor(5.0)), nn.Parameter(torch.tensor(0.0))
        self.w_v, self.w_a = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.w_v.weight)
        nn.init.zeros_(self.w_a.weight)

    def embed(self, v: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, D, T] streams -> unit vectors [B, T, proj_dim] per modality."""
        return (F.normalize(self.proj_v(v.transpose(1, 2)), dim=-1),
                F.normalize(self.proj_a(a.transpose(1, 2)), dim=-1))

    def loss(self, zv: torch.Tensor, za: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Multi-positive InfoNCE over every real step of the batch, both directions."""
        b, t, _ = zv.shape
        valid = mask[:, 0, :].reshape(-1)  # [B*T]
        sim = (zv.reshape(b * t, -1) @ za.reshape(b * t, -1).t()) / self.tau  # [BT, BT]
        video = torch.arange(b, device=zv.device).repeat_interleave(t)
        step = torch.arange(t, device=zv.device).repeat(b)
        same = video[:, None] == video[None, :]
        gap = (step[:, None] - step[None, :]).abs()
        pos = same & (gap <= self.window)
        neg = ~same | (gap > self.guard)
        pair_ok = valid[:, None] & valid[None, :]
        pos, allowed = pos & pair_ok, (pos | neg) & pair_ok
        total = sim.new_zeros(())
        for s in (sim, sim.t()):  # visual anchors against audio, then audio anchors against visual
            num = torch.logsumexp(s.masked_fill(~pos, EXCLUDED), dim=1)
            den = torch.logsumexp(s.masked_fill(~allowed, EXCLUDED), dim=1)
            total = total + (den - num)[valid].mean()
        return total / 2

    def forward(self, v: torch.Tensor, a: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(V', A', loss) for [B, D, T] streams."""
        zv, za = self.embed(v, a)
        t = v.shape[-1]
        keys = mask[:, 0, None, :] & _band(t, self.window, v.device)[None]  # [B, T, T]: local, real
        cos = zv @ za.transpose(1, 2)  # [B, T_v, T_a]
        m = mask.to(v.dtype)

        def modulate(x: torch.Tensor, other: torch.Tensor, cos_xo: torch.Tensor, w: nn.Linear) -> torch.Tensor:
            local = cos_xo.masked_fill(~keys, EXCLUDED)
            gate = torch.sigmoid(self.kappa * (local.amax(-1) - self.mu))[:, None, :]  # [B, 1, T]
            if self.modulation == "scale":
                return x * (1 + gate) * m
            attn = torch.softmax(local / self.tau, dim=-1)  # [B, T, T]
            gathered = attn @ other.transpose(1, 2)  # [B, T, D]
            return (x + gate * w(gathered).transpose(1, 2)) * m

        v2 = modulate(v, a, cos, self.w_v)
        a2 = modulate(a, v, cos.transpose(1, 2), self.w_a)
        return v2, a2, self.loss(zv, za, mask)


class LocalAdaptiveBlock(TransformerBlock):
    """LAC: the pyramid's cross-modal block with a learned Gaussian window on its attention logits (our design)."""

    def __init__(self, dim: int, n_head: int = 4, stride: int = 1, r_max: float = 8.0, delta_max: float = 2.0,
                 **kw):
        super().__init__(dim, n_head, stride, **kw)
        self.r_max, self.delta_max = r_max, delta_max
        self.window = nn.Conv1d(2 * dim, 2 * n_head, 3, stride=stride, padding=1)
        nn.init.zeros_(self.window.weight)
        nn.init.zeros_(self.window.bias)  # start at r = (1 + r_max) / 2, delta = 0

    def window_params(self, xn: torch.Tensor, yn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(radius, offset), each [B, heads, T_q], in steps of this block's output level."""
        raw = self.window(torch.cat([xn, yn], dim=1))
        r_raw, d_raw = raw[:, : self.n_head], raw[:, self.n_head:]
        return 1 + (self.r_max - 1) * torch.sigmoid(r_raw), self.delta_max * torch.tanh(d_raw)

    def attention_bias(self, xn: torch.Tensor, yn: torch.Tensor, length: int) -> torch.Tensor:
        r, delta = self.window_params(xn, yn)
        idx = torch.arange(length, device=xn.device, dtype=r.dtype)
        dist = idx[None, None, None, :] - idx[None, None, :, None] - delta[..., None]  # s - t - delta_t
        return -dist.square() / (2 * r[..., None].square())
