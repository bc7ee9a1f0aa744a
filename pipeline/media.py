"""Decoding videos for feature extraction: the frames of the AVE sampling grid and 32 kHz mono audio.

`decode(path)` returns, for a window of `segments` 1-s segments starting at second `start` (AVE: 0 and 10),
- `frames`: uint8 [segments * frames_per_segment, H, W, 3] RGB, `frames_per_segment` (16) evenly spaced frames
  per second: the frame on screen at time `start + s + i / frames_per_segment` for segment s, sub-frame i;
- `audio`: float32 [segments * 32000] mono samples of the same window;
- `info`: what happened (decoder, duration, frames decoded, padding/trimming, audio status), for the manifest.

The sampling grid (why it is built from timestamps). The reference (CACE-Net `visual_feature_extractor.py`, from
AVE-ECCV18) takes `fi = int(CAP_PROP_FRAME_COUNT / 10)` and frame `int(l*fi + (i/16)*fi)`. For a 10-s
constant-frame-rate video this is the frame shown at time `l + i/16`, which is what we pick, but from the
timestamps of the frames the decoder actually lists and decodes, not from a container's frame count (which can be
wrong, as AVE's maintainers warn) and not from an assumed duration of 10 s.

One rule for any length (recorded per video in `info`): the window is `[start, start + segments)` seconds of the
video's own timeline (first frame = 0 s). Times past the last frame show the last frame (a short video is padded
by repeating its last frame; `padded_s` says by how much) and anything after the window is not used (a long video
is trimmed to the window; `trimmed_s`). Audio follows the same rule: the window's samples, zeros past the end of
the stream (so AAC encoder padding at the end is cut off and short audio is zero-padded), exactly
`segments * sample_rate` samples. A video without an audio stream gives silence and `audio_status == "missing"`.

Decoders: for frames decord first (fast random access); if it cannot open the file or decode the frames it needs,
PyAV (FFmpeg, sequential decode, which also tells how many frames are really decodable) gets one try. For audio
the order is reversed (decord's AudioReader leaks its buffer; see `_decode_audio`). Only when both fail is the
video a failure (`MediaError`, recorded by the caller; other videos go on).

`expand_videos(paths)` turns the files and folders a person names (`avel predict`, `avel dense predict`) into the
list of video files to read.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from pipeline.errors import UserError

log = logging.getLogger(__name__)

SAMPLE_RATE = 32000  # Cnn14's rate
SEGMENTS = 10  # AVE videos are 10 s, one label per second
FRAMES_PER_SEGMENT = 16  # the AVE sampler: 16 frames per 1-s segment
EXACT_TOLERANCE_S = 0.05  # a video within this of the window end counts as exact (AVE clips vary by a frame or so)
TIME_EPS = 1e-4  # seconds; absorbs float rounding when a sample time falls exactly on a frame's start
DECODERS = ("decord", "pyav")  # video: decord first (fast random access to the grid frames)
AUDIO_DECODERS = ("pyav", "decord")  # audio: PyAV first (see _decode_audio)
# What a folder's video files are called (a file named explicitly is taken whatever its suffix)
VIDEO_SUFFIXES = (".3gp", ".avi", ".flv", ".m4v", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".webm", ".wmv")


class MediaError(RuntimeError):
    """A video that no decoder could read (or that has no decodable frames). The caller records it and goes on."""


@dataclass
class VideoInfo:
    path: str
    decoder: str | None = None  # decoder that produced the frames ("decord" or "pyav")
    fallback_reason: str | None = None  # why the first decoder was not used
    frames_decoded: int = 0  # frames the decoder listed and decoded (the grid's basis)
    fps: float | None = None
    duration_s: float | None = None  # first frame start to last frame end
    width: int | None = None
    height: int | None = None
    window_start: int = 0
    window_segments: int = SEGMENTS
    frames_per_segment: int = FRAMES_PER_SEGMENT
    length_rule: str | None = None  # "exact", "padded" (last frame repeated) or "trimmed" (window only)
    padded_s: float = 0.0
    trimmed_s: float = 0.0
    audio_status: str = "not-decoded"  # "ok", "missing" (no audio stream: silence), "failed", "not-decoded"
    audio_decoder: str | None = None
    audio_samples: int | None = None  # samples the stream decoded to at SAMPLE_RATE, before windowing
    audio_padded_samples: int = 0
    audio_trimmed_samples: int = 0
    audio_error: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("fps", "duration_s", "padded_s", "trimmed_s"):
            if d[k] is not None:
                d[k] = round(float(d[k]), 4)
        return d


@dataclass
class Decoded:
    frames: np.ndarray | None  # uint8 [segments*frames_per_segment, H, W, 3]
    audio: np.ndarray | None  # float32 [segments*sample_rate]
    info: VideoInfo


# ---- the sampling grid ------------------------------------------------------------------------------------------
def sample_times(start: int = 0, segments: int = SEGMENTS, frames_per_segment: int = FRAMES_PER_SEGMENT) -> np.ndarray:
    """[segments*frames_per_segment] times in seconds: `start + s + i/frames_per_segment`, segment-major."""
    s = np.arange(segments, dtype=np.float64)[:, None]
    i = np.arange(frames_per_segment, dtype=np.float64)[None, :]
    return (start + s + i / frames_per_segment).reshape(-1)


def frame_indices(frame_starts: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Index of the frame on screen at each time: the last frame whose start is <= t (0 before the first frame,
    the last frame after the end). `frame_starts` are increasing presentation times in seconds, first = 0."""
    idx = np.searchsorted(np.asarray(frame_starts, np.float64), np.asarray(times) + TIME_EPS, side="right") - 1
    return np.clip(idx, 0, len(frame_starts) - 1)


def _length_rule(info: VideoInfo, duration: float, window_end: float) -> None:
    info.duration_s = duration
    info.padded_s = max(0.0, window_end - duration)
    info.trimmed_s = max(0.0, duration - window_end)
    if abs(duration - window_end) <= EXACT_TOLERANCE_S:
        info.length_rule = "exact"
    else:
        info.length_rule = "padded" if duration < window_end else "trimmed"


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = next((line for line in text if line.strip()), type(e).__name__)
    return f"{type(e).__name__}: {first[:200]}"


# ---- video ------------------------------------------------------------------------------------------------------
def _video_decord(path: Path, times: np.ndarray, info: VideoInfo, threads: int) -> np.ndarray:
    import decord

    vr = decord.VideoReader(str(path), num_threads=threads)
    n = len(vr)  # from the packet index decord builds at open, not the container header's frame count
    if n == 0:
        raise MediaError("no video frames")
    stamps = np.asarray(vr.get_frame_timestamp(np.arange(n)), np.float64)  # [n, 2] start, end (s)
    starts = stamps[:, 0] - stamps[0, 0]
    if np.any(np.diff(starts) < 0):  # out-of-order timestamps: trust the decode order instead
        starts = np.maximum.accumulate(starts)
    idx = frame_indices(starts, times)
    unique, inverse = np.unique(idx, return_inverse=True)
    frames = vr.get_batch(unique.tolist()).asnumpy()
    if frames.shape[0] != unique.size:
        raise MediaError(f"decord returned {frames.shape[0]} frames for {unique.size} indices")
    fps = float(vr.get_avg_fps() or 0) or None
    end = stamps[-1, 1] - stamps[0, 0]
    if not end > starts[-1]:  # a missing end time: one average frame interval
        end = starts[-1] + (1 / fps if fps else 0.0)
    info.frames_decoded, info.fps = n, fps
    _length_rule(info, float(end), info.window_start + info.window_segments)
    return frames[inverse]


def _video_pyav(path: Path, times: np.ndarray, info: VideoInfo, threads: int) -> np.ndarray:
    """Sequential decode; keeps only the frames the grid needs, so memory does not depend on the video's length."""
    import av

    order = np.argsort(times, kind="stable")
    picked: list[np.ndarray | None] = [None] * len(times)
    k = 0  # next sample (in time order) still waiting for its frame
    prev = None  # (start time, frame) of the frame currently on screen
    first_t = None
    n = 0
    last_end = 0.0
    fps = None
    window_end = float(info.window_start + info.window_segments)
    stopped_early = False
    header_duration = None
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise MediaError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if threads:
            stream.codec_context.thread_count = threads
        fps = float(stream.average_rate) if stream.average_rate else None
        if stream.duration is not None and stream.time_base:
            header_duration = float(stream.duration * stream.time_base)
        try:
            for frame in container.decode(stream):
                t = frame.time
                if t is None:
                    t = (prev[0] + first_t + 1 / (fps or 25)) if prev is not None else 0.0
                if first_t is None:
                    first_t = t
                t -= first_t
                if prev is not None and t < prev[0]:
                    t = prev[0]
                # every pending sample before this frame's start showed the previous frame
                while k < len(order) and prev is not None and times[order[k]] + TIME_EPS < t:
                    picked[order[k]] = prev[1]
                    k += 1
                if frame.duration and frame.time_base:
                    last_end = t + float(frame.duration * frame.time_base)
                else:
                    last_end = t + 1 / (fps or 25)
                prev = (t, frame)
                n += 1
                if k == len(order) and t > window_end:
                    stopped_early = True  # the window is done; the rest of a long video is not decoded
                    break
        except av.error.FFmpegError as e:
            if n == 0:
                raise
            info.notes.append(f"pyav stopped after {n} frames: {_short(e)}")
    if n == 0 or prev is None:
        raise MediaError("no decodable video frames")
    while k < len(order):  # past the last frame: repeat it
        picked[order[k]] = prev[1]
        k += 1
    cache: dict[int, np.ndarray] = {}
    out = []
    for fr in picked:
        if id(fr) not in cache:
            cache[id(fr)] = fr.to_ndarray(format="rgb24")
        out.append(cache[id(fr)])
    info.frames_decoded, info.fps = n, fps
    duration = float(last_end)
    if stopped_early:
        info.notes.append(f"pyav decoded the first {n} frames (the window); duration from the header")
        duration = max(duration, header_duration or 0.0)
    _length_rule(info, duration, window_end)
    return np.stack(out)


# ---- audio ------------------------------------------------------------------------------------------------------
def _audio_decord(path: Path, sample_rate: int) -> np.ndarray:
    import decord

    ar = decord.AudioReader(str(path), sample_rate=sample_rate, mono=True)
    return np.asarray(ar[:].asnumpy(), np.float32).reshape(-1)


def _has_audio_stream(path: Path) -> bool:
    import av

    with av.open(str(path)) as container:
        return bool(container.streams.audio)


def _audio_pyav(path: Path, sample_rate: int) -> np.ndarray | None:
    """All samples of the first audio stream, mono at `sample_rate`; None when the file has no audio stream."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks = []
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def _window_audio(samples: np.ndarray, info: VideoInfo, sample_rate: int) -> np.ndarray:
    lo = info.window_start * sample_rate
    hi = lo + info.window_segments * sample_rate
    out = np.zeros(hi - lo, np.float32)
    part = samples[lo:hi]
    out[:part.size] = part
    info.audio_samples = int(samples.size)
    info.audio_padded_samples = int(max(0, hi - samples.size) - max(0, lo - samples.size))
    info.audio_trimmed_samples = int(max(0, samples.size - hi))
    return out


def _decode_audio(path: Path, info: VideoInfo, sample_rate: int, decoders: tuple[str, ...]) -> np.ndarray | None:
    """The window's audio, silence for a file without an audio stream, None if the stream cannot be decoded.

    PyAV goes first here: decord's AudioReader keeps its decoded buffer (about 1.3 MB per file, measured over 200
    files: a decoding worker would grow by gigabytes over AVE), and PyAV was faster too (33-45 ms against 58 ms
    per 10-s clip). decord is the fallback."""
    errors = []
    for name in [d for d in AUDIO_DECODERS if d in decoders]:
        try:
            if name == "pyav":
                samples = _audio_pyav(path, sample_rate)
                if samples is None:
                    info.audio_status, info.audio_decoder = "missing", name
                    info.notes.append("no audio stream: silence")
                    return np.zeros(info.window_segments * sample_rate, np.float32)
            else:
                samples = _audio_decord(path, sample_rate)
        except Exception as e:  # decord raises DECORDError/RuntimeError, PyAV its FFmpegError subclasses
            errors.append(f"{name}: {_short(e)}")
            continue
        info.audio_status, info.audio_decoder = "ok", name
        return _window_audio(samples, info, sample_rate)
    if "pyav" not in decoders:  # decord alone cannot tell "no stream" from "broken stream"
        try:
            if not _has_audio_stream(path):
                info.audio_status = "missing"
                info.notes.append("no audio stream: silence")
                return np.zeros(info.window_segments * sample_rate, np.float32)
        except Exception:
            pass
    info.audio_status, info.audio_error = "failed", "; ".join(errors)
    return None


# ---- the entry points -------------------------------------------------------------------------------------------
def decode(path: Path, *, video: bool = True, audio: bool = True, start: int = 0, segments: int = SEGMENTS,
           frames_per_segment: int = FRAMES_PER_SEGMENT, sample_rate: int = SAMPLE_RATE,
           decoders: tuple[str, ...] = DECODERS, threads: int = 0) -> Decoded:
    """Frames of the sampling grid and/or the audio of the window `[start, start + segments)` seconds.

    Raises MediaError when the file is missing or no decoder can produce video frames (with `video=True`); with
    `video=False`, an audio stream that cannot be decoded raises MediaError too. A missing audio stream is not an
    error (silence, `info.audio_status == "missing"`). `threads`: decoder threads (0 = the decoder's default).
    """
    path = Path(path)
    if start < 0 or segments < 1 or frames_per_segment < 1:
        raise ValueError(f"need start >= 0, segments >= 1, frames_per_segment >= 1; got {start}, {segments}, "
                         f"{frames_per_segment}")
    unknown = [d for d in decoders if d not in DECODERS]
    if unknown or not decoders:
        raise ValueError(f"decoders must be a non-empty subset of {DECODERS}, got {decoders}")
    info = VideoInfo(path=str(path), window_start=start, window_segments=segments,
                     frames_per_segment=frames_per_segment)
    if not path.is_file():
        raise MediaError(f"file not found: {path}")
    if path.stat().st_size == 0:
        raise MediaError("empty file")

    frames = None
    if video:
        frames, info = _frames(path, sample_times(start, segments, frames_per_segment), info, decoders, threads)
        if info.duration_s is not None and start >= info.duration_s:
            info.notes.append(f"window starts at {start} s, after the video's end ({info.duration_s:.2f} s): "
                              f"every frame is the last frame")

    samples = None
    if audio:
        samples = _decode_audio(path, info, sample_rate, decoders)
        if samples is None and not video:
            raise MediaError(f"audio could not be decoded: {info.audio_error}")
    return Decoded(frames, samples, info)


def _frames(path: Path, times: np.ndarray, info: VideoInfo, decoders: tuple[str, ...],
            threads: int) -> tuple[np.ndarray, VideoInfo]:
    """The frames on screen at `times` (s), decord first and PyAV as the fallback; MediaError if neither can."""
    errors = []
    for name in decoders:
        attempt = VideoInfo(**{**info.__dict__, "notes": list(info.notes)})
        try:
            fn = _video_decord if name == "decord" else _video_pyav
            frames = fn(path, times, attempt, threads)
        except Exception as e:
            errors.append(f"{name}: {_short(e)}")
            continue
        attempt.decoder = name
        attempt.fallback_reason = "; ".join(errors) or None
        attempt.height, attempt.width = int(frames.shape[1]), int(frames.shape[2])
        return frames, attempt
    raise MediaError("no decoder could read the video: " + "; ".join(errors))


def frames_at(path: Path, times: np.ndarray, *, decoders: tuple[str, ...] = DECODERS,
              threads: int = 0) -> tuple[np.ndarray, VideoInfo]:
    """uint8 frames [len(times), H, W, 3] on screen at arbitrary times (seconds from the first frame): for time grids
    other than AVE's whole seconds (the dense task's 0.96-s windows every 0.32 s). Times past the end repeat the
    last frame."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"file not found: {path}")
    times = np.asarray(times, np.float64)
    info = VideoInfo(path=str(path), window_start=0, window_segments=max(1, int(np.ceil(times.max(initial=0.0)))))
    return _frames(path, times, info, decoders, threads)


def probe(path: Path) -> VideoInfo:
    """Duration, frame rate, frame count and audio presence of a video without decoding its frames (for splitting
    long videos into windows). Raises MediaError if neither decoder can open it."""
    path = Path(path)
    info = VideoInfo(path=str(path))
    if not path.is_file():
        raise MediaError(f"file not found: {path}")
    errors = []
    try:
        import decord

        vr = decord.VideoReader(str(path), num_threads=1)
        n = len(vr)
        if n:
            stamps = np.asarray(vr.get_frame_timestamp([0, n - 1]), np.float64)
            info.decoder, info.frames_decoded = "decord", n
            info.fps = float(vr.get_avg_fps() or 0) or None
            info.duration_s = float(stamps[1, 1] - stamps[0, 0])
            h, w = vr[0].shape[:2]
            info.height, info.width = int(h), int(w)
    except Exception as e:
        errors.append(f"decord: {_short(e)}")
    try:
        import av

        with av.open(str(path)) as container:
            has_audio = bool(container.streams.audio)
            if info.decoder is None:
                if not container.streams.video:
                    raise MediaError("no video stream")
                s = container.streams.video[0]
                info.decoder = "pyav"
                info.fps = float(s.average_rate) if s.average_rate else None
                info.frames_decoded = int(s.frames or 0)  # the header's count: an estimate only
                if s.duration is not None and s.time_base:
                    info.duration_s = float(s.duration * s.time_base)
                elif container.duration:
                    info.duration_s = container.duration / 1e6
                info.width, info.height = s.codec_context.width, s.codec_context.height
        info.audio_status = "ok" if has_audio else "missing"
    except Exception as e:
        errors.append(f"pyav: {_short(e)}")
    if info.decoder is None:
        raise MediaError("no decoder could open the video: " + "; ".join(errors))
    return info


# ---- which files are videos -------------------------------------------------------------------------------------
def expand_videos(videos: Iterable[str | Path]) -> list[Path]:
    """The paths given (`~` expanded), in order, with a folder replaced by the video files in it (sorted).

    Everything about the paths themselves is a UserError here, before any video is decoded, so that a typo fails at
    once instead of after the videos before it: a path that does not exist, a folder without video files, no paths
    at all. Whether a file is a readable video is left to the decoders (a per-video failure the caller reports)."""
    out = []
    for v in videos:
        out.extend(_videos_at(Path(v).expanduser()))
    if not out:
        raise UserError("no videos given")
    return out


def _videos_at(path: Path) -> list[Path]:
    """[path] for a file; for a folder, its regular files with a video suffix (not a subfolder, whatever its name;
    not the files in subfolders, which may hold outputs rather than inputs)."""
    if path.is_dir():
        found = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES)
        if not found:
            raise UserError(f"{path}: folder holds no video files ({', '.join(VIDEO_SUFFIXES)})")
        return found
    if not path.exists():
        raise UserError(f"{path}: no such video file or folder")
    if not path.is_file():  # a FIFO or device: decoding it could block or never end
        raise UserError(f"{path}: not a regular file or a folder; give a video file or a folder of videos")
    return [path]
