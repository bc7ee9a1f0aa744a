"""The synthetic AVE-format dataset generator (pipeline/ave/synth.py): layout, determinism, ground truth, media."""

from __future__ import annotations

import colorsys
import json
import re
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.ave.synth import (
    AUDIO_ONLY,
    BACKGROUND_KINDS,
    EMPTY,
    EVENT,
    GENERATOR_VERSION,
    MISMATCH,
    OTHER_PICTURE,
    PICTURE_WITHOUT_SOUND,
    SOUND_WITHOUT_PICTURE,
    SPLITS,
    VISUAL_ONLY,
    SynthConfig,
    generate_dataset,
    made_with,
    plan_dataset,
    render_audio,
    write_video,
)
from pipeline.synth_engine import AVE_CATEGORIES, class_style

# Small and fast; fps/size reduced where a test does not need AVE's (the decode test writes a full-size video).
SMALL = SynthConfig(videos=12, classes=4, seed=3, fps=8, width=128, height=96)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synth") / "ds", SMALL)


def read_rows(root: Path, name: str = "Annotations.txt") -> list[str]:
    return (root / name).read_text(encoding="utf-8").splitlines()


def read_order(root: Path, split: str) -> np.ndarray:
    with h5py.File(root / f"{split}_order.h5", "r") as f:
        return f["order"][()]


def meta(root: Path) -> dict:
    return json.loads((root / "synth.json").read_text(encoding="utf-8"))


# ---- layout and AVE format --------------------------------------------------------------------------------------
def test_layout_and_ave_format(small):
    for name in ["Annotations.txt", "synth.json", "videos",
                 *(f"{s}_order.h5" for s in SPLITS), *(f"{s}Set.txt" for s in SPLITS)]:
        assert (small / name).exists(), name
    lines = read_rows(small)
    assert len(lines) == SMALL.videos + 1  # one duplicate row by default at >= 10 videos
    text = (small / "Annotations.txt").read_bytes()
    assert text.endswith(b"\n") and b"\r" not in text
    first_seen = []
    for line in lines:
        category, vid, quality, start, end = line.split("&")
        assert category in AVE_CATEGORIES[:SMALL.classes]
        assert re.fullmatch(r"[A-Za-z0-9_-]{11}", vid)
        assert quality == "good"
        assert 0 <= int(start) < int(end) <= 10
        if category not in first_seen:
            first_seen.append(category)
    assert first_seen == list(AVE_CATEGORIES[:SMALL.classes])  # class index = first appearance = AVE's order
    assert "Male speech, man speaking" in first_seen  # names with commas, exactly as AVE spells them

    orders = {s: read_order(small, s) for s in SPLITS}
    for s, order in orders.items():
        assert order.dtype == np.int64 and order.ndim == 1 and order.size >= 1, s
        assert read_rows(small, f"{s}Set.txt") == [lines[i] for i in order]
    every = np.concatenate(list(orders.values()))
    assert sorted(every.tolist()) == list(range(len(lines)))  # disjoint and covering
    train_categories = {lines[i].split("&")[0] for i in orders["train"]}
    assert train_categories == set(AVE_CATEGORIES[:SMALL.classes])

    videos = sorted(p.name for p in (small / "videos").iterdir())
    assert videos == sorted({f"{line.split('&')[1]}.mp4" for line in lines})
    assert len(videos) == SMALL.videos


def test_reads_back_through_the_data_layer(small):
    from pipeline.ave import load_dataset

    ds = load_dataset(small)
    m = meta(small)
    assert ds.classes == list(AVE_CATEGORIES[:SMALL.classes])
    assert ds.background == SMALL.classes
    assert len(ds.video_ids()) == SMALL.videos
    for s in SPLITS:
        assert ds.split_rows(s).tolist() == m["splits"][s]
    labels = ds.segment_labels()
    assert labels.shape == (len(m["rows"]), 10, SMALL.classes + 1)
    for r in m["rows"]:
        a = ds.annotations[r["row"]]
        assert (a.category, a.video_id, a.start, a.end) == (r["category"], r["video_id"], r["start"], r["end"])
        assert ds.video_path(a.video_id).is_file()
        for t in range(10):
            target = int(labels[r["row"], t].argmax())
            if r["kinds"][t] == EVENT:
                # an event: the class both on screen and audible
                assert target == r["label"] and r["visual"][t] == r["audio"][t] == r["label"]
            else:
                # background: the correspondence is broken
                assert target == ds.background and r["kinds"][t] in BACKGROUND_KINDS
                assert not (r["visual"][t] == r["label"] and r["audio"][t] == r["label"])


def test_duplicate_rows_share_a_video_and_go_train_to_test(small):
    m = meta(small)
    dups = [r for r in m["rows"] if r["duplicate_of"] is not None]
    assert len(dups) == 1
    for d in dups:
        orig = m["rows"][d["duplicate_of"]]
        assert orig["duplicate_of"] is None
        assert (d["video_id"], d["category"], d["start"], d["end"], d["visual"], d["audio"]) == \
               (orig["video_id"], orig["category"], orig["start"], orig["end"], orig["visual"], orig["audio"])
        assert orig["row"] in read_order(small, "train") and d["row"] in read_order(small, "test")
    assert not any(r.duplicate_of is not None for r in plan_dataset(SynthConfig(videos=9, classes=3)).rows)
    plan = plan_dataset(SynthConfig(videos=20, duplicates=3))
    dups = [r for r in plan.rows if r.duplicate_of is not None]
    assert len(dups) == 3 and len({r.duplicate_of for r in dups}) == 3
    assert all(r.split == "test" and plan.rows[r.duplicate_of].split == "train" for r in dups)


# ---- determinism ------------------------------------------------------------------------------------------------
def test_same_seed_same_dataset_other_seed_other_dataset(tmp_path):
    cfg = SynthConfig(videos=4, classes=2, seed=11, fps=5, width=96, height=64, sample_rate=16000)
    a = generate_dataset(tmp_path / "a", cfg, workers=1)
    b = generate_dataset(tmp_path / "b", cfg, workers=4)  # several videos rendered and encoded at once
    c = generate_dataset(tmp_path / "c", replace(cfg, seed=12))
    for name in ["Annotations.txt", "synth.json", *(f"{s}Set.txt" for s in SPLITS)]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for s in SPLITS:
        assert np.array_equal(read_order(a, s), read_order(b, s))
    for vid in sorted(p.name for p in (a / "videos").iterdir()):
        # byte-identical (single-threaded x264, no timestamps); decoded content is what the pipeline relies on
        assert (a / "videos" / vid).read_bytes() == (b / "videos" / vid).read_bytes(), vid
        fa, aa = decode(a / "videos" / vid)
        fb, ab = decode(b / "videos" / vid)
        assert np.array_equal(fa, fb) and np.array_equal(aa, ab)
    assert (a / "Annotations.txt").read_text() != (c / "Annotations.txt").read_text()
    assert meta(a)["rows"] != meta(c)["rows"]


def test_two_syntheses_at_the_same_time_write_the_same_bytes(tmp_path):
    """Two processes synthesising one seed at once (each with 3 rendering threads on 2 cores: load and thread
    interleaving differ between them) write byte-identical videos, equal to a quiet single-threaded run's."""
    import subprocess
    import sys

    cfg = dict(videos=6, classes=3, seed=5, fps=5, width=64, height=48, sample_rate=16000)
    code = ("import sys; from pathlib import Path; from pipeline.ave.synth import SynthConfig, generate_dataset; "
            f"generate_dataset(Path(sys.argv[1]), SynthConfig(**{cfg!r}), workers=3)")
    repo = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / name)], cwd=repo,
                              stderr=subprocess.PIPE) for name in ("p1", "p2")]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    quiet = generate_dataset(tmp_path / "quiet", SynthConfig(**cfg), workers=1)
    names = sorted(p.name for p in (quiet / "videos").iterdir())
    assert len(names) == 6
    for name in names:
        want = (quiet / "videos" / name).read_bytes()
        assert (tmp_path / "p1" / "videos" / name).read_bytes() == want, name
        assert (tmp_path / "p2" / "videos" / name).read_bytes() == want, name


def test_rgb_to_yuv420_matches_bt601():
    from pipeline.synth_engine import rgb_to_yuv420

    img = np.zeros((4, 4, 3), np.uint8)
    img[:2, :2] = (255, 0, 0)  # red block
    img[2:, 2:] = (255, 255, 255)
    yuv = rgb_to_yuv420(img)
    assert yuv.shape == (6, 4)
    y, u, v = yuv[:4], yuv[4:5].reshape(2, 2), yuv[5:6].reshape(2, 2)
    assert y[0, 0] == 82 and y[3, 3] == 235 and y[0, 3] == 16  # BT.601 limited range: red, white, black
    assert (u[0, 0], v[0, 0]) == (90, 240) and (u[1, 1], v[1, 1]) == (128, 128)


def test_plan_is_deterministic_and_seed_dependent():
    assert plan_dataset(SynthConfig(seed=5)) == plan_dataset(SynthConfig(seed=5))
    assert plan_dataset(SynthConfig(seed=5)).rows != plan_dataset(SynthConfig(seed=6)).rows
    x = render_audio([0, None, 1], seed=2, sample_rate=16000)
    assert np.array_equal(x, render_audio([0, None, 1], seed=2, sample_rate=16000))


def decode(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import decord

    vr = decord.VideoReader(str(path))
    frames = vr.get_batch(list(range(len(vr)))).asnumpy()
    audio = decord.AudioReader(str(path), sample_rate=32000, mono=True)[:].asnumpy()
    return frames, audio


# ---- the plan: splits, event lengths, background kinds ----------------------------------------------------------
@pytest.mark.parametrize("videos,classes", [(3, 1), (4, 2), (6, 4), (24, 4), (40, 28), (200, 10)])
def test_plan_splits_and_segments(videos, classes):
    plan = plan_dataset(SynthConfig(videos=videos, classes=classes, seed=videos))
    rows = plan.rows
    for s in SPLITS:
        assert len(plan.orders[s]) >= 1, s
    assert sorted(i for s in SPLITS for i in plan.orders[s]) == list(range(len(rows)))
    if videos >= classes + 2:
        assert {rows[i].label for i in plan.orders["train"]} == set(range(classes))
    assert len({r.video_id for r in rows}) == videos
    for r in rows:
        assert len(r.visual) == len(r.audio) == len(r.kinds) == 10
        for t in range(10):
            event = r.start <= t < r.end
            assert (r.kinds[t] == EVENT) == event
            assert (r.visual[t] == r.audio[t] == r.label) == event
            if r.kinds[t] == MISMATCH:
                assert r.visual[t] == r.label and r.audio[t] not in (None, r.label)
            if r.kinds[t] == OTHER_PICTURE:
                assert r.audio[t] == r.label and r.visual[t] not in (None, r.label)
            if r.kinds[t] == VISUAL_ONLY:
                assert r.visual[t] == r.label and r.audio[t] is None
            if r.kinds[t] == AUDIO_ONLY:
                assert r.audio[t] == r.label and r.visual[t] is None


def test_version_2_events_vary_like_ave():
    rows = plan_dataset(SynthConfig(videos=400, classes=4, seed=1, version=2)).rows
    lengths = np.array([r.end - r.start for r in rows])
    assert 0.35 < np.mean(lengths == 10) < 0.65  # many fully-event videos, as in AVE
    assert set(range(1, 11)) <= set(lengths.tolist())  # short and long events
    assert len({r.start for r in rows}) >= 8  # events start anywhere
    assert 7.0 < lengths.mean() < 8.5  # AVE: 8.3
    kinds = {k for r in rows for k in r.kinds}
    assert kinds == {EVENT, VISUAL_ONLY, AUDIO_ONLY, MISMATCH, EMPTY}


def test_version_3_needs_both_modalities():
    """Each single modality's blind spot (the seconds it must take for the event: the class's picture without its
    sound for a model that sees the picture, the sound without its picture for one that hears) is a fifth of all
    seconds, so a single-modality model is wrong on about that share whatever it learns."""
    rows = plan_dataset(SynthConfig(videos=400, classes=4, seed=1)).rows
    kinds = np.array([r.kinds for r in rows])
    assert 0.05 < np.mean([r.end - r.start == 10 for r in rows]) < 0.15  # few fully-event rows
    lengths = [r.end - r.start for r in rows]
    assert set(range(1, 11)) <= set(lengths)  # short and long events
    assert 0.4 < np.mean(kinds != EVENT) < 0.5
    for blind in (PICTURE_WITHOUT_SOUND, SOUND_WITHOUT_PICTURE):
        assert 0.16 < np.isin(kinds, blind).mean() < 0.22, blind
    assert set(kinds.ravel()) == {EVENT, *BACKGROUND_KINDS}


def test_a_version_is_written_and_an_older_folder_is_not_taken_for_a_newer_one(small, tmp_path):
    assert meta(small)["version"] == GENERATOR_VERSION == SMALL.version == 3
    assert made_with(small, SMALL)
    assert not made_with(small, replace(SMALL, version=2)) and not made_with(small, replace(SMALL, seed=4))
    assert not made_with(tmp_path, SMALL)  # no synth.json
    old = generate_dataset(tmp_path / "v2", replace(SMALL, videos=4, version=2))
    assert meta(old)["version"] == 2 and made_with(old, replace(SMALL, videos=4, version=2))
    assert not made_with(old, replace(SMALL, videos=4))


# ---- media ------------------------------------------------------------------------------------------------------
def test_default_video_decodes_with_decord(tmp_path):
    import decord

    path = tmp_path / "v.mp4"
    visual = [0, 0, 1, 1, None, None, 2, 2, 3, 3]
    audio = [0, None, 1, 2, 3, None, 2, 2, 3, None]
    write_video(path, visual, audio, seed=4)
    vr = decord.VideoReader(str(path))
    assert len(vr) == 250 and vr[0].shape == (240, 320, 3)
    assert vr.get_avg_fps() == pytest.approx(25)
    ar = decord.AudioReader(str(path), sample_rate=32000, mono=True)
    assert ar.shape[0] == 1 and abs(ar.shape[1] - 320000) <= 2048  # ~10 s (AAC priming/padding aside)

    # The content matches the per-second plan: the class colour on screen, the class pitch audible.
    for t, k in enumerate(visual):
        frame = vr[t * 25 + 12].asnumpy()
        share = colour_share(frame, None if k is None else class_style(k).rgb)
        if k is None:
            assert share["saturated"] < 0.01, t
        else:
            assert share["class"] > 0.04, t
    samples = ar[:].asnumpy()[0]
    for t, k in enumerate(audio):
        sec = samples[t * 32000 + 3200:(t + 1) * 32000 - 3200]
        rms = float(np.sqrt(np.mean(sec ** 2)))
        if k is None:  # noise bed, sometimes a noise burst
            assert rms < 0.05, t
        else:
            assert rms > 0.05, t
            spec = np.abs(np.fft.rfft(sec * np.hanning(sec.size)))
            peak = np.fft.rfftfreq(sec.size, 1 / 32000)[spec.argmax()]
            assert abs(peak / class_style(k).pitch_hz - 1) < 0.05, (t, peak)  # detuning, vibrato


def colour_share(frame: np.ndarray, rgb) -> dict:
    from matplotlib.colors import rgb_to_hsv

    hsv = rgb_to_hsv(frame.reshape(-1, 3) / 255.0)
    saturated = (hsv[:, 1] > 0.6) & (hsv[:, 2] > 0.4)
    out = {"saturated": float(saturated.mean())}
    if rgb is not None:
        hue = colorsys.rgb_to_hsv(*(np.array(rgb) / 255.0))[0]
        d = np.abs(hsv[:, 0] - hue)
        out["class"] = float((saturated & (np.minimum(d, 1 - d) < 0.05)).mean())
    return out


def test_video_without_audio_and_other_lengths(tmp_path):
    import av
    import decord

    silent = tmp_path / "silent.mp4"
    write_video(silent, [0, None, 1, 1], None, fps=10, width=96, height=64, num_classes=2)
    with av.open(str(silent)) as c:
        assert len(c.streams.audio) == 0 and len(c.streams.video) == 1
        assert c.streams.video[0].codec_context.name == "h264"
    assert len(decord.VideoReader(str(silent))) == 40

    long = tmp_path / "long.mp4"
    write_video(long, [None] * 23, [None] * 23, fps=2, width=64, height=48, sample_rate=32000)
    with av.open(str(long)) as c:
        assert c.streams.audio[0].codec_context.name == "aac" and c.streams.audio[0].sample_rate == 32000
        assert c.duration / 1e6 == pytest.approx(23, abs=0.2)

    with pytest.raises(ValueError, match="audio has 2 entries"):
        write_video(tmp_path / "bad.mp4", [0, 0, 0], [0, 0])
    with pytest.raises(ValueError, match="class index"):
        write_video(tmp_path / "bad.mp4", [0, 5], None, num_classes=4)
    assert not list(tmp_path.glob("*bad*"))


# ---- the output folder ------------------------------------------------------------------------------------------
def test_refuses_foreign_folder_and_replaces_previous_output(tmp_path):
    cfg = SynthConfig(videos=3, classes=1, fps=2, width=64, height=48, sample_rate=16000)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a previous"):
        generate_dataset(foreign, cfg)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    generate_dataset(empty, cfg)
    (empty / "features.h5").write_text("kept")  # something a later stage put beside the dataset
    first = read_rows(empty)
    generate_dataset(empty, replace(cfg, seed=1))
    assert read_rows(empty) != first
    assert (empty / "features.h5").read_text() == "kept"
    assert len(list((empty / "videos").iterdir())) == 3  # the old videos are gone
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_config_errors():
    with pytest.raises(ValueError, match="at least classes"):
        SynthConfig(videos=3, classes=4)
    with pytest.raises(ValueError, match="classes must be 1..28"):
        SynthConfig(videos=40, classes=29)
    with pytest.raises(ValueError, match="seed"):
        SynthConfig(seed=-1)
    with pytest.raises(ValueError, match="even"):
        SynthConfig(width=321)
    with pytest.raises(ValueError, match="duplicates"):
        plan_dataset(SynthConfig(videos=3, classes=1, duplicates=5))
    assert SynthConfig(split=[0.8, 0.1, 0.1]).split == (0.8, 0.1, 0.1)
