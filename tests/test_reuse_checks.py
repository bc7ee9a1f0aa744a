"""A reused artifact is checked against what its manifest recorded: size always, sha256 for small files, the format's
header (HDF5 dataset shape, .npy header) for big ones. A changed output is one notice and a recompute, or with
--no-recompute one error naming the file; an old manifest without the new fields is reused as before."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from extractors import register_extractor
from extractors.base import Extractor
from extractors.weights import WeightsInfo
from pipeline import store as store_mod
from pipeline.errors import UserError
from pipeline.store import MANIFEST, ArtifactStore, check_output, file_sha256, read_manifest, set_recompute

ARGS = ("train", "1", {"epochs": 2}, {"features": "f"})


@pytest.fixture(autouse=True)
def _recompute_policy():
    """The policy is process-wide: every test starts from the default and leaves it there."""
    set_recompute(True)
    yield
    set_recompute(True)


def _compute(store: ArtifactStore, text: str = "weights", *, shape=None) -> Path:
    """One run of a stage with a small text output and an HDF5 output; returns the stage folder."""
    with store.stage(*ARGS) as run:
        assert not run.reused
        (run.dir / "model.pt").write_text(text * 100)
        run.add_output("model", "model.pt")
        with h5py.File(run.dir / "features.h5", "w") as f:
            f.create_dataset("avadataset", data=np.arange(4 * 10 * 8, dtype=np.float32).reshape(4, 10, 8))
            f.create_dataset("valid", data=np.ones(4, bool))
        run.add_output("features", "features.h5", shape=shape or (4, 10, 8), dtype="float32")
        run.manifest.metrics = {"text": text}
    return run.dir


def _reopen(store: ArtifactStore, text: str = "again"):
    """Open the stage again: (reused?, the run), computing `text` when it is not reused."""
    with store.stage(*ARGS) as run:
        if not run.reused:
            assert sorted(p.name for p in run.dir.iterdir()) == [MANIFEST]  # emptied, as --force does
            (run.dir / "model.pt").write_text(text * 100)
            run.add_output("model", "model.pt")
            run.manifest.metrics = {"text": text}
    return run.reused, run


def test_intact_small_outputs_are_reused_and_their_digests_recorded(tmp_path, capsys):
    store = ArtifactStore(tmp_path)
    folder = _compute(store)
    m = read_manifest(folder / MANIFEST)
    assert m.outputs["model"].sha256 == file_sha256(folder / "model.pt")  # small: a digest without asking
    assert m.outputs["features"].sha256 == file_sha256(folder / "features.h5")
    reused, run = _reopen(store)
    assert reused and run.manifest.metrics == {"text": "weights"} and not run.lock.held
    assert store.is_complete("train", m.key) and capsys.readouterr().err == ""


def test_truncated_output_is_recomputed_with_one_notice(tmp_path, capsys):
    store = ArtifactStore(tmp_path)
    folder = _compute(store)
    key = folder.name
    (folder / "model.pt").write_bytes((folder / "model.pt").read_bytes()[:100])
    assert not store.is_complete("train", key)  # a changed artifact is not complete
    capsys.readouterr()
    reused, run = _reopen(store)
    assert not reused and run.manifest.key == key and run.manifest.metrics == {"text": "again"}
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"notice: train {key}: {folder / 'model.pt'} changed since it was written (size 100 != 700); "
                   f"recomputing"]
    assert store.manifest("train", key).status == "complete" and (folder / "model.pt").read_text() == "again" * 100
    assert _reopen(store)[0]  # and the recomputed artifact is reused


def test_flipped_byte_in_a_small_file_is_found_by_its_digest(tmp_path, capsys):
    store = ArtifactStore(tmp_path)
    folder = _compute(store)
    data = bytearray((folder / "model.pt").read_bytes())
    data[10] ^= 0x01
    (folder / "model.pt").write_bytes(bytes(data))  # same size
    reused, run = _reopen(store)
    assert not reused and run.manifest.metrics == {"text": "again"}
    assert "model.pt changed since it was written (sha256 " in capsys.readouterr().err


def test_truncated_hdf5_output_is_recomputed(tmp_path, capsys):
    store = ArtifactStore(tmp_path)
    folder = _compute(store)
    size = (folder / "features.h5").stat().st_size
    with open(folder / "features.h5", "r+b") as f:
        f.truncate(1000)
    reused, _ = _reopen(store)
    assert not reused
    assert f"features.h5 changed since it was written (size 1000 != {size})" in capsys.readouterr().err


def test_big_files_are_checked_by_size_and_header_never_hashed(tmp_path, monkeypatch):
    """Above DIGEST_MAX_BYTES (a 16 GB feature file): no digest recorded or computed; an HDF5 file must open and
    hold the recorded shape, a .npy header must give it."""
    monkeypatch.setattr(store_mod, "DIGEST_MAX_BYTES", 100)
    store = ArtifactStore(tmp_path)
    folder = _compute(store)
    np.save(folder / "feat.npy", np.zeros((5, 3), np.float32))
    rec = read_manifest(folder / MANIFEST).outputs
    assert rec["features"].sha256 is None and rec["model"].sha256 is None

    def no_hashing(path, chunk=0):
        raise AssertionError(f"{path} hashed on reuse")

    monkeypatch.setattr(store_mod, "file_sha256", no_hashing)
    assert _reopen(store)[0]  # intact: reused, nothing hashed
    h5 = rec["features"]
    assert check_output(folder / "features.h5", h5) is None
    assert check_output(folder / "features.h5", h5.model_copy(update={"shape": [4, 10, 9]})) == \
        "no dataset of shape [4, 10, 9] float32 in it"
    assert check_output(folder / "features.h5", h5.model_copy(update={"dtype": "float16"})) == \
        "no dataset of shape [4, 10, 8] float16 in it"
    with open(folder / "features.h5", "r+b") as f:  # the superblock overwritten, same size
        f.write(b"\0" * 8)
    assert check_output(folder / "features.h5", h5).startswith("not readable as HDF5")
    npy = h5.model_copy(update={"path": "feat.npy", "bytes": (folder / "feat.npy").stat().st_size, "shape": [5, 3]})
    assert check_output(folder / "feat.npy", npy) is None
    assert check_output(folder / "feat.npy", npy.model_copy(update={"shape": [3, 5]})) == "shape [5, 3] != [3, 5]"
    assert check_output(folder / "nope.npy", npy) == "missing"
    reused, _ = _reopen(store)
    assert not reused  # the damaged HDF5 file: recomputed


def test_no_recompute_policy_is_one_error_naming_the_file(tmp_path, capsys):
    store = ArtifactStore(tmp_path)
    folder = _compute(store)
    key = folder.name
    (folder / "model.pt").write_text("short")
    set_recompute(False)
    with pytest.raises(UserError) as e:
        _reopen(store)
    assert str(e.value) == (f"train {key}: {folder / 'model.pt'} changed since it was written (size 5 != 700); run "
                            f"again without --no-recompute to recompute it, or with --force")
    with pytest.raises(UserError, match="--no-recompute"):
        store.is_complete("train", key)  # the early check (before building encoders) says the same
    assert (folder / "model.pt").read_text() == "short"  # nothing touched
    m = store.manifest("train", key)
    assert m.status == "complete" and m.metrics == {"text": "weights"} and "notice" not in capsys.readouterr().err
    with store.stage(*ARGS, force=True) as run:  # --force still recomputes
        assert not run.reused
        (run.dir / "model.pt").write_text("forced")
        run.add_output("model", "model.pt")
    set_recompute(True)


def test_old_manifest_without_digests_is_reused(tmp_path):
    """A manifest written before digests were recorded: only its sizes are checked (a flipped byte goes unseen)."""
    store = ArtifactStore(tmp_path)
    folder = _compute(store)
    path = folder / MANIFEST
    raw = json.loads(path.read_text())
    for o in raw["outputs"].values():
        del o["sha256"]
    path.write_text(json.dumps(raw))
    assert all(o.sha256 is None for o in read_manifest(path).outputs.values())
    data = bytearray((folder / "model.pt").read_bytes())
    data[10] ^= 0x01
    (folder / "model.pt").write_bytes(bytes(data))
    reused, run = _reopen(store)
    assert reused and run.manifest.metrics == {"text": "weights"}


# ---- end to end: the AVE extraction's early reuse check -----------------------------------------------------------
# Tiny encoders of their own names (registering test_extract's classes again from another module object would
# replace the ones its tests patch).
@register_extractor
class ReuseTinyVisual(Extractor):
    """16x16 thumbnails -> a fixed random 8x8-stride conv -> [2,2,4] per segment (mean over its frames)."""

    name, modality, output_file = "reuse-tiny-visual", "visual", "visual.h5"

    def __init__(self, weights=None, *, random_init=True, seed=0, device="cpu", precision="auto", frames_per_segment=2):
        super().__init__(weights, random_init=random_init, seed=seed, device=device, precision=precision)
        self.weights = WeightsInfo(self.name, None, None, True, seed, "random init")
        self.units_per_segment, self.segment_shape = frames_per_segment, (2, 2, 4)
        self.kernel = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))

    def prepare(self, raw):
        x = torch.as_tensor(raw).permute(0, 3, 1, 2).float() / 255
        return F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)

    def encode(self, units):
        y = F.conv2d(units, self.kernel, stride=8)  # [n,4,2,2]
        k = units.shape[0] // self.units_per_segment
        return y.reshape(k, self.units_per_segment, 4, 2, 2).mean(1).permute(0, 2, 3, 1).contiguous()


@register_extractor
class ReuseTinyAudio(Extractor):
    """Per 1-s chunk: mean |x| over 32 blocks -> a fixed random linear map -> [8]."""

    name, modality, output_file = "reuse-tiny-audio", "audio", "audio.h5"

    def __init__(self, weights=None, *, random_init=True, seed=0, device="cpu", precision="auto", **_):
        super().__init__(weights, random_init=random_init, seed=seed, device=device, precision=precision)
        self.weights = WeightsInfo(self.name, None, None, True, seed, "random init")
        self.units_per_segment, self.segment_shape = 1, (8,)
        self.w = torch.randn(32, 8, generator=torch.Generator().manual_seed(seed + 1))

    def prepare(self, raw):
        return torch.as_tensor(raw, dtype=torch.float32).reshape(-1, 32000)

    def encode(self, units):
        return units.abs().reshape(units.shape[0], 32, 1000).mean(2) @ self.w + 1.0


TINY = dict(visual_encoder="reuse-tiny-visual", audio_encoder="reuse-tiny-audio", random_init=True,
            frames_per_segment=2, workers=0)


@pytest.fixture(scope="module")
def tiny_ds(tmp_path_factory) -> Path:
    from pipeline.ave.synth import SynthConfig, generate_dataset

    out = tmp_path_factory.mktemp("ds") / "synth"
    generate_dataset(out, SynthConfig(videos=3, classes=2, seed=2, duplicates=0, fps=2, width=32, height=32),
                     workers=1)
    return out


def test_extraction_with_a_truncated_visual_file_is_recomputed_to_the_same_bytes(tiny_ds, tmp_path, capsys,
                                                                                    monkeypatch):
    from pipeline.ave import extract as ex
    from pipeline.extraction import encoders

    cfg = ex.ExtractConfig(**TINY, threads=1)
    root = tmp_path / "art"
    first = ex.extract(tiny_ds, cfg, root)
    visual = first["visual"].path
    original = visual.read_bytes()
    audio_manifest = (first["audio"].dir / MANIFEST).read_text()
    assert ex.extract(tiny_ds, cfg, root)["visual"].reused  # intact: reused by the early check
    capsys.readouterr()

    with open(visual, "r+b") as f:
        f.truncate(1000)
    set_recompute(False)  # --no-recompute: the early check stops before any encoder is built
    monkeypatch.setattr(encoders, "build", lambda *a, **k: pytest.fail("an encoder was built"))
    with pytest.raises(UserError, match=re.escape(f"{visual} changed since it was written (size 1000 != "
                                                  f"{len(original)}); run again without --no-recompute")):
        ex.extract(tiny_ds, cfg, root)
    monkeypatch.undo()
    set_recompute(True)

    again = ex.extract(tiny_ds, cfg, root)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"notice: extract_visual {first['visual'].key}: {visual} changed since it was written (size 1000 "
                   f"!= {len(original)}); recomputing"]
    assert not again["visual"].reused and again["visual"].key == first["visual"].key and again["visual"].path == visual
    assert visual.read_bytes() == original  # deterministic with one thread: restored byte for byte
    assert again["audio"].reused and (first["audio"].dir / MANIFEST).read_text() == audio_manifest
    assert ex.extract(tiny_ds, cfg, root)["visual"].reused


def test_cli_no_recompute_option_sets_the_policy(tiny_ds, tmp_path):
    from typer.testing import CliRunner

    from pipeline.ave import extract as ex
    from pipeline.cli import app

    root = tmp_path / "art"
    first = ex.extract(tiny_ds, ex.ExtractConfig(**TINY), root)
    with open(first["audio"].path, "r+b") as f:
        f.truncate(1000)
    args = ["extract", "--dataset", str(tiny_ds), "--root", str(root), "--random-init", "--workers", "0",
            "--frames-per-segment", "2", "--set", "visual_encoder=reuse-tiny-visual",
            "--set", "audio_encoder=reuse-tiny-audio"]
    res = CliRunner().invoke(app, [*args, "--no-recompute"])
    assert isinstance(res.exception, UserError) and str(first["audio"].path) in str(res.exception)
    assert "without --no-recompute" in str(res.exception)
    res = CliRunner().invoke(app, args)  # without it: the policy is back to recomputing
    assert res.exit_code == 0, res.output
    assert (first["audio"].path).stat().st_size > 1000
