"""Decoding: the AVE sampling grid, the length rule, 32 kHz audio windows, missing audio, decoder fallback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import media
from pipeline.ave.synth import write_video


def counter_video(path: Path, seconds: int, fps: int, audio: bool = True, sr: int = 44100) -> Path:
    """Frame k is uniformly grey at level 4*k (mod 256): the decoded level tells which frame was picked.
    Audio: a 440 Hz tone whose amplitude is 0.05*(1 + second), so a sample's second can be read back."""
    import av

    with av.open(str(path), "w", format="mp4") as c:
        vs = c.add_stream("libx264", rate=fps, options={"qp": "0", "preset": "ultrafast"})
        vs.width, vs.height, vs.pix_fmt = 32, 32, "yuv420p"
        if audio:
            a = c.add_stream("aac", rate=sr)
            a.layout = "mono"
        for k in range(seconds * fps):
            img = np.full((32, 32, 3), (4 * k) % 256, np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = k
            c.mux(vs.encode(frame))
        c.mux(vs.encode(None))
        if audio:
            t = np.arange(seconds * sr) / sr
            x = (0.05 * (1 + np.floor(t)) * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
            for s in range(0, x.shape[1], 1024):
                fr = av.AudioFrame.from_ndarray(x[:, s:s + 1024], format="fltp", layout="mono")
                fr.sample_rate, fr.pts = sr, s
                c.mux(a.encode(fr))
            c.mux(a.encode(None))
    return path


def levels(frames: np.ndarray) -> np.ndarray:
    return np.round(frames.reshape(frames.shape[0], -1).mean(1) / 4).astype(int)  # frame index (mod 64)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    return {
        "ten": counter_video(d / "ten.mp4", 10, 8),
        "short": counter_video(d / "short.mp4", 6, 8),
        "long": counter_video(d / "long.mp4", 12, 8),
        "silent": counter_video(d / "silent.mp4", 10, 8, audio=False),
    }


# ---- the grid ---------------------------------------------------------------------------------------------------
def test_grid_matches_the_reference_sampler_for_10s_videos():
    """For a 10-s constant-rate video the reference's int(l*fi + i/16*fi) with fi = frames/10 is the frame on
    screen at l + i/16; our timestamp grid gives the same indices."""
    for fps in (24, 25, 30):
        n = 10 * fps
        fi = n // 10
        ref = np.array([int(s * fi + (i / 16) * fi) for s in range(10) for i in range(16)])
        ours = media.frame_indices(np.arange(n) / fps, media.sample_times(0, 10, 16))
        assert np.array_equal(ours, ref), fps


def test_sample_times_and_clamping():
    t = media.sample_times(2, 3, 4)
    assert t.shape == (12,) and t[0] == 2 and t[4] == 3 and t[5] == 3.25
    # past the last frame: the last frame; before the first: the first
    assert media.frame_indices(np.array([0.0, 1.0]), np.array([-1.0, 0.5, 1.0, 99.0])).tolist() == [0, 0, 1, 1]


def test_decode_ten_seconds(videos):
    d = media.decode(videos["ten"], frames_per_segment=4)
    assert d.frames.shape == (40, 32, 32, 3) and d.frames.dtype == np.uint8
    assert d.audio.shape == (320000,) and d.audio.dtype == np.float32
    # 8 fps, 4 samples per second -> every other frame
    assert levels(d.frames).tolist() == [k % 64 for k in range(0, 80, 2)]
    i = d.info
    assert (i.decoder, i.frames_decoded, i.length_rule, i.audio_status) == ("decord", 80, "exact", "ok")
    assert abs(i.duration_s - 10) < 1e-6 and i.fallback_reason is None
    assert i.audio_samples > 320000 and i.audio_trimmed_samples == i.audio_samples - 320000  # AAC padding cut
    # the audio of second s has amplitude 0.05*(s+1)
    amp = np.abs(d.audio.reshape(10, 32000)[:, 2000:30000]).max(1)
    assert np.allclose(amp, 0.05 * np.arange(1, 11), atol=0.01)


def test_short_video_is_padded_with_its_last_frame(videos):
    d = media.decode(videos["short"], frames_per_segment=2)
    assert d.frames.shape[0] == 20
    idx = levels(d.frames)
    assert idx[:12].tolist() == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44]
    assert (idx[12:] == 47).all()  # frame 47 = the last of 6 s x 8 fps
    i = d.info
    assert i.length_rule == "padded" and abs(i.padded_s - 4) < 1e-6
    assert d.audio.shape == (320000,) and np.all(d.audio[7 * 32000:] == 0)  # zero-padded after 6 s (+ AAC tail)
    assert i.audio_padded_samples > 0


def test_long_video_is_trimmed_and_windows_work(videos):
    d = media.decode(videos["long"], frames_per_segment=1)
    assert d.info.length_rule == "trimmed" and abs(d.info.trimmed_s - 2) < 1e-6
    assert levels(d.frames).tolist() == [8 * s for s in range(8)] + [0, 8]  # 64 wraps to 0
    w = media.decode(videos["long"], frames_per_segment=1, start=2, segments=10)
    assert (w.info.window_start, w.info.length_rule) == (2, "exact")
    assert levels(w.frames)[0] == 16  # second 2 starts at frame 16
    amp = np.abs(w.audio.reshape(10, 32000)[:, 2000:30000]).max(1)
    assert np.allclose(amp, 0.05 * np.arange(3, 13), atol=0.01)


def test_no_audio_track_is_silence_with_a_status(videos):
    d = media.decode(videos["silent"], frames_per_segment=1)
    assert d.audio.shape == (320000,) and not d.audio.any()
    assert d.info.audio_status == "missing" and any("no audio" in n for n in d.info.notes)
    only_audio = media.decode(videos["silent"], video=False)
    assert only_audio.frames is None and only_audio.info.audio_status == "missing"


def test_pyav_gives_the_same_frames(videos):
    a = media.decode(videos["ten"], frames_per_segment=3)
    b = media.decode(videos["ten"], frames_per_segment=3, decoders=("pyav",))
    assert b.info.decoder == "pyav" and np.array_equal(a.frames, b.frames)
    assert b.info.frames_decoded == 80 and b.info.length_rule == "exact"
    # resamplers differ (decord's output lags by ~0.5 ms): same per-second loudness
    ea, eb = (np.sqrt((x.reshape(10, -1) ** 2).mean(1)) for x in (a.audio, b.audio))
    assert np.allclose(ea, eb, rtol=0.02)


def test_decord_failure_falls_back_to_pyav(videos, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated decord failure")

    monkeypatch.setattr(media, "_video_decord", broken)
    d = media.decode(videos["ten"], frames_per_segment=1)
    assert d.info.decoder == "pyav" and "simulated decord failure" in d.info.fallback_reason
    assert levels(d.frames).tolist() == [(8 * s) % 64 for s in range(10)]


def test_unreadable_and_missing_files(tmp_path, videos):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    with pytest.raises(media.MediaError, match="decord.*pyav"):
        media.decode(bad)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(videos["ten"].read_bytes()[:3000])
    with pytest.raises(media.MediaError):
        media.decode(truncated)
    with pytest.raises(media.MediaError, match="not found"):
        media.decode(tmp_path / "nope.mp4")
    (tmp_path / "empty.mp4").touch()
    with pytest.raises(media.MediaError, match="empty"):
        media.decode(tmp_path / "empty.mp4")


def test_synth_video_and_probe(tmp_path):
    path = tmp_path / "s.mp4"
    write_video(path, [0, None, 1], [0, None, 1], fps=5, width=64, height=48)
    d = media.decode(path, frames_per_segment=16)
    assert d.frames.shape == (160, 48, 64, 3) and d.audio.shape == (320000,)
    assert d.info.length_rule == "padded" and abs(d.info.padded_s - 7) < 1e-6
    p = media.probe(path)
    assert abs(p.duration_s - 3) < 1e-6 and p.audio_status == "ok" and (p.width, p.height) == (64, 48)
