"""Decoding recipes of the field's released feature sets (`shared/reference/feature-sets-spec.md`): the frames and
the waveform each released set's encoders saw, in two modes.

- `faithful` (the default of the `ave` and `unav` sets): shells out to ffmpeg as the reference tools did. AVE's
  visual script read every frame through imageio's ffmpeg pipe (rgb24) and counted frames as
  round(banner duration x fps) (imageio <= 2.4); UnAV's I3D re-encoded every video to 25 fps with libx264
  (`-filter:v fps=fps=25`) and read it with OpenCV; the audio went through `ffmpeg ... -acodec copy x.aac` and
  `ffmpeg -i x.aac x.wav` (16-bit PCM at the source rate), read as int16 / 32768.
- `fast`: in-process decoding (decord / PyAV), no re-encode: frames at the same times, the audio decoded to 16-bit
  PCM at its own rate. Closer to the source and faster, but not the released numbers bit for bit.
ffmpeg is the system's when there is one, else the binary imageio-ffmpeg ships (pip-installable, no root); which
one ran is recorded (`ffmpeg_info`). Nothing here knows encoders: it hands frames and samples to the grid.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline import media

MODES = ("faithful", "fast")
AVE_SEGMENTS, AVE_FRAMES_PER_SECOND = 10, 16
UNAV_FPS = 25


# ---- ffmpeg -------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """The system's ffmpeg, else imageio-ffmpeg's bundled binary."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@lru_cache(maxsize=1)
def ffmpeg_info() -> dict:
    """What the manifest records of the ffmpeg that ran: its path and version line."""
    exe = ffmpeg_exe()
    try:
        line = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError) as e:
        line = f"unknown ({e})"
    return {"path": exe, "version": line}


def _run_ffmpeg(args: list[str], what: str) -> None:
    proc = subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise media.MediaError(f"ffmpeg could not {what}: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")


def recipe_record(cfg) -> dict:
    """What a released set's manifest records of the tools behind its numbers (the spec's sources of mismatch:
    decoder, ffmpeg build, resampler version, OpenCV, the frame-index rule)."""
    from importlib import metadata

    out = {"feature_set": cfg.feature_set, "decode_mode": cfg.decode_mode}
    if cfg.decode_mode == "faithful":
        out["ffmpeg"] = ffmpeg_info()
    for lib in ("resampy", "opencv-python-headless", "soundfile", "imageio-ffmpeg", "decord", "av", "pillow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[lib] = metadata.version(lib)
    return out


# ---- AVE: 16 frames per second by the AVE scripts' index formula ----------------------------------------------------
def ave_vid_len(duration_s: float, fps: float) -> int:
    """The frame count imageio <= 2.4 reported: round(duration x fps), duration as ffmpeg's banner prints it (2
    decimals)."""
    return int(round(round(duration_s, 2) * fps))


def ave_frame_indices(vid_len: int, segments: int = AVE_SEGMENTS,
                      per_second: int = AVE_FRAMES_PER_SECOND) -> np.ndarray:
    """[segments * per_second] frame indices: idx(l, i) = floor(l * fi + (i / per_second) * fi), fi = floor(vid_len /
    segments) (AVE's visual script, spec §1.3 step 3); the last frame of each second is never used."""
    fi = vid_len // segments
    return np.array([math.floor(l_ * fi + (i / per_second) * fi) for l_ in range(segments)
                     for i in range(per_second)], dtype=np.int64)


def ave_frames(path: Path, mode: str, notes: list[str]) -> np.ndarray:
    """uint8 RGB [160, H, W, 3]: the frames AVE's visual script averaged. An index past the frames actually decoded
    (the header promised more) takes the last decoded frame, and `notes` says so (the reference script would have
    stopped with an IndexError)."""
    if mode == "faithful":
        import imageio_ffmpeg

        reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        try:
            meta = next(reader)
            width, height = meta["size"]
            idx = ave_frame_indices(ave_vid_len(float(meta["duration"]), float(meta["fps"])))
            wanted, out, last, n = set(idx.tolist()), {}, None, 0
            for n, raw in enumerate(reader):
                frame = np.frombuffer(raw, np.uint8).reshape(height, width, 3)
                last = frame
                if n in wanted:
                    out[n] = frame.copy()
                if n >= idx[-1]:
                    break
        except (RuntimeError, StopIteration, KeyError, ValueError) as e:
            raise media.MediaError(f"ffmpeg could not read the frames: {media._short(e)}") from None
        finally:
            with contextlib.suppress(Exception):
                reader.close()
        if last is None:
            raise media.MediaError("ffmpeg decoded no frame")
    else:
        import decord

        try:
            vr = decord.VideoReader(str(path), num_threads=1)
            duration = float(vr.get_frame_timestamp(len(vr) - 1)[1])
            idx = ave_frame_indices(ave_vid_len(duration, float(vr.get_avg_fps())))
            have = len(vr)
            frames = vr.get_batch(np.minimum(idx, have - 1).tolist()).asnumpy()
        except Exception as e:  # decord raises its own error types
            raise media.MediaError(f"decord could not read the frames: {media._short(e)}") from None
        out = {int(i): f for i, f in zip(np.minimum(idx, have - 1), frames)}
        last, n = frames[-1], have - 1
    missing = [int(i) for i in idx if int(i) not in out]
    if missing:
        notes.append(f"{len(missing)} sampled frame indices (from {missing[0]}) are past the {n + 1} frames decoded: "
                     f"the last frame is used for them")
    return np.stack([out.get(int(i), last) for i in idx])


# ---- UnAV: the video at 25 fps --------------------------------------------------------------------------------------
def frames_25fps(path: Path, mode: str, chunk: int = 64) -> Iterator[np.ndarray]:
    """uint8 RGB frames [H, W, 3] of the video at 25 fps, one at a time (streamed: memory does not grow with the
    video). faithful: ffmpeg's fps filter re-encodes with libx264 as video_features did, then OpenCV reads it;
    fast: the frame on screen at every 1/25 s, decoded in process."""
    if mode == "faithful":
        import cv2

        with tempfile.TemporaryDirectory(prefix="avel-25fps-") as tmp:
            out = Path(tmp) / "video_25fps.mp4"
            _run_ffmpeg(["-i", str(path), "-filter:v", f"fps=fps={UNAV_FPS}", str(out)], "re-encode at 25 fps")
            cap = cv2.VideoCapture(str(out))
            try:
                while True:
                    ok, bgr = cap.read()
                    if not ok:
                        break
                    yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            finally:
                cap.release()
        return
    info = media.probe(path)
    if not info.duration_s:
        raise media.MediaError("no duration: not a readable video")
    n = int(math.floor(info.duration_s * UNAV_FPS + 1e-6))
    for start in range(0, n, chunk):
        times = np.arange(start, min(n, start + chunk), dtype=np.float64) / UNAV_FPS
        frames, _ = media.frames_at(path, times)
        yield from frames


# ---- audio: the waveform as 16-bit PCM at the source rate --------------------------------------------------------
def waveform(path: Path, mode: str) -> tuple[np.ndarray, int]:
    """(mono float64 samples = int16 / 32768 averaged over channels, the source's sample rate). faithful: ffmpeg
    copies the AAC stream out and converts it to a wav (`-acodec copy`, then a plain conversion), read with
    soundfile as int16; fast: PyAV decodes to 16-bit PCM in process. A video without audio is an error here (the
    recipe has no silence rule); the caller records it."""
    if mode == "faithful":
        import soundfile

        with tempfile.TemporaryDirectory(prefix="avel-wav-") as tmp:
            aac, wav = Path(tmp) / "audio.aac", Path(tmp) / "audio.wav"
            _run_ffmpeg(["-i", str(path), "-vn", "-acodec", "copy", str(aac)], "copy the audio stream out")
            _run_ffmpeg(["-i", str(aac), str(wav)], "convert the audio to wav")
            try:
                data, rate = soundfile.read(str(wav), dtype="int16", always_2d=True)
            except Exception as e:
                raise media.MediaError(f"the wav ffmpeg wrote is unreadable: {media._short(e)}") from None
        return (data.astype(np.float64) / 32768.0).mean(axis=1), int(rate)
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise media.MediaError("no audio stream")
            stream = container.streams.audio[0]
            rate = int(stream.rate)
            channels = stream.codec_context.channels or 1
            resampler = av.AudioResampler(format="s16", layout=stream.layout.name, rate=rate)
            parts = []
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1, channels))
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1, channels))
    except media.MediaError:
        raise
    except Exception as e:  # PyAV's FFmpeg errors
        raise media.MediaError(f"PyAV could not decode the audio: {media._short(e)}") from None
    if not parts:
        raise media.MediaError("the audio stream holds no samples")
    return (np.concatenate(parts).astype(np.float64) / 32768.0).mean(axis=1), rate
