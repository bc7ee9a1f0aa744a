"""The AVE-CLIP localizer: shapes, windows, post-processing, the registry, checkpoints, learning (CPU, seconds)."""

import pytest
import torch

from models import create_localizer, get_family, list_localizers
from models.aveclip import (
    AVECLIP,
    AVECLIPConfig,
    PostProcessConfig,
    aveclip_loss,
    postprocess,
    select_postprocess,
    window_layout,
)
from pipeline.ave.features import from_public_folder
from pipeline.ave.train import TrainConfig, evaluate, load_model, train_model
from pipeline.errors import UserError
from tests.features_fixture import write_feature_folder

TINY = {"d_model": 16, "num_heads": 2, "feature_heads": 2, "ff_mult": 2}
C = 3  # classes; background = 3


def tiny_model(**kw) -> AVECLIP:
    torch.manual_seed(0)
    return AVECLIP(AVECLIPConfig(video_dim=12, audio_dim=6, num_classes=C, **{**TINY, **kw}))


@pytest.mark.parametrize("T", [10, 7, 1, 13])
@pytest.mark.parametrize("windows,stride", [((2, 5, 10), None), ((3, 4), None), ((4,), 2)])
def test_output_shapes_for_any_segment_count_and_windows(T, windows, stride):
    model = tiny_model(window_sizes=windows, window_stride=stride).eval()
    out = model(torch.randn(2, T, 2, 2, 12), torch.randn(2, T, 6))  # maps are pooled inside
    assert out.class_logits.shape == (2, T, C + 1) and out.event_logits.shape == (2, T)
    assert out.branch_logits.shape == (len(windows), 2, T, C + 1)
    assert torch.isfinite(out.class_logits).all()
    pooled = model(torch.randn(2, T, 12), torch.randn(2, T, 6))  # per-second vectors work as well
    assert pooled.class_logits.shape == (2, T, C + 1)


def test_window_layout_covers_every_step_and_masks_padding():
    idx, valid = window_layout(10, 3, 3)  # 3 does not divide 10: windows 0-2, 3-5, 6-8, 9 (+2 padded)
    assert idx.tolist()[-1] == [9, 9, 9] and valid.tolist()[-1] == [True, False, False]
    covered = torch.zeros(10).index_add_(0, idx[valid], torch.ones(int(valid.sum())))
    assert covered.tolist() == [1.0] * 10  # each step in exactly one (non-overlapping) window
    idx, valid = window_layout(10, 4, 2)  # overlapping windows
    covered = torch.zeros(10).index_add_(0, idx[valid], torch.ones(int(valid.sum())))
    assert covered.min() >= 1 and covered.max() == 2
    idx, valid = window_layout(6, 10, 10)  # a window longer than the video is the whole video
    assert idx.tolist() == [list(range(6))] and valid.all()


def test_a_window_sees_only_its_own_steps():
    """Changing step 9 must not change the outputs of the short-window branch at steps 0-7 (window size 2)."""
    model = tiny_model(window_sizes=(2,), fusion="concat").eval()
    x = torch.randn(1, 10, 16)
    y = x.clone()
    y[:, 9] += 5.0
    bx, by = model.branches[0](x), model.branches[0](y)
    assert torch.allclose(bx[:, :8], by[:, :8], atol=1e-6) and not torch.allclose(bx[:, 8:], by[:, 8:])


def test_padded_steps_do_not_change_the_valid_ones():
    """A window of 3 over 4 steps: the last window holds step 3 plus 2 masked copies; its output equals the output
    of the same branch run on step 3 alone."""
    model = tiny_model(window_sizes=(3,), fusion="concat").eval()
    x = torch.randn(1, 4, 16)
    assert torch.allclose(model.branches[0](x)[:, 3], model.branches[0](x[:, 3:4])[:, 0], atol=1e-5)


# ---- cross-modal windows (fusion: cross, the default) -------------------------------------------------------------
@pytest.mark.parametrize("T,windows,stride", [(7, (3,), None), (13, (2, 5, 10), None), (9, (4,), 2), (1, (3, 4), 1)])
@pytest.mark.parametrize("combine", ["concat_product", "concat", "sum"])
def test_cross_windows_shapes_when_T_is_not_a_window_multiple(T, windows, stride, combine):
    model = tiny_model(fusion="cross", cross_combine=combine, window_sizes=windows, window_stride=stride).eval()
    v, a = torch.randn(2, T, 16), torch.randn(2, T, 16)
    for branch in model.branches:
        assert branch(v, a).shape == (2, T, 16)
    out = model(torch.randn(2, T, 2, 2, 12), torch.randn(2, T, 6))
    assert out.class_logits.shape == (2, T, C + 1) and out.branch_logits.shape == (len(windows), 2, T, C + 1)
    assert torch.isfinite(out.class_logits).all() and torch.isfinite(out.event_logits).all()


def test_cross_windows_mask_padded_steps_in_both_directions():
    """Keys at padded steps take no part: garbage there leaves the real steps' outputs exactly as they were, and a
    last window of one real step + 2 padded ones gives what the branch gives on that step alone."""
    model = tiny_model(fusion="cross", window_sizes=(3,)).eval()
    cross = model.branches[0].cross
    v, a = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    garbage_v, garbage_a = v.clone(), a.clone()
    garbage_v[~valid], garbage_a[~valid] = 1e3, -1e3
    assert torch.allclose(cross(v, a, valid)[valid], cross(garbage_v, garbage_a, valid)[valid], atol=1e-5)
    v, a = torch.randn(1, 4, 16), torch.randn(1, 4, 16)  # windows 0-2 and 3 (+2 padded)
    alone = model.branches[0](v[:, 3:4], a[:, 3:4])[:, 0]
    assert torch.allclose(model.branches[0](v, a)[:, 3], alone, atol=1e-5)


def test_a_cross_window_sees_only_its_own_steps_of_either_modality():
    model = tiny_model(fusion="cross", window_sizes=(2,)).eval()
    v, a = torch.randn(1, 10, 16), torch.randn(1, 10, 16)
    v9, a9 = v.clone(), a.clone()
    v9[:, 9] += 5.0
    a9[:, 9] += 5.0
    bx = model.branches[0](v, a)
    for changed in ((v9, a), (v, a9)):  # step 9 of the visual stream, then of the audio stream
        by = model.branches[0](*changed)
        assert torch.allclose(bx[:, :8], by[:, :8], atol=1e-6) and not torch.allclose(bx[:, 8:], by[:, 8:])


def test_cross_windows_train_both_directions_and_both_modalities():
    model = tiny_model(fusion="cross").train()
    out = model(torch.randn(4, 10, 12), torch.randn(4, 10, 6))
    labels = torch.nn.functional.one_hot(torch.randint(0, C + 1, (4, 10)), C + 1).float()
    aveclip_loss(out, labels, model.cfg)[0].backward()
    for branch in model.branches:
        for direction in (branch.cross.visual_from_audio, branch.cross.audio_from_visual):
            for layer in (direction.q, direction.kv, direction.proj):
                assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert model.v_proj[0].weight.grad.abs().sum() > 0 and model.a_proj[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="cross-modal window branch takes the visual and the audio"):
        model.branches[0](torch.randn(1, 10, 16))


# parameter counts of the early-fusion model before the cross-modal windows existed (issue 29): its checkpoints and
# stage keys depend on it building exactly the same modules
EARLY_FUSION_PARAMETERS = {("concat", "tiny"): 12347, ("concat_product", "tiny"): 12603,
                           ("concat", "default"): 4604549, ("concat_product", "default"): 4670085}


@pytest.mark.parametrize("fusion", ["concat", "concat_product"])
def test_early_fusion_options_build_the_model_they_built_before(fusion):
    tiny, default = tiny_model(fusion=fusion), AVECLIP(AVECLIPConfig(fusion=fusion))
    for name, model in (("tiny", tiny), ("default", default)):
        assert sum(p.numel() for p in model.parameters()) == EARLY_FUSION_PARAMETERS[fusion, name]
        assert not any(".cross." in k for k in model.state_dict()) and "fuse.weight" in model.state_dict()
        assert all(branch.cross is None for branch in model.branches)
    cross = tiny_model(fusion="cross")
    assert "fuse.weight" not in cross.state_dict() and all(b.cross is not None for b in cross.branches)
    assert get_family("aveclip").version == "2"  # the default changed: a config not naming `fusion` trains anew


def labels_of(seq):
    return torch.tensor([seq])


def probs_for(seq, boost=None):
    """Class probabilities agreeing with `seq`, with class `boost` (if given) the most probable event class."""
    p = torch.full((1, len(seq), C + 1), 0.05)
    for t, c in enumerate(seq):
        p[0, t, c] = 0.8
    if boost is not None:
        p[0, :, boost] += 0.1
    return p / p.sum(-1, keepdim=True)


B = C  # background label in the hand-made sequences


def test_postprocess_unifies_the_class_and_fills_one_second_gaps():
    seq = [B, 0, 0, 1, B, 0, 0, B, B, B]
    out = postprocess(labels_of(seq), probs_for(seq), torch.ones(1, 10), PostProcessConfig())
    assert out.tolist()[0] == [B, 0, 0, 0, 0, 0, 0, B, B, B]


def test_postprocess_keeps_what_it_must():
    clean = [B, B, 2, 2, 2, 2, B, B, B, B]  # one class, one run: nothing to change
    assert postprocess(labels_of(clean), probs_for(clean), torch.ones(1, 10), PostProcessConfig()).tolist()[0] == clean
    gap2 = [1, 1, B, B, 1, 1, B, B, B, B]  # a 2-second gap is longer than max_gap = 1: kept
    assert postprocess(labels_of(gap2), probs_for(gap2), torch.ones(1, 10), PostProcessConfig()).tolist()[0] == gap2
    edge = [B, 1, 1, 1, 1, 1, 1, 1, 1, 1]  # background at the video's start is not a gap
    assert postprocess(labels_of(edge), probs_for(edge), torch.ones(1, 10), PostProcessConfig()).tolist()[0] == edge
    empty = [B] * 10
    assert postprocess(labels_of(empty), probs_for(empty), torch.ones(1, 10), PostProcessConfig()).tolist()[0] == empty


def test_postprocess_islands_single_run_and_off():
    seq = [0, B, B, 0, 0, 0, B, B, 0, B]
    ev = torch.tensor([[0.6, 0, 0, 0.9, 0.9, 0.9, 0, 0, 0.7, 0]])
    islands = postprocess(labels_of(seq), probs_for(seq), ev, PostProcessConfig(max_gap=0, min_run=2))
    assert islands.tolist()[0] == [B, B, B, 0, 0, 0, B, B, B, B]
    single = postprocess(labels_of(seq), probs_for(seq), ev, PostProcessConfig(max_gap=0, single_run=True))
    assert single.tolist()[0] == [B, B, B, 0, 0, 0, B, B, B, B]
    off = postprocess(labels_of(seq), probs_for(seq), ev, PostProcessConfig(enabled=False))
    assert off.tolist()[0] == seq


def test_postprocess_unification_picks_the_most_probable_class_over_event_seconds():
    seq = [1, 1, 2, 1, B, B, B, B, B, B]
    out = postprocess(labels_of(seq), probs_for(seq, boost=2), torch.ones(1, 10), PostProcessConfig())
    # class 2 has +0.1 everywhere but class 1 is 0.8 on three of the four event seconds: class 1 wins
    assert out.tolist()[0] == [1, 1, 1, 1, B, B, B, B, B, B]


def test_validation_chooses_the_post_processing_and_ties_keep_the_raw_predictions():
    truth = [B, 1, 1, 1, 1, 1, B, B, B, B]
    holed = [B, 1, 1, B, 1, 1, B, B, B, B]  # a one-second hole that gap filling repairs
    raw, targets = torch.tensor([holed, truth]), torch.tensor([truth, truth])
    probs = torch.cat([probs_for(holed), probs_for(truth)])
    chosen, table = select_postprocess(raw, probs, torch.ones(2, 10), targets, PostProcessConfig())
    assert chosen.enabled and chosen.max_gap >= 1 and not chosen.select_on_val
    assert table[0]["enabled"] is False and table[0]["accuracy"] == 95.0
    assert max(r["accuracy"] for r in table) == 100.0
    perfect = torch.tensor([truth, truth])  # every setting gives 100 %: the weakest, no post-processing, wins
    chosen, _ = select_postprocess(perfect, torch.cat([probs_for(truth)] * 2), torch.ones(2, 10), targets,
                                   PostProcessConfig())
    assert not chosen.enabled


def test_loss_terms_and_the_staged_branch_phase():
    model = tiny_model().train()
    out = model(torch.randn(4, 10, 12), torch.randn(4, 10, 6))
    labels = torch.nn.functional.one_hot(torch.randint(0, C + 1, (4, 10)), C + 1).float()
    total, terms = aveclip_loss(out, labels, model.cfg)
    expect = terms["segment"] + terms["event"] + 0.5 * terms["aux"]
    assert torch.allclose(total, expect)
    branches_only, _ = aveclip_loss(out, labels, model.cfg, stage="branches")
    branches_only.backward()
    assert model.classifier.weight.grad is None and model.branch_heads[0].weight.grad is not None


def test_registry_names_and_errors():
    assert list_localizers() == ["cace", "aveclip"]
    assert get_family("aveclip").model_cls is AVECLIP
    with pytest.raises(ValueError, match="known: cace, aveclip"):
        get_family("nope")
    m = create_localizer("aveclip", video_dim=12, audio_dim=6, num_classes=C, **TINY)
    assert isinstance(m, AVECLIP)
    with pytest.raises(ValueError, match="unknown aveclip model field"):
        TrainConfig(model="aveclip", model_args={"guide": "co"})  # a CACE field
    with pytest.raises(ValueError, match="unknown localizer"):
        TrainConfig(model="transformer")
    old = TrainConfig(model={"d_model": 16})  # configs from before the registry: `model` held CACE's overrides
    assert old.model == "cace" and old.model_args == {"d_model": 16}


def aveclip_cfg(**kw):
    base = dict(model="aveclip", epochs=30, batch_size=4, lr=3e-3, milestones=[100], device="cpu", seed=1,
                precision="fp32", model_args=TINY)
    return TrainConfig(**{**base, **kw})


def test_learns_the_feature_fixture_and_round_trips_its_checkpoint(tmp_path):
    fs = from_public_folder(write_feature_folder(tmp_path / "feats"))
    out = tmp_path / "run"
    out.mkdir()
    history = []
    summary = train_model(fs, aveclip_cfg(), out, on_epoch=history.append)
    assert summary["model"] == "aveclip" and summary["parameters"] > 0
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert max(r["train_acc"] for r in history[-5:]) >= 95.0
    assert summary["test_accuracy"] >= 80.0 and "test_accuracy_without_postprocess" in summary
    # the checkpoint names its model: evaluate and load need no flag, and give the same numbers
    model, info = load_model(out / "best.pt")
    assert isinstance(model, AVECLIP) and info["model"] == "aveclip"
    chosen = summary["tuned_on_val"]["postprocess_selected"]  # chosen on val, saved with the checkpoint
    assert model.cfg.postprocess.enabled == chosen["enabled"] and not model.cfg.postprocess.select_on_val
    again = evaluate(out / "best.pt", fs, "test", device="cpu", precision="fp32")
    assert again["accuracy"] == summary["test_accuracy"] and again["model"] == "aveclip"


def test_staged_multiscale_training_switches_phase(tmp_path):
    fs = from_public_folder(write_feature_folder(tmp_path / "feats"))
    out = tmp_path / "run"
    out.mkdir()
    history = []
    train_model(fs, aveclip_cfg(epochs=4, model_args={**TINY, "multiscale": "staged"}), out,
                on_epoch=history.append)
    assert [r["stage"] for r in history] == ["branches", "branches", "fusion", "fusion"]


def test_wrong_model_fields_are_user_errors(tmp_path):
    fs = from_public_folder(write_feature_folder(tmp_path / "feats"))
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(UserError, match="aveclip model config: d_model=16 must be divisible by num_heads=3"):
        train_model(fs, aveclip_cfg(epochs=1, model_args={**TINY, "num_heads": 3}), out)


def test_cli_trains_aveclip_and_evaluates_its_checkpoint_without_naming_it(tmp_path):
    import re
    import subprocess
    import sys

    folder = write_feature_folder(tmp_path / "feats")
    root = tmp_path / "store"
    cli = [sys.executable, "-m", "pipeline.cli"]
    args = ["--set", "model_args={d_model: 16, num_heads: 2, feature_heads: 2, ff_mult: 2}", "--set", "batch_size=4",
            "--set", "lr=0.003", "--set", "milestones=[100]"]
    proc = subprocess.run([*cli, "train", "--features", str(folder), "--model", "aveclip", "--epochs", "8",
                           "--root", str(root), "--device", "cpu", "--precision", "fp32", *args],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "localizer: aveclip" in lines and any("without post-processing" in ln for ln in lines)
    assert re.fullmatch(r"test accuracy: \d+\.\d\d %", lines[-1])
    (run,) = (root / "train").iterdir()
    proc = subprocess.run([*cli, "evaluate", "--checkpoint", str(run / "best.pt"), "--features", str(folder),
                           "--root", str(root), "--device", "cpu", "--precision", "fp32"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == lines[-1]  # same checkpoint, same features: same number
    bad = subprocess.run([*cli, "train", "--features", str(folder), "--model", "lstm", "--root", str(root)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown localizer 'lstm'; known: cace, aveclip" in bad.stderr + bad.stdout
    assert "Traceback" not in bad.stderr


def test_bf16_autocast_trains_aveclip_and_records_it(tmp_path):
    """The path `precision: auto` takes on CPUs with AMX/AVX512-BF16 and on CUDA (emulated where neither)."""
    fs = from_public_folder(write_feature_folder(tmp_path / "feats"))
    out = tmp_path / "run"
    out.mkdir()
    history = []
    summary = train_model(fs, aveclip_cfg(precision="bf16"), out, on_epoch=history.append)
    assert summary["precision"] == "bf16" and all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"] and summary["test_accuracy"] >= 80.0
