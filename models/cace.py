"""CACE-Net audio-visual event localizer (ACM MM 2024), re-implemented from the spec.

The module tree, parameter names, shapes and registration order follow the reference
``supv_main_model`` (see ``shared/reference/cace-net-state-dict.txt``) so that the released
checkpoint loads strictly and a seeded init consumes the RNG in the same order.  The forward
pass follows spec §2.2 including its oddities, which are kept on purpose because the released
weights were trained with them:

* no 1/sqrt(d) scaling in any co-guidance attention;
* both visual spatial self-attentions share the LayerNorm ``v_norm`` (``v_norm2`` is registered
  but never used: a reference bug, kept so the checkpoint loads);
* the background-suppression gates are crossed (video is scaled by the audio gate);
* ``gamma * av_score`` is added to the class logits, and the class logits come from
  ``max_T F_av`` (not ``F_o``);
* the contrastive key ``k`` is computed every call (eval too) from ``F_av`` plus Gaussian noise
  through the same ``encoder_q`` with no stop-gradient, so a forward consumes RNG even in eval;
* registered but unused parameters: ``a_fc`` (unless it is the audio adaptor, below),
  ``v_norm2``, ``ave_bottleneck``, the Encoder/Decoder template layers and the decoder
  ``self_attn``.

Guide modes (paper Table 1; the reference's CLI names are swapped relative to the paper's):

=======================  ==================  ==========================  =================
name here                reference --guide   paper                        what it does
=======================  ==================  ==========================  =================
``co``                   ``Co-Guide``        "w/ AVCA"                    full co-guidance
``audio_guides_visual``  ``Audio-Guide``     "w/ AVCA-Visual-only"        co with psi = 0
``visual_guides_audio``  ``Visual-Guide``    "w/ AVCA-Audio-only"         raw mean visual,
                                                                          guided audio
``none``                 ``None``            "w/o AVCA"                   no AVCA module
=======================  ==================  ==========================  =================

Internally everything is batch-first ([B, T, ...]); the reference is sequence-first in places,
which only changes the layout, not the numbers.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GUIDE_MODES",
    "REFERENCE_GUIDE_NAMES",
    "CACEConfig",
    "CACENet",
    "CACEOutput",
    "CACEPrediction",
    "resolve_guide",
    "create_model",
    "count_parameters",
    "predict",
    "extract_state_dict",
    "load_reference_state_dict",
]

GUIDE_MODES = ("co", "audio_guides_visual", "visual_guides_audio", "none")
# Reference (CLI) spelling -> paper-consistent name used here.
REFERENCE_GUIDE_NAMES = {
    "Co-Guide": "co",
    "Audio-Guide": "audio_guides_visual",
    "Visual-Guide": "visual_guides_audio",
    "None": "none",
}


def resolve_guide(name: Optional[str]) -> str:
    """Map a guide name (ours or the reference's) to one of GUIDE_MODES."""
    if name is None:  # the reference's `--guide None` may arrive as a Python None
        return "none"
    if name in GUIDE_MODES:
        return name
    if name in REFERENCE_GUIDE_NAMES:
        return REFERENCE_GUIDE_NAMES[name]
    valid = list(GUIDE_MODES) + list(REFERENCE_GUIDE_NAMES)
    raise ValueError(f"unknown guide mode {name!r}; valid names: {', '.join(valid)}")


@dataclass
class CACEConfig:
    """Every hyper-parameter of the localizer (defaults = the paper run, VGG-19 + VGGish)."""

    video_dim: int = 512  # input visual channels: 512 VGG-19 pool5, 2048 ResNet-50 layer4
    audio_dim: int = 128  # input audio channels: 128 VGGish, 2048 Cnn14
    num_classes: int = 28  # event classes; background index = num_classes
    video_fc_dim: int = 512  # width after v_fc (the co-guidance visual width)
    audio_fc_dim: int = 128  # audio width inside co-guidance and the audio LSTM
    d_model: int = 256
    guide: str = "co"
    alpha: float = 0.1  # background-suppression gate strength
    beta: float = 0.4  # visual self-calibration (paper Eq. 2)
    gamma: float = 0.3  # weight of the CAS score added to the class logits
    psi: float = 0.3  # visual-guided audio strength (paper Eq. 6)
    lam: float = 0.6  # lambda: F_o = F_av + lam * F_FT when BECE is on (paper Eq. 8)
    noise_std: float = 0.1  # Gaussian noise on F_av for the contrastive key
    cas_topk: int = 4  # CAS: mean of the top-k segment scores per class
    num_heads: int = 4
    num_encoder_layers: int = 2
    num_decoder_layers: int = 1
    encoder_ff_dim: int = 1024
    decoder_ff_dim: int = 512
    coguide_hidden_dim: int = 256  # CMBS channel/spatial attention bottleneck
    coguide_qk_dim: int = 128  # visual spatial self-attention latent (video_fc_dim / 4)
    v_fc_dropout: float = 0.2
    coguide_dropout: float = 0.2  # inside the co-guidance residuals
    relation_dropout: float = 0.1  # CMRAN encoder/decoder layers
    inter_attn_dropout: float = 0.2  # AVInter/VAInter attention dropout
    inter_dropout: float = 0.1  # AVInter/VAInter residual dropout
    # Apply a_fc (audio_dim -> audio_fc_dim) to the audio?  None = only when the sizes differ
    # (spec §4.3: the adaptor for 2048-d Cnn14 features); the reference feeds 128-d VGGish raw.
    audio_adaptor: Optional[bool] = None

    def __post_init__(self) -> None:
        self.guide = resolve_guide(self.guide)
        for name in ("video_dim", "audio_dim", "num_classes", "video_fc_dim", "audio_fc_dim",
                     "d_model", "cas_topk", "num_heads", "num_encoder_layers",
                     "num_decoder_layers", "encoder_ff_dim", "decoder_ff_dim",
                     "coguide_hidden_dim", "coguide_qk_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"CACEConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % 2 or self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} must be even and divisible by "
                             f"num_heads={self.num_heads}")
        if self.audio_adaptor is False and self.audio_dim != self.audio_fc_dim:
            raise ValueError(f"audio_dim={self.audio_dim} differs from audio_fc_dim="
                             f"{self.audio_fc_dim}, so the audio adaptor a_fc is required: "
                             "set audio_adaptor=None or True")

    @property
    def background_index(self) -> int:
        return self.num_classes

    @property
    def uses_audio_adaptor(self) -> bool:
        if self.audio_adaptor is None:
            return self.audio_dim != self.audio_fc_dim
        return self.audio_adaptor

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CACEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CACEConfig fields {unknown}; valid fields: {sorted(known)}")
        return cls(**dict(d))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class CACEOutput(NamedTuple):
    """Model outputs, batch-first.  Reference shapes in brackets after the arrow."""

    is_event_logits: Tensor  # [B, T]      <- reference [T, B, 1]
    event_scores: Tensor  # [B, C]         class logits + gamma * av_score
    gate: Tensor  # [B, T]                 audio gate * video gate  <- reference [T, B, 1]
    av_score: Tensor  # [B, C]             CAS top-k score
    q: Tensor  # [B, T, d_model]           L2-normalised F_FT
    k: Tensor  # [B, T, d_model]           L2-normalised encoder_q(F_av + noise)


class CACEPrediction(NamedTuple):
    labels: Tensor  # [B, T] long: class index, or num_classes for background
    event_prob: Tensor  # [B, T] sigmoid(is_event_logits)
    video_class: Tensor  # [B] long: argmax of event_scores


class Dropout(nn.Dropout):
    """``nn.Dropout`` with its mask drawn from random integer bits on the CPU (a 3x cheaper draw).

    ``bernoulli_`` is the CPU's slowest way to draw a mask: 165 ms for a [640, 49, 512] float32 map, where 64-bit
    random integers give the same number of 15-bit uniforms in 21 ms (2 threads, measured), and the localizer draws
    three such masks per step. So each element keeps with probability ``keep_q / 2**15`` (p rounded to the nearest
    multiple of 2**-15: 0.2 -> 0.20001) and kept values are scaled by exactly its inverse, so the expectation is
    unchanged as in nn.Dropout. The draws differ from nn.Dropout's for the same seed. Other devices keep torch's
    fused kernel."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        keep_q = round((1.0 - self.p) * 2**15)
        if keep_q == 0:
            return x * 0.0
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_()  # 63 random bits each
        uniform15 = bits.view(torch.int16)[:n].bitwise_and_(0x7FFF)  # four 15-bit uniforms per draw
        keep = uniform15.lt_(keep_q).view(x.shape)  # 1 where kept (int16)
        return x * keep.to(x.dtype).mul_(2**15 / keep_q)


def _spatial_mean(x: Tensor, dim: int) -> Tensor:
    """`x.mean(dim)` as a sum times 1/n: the same value up to rounding, but its gradient is a broadcast view, where
    mean's backward writes a full [B*T, 49, 512] tensor (three of them per step: ~2 % of the localizer's step)."""
    return x.sum(dim=dim) * (1.0 / x.shape[dim])


def _shared_input_linear(x: Tensor, *layers: nn.Linear) -> list[Tensor]:
    """Several Linear layers on the same input as one matrix product (their weights stacked), split back.

    Same result as calling each layer, up to float rounding; on the CPU one wide product (and one input gradient in
    backward instead of a sum of several) is faster than many narrow ones on the [B*T*49, 512] visual maps."""
    weight = torch.cat([layer.weight for layer in layers])
    bias = torch.cat([layer.bias for layer in layers])
    return list(F.linear(x, weight, bias).split([layer.out_features for layer in layers], dim=-1))


# --------------------------------------------------------------------------------------------
# Audio-visual co-guidance attention (AVCA)
# --------------------------------------------------------------------------------------------
class CoGuidedAttention(nn.Module):
    """AVCA (spec §2.2 b).  Reference classes ``Co_Guided_Attention`` (second_visual_attention
    True) and ``Only_Visual_Guided_Attention`` (False: registers the same layers minus the
    ``*2`` ones; the visual stream is then the raw spatial mean and audio is guided by the
    first self-attention's output).  psi = 0 gives ``Audio-Guide``."""

    def __init__(self, cfg: CACEConfig, psi: float, second_visual_attention: bool = True):
        super().__init__()
        V, A = cfg.video_fc_dim, cfg.audio_fc_dim
        H, Q = cfg.coguide_hidden_dim, cfg.coguide_qk_dim
        self.psi, self.beta = psi, cfg.beta
        self.second_visual_attention = second_visual_attention
        # Registration order = reference __init__ order (state-dict order and init RNG order).
        # Audio-guided channel attention (CMBS).
        self.affine_video_1 = nn.Linear(V, V)
        self.affine_audio_1 = nn.Linear(A, V)
        self.affine_bottleneck = nn.Linear(V, H)
        self.affine_v_c_att = nn.Linear(H, V)
        # Audio-guided spatial attention (CMBS).
        self.affine_video_2 = nn.Linear(V, H)
        self.affine_audio_2 = nn.Linear(A, H)
        self.affine_v_s_att = nn.Linear(H, 1)
        # Visual spatial self-attention #1 (G1).
        self.video_query = nn.Linear(V, Q)
        self.video_key = nn.Linear(V, Q)
        self.video_value = nn.Linear(V, V)
        self.v_norm = nn.LayerNorm(V)
        if second_visual_attention:
            # Self-attention #2 (G2): the query source for visual-guided audio.  The reference
            # normalises it with v_norm too; v_norm2 is dead (kept for the checkpoint).
            self.video_query2 = nn.Linear(V, Q)
            self.video_key2 = nn.Linear(V, Q)
            self.video_value2 = nn.Linear(V, V)
            self.v_norm2 = nn.LayerNorm(V)
        # Visual self-calibration ("global feature" branch).  ave_bottleneck is unused.
        self.affine_video_ave = nn.Linear(V, H)
        self.affine_video_3 = nn.Linear(V, H)
        self.ave_bottleneck = nn.Linear(V, H)
        self.ave_v_att = nn.Linear(H, 1)
        # Visual-guided audio attention (paper Eq. 5).
        self.v_query = nn.Linear(V, A)
        self.vaudio_key = nn.Linear(A, A)
        self.vaudio_value = nn.Linear(A, A)
        # Audio temporal self-attention (paper Eqs. 3-4, plus residual + LN the paper omits).
        self.audio_query = nn.Linear(A, A)
        self.audio_key = nn.Linear(A, A)
        self.audio_value = nn.Linear(A, A)
        self.a_norm = nn.LayerNorm(A)
        self.dropout = Dropout(cfg.coguide_dropout)

    def _visual_self_attention(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # x [BT, N, V] and its query/key/value projections; unscaled dot-product attention over the N positions.
        att = torch.softmax(q @ k.transpose(1, 2), dim=-1)
        return self.v_norm(x + self.dropout(att @ v))  # shared v_norm (faithful)

    def _guide_visual(self, v0: Tensor, g1: Tensor, audio: Tensor) -> Tensor:
        """v0, g1 [BT, N, V]; audio [BT, 1, A] -> calibrated visual [BT, V]."""
        # Self-calibration: attention pooling of G1 driven by its own global mean.
        u = F.relu(self.affine_video_ave(_spatial_mean(g1, 1))).unsqueeze(1)  # [BT, 1, H]
        p, p1 = (F.relu(t) for t in _shared_input_linear(g1, self.affine_video_3, self.affine_video_1))
        s = torch.softmax(torch.tanh(self.ave_v_att(p * u)), dim=1)  # p [BT, N, H] -> s [BT, N, 1]
        c_self = (s.transpose(1, 2) @ g1).squeeze(1)  # [BT, V]
        # Audio-guided channel attention (p1 [BT, N, V]); note it rescales the raw V0, not G1.
        a1 = F.relu(self.affine_audio_1(audio))  # [BT, 1, V]
        z = F.relu(self.affine_bottleneck(_spatial_mean(a1 * p1, 1)))  # [BT, H]
        ch = torch.sigmoid(self.affine_v_c_att(z)).unsqueeze(1)  # [BT, 1, V]
        vc = v0 * (ch + 1)
        # Audio-guided spatial attention.
        p2 = F.relu(self.affine_video_2(vc))  # [BT, N, H]
        a2 = F.relu(self.affine_audio_2(audio))  # [BT, 1, H]
        sp = torch.softmax(torch.tanh(self.affine_v_s_att(p2 * a2)), dim=1)  # [BT, N, 1]
        v_cs = (sp.transpose(1, 2) @ vc).squeeze(1)  # [BT, V]
        return v_cs + self.beta * torch.sigmoid(c_self) * v_cs  # paper Eq. 2

    def _guide_audio(self, audio: Tensor, g: Tensor) -> Tensor:
        """audio [B, T, A]; g [B, T, N, V] (a visual self-attention output) -> [B, T, A]."""
        att = torch.softmax(self.audio_query(audio) @ self.audio_key(audio).transpose(1, 2), -1)
        a_g = self.a_norm(audio + self.dropout(att @ self.audio_value(audio)))
        q = self.v_query(_spatial_mean(g, 2))  # [B, T, A]
        att = torch.softmax(q @ self.vaudio_key(a_g).transpose(1, 2), dim=-1)  # [B, T, T]
        a_tilde = att @ self.vaudio_value(a_g)  # no residual, no LN (faithful)
        return audio + self.psi * torch.sigmoid(a_tilde) * audio  # paper Eq. 6

    def forward(self, video: Tensor, audio: Tensor) -> tuple[Tensor, Tensor]:
        """video [B, T, N, V] (after v_fc), audio [B, T, A] -> ([B, T, V], [B, T, A])."""
        B, T, N, V = video.shape
        v0 = video.reshape(B * T, N, V)
        first = (self.video_query, self.video_key, self.video_value)
        if not self.second_visual_attention:  # Visual-Guide: the visual stream is not guided
            g1 = self._visual_self_attention(v0, *_shared_input_linear(v0, *first))
            return video.mean(dim=2), self._guide_audio(audio, g1.reshape(B, T, N, V))
        projections = _shared_input_linear(v0, *first, self.video_query2, self.video_key2, self.video_value2)
        g1 = self._visual_self_attention(v0, *projections[:3])
        g2 = self._visual_self_attention(v0, *projections[3:])
        v_out = self._guide_visual(v0, g1, audio.reshape(B * T, 1, -1)).reshape(B, T, V)
        return v_out, self._guide_audio(audio, g2.reshape(B, T, N, V))


# --------------------------------------------------------------------------------------------
# CMRAN relation modules (post-LN Transformer blocks)
# --------------------------------------------------------------------------------------------
class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_ff: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_ff)
        self.linear2 = nn.Linear(dim_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(x + self.dropout1(self.self_attn(x, x, x, need_weights=False)[0]))
        ff = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout2(ff))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_ff: int, dropout: float):
        super().__init__()
        # self_attn is registered but never used by the reference forward (kept for loading).
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout,
                                                    batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_ff)
        self.linear2 = nn.Linear(dim_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor) -> Tensor:
        mem = torch.cat([memory, tgt], dim=1)  # keys/values: the other modality, then itself
        y = self.norm1(tgt + self.dropout1(self.multihead_attn(tgt, mem, mem,
                                                               need_weights=False)[0]))
        ff = self.linear2(self.dropout(F.relu(self.linear1(y))))
        return self.norm2(y + self.dropout2(ff))


class _LayerStack(nn.Module):
    """N deep copies of a template layer.  As in the reference the copies start with identical
    weights (deepcopy consumes no RNG), and the template stays registered, unused."""

    def __init__(self, layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, x: Tensor, *memory: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, *memory)
        return x


class IntraModalRelation(nn.Module):
    """Reference ``InternalTemporalRelationModule``: Linear to d_model, then encoder layers."""

    def __init__(self, input_dim: int, cfg: CACEConfig):
        super().__init__()
        self.encoder_layer = EncoderLayer(cfg.d_model, cfg.num_heads, cfg.encoder_ff_dim,
                                          cfg.relation_dropout)
        self.encoder = _LayerStack(self.encoder_layer, cfg.num_encoder_layers)
        self.affine_matrix = nn.Linear(input_dim, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(self.affine_matrix(x))


class CrossModalRelation(nn.Module):
    """Reference ``CrossModalRelationAttModule``: query from one modality, memory from the
    other's encoder output (concatenated with the query itself in the decoder layer)."""

    def __init__(self, input_dim: int, cfg: CACEConfig):
        super().__init__()
        self.decoder_layer = DecoderLayer(cfg.d_model, cfg.num_heads, cfg.decoder_ff_dim,
                                          cfg.relation_dropout)
        self.decoder = _LayerStack(self.decoder_layer, cfg.num_decoder_layers)
        self.affine_matrix = nn.Linear(input_dim, cfg.d_model)

    def forward(self, query: Tensor, memory: Tensor) -> Tensor:
        return self.decoder(self.affine_matrix(query), memory)


class AudioVisualRNN(nn.Module):
    """One-layer BiLSTMs: audio -> [B, T, d_model], visual -> [B, T, 2 * d_model].
    The reference passes dropout=0.2, which is a no-op for one layer, so it is omitted."""

    def __init__(self, cfg: CACEConfig):
        super().__init__()
        self.audio_rnn = nn.LSTM(cfg.audio_fc_dim, cfg.d_model // 2, num_layers=1,
                                 batch_first=True, bidirectional=True)
        self.visual_rnn = nn.LSTM(cfg.video_fc_dim, cfg.d_model, num_layers=1,
                                  batch_first=True, bidirectional=True)

    def forward(self, audio: Tensor, visual: Tensor) -> tuple[Tensor, Tensor]:
        # In the weights' dtype even under bf16 autocast: oneDNN has no bf16 LSTM on CPUs without bf16 units
        # ("could not create a primitive descriptor for the LSTM forward"), and the LSTMs are ~1 % of the step.
        with torch.autocast(audio.device.type, enabled=False):
            dtype = self.audio_rnn.weight_ih_l0.dtype
            return self.audio_rnn(audio.to(dtype))[0], self.visual_rnn(visual.to(dtype))[0]


class AudioVideoInter(nn.Module):
    """CMBS interaction: LN(x*y + Drop(MHA(x*y, [y; x], [y; x])))."""

    def __init__(self, cfg: CACEConfig):
        super().__init__()
        self.video_multihead = nn.MultiheadAttention(cfg.d_model, cfg.num_heads,
                                                     dropout=cfg.inter_attn_dropout,
                                                     batch_first=True)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.dropout = Dropout(cfg.inter_dropout)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        fused = x * y
        memory = torch.cat([y, x], dim=1)
        att = self.video_multihead(fused, memory, memory, need_weights=False)[0]
        return self.norm1(fused + self.dropout(att))


class LocalizeHead(nn.Module):
    """Reference ``SupvLocalizeModule``: event/background head, class head and the BECE
    projection encoder_q (its outputs q, k feed the supervised contrastive loss)."""

    def __init__(self, cfg: CACEConfig):
        super().__init__()
        self.classifier = nn.Linear(cfg.d_model, 1)
        self.encoder_q = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_model), nn.ReLU())
        self.event_classifier = nn.Linear(cfg.d_model, cfg.num_classes)
        self.noise_std = cfg.noise_std

    def forward(self, f_av: Tensor, lam: Optional[float]):
        f_ft = self.encoder_q(f_av)  # F_FT, the "one nonlinear layer"
        f_o = f_av + lam * f_ft if lam is not None else f_av
        is_event_logits = self.classifier(f_o).squeeze(-1)  # [B, T]
        q = F.normalize(f_ft, dim=-1)
        # Augmented key: same encoder, no stop-gradient; noise drawn even in eval (faithful).
        noisy = f_av + self.noise_std * torch.randn_like(f_av)
        k = F.normalize(self.encoder_q(noisy), dim=-1)
        class_logits = self.event_classifier(f_av.max(dim=1).values)  # from F_av, not F_o
        return is_event_logits, class_logits, q, k


# --------------------------------------------------------------------------------------------
# The localizer
# --------------------------------------------------------------------------------------------
class CACENet(nn.Module):
    """CACE-Net localizer.  ``bece_enabled`` (reference ``contrastive and contrastive_switch``)
    selects F_o = F_av + lam * F_FT (True) or F_o = F_av (False) for the event/background
    head; the training loop turns it on at the start of the contrastive phase and leaves it on
    for evaluation.  It is a plain attribute, not saved in the state dict."""

    def __init__(self, cfg: Optional[CACEConfig] = None):
        super().__init__()
        cfg = cfg if cfg is not None else CACEConfig()
        self.cfg = cfg
        self.bece_enabled = False
        d = cfg.d_model
        # Registration order follows the reference exactly (see module docstring).
        if cfg.guide != "none":
            psi = 0.0 if cfg.guide == "audio_guides_visual" else cfg.psi
            self.spatial_channel_att = CoGuidedAttention(
                cfg, psi, second_visual_attention=cfg.guide != "visual_guides_audio")
        self.v_fc = nn.Linear(cfg.video_dim, cfg.video_fc_dim)
        self.a_fc = nn.Linear(cfg.audio_dim, cfg.audio_fc_dim)
        # BiLSTM outputs are 2*d_model (visual) and d_model (audio) wide.
        self.video_encoder = IntraModalRelation(2 * d, cfg)
        self.video_decoder = CrossModalRelation(2 * d, cfg)
        self.audio_encoder = IntraModalRelation(d, cfg)
        self.audio_decoder = CrossModalRelation(d, cfg)
        self.audio_visual_rnn_layer = AudioVisualRNN(cfg)
        self.audio_gated = nn.Sequential(nn.Linear(d, 1), nn.Sigmoid())
        self.video_gated = nn.Sequential(nn.Linear(d, 1), nn.Sigmoid())
        self.AVInter = AudioVideoInter(cfg)
        self.VAInter = AudioVideoInter(cfg)
        self.localize_module = LocalizeHead(cfg)
        self.audio_cas = nn.Linear(d, cfg.num_classes)
        self.video_cas = nn.Linear(d, cfg.num_classes)
        self.v_dropout = Dropout(cfg.v_fc_dropout)

    def _check_inputs(self, visual: Tensor, audio: Tensor) -> None:
        cfg = self.cfg
        if not (isinstance(visual, Tensor) and isinstance(audio, Tensor)):
            raise ValueError("visual and audio features must be torch tensors")
        if visual.dim() != 5:
            raise ValueError(f"visual features must be [B, T, H, W, video_dim], got shape "
                             f"{tuple(visual.shape)}; add the missing axes (e.g. unsqueeze a "
                             "batch axis, or reshape pooled features to H = W = 1)")
        if audio.dim() != 3:
            raise ValueError(f"audio features must be [B, T, audio_dim], got shape "
                             f"{tuple(audio.shape)}")
        if visual.shape[-1] != cfg.video_dim:
            raise ValueError(f"visual features have {visual.shape[-1]} channels but the model "
                             f"was configured with video_dim={cfg.video_dim}: set video_dim to "
                             f"{visual.shape[-1]} (512 for VGG-19, 2048 for ResNet-50)")
        if audio.shape[-1] != cfg.audio_dim:
            raise ValueError(f"audio features have {audio.shape[-1]} channels but the model "
                             f"was configured with audio_dim={cfg.audio_dim}: set audio_dim to "
                             f"{audio.shape[-1]} (128 for VGGish, 2048 for Cnn14)")
        if visual.shape[:2] != audio.shape[:2]:
            raise ValueError(f"visual [B, T] = {tuple(visual.shape[:2])} and audio [B, T] = "
                             f"{tuple(audio.shape[:2])} must match")
        if visual.shape[1] < 1 or visual.shape[0] < 1:
            raise ValueError(f"empty batch or sequence: visual shape {tuple(visual.shape)}")

    def forward(self, visual: Tensor, audio: Tensor) -> CACEOutput:
        """visual [B, T, H, W, video_dim], audio [B, T, audio_dim] -> CACEOutput."""
        self._check_inputs(visual, audio)
        cfg = self.cfg
        # Features often arrive as float64 (the AVE h5 files): follow the model's dtype.
        dtype = self.v_fc.weight.dtype
        visual, audio = visual.to(dtype), audio.to(dtype)
        B, T = visual.shape[:2]
        if cfg.uses_audio_adaptor:
            audio = self.a_fc(audio)
        v0 = self.v_dropout(F.relu(self.v_fc(visual))).flatten(2, 3)  # [B, T, HW, video_fc]

        if cfg.guide == "none":
            v, a = v0.mean(dim=2), audio
        else:
            v, a = self.spatial_channel_att(v0, audio)

        a1, v1 = self.audio_visual_rnn_layer(a, v)  # [B, T, d], [B, T, 2d]
        # Same call order as the reference (matters for dropout RNG in training).
        ev = self.video_encoder(v1)
        da = self.audio_decoder(a1, ev)
        ea = self.audio_encoder(a1)
        dv = self.video_decoder(v1, ea)

        # Background suppression (CMBS); the gates are crossed: video scaled by the audio gate.
        g_a, g_v = self.audio_gated(ea), self.video_gated(ev)  # [B, T, 1]
        gate = (g_a * g_v).squeeze(-1)
        dv = dv + cfg.alpha * g_a * dv
        da = da + cfg.alpha * g_v * da

        # CAS: per class, mean of the top-k segment scores.  k is clamped to T so that
        # sequences shorter than cas_topk still work (no effect at T = 10).
        topk = min(cfg.cas_topk, T)
        score_v = self.video_cas(dv).topk(topk, dim=1).values.mean(dim=1)
        score_a = self.audio_cas(da).topk(topk, dim=1).values.mean(dim=1)
        av_score = (score_v + score_a) / 2

        dv = self.AVInter(dv, da)
        da = self.VAInter(da, dv)  # uses the updated dv (faithful)
        f_av = (dv + da) / 2
        lam = cfg.lam if self.bece_enabled else None
        is_event_logits, class_logits, q, k = self.localize_module(f_av, lam)
        event_scores = class_logits + cfg.gamma * av_score  # term absent from the paper
        return CACEOutput(is_event_logits, event_scores, gate, av_score, q, k)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def create_model(cfg: Optional[CACEConfig] = None, **overrides: Any) -> CACENet:
    """Build a CACENet (CPU, float32).  ``overrides`` replace config fields."""
    cfg = cfg if cfg is not None else CACEConfig()
    if overrides:
        cfg = CACEConfig.from_dict({**cfg.to_dict(), **overrides})
    return CACENet(cfg)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def predict(outputs: CACEOutput, threshold: float = 0.5) -> CACEPrediction:
    """Spec §2.5: segment t of video b gets argmax_c event_scores[b] when
    sigmoid(is_event_logits[b, t]) > threshold, else background (= num_classes)."""
    prob = torch.sigmoid(outputs.is_event_logits)
    video_class = outputs.event_scores.argmax(dim=-1)
    background = torch.full_like(prob, outputs.event_scores.shape[-1], dtype=torch.long)
    labels = torch.where(prob > threshold, video_class[:, None].expand_as(background),
                         background)
    return CACEPrediction(labels, prob, video_class)


_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_DP_PREFIX = "module."


def extract_state_dict(obj: Any) -> dict[str, Tensor]:
    """A raw state dict from a loaded checkpoint object: unwraps 'state_dict' / 'model' /
    'model_state_dict' and strips the DataParallel 'module.' prefix."""
    for _ in range(3):  # tolerate a wrapper inside a wrapper
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS
                      if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict (or a dict holding one under "
                         f"{'/'.join(_WRAPPER_KEYS)}), got {type(obj).__name__}")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a "
                             f"tensor; top-level keys seen: {list(obj)[:8]}")
        state[key[len(_DP_PREFIX):] if key.startswith(_DP_PREFIX) else key] = value
    return state


def _mismatch_hints(model: CACENet, state: Mapping[str, Tensor], missing, unexpected,
                    shapes) -> list[str]:
    cfg, hints = model.cfg, []
    shape_of = {k: tuple(v.shape) for k, v in state.items()}
    if "v_fc.weight" in shape_of and shape_of["v_fc.weight"][1] != cfg.video_dim:
        hints.append(f"the checkpoint expects video_dim={shape_of['v_fc.weight'][1]} "
                     f"(model has {cfg.video_dim})")
    if "a_fc.weight" in shape_of and shape_of["a_fc.weight"][1] != cfg.audio_dim:
        hints.append(f"the checkpoint expects audio_dim={shape_of['a_fc.weight'][1]} "
                     f"(model has {cfg.audio_dim})")
    key = "localize_module.event_classifier.weight"
    if key in shape_of and shape_of[key][0] != cfg.num_classes:
        hints.append(f"the checkpoint has num_classes={shape_of[key][0]} "
                     f"(model has {cfg.num_classes})")
    if any("spatial_channel_att" in k for k in list(missing) + list(unexpected)):
        if not any(k.startswith("spatial_channel_att.") for k in state):
            guess = "none"
        elif "spatial_channel_att.video_query2.weight" in state:
            guess = "co or audio_guides_visual"
        else:
            guess = "visual_guides_audio"
        hints.append(f"the checkpoint looks like guide={guess} (model has guide={cfg.guide})")
    if shapes and not hints:
        hints.append("check the CACEConfig sizes (d_model, *_fc_dim, *_ff_dim) against the "
                     "checkpoint")
    return hints


def load_reference_state_dict(model: CACENet, obj: Any) -> CACENet:
    """Load a checkpoint object (already read by the caller, e.g. ``torch.load``) strictly.

    Accepts a raw state dict or one wrapped under 'state_dict' / 'model' / 'model_state_dict',
    with or without the 'module.' prefix that the released (DataParallel) checkpoint carries.
    float64 checkpoints load into a float32 model (values are cast).  Raises ValueError listing
    missing/unexpected keys and shape mismatches, with a hint at the config field to change."""
    state = extract_state_dict(obj)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{len(items)} {title}: {items[:5]}{more}")
        hints = _mismatch_hints(model, state, missing, unexpected, shapes)
        raise ValueError("checkpoint does not match the model: " + "; ".join(parts)
                         + ("; hint: " + "; ".join(hints) if hints else ""))
    model.load_state_dict(state, strict=True)
    return model


# --------------------------------------------------------------------------------------------
# The family: what the training harness, evaluate and predict call (models.registry)
# --------------------------------------------------------------------------------------------
from .registry import LocalizerFamily, SegmentPrediction  # noqa: E402  (registry imports this module lazily)


class CACEFamily(LocalizerFamily):
    name = "cace"
    summary = "CACE-Net (ACM MM 2024): co-guidance attention + background-event contrastive enhancement"
    config_cls = CACEConfig
    model_cls = CACENet

    def begin_epoch(self, model: CACENet, epoch: int, options: Mapping[str, Any]) -> None:
        """BECE (the contrastive loss and lambda-mixing in the event head) from epoch `bece_start`, default
        ceil(epochs / 8) as the reference; it stays on for evaluation."""
        start = options.get("bece_start")
        start = -(-int(options.get("epochs", 1)) // 8) if start is None else int(start)
        model.bece_enabled = bool(options.get("contrastive", True)) and epoch >= start

    def epoch_flags(self, model: CACENet) -> dict:
        return {"bece": model.bece_enabled}

    def loss(self, model: CACENet, out: CACEOutput, labels: Tensor, options: Mapping[str, Any]):
        from .losses import cace_loss

        return cace_loss(out, labels, contrastive=model.bece_enabled,
                         contrastive_coeff=options.get("contrastive_coeff", 1.0),
                         temperature=options.get("temperature", 0.01))

    def predict(self, model: CACENet, out: CACEOutput, postprocessed: bool = True) -> SegmentPrediction:
        p = predict(out)
        class_prob = out.event_scores.float().softmax(-1).max(-1).values
        return SegmentPrediction(p.labels, p.event_prob, p.video_class, class_prob)

    def runtime_state(self, model: CACENet) -> dict:
        return {"bece_enabled": bool(model.bece_enabled)}

    def restore_runtime_state(self, model: CACENet, state: Mapping[str, Any]) -> None:
        # The reference evaluates with its contrastive switch on (spec §3.2): on unless recorded otherwise.
        model.bece_enabled = bool(state.get("bece_enabled", True))

    def load_weights(self, model: CACENet, obj: Any) -> CACENet:
        return load_reference_state_dict(model, obj)

    def foreign_config(self, obj: Any) -> CACEConfig:
        """The config of the released checkpoint (or any reference-format state dict), read from its shapes."""
        state = extract_state_dict(obj)
        if "v_fc.weight" not in state:
            raise ValueError("no v_fc.weight: this is not a CACE-Net localizer checkpoint")
        if any(k.startswith("spatial_channel_att.video_query2") for k in state):
            guide = "co"
        elif any(k.startswith("spatial_channel_att.") for k in state):
            guide = "visual_guides_audio"
        else:
            guide = "none"
        return CACEConfig(video_dim=state["v_fc.weight"].shape[1], audio_dim=state["a_fc.weight"].shape[1],
                          num_classes=state["localize_module.event_classifier.weight"].shape[0], guide=guide)


FAMILY = CACEFamily()
