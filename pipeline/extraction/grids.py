"""Time grids: how a video is cut into steps that get one feature row each, and how each encoder sees a step.

- `SegmentGrid` (AVE): ten 1-s segments from the video's start, `frames_per_segment` frames sampled inside each
  (`media.sample_times`), the audio as ten 1-s chunks. The whole video is decoded at once (in a decoding worker)
  and each encoder runs one forward over all its units: visual [10 * F frames], audio [10 chunks]. Rows are
  [10, *segment_shape] (ResNet-50: 7x7x2048 maps).
- `WindowGrid` (UnAV-100 and any untrimmed video): windows of `window_s` every `stride_s` (`TimeGrid`) for the whole
  video, `frames_per_window` frames evenly inside each window, the window's samples for audio. Frames are decoded
  `chunk_windows` windows at a time while encoding, so memory does not grow with the video's length; the audio
  track (~4 MB a minute at 32 kHz) is decoded whole. Rows are [T, channels] (visual maps averaged over space).

A grid decodes (`decode`, in a worker process where there are workers: failures come back as data) and encodes
(`encode`, in the main process, under the engine's pinned thread count). A video that cannot be turned into
features raises `VideoFailed` (or `media.MediaError`) from `encode`; a bug raises anything else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import media

SEGMENTS = media.SEGMENTS  # AVE: every video is ten 1-s segments


class VideoFailed(Exception):
    """One video's input cannot become features; the reason is recorded and the other videos go on."""


@dataclass
class DecodedVideo:
    """What a grid's `decode` hands to its `encode`: the raw input per modality (None where it failed, with the reason
    in `errors`), and the decoder's record of the video for the manifest."""

    inputs: dict[str, Any] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    decode_s: float = 0.0
    decode_cpu_s: float = 0.0


@dataclass(frozen=True)
class TimeGrid:
    """Windows of `window_s` seconds every `stride_s` seconds, the first starting at 0 (UnAV: 24 frames every 8 at
    25 fps = 0.96 s every 0.32 s; window i is centred at stride_s * i + window_s / 2)."""

    window_s: float = 0.96
    stride_s: float = 0.32

    def to_grid(self, seconds: float) -> float:
        """Seconds -> grid units (the index of the window centred there): g = (t - window / 2) / stride."""
        return (seconds - self.window_s / 2) / self.stride_s

    def to_seconds(self, g: float) -> float:
        return self.stride_s * g + self.window_s / 2

    def steps(self, duration_s: float) -> int:
        """Windows that fit in a video of this length (at least 1)."""
        return max(1, int(np.floor((duration_s - self.window_s) / self.stride_s + 1e-6)) + 1)

    def centres(self, n: int) -> np.ndarray:
        return self.to_seconds(np.arange(n, dtype=np.float64))


UNAV_GRID = TimeGrid()
TIME_GRIDS = {"unav": UNAV_GRID, "1s": TimeGrid(window_s=1.0, stride_s=1.0)}


def _timed(stats: dict, name: str, t0: float) -> float:
    t1 = time.perf_counter()
    stats[name] = stats.get(name, 0.0) + t1 - t0
    return t1


# ---- AVE: ten 1-s segments --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentGrid:
    frames_per_segment: int = media.FRAMES_PER_SEGMENT
    segments: int = SEGMENTS

    def decode(self, path: Path, modalities: tuple[str, ...], threads: int = 0) -> DecodedVideo:
        """The video's frames and/or audio on the grid; a decoder failure is recorded per modality (the audio is
        tried on its own when the frames fail)."""
        t0, c0 = time.perf_counter(), time.process_time()
        out = DecodedVideo()
        need_v, need_a = "visual" in modalities, "audio" in modalities
        try:
            d = media.decode(path, video=need_v, audio=need_a, frames_per_segment=self.frames_per_segment,
                             segments=self.segments, threads=threads)
        except media.MediaError as e:
            out.errors["visual"] = str(e)
            d = None
            if need_a and need_v:  # the frames failed; the audio may still be there
                try:
                    d = media.decode(path, video=False, audio=True, segments=self.segments, threads=threads)
                except media.MediaError as e2:
                    out.errors["audio"] = str(e2)
            else:
                out.errors["audio"] = str(e)
        except Exception as e:  # an unexpected decoder crash is still one video's problem
            out.errors = {"visual": f"unexpected: {media._short(e)}", "audio": f"unexpected: {media._short(e)}"}
            d = None
        if d is not None:
            out.info = d.info.to_dict()
            if d.frames is not None:
                out.inputs["visual"] = torch.from_numpy(d.frames)
            if d.audio is not None:
                out.inputs["audio"] = torch.from_numpy(d.audio)
            elif need_a and "audio" not in out.errors:
                out.errors["audio"] = d.info.audio_error or "audio could not be decoded"
        out.decode_s = time.perf_counter() - t0
        out.decode_cpu_s = time.process_time() - c0  # this process, all its threads (decoder threads too)
        return out

    def encode(self, extractor, modality: str, raw, stats: dict) -> np.ndarray:
        """One forward of exactly the video's segments x units_per_segment units -> [segments, *segment_shape]."""
        t0 = time.perf_counter()
        try:
            units = extractor.prepare(raw)
        except Exception as e:  # e.g. a frame size the resize cannot take: this video fails, others go on
            raise VideoFailed(f"prepare failed: {media._short(e)}") from None
        expected = self.segments * extractor.units_per_segment
        if units.shape[0] != expected:  # the length rule makes every video `segments` long
            raise RuntimeError(f"{extractor.name} prepared {units.shape[0]} units, expected {expected}")
        t1 = _timed(stats, "prepare_s", t0)
        feats = extractor.encode(units)
        _timed(stats, "encode_s", t1)
        stats["units"] = stats.get("units", 0) + units.shape[0]
        return feats.numpy()


# ---- untrimmed videos: windows on a TimeGrid ---------------------------------------------------------------------
def window_frame_times(grid: TimeGrid, start: int, stop: int, per_window: int) -> np.ndarray:
    """[n * per_window] frame times: `per_window` evenly spaced inside each window start..stop-1 (centred)."""
    t0 = np.arange(start, stop, dtype=np.float64)[:, None] * grid.stride_s
    k = (np.arange(per_window, dtype=np.float64)[None, :] + 0.5) / per_window
    return (t0 + k * grid.window_s).reshape(-1)


def window_audio(samples: np.ndarray, grid: TimeGrid, start: int, stop: int, rate: int) -> np.ndarray:
    """[n, window samples] float32, zero-padded past the end of the track."""
    width = int(round(grid.window_s * rate))
    out = np.zeros((stop - start, width), np.float32)
    for j, i in enumerate(range(start, stop)):
        lo = int(round(i * grid.stride_s * rate))
        part = samples[lo:lo + width]
        out[j, :part.size] = part
    return out


@dataclass(frozen=True)
class WindowGrid:
    grid: TimeGrid = UNAV_GRID
    frames_per_window: int = 4
    chunk_windows: int = 64  # windows decoded and encoded at a time

    def decode(self, path: Path, modalities: tuple[str, ...], threads: int = 0) -> DecodedVideo:
        """The video's length (so its steps) and its audio track; the frames are read while encoding. A video that
        cannot be probed or whose audio cannot be decoded fails in every modality."""
        t0, c0 = time.perf_counter(), time.process_time()
        out = DecodedVideo()
        try:
            info = media.probe(path)
            if not info.duration_s:
                raise media.MediaError("no duration: not a readable video")
            steps = self.grid.steps(info.duration_s)
            out.info = {"steps": steps, "duration_s": info.duration_s}
            if "visual" in modalities:
                out.inputs["visual"] = (Path(path), steps)
            if "audio" in modalities:
                track = media.decode(path, video=False, audio=True, start=0,
                                     segments=max(1, int(np.ceil(info.duration_s))))
                samples = track.audio if track.audio is not None else np.zeros(0, np.float32)
                out.inputs["audio"] = (samples, steps)
        except media.MediaError as e:
            out.inputs = {}
            out.errors = {m: str(e) for m in modalities}
        out.decode_s = time.perf_counter() - t0
        out.decode_cpu_s = time.process_time() - c0
        return out

    def encode(self, extractor, modality: str, raw, stats: dict) -> np.ndarray:
        """[steps, channels] float32, `chunk_windows` windows per forward."""
        source, steps = raw
        parts = []
        for start in range(0, steps, self.chunk_windows):
            stop = min(steps, start + self.chunk_windows)
            t0 = time.perf_counter()
            if modality == "visual":
                frames, _ = media.frames_at(source, window_frame_times(self.grid, start, stop, self.frames_per_window))
                t0 = _timed(stats, "decode_s", t0)
                units = extractor.prepare(frames)
                t0 = _timed(stats, "prepare_s", t0)
                maps = extractor.encode(units)  # [n, h, w, C]: mean over the window's frames
                parts.append(maps.flatten(1, -2).mean(1).numpy())
                stats["units"] = stats.get("units", 0) + units.shape[0]
            else:
                windows = window_audio(source, self.grid, start, stop, media.SAMPLE_RATE)
                parts.append(extractor.encode(torch.from_numpy(windows)).numpy())
                stats["units"] = stats.get("units", 0) + windows.shape[0]
            _timed(stats, "encode_s", t0)
        return np.concatenate(parts).astype(np.float32)


# ---- the released feature sets: each stream decoded by its recipe ------------------------------------------------
@dataclass(frozen=True)
class RecipeGrid:
    """The grid of a released feature set (`feature_sets`): each stream is decoded by its recipe (`recipes`: AVE's
    16 frames per second by index, the video at 25 fps, the 16-bit waveform), in `mode` ("faithful" or "fast"), and
    encoded as the recipe says: AVE's frames one second (16 frames) per forward -> [10, *shape]; a clip encoder
    (`extractors.base.ClipExtractor`: I3D, VGGish) over the whole clip -> its own rows. Decoding happens while
    encoding (nothing is decoded ahead), so the engine runs it without decoding workers. Notes a recipe makes (an
    index past the decoded frames, padded VGGish examples) go into the video's record."""

    recipes: tuple[tuple[str, str], ...]  # (stream name, recipe name)
    mode: str = "faithful"
    segments: int = SEGMENTS

    def decode(self, path: Path, modalities: tuple[str, ...], threads: int = 0) -> DecodedVideo:
        notes: list[str] = []
        out = DecodedVideo(info={"notes": notes, "decode_mode": self.mode})
        recipe = dict(self.recipes)
        for m in modalities:
            out.inputs[m] = (Path(path), recipe[m], notes)
        return out

    def encode(self, extractor, modality: str, raw, stats: dict) -> np.ndarray:
        from pipeline.extraction import recipes

        path, recipe, notes = raw
        t0 = time.perf_counter()
        if recipe == "ave_frames":
            frames = recipes.ave_frames(path, self.mode, notes)
            t0 = _timed(stats, "decode_s", t0)
            units = extractor.prepare(frames)
            t0 = _timed(stats, "prepare_s", t0)
            per = extractor.units_per_segment  # one second per forward: a fixed shape whatever the video
            rows = np.concatenate([extractor.encode(units[s * per:(s + 1) * per]).numpy()
                                   for s in range(self.segments)])
            stats["units"] = stats.get("units", 0) + units.shape[0]
        else:
            source = recipes.frames_25fps(path, self.mode) if recipe == "frames_25fps" else \
                recipes.waveform(path, self.mode)
            rows = extractor.encode_clip(source)
            padded = getattr(extractor, "last_padding", 0)
            if padded:
                notes.append(f"{extractor.name}: {padded} of its rows repeat the last example (the clip is short)")
            stats["units"] = stats.get("units", 0) + len(rows)
        _timed(stats, "encode_s", t0)
        return np.asarray(rows, np.float32)
