"""Compute precision (auto / fp32 / bf16): detection, keys, and what bf16 changes; the localizer's fast layers."""

import numpy as np
import pytest
import torch

from extractors.resnet50 import ResNet50Extractor
from models.cace import Dropout, _shared_input_linear
from pipeline import runtime
from pipeline.ave import extract
from pipeline.ave.extract import ExtractConfig
from pipeline.ave.finetune import FinetuneConfig
from pipeline.ave.train import TrainConfig
from pipeline.errors import UserError

CPU = torch.device("cpu")
AMD_EPYC_FLAGS = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
SAPPHIRE_RAPIDS_FLAGS = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"


def test_cpu_bf16_units_are_read_from_the_flags():
    assert runtime.cpu_bf16_flags(AMD_EPYC_FLAGS) == []
    assert runtime.cpu_bf16_flags(SAPPHIRE_RAPIDS_FLAGS) == ["amx_bf16", "avx512_bf16"]
    assert runtime.cpu_bf16_flags("") == []


def test_the_flags_can_be_stood_in_for(monkeypatch):
    monkeypatch.setenv("AVEL_CPU_FLAGS", "avx2 amx_bf16")
    assert runtime.cpu_bf16_flags() == ["amx_bf16"] and runtime.resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setenv("AVEL_CPU_FLAGS", "")
    assert runtime.cpu_bf16_flags() == [] and runtime.resolve_precision("auto", CPU) == "fp32"


@pytest.mark.parametrize("flags,auto", [([], "fp32"), (["amx_bf16"], "bf16"), (["avx512_bf16"], "bf16")])
def test_auto_resolves_by_the_cpu_and_explicit_choices_stay(monkeypatch, flags, auto):
    monkeypatch.setattr(runtime, "cpu_bf16_flags", lambda cpuinfo=None: flags)
    assert runtime.resolve_precision("auto", CPU) == auto
    assert runtime.resolve_precision("fp32", CPU) == "fp32"
    assert runtime.resolve_precision("bf16", CPU) == "bf16"
    assert runtime.precision_note("auto", CPU).startswith(f"precision {auto} (auto: CPU has")
    with pytest.raises(UserError, match="unknown precision 'half'"):
        runtime.resolve_precision("half", CPU)


def test_the_precision_that_runs_is_in_every_stage_key(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_bf16_flags", lambda cpuinfo=None: [])
    assert extract.key_config(ExtractConfig(), "visual", CPU) == extract.key_config(
        ExtractConfig(precision="fp32"), "visual", CPU)  # auto resolved: same features, same key
    fp32 = (extract.key_config(ExtractConfig(), "visual", CPU), TrainConfig().key_fields(),
            FinetuneConfig().key_fields())
    monkeypatch.setattr(runtime, "cpu_bf16_flags", lambda cpuinfo=None: ["amx_bf16"])
    bf16 = (extract.key_config(ExtractConfig(), "visual", CPU), TrainConfig().key_fields(),
            FinetuneConfig().key_fields())
    for a, b in zip(fp32, bf16):
        assert a["precision"] == "fp32" and b["precision"] == "bf16"


def test_bf16_visual_features_are_close_to_fp32():
    """The acceptance bound of the fast path: per-row cosine >= 0.999 (measured 0.99994 on random-init weights)."""
    frames = np.random.default_rng(0).integers(0, 256, (2, 240, 320, 3), dtype=np.uint8)
    feats = {}
    for precision in ("fp32", "bf16"):
        ext = ResNet50Extractor(random_init=True, seed=0, device="cpu", precision=precision, frames_per_segment=1)
        assert ext.precision == precision and ext.describe()["precision"] == precision
        feats[precision] = ext.extract(frames)
    assert feats["bf16"].dtype == torch.float32  # stored in float32 whatever the compute
    cos = torch.nn.functional.cosine_similarity(feats["bf16"].flatten(1).double(),
                                                feats["fp32"].flatten(1).double(), dim=1)
    assert cos.min() >= 0.999
    assert not torch.equal(feats["bf16"], feats["fp32"])  # bf16 really ran


def test_integer_bit_dropout_keeps_nn_dropout_law():
    torch.manual_seed(0)
    x = torch.ones(2_000_000, requires_grad=True)
    drop = Dropout(0.2).train()
    y = drop(x)
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - 0.2) < 0.002  # 2e6 draws: std of the share ~3e-4
    assert torch.unique(y.detach()).tolist() == [0.0, pytest.approx(2**15 / round(0.8 * 2**15))]
    assert abs(y.detach().double().mean().item() - 1.0) < 0.003  # expectation kept
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # gradient = the same mask, scaled
    assert drop.eval()(x) is x
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    assert Dropout(0.0).train()(x) is x


def test_shared_input_projections_equal_separate_layers():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, n) for n in (4, 4, 16)]
    x = torch.randn(3, 5, 16, requires_grad=True)
    fused = _shared_input_linear(x, *layers)
    separate = [layer(x) for layer in layers]
    for f, s in zip(fused, separate):
        assert f.shape == s.shape and torch.allclose(f, s, atol=1e-6)
    sum(f.square().sum() for f in fused).backward()
    fused_grads = [x.grad.clone()] + [layer.weight.grad.clone() for layer in layers]
    x.grad = None
    for layer in layers:
        layer.weight.grad = None
    sum(s.square().sum() for s in separate).backward()
    for a, b in zip(fused_grads, [x.grad] + [layer.weight.grad for layer in layers]):
        assert torch.allclose(a, b, atol=1e-5)


def test_heap_allocations_change_no_number():
    torch.manual_seed(0)
    a = torch.randn(1024, 4096)
    plain = (a @ a.T).sum()
    with runtime.heap_allocations():
        heap = (a @ a.T).sum()
    assert torch.equal(plain, heap)


def test_full_size_localizer_runs_under_bf16_autocast_on_any_cpu():
    """oneDNN has no bf16 LSTM on CPUs without bf16 units: the LSTMs stay in fp32 under autocast."""
    from models import CACEConfig, CACENet

    torch.manual_seed(0)
    model = CACENet(CACEConfig(num_classes=3)).eval()
    with torch.no_grad(), runtime.autocast(CPU, "bf16"):
        out = model(torch.randn(2, 10, 7, 7, 512), torch.randn(2, 10, 128))
    assert out.event_scores.shape == (2, 3) and torch.isfinite(out.event_scores.float()).all()
