"""Fast CPU tests of the CACE-Net localizer and its losses (models/cace.py, models/losses.py).

The reference facts come from shared/reference (cace-net-state-dict.txt, cace-net-spec.md);
set AVEL_SHARED to point elsewhere."""

from __future__ import annotations

import ast
import io
import math
import os
from pathlib import Path

import pytest
import torch

from models import (
    GUIDE_MODES,
    CACEConfig,
    CACEOutput,
    cace_loss,
    count_parameters,
    create_model,
    derive_targets,
    info_nce_loss,
    load_reference_state_dict,
    predict,
    resolve_guide,
    supervised_contrastive_loss,
)

SHARED = Path(os.environ.get("AVEL_SHARED") or Path(__file__).resolve().parents[2] / "shared")
STATE_DICT_TXT = SHARED / "reference" / "cace-net-state-dict.txt"

B, T, HW = 2, 10, 7
# Spec §2.4: (registered, used in forward) parameters per guide mode, VGG-19/VGGish dims.
PARAM_COUNTS = {
    "co": (13_118_681, 9_283_417),
    "audio_guides_visual": (13_118_681, 9_283_417),
    "visual_guides_audio": (12_723_673, 7_870_295),
    "none": (11_029_719, 7_326_807),
}


def _inputs(cfg: CACEConfig, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    visual = torch.randn(B, T, HW, HW, cfg.video_dim, generator=g)
    audio = torch.randn(B, T, cfg.audio_dim, generator=g)
    return visual, audio


def _labels(num_classes: int = 28) -> torch.Tensor:
    """Video 0: class 5 on segments 2..7, background elsewhere; video 1: all background."""
    labels = torch.zeros(B, T, num_classes + 1)
    labels[..., num_classes] = 1
    labels[0, 2:8, num_classes] = 0
    labels[0, 2:8, 5] = 1
    return labels


def _parse_reference(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, shape = line.split(" ", 1)
            rows.append((name, tuple(ast.literal_eval(shape))))
    return rows


# ------------------------------------------------------------------------------------ model
def test_parameters_match_reference_state_dict():
    if not STATE_DICT_TXT.exists():
        pytest.skip(f"{STATE_DICT_TXT} not found (set AVEL_SHARED)")
    reference = _parse_reference(STATE_DICT_TXT)
    model = create_model()
    ours = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert ours == reference  # names, shapes and registration order
    assert [n for n, _ in ours] == list(model.state_dict())  # no buffers
    assert count_parameters(model) == 13_118_681 == sum(math.prod(s) for _, s in reference)


@pytest.mark.parametrize("guide", GUIDE_MODES)
def test_guide_modes_forward_backward_and_counts(guide):
    torch.manual_seed(0)
    model = create_model(guide=guide)
    model.bece_enabled = True  # so encoder_q is used by both heads and the loss
    out = model(*_inputs(model.cfg))
    assert out.is_event_logits.shape == (B, T) and out.gate.shape == (B, T)
    assert out.event_scores.shape == (B, 28) and out.av_score.shape == (B, 28)
    assert out.q.shape == (B, T, 256) and out.k.shape == (B, T, 256)
    total, terms = cace_loss(out, _labels(), contrastive=True)
    total.backward()
    assert all(torch.isfinite(v) for v in terms.values())
    registered, used = PARAM_COUNTS[guide]
    assert count_parameters(model) == registered
    assert sum(p.numel() for p in model.parameters() if p.grad is not None) == used


def test_guide_names():
    assert resolve_guide("Co-Guide") == "co"
    assert resolve_guide("Audio-Guide") == "audio_guides_visual"  # paper: AVCA-Visual-only
    assert resolve_guide("Visual-Guide") == "visual_guides_audio"  # paper: AVCA-Audio-only
    assert resolve_guide("None") == "none"
    assert create_model(guide="Audio-Guide").spatial_channel_att.psi == 0.0  # psi forced
    with pytest.raises(ValueError, match="valid names: co, audio_guides_visual"):
        CACEConfig(guide="both")


def test_encoder_stack_layers_start_identical():
    model = create_model()
    l0, l1 = model.video_encoder.encoder.layers
    assert all(torch.equal(a, b) for a, b in zip(l0.parameters(), l1.parameters()))


def test_resnet_cnn14_dims_use_audio_adaptor():
    model = create_model(video_dim=2048, audio_dim=2048)
    assert model.v_fc.weight.shape == (512, 2048)
    assert model.a_fc.weight.shape == (128, 2048)
    visual, audio = _inputs(model.cfg)
    model(visual, audio).event_scores.sum().backward()
    assert model.a_fc.weight.grad is not None  # applied as the adaptor (spec §4.3)
    # With VGGish-sized audio the reference feeds it raw: a_fc stays unused.
    model = create_model()
    model(*_inputs(model.cfg)).event_scores.sum().backward()
    assert model.a_fc.weight.grad is None


def test_bad_feature_shapes_raise():
    model = create_model()
    visual, audio = _inputs(model.cfg)
    with pytest.raises(ValueError, match="2048 channels .* video_dim=512: set video_dim to 2048"):
        model(torch.zeros(B, T, HW, HW, 2048), audio)
    with pytest.raises(ValueError, match="audio features have 2048 channels .* audio_dim=128"):
        model(visual, torch.zeros(B, T, 2048))
    with pytest.raises(ValueError, match=r"\[B, T, H, W, video_dim\]"):
        model(visual.mean(dim=(2, 3)), audio)
    with pytest.raises(ValueError, match="must match"):
        model(visual, audio[:, :5])


def test_float64_features_and_bece_flag():
    model = create_model().eval()
    visual, audio = _inputs(model.cfg)
    torch.manual_seed(1)
    off = model(visual.double(), audio.double())  # h5 features are float64
    assert off.event_scores.dtype == torch.float32
    model.bece_enabled = True
    torch.manual_seed(1)
    on = model(visual, audio)
    # F_o = F_av + lam*F_FT changes only the event/background head; class logits use F_av.
    assert not torch.allclose(on.is_event_logits, off.is_event_logits)
    torch.testing.assert_close(on.event_scores, off.event_scores)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "model_state_dict"])
def test_checkpoint_roundtrip_released_format(wrapper):
    torch.manual_seed(0)
    source = create_model().eval()
    # Released format: float64 tensors saved from nn.DataParallel ('module.' prefix).
    state = {"module." + k: v.double() for k, v in source.state_dict().items()}
    obj = state if wrapper is None else {wrapper: state, "epoch": 46}
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # reading files is the caller's job

    torch.manual_seed(1)
    target = load_reference_state_dict(create_model(), loaded).eval()
    visual, audio = _inputs(source.cfg)
    torch.manual_seed(7)  # the noise for k is drawn even in eval
    expected = source(visual, audio)
    torch.manual_seed(7)
    got = target(visual, audio)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    # Without reseeding only k (the noisy key) changes.
    again = target(visual, audio)
    assert not torch.equal(again.k, got.k)
    for field in ("is_event_logits", "event_scores", "gate", "av_score", "q"):
        assert torch.equal(getattr(again, field), getattr(got, field))


def test_checkpoint_mismatch_raises_with_hint():
    resnet_state = create_model(video_dim=2048).state_dict()
    with pytest.raises(ValueError, match="shape mismatches.*v_fc.weight.*video_dim=2048"):
        load_reference_state_dict(create_model(), resnet_state)
    none_state = create_model(guide="none").state_dict()
    with pytest.raises(ValueError, match="missing keys.*guide=none"):
        load_reference_state_dict(create_model(), none_state)
    with pytest.raises(ValueError, match="expected a state dict"):
        load_reference_state_dict(create_model(), [1, 2])


def test_predict_known_outputs():
    logits = torch.tensor([[3.0, -3.0, 0.1, 0.0], [-1.0, -1.0, 2.0, 5.0]])
    scores = torch.zeros(2, 4)
    scores[0, 2] = 1.0
    scores[1, 1] = 1.0
    out = CACEOutput(logits, scores, logits, scores, None, None)
    pred = predict(out)
    # sigmoid(0) = 0.5 is not > 0.5: background (index 4 = num_classes).
    assert pred.labels.tolist() == [[2, 4, 2, 4], [4, 4, 1, 1]]
    assert pred.video_class.tolist() == [2, 1]
    torch.testing.assert_close(pred.event_prob, torch.sigmoid(logits))
    assert predict(out, threshold=0.9).labels.tolist() == [[2, 4, 4, 4], [4, 4, 4, 1]]


# ----------------------------------------------------------------------------------- losses
def test_derive_targets_and_loss_terms():
    labels = _labels()
    t = derive_targets(labels)
    assert t.y_bce[0].tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]
    assert t.y_seg[0].tolist() == [0, 0, 5, 5, 5, 5, 5, 5, 0, 0]  # background -> 0
    assert t.y_vid.tolist() == [5, 0]  # an all-background video gets class 0
    assert t.y_eval[1].tolist() == [28] * T
    torch.manual_seed(0)
    out = create_model()(*_inputs(CACEConfig()))
    plain, terms = cace_loss(out, labels)
    assert terms["contrastive"] == 0
    torch.testing.assert_close(plain, sum(terms.values()))
    with_con, terms2 = cace_loss(out, labels, contrastive=True, contrastive_coeff=2.0)
    torch.testing.assert_close(with_con, plain + 2.0 * terms2["contrastive"])
    with pytest.raises(ValueError, match="one-hot"):
        cace_loss(out, labels[..., :28])


def _supcon_loop(q, k, is_event, tau):
    """Direct evaluation of paper Eq. 7 / spec §3.4, one sample at a time (float64)."""
    total, count = 0.0, 0
    n_videos, n_seg = is_event.shape
    for n in range(n_videos):
        feats = torch.cat([q[n], k[n]])
        events = torch.cat([is_event[n], is_event[n]]).tolist()
        for i in range(2 * n_seg):
            num, den, n_pos = 0.0, 0.0, 0
            for j in range(2 * n_seg):
                if j == i:
                    continue
                e = math.exp(float(feats[i] @ feats[j]) / tau)
                den += e
                own_copy = j % n_seg == i % n_seg
                if own_copy or (events[i] and events[j]):
                    num += e
                    n_pos += 1
            total += -math.log(num / n_pos / den)
            count += 1
    return total / count


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64),
                                         dim=-1)


@pytest.mark.parametrize("tau", [0.01, 0.5])
def test_supcon_matches_direct_formula(tau):
    q = _unit(3, 6, 8, seed=1)
    k = torch.nn.functional.normalize(q + 0.3 * _unit(3, 6, 8, seed=2), dim=-1)
    is_event = torch.tensor([[0, 1, 1, 0, 1, 0],   # mixed
                             [0, 0, 0, 0, 0, 0],   # all background
                             [1, 1, 1, 1, 1, 1]], dtype=torch.float64)  # all event
    got = supervised_contrastive_loss(q, k, is_event, temperature=tau)
    assert got.item() == pytest.approx(_supcon_loop(q, k, is_event, tau), rel=1e-10)


def test_supcon_float32_finite_where_naive_overflows():
    q64 = _unit(2, 10, 16, seed=3)
    k64 = torch.nn.functional.normalize(q64 + 0.01 * _unit(2, 10, 16, seed=4), dim=-1)
    is_event = torch.tensor([[1.0] * 6 + [0.0] * 4, [0.0] * 3 + [1.0] * 7])
    q, k = q64.float(), k64.float()
    f = torch.cat([q, k], dim=1)
    naive = torch.exp(f @ f.transpose(1, 2) / 0.01)  # exp(~100) > float32 max
    assert torch.isinf(naive).any()
    loss = supervised_contrastive_loss(q, k, is_event, temperature=0.01)
    assert torch.isfinite(loss)
    reference = supervised_contrastive_loss(q64, k64, is_event.double(), temperature=0.01)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-4, abs=1e-5)


def test_info_nce():
    aligned = torch.eye(4) * 3.0  # well separated, a_i == b_i
    assert info_nce_loss(aligned, aligned, temperature=0.01).item() < 1e-6
    same = torch.ones(5, 8)  # every pair identical: uniform logits
    assert info_nce_loss(same, same, temperature=0.2).item() == pytest.approx(math.log(5))
    with pytest.raises(ValueError):
        info_nce_loss(torch.ones(3, 4), torch.ones(2, 4))


def test_supcon_floor_is_mean_log_positive_count():
    """Perfectly separated embeddings reach the formula's floor, mean_i log|K(i)|, not zero."""
    from models.losses import supervised_contrastive_loss

    is_event = torch.tensor([[1.0] * 7 + [0.0] * 3])
    # events share one direction; each background segment has its own, orthogonal to everything else
    basis = torch.eye(16, dtype=torch.float64)
    q = torch.stack([basis[0] if e else basis[1 + t] for t, e in enumerate(is_event[0].tolist())])[None]
    loss = supervised_contrastive_loss(q, q.clone(), is_event.double(), temperature=0.01)
    floor = (2 * 7 * math.log(2 * 7 - 1)) / 20  # 14 event samples with |K| = 13, background |K| = 1
    assert loss.item() == pytest.approx(floor, abs=1e-6)
