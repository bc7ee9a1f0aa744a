"""The synthetic-scene engine: what generated videos look and sound like, and how they become MP4 files.

Owned here, shared by both generators (`pipeline.ave.synth`: 10-s AVE-format clips; `pipeline.dense.videos`:
untrimmed UnAV-100-layout videos):
- each class's object and sound (`class_style`, `sprite`, `class_sound`): shape, colour and texture; pitch, timbre
  and rhythm, designed so that randomly initialised ResNet-50 / Cnn14 features tell the classes apart;
- the scene (`Scene`: a cluttered, slowly panning background), an object's drift (`Motion`), the noise bed
  (`pink_noise`) and the seeded random streams everything draws from (`seeded_rng`);
- encoding (`rgb_to_yuv420`, `encode_mp4`): H.264 + AAC, byte-deterministic (X264_PARAMS says how), written
  atomically.

Not here: what a dataset holds and how it is laid out on disk (which object and sound in which second or interval,
splits, annotation files, ground truth). That stays with each generator, in `pipeline/ave/synth.py` and
`pipeline/dense/videos.py`. Changing anything here changes the bytes both of them write for a given seed.
"""

from __future__ import annotations

import colorsys
import math
import os
import threading
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.errors import UserError

# The 28 AVE categories in AVE's class order (order of first appearance in its Annotations.txt), spelled as AVE does.
AVE_CATEGORIES: tuple[str, ...] = (
    "Church bell", "Male speech, man speaking", "Bark", "Fixed-wing aircraft, airplane", "Race car, auto racing",
    "Female speech, woman speaking", "Helicopter", "Violin, fiddle", "Flute", "Ukulele", "Frying (food)", "Truck",
    "Shofar", "Motorcycle", "Acoustic guitar", "Train horn", "Clock", "Banjo", "Goat", "Baby cry, infant cry", "Bus",
    "Chainsaw", "Cat", "Horse", "Toilet flush", "Rodents, rats, mice", "Accordion", "Mandolin",
)
MAX_CLASSES = len(AVE_CATEGORIES)

X264_OPTIONS = {"preset": "ultrafast", "crf": "23"}
# x264 made byte-deterministic, each part measured (same frames, same options, fresh or reused process):
# - its threading spelled out: frame, lookahead and sliced threads each can make the bitstream depend on timing;
# - asm=0, x264's plain C code paths: with its SIMD code, one encoder thread and identical input still gave a
#   different bitstream in ~1 of 100 encodes in fresh processes and in most videos over 25 repeats in one process
#   (consistent with reads past a buffer's end, whose contents vary); with asm=0, 0 of 160 repeats differed.
#   Concurrent encoders in one process differed more often still with SIMD, and not at all without it.
# - preset ultrafast: the C paths cost ~3x, ultrafast brings a 10-s 320x240 video back to ~0.45 CPU-s
#   (quality is irrelevant here: the content is flat colours and tones).
X264_PARAMS = "threads=1:lookahead-threads=1:sliced-threads=0:asm=0"


# ---- randomness -------------------------------------------------------------------------------------------------
def seeded_rng(seed: int, *path: int) -> np.random.Generator:
    """An independent random stream per (seed, *path): each part of a video (scene, sound, one class's motion...)
    draws from its own, so adding a draw in one part does not shift what any other part gets."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *path]))


# ---- what each class looks and sounds like ----------------------------------------------------------------------
SHAPES = ("disc", "square", "triangle", "star", "cross", "ring", "diamond")
TEXTURES = ("solid", "hstripes", "checker", "dots", "vstripes")
TIMBRES = ("sine", "odd_harmonics", "all_harmonics", "bell")
RHYTHMS = ("steady", "tremolo", "pulses", "trill")
PITCH_LOW_HZ, PITCH_OCTAVES = 200.0, 4.0


def _van_der_corput(k: int) -> float:
    """0, 1/2, 1/4, 3/4, 1/8, ...: the first few values are as far apart as possible."""
    out, denom = 0.0, 1.0
    while k:
        denom *= 2
        k, bit = divmod(k, 2)
        out += bit / denom
    return out


@dataclass(frozen=True)
class ClassStyle:
    index: int
    name: str
    shape: str
    texture: str
    rgb: tuple[int, int, int]
    pitch_hz: float
    timbre: str
    rhythm: str


@lru_cache(maxsize=None)
def class_style(k: int) -> ClassStyle:
    """The visual object and the sound of class k; the first few classes differ in every attribute."""
    if not 0 <= k < MAX_CLASSES:
        raise UserError(f"class index must be 0..{MAX_CLASSES - 1}, got {k}")
    hue = _van_der_corput(k % 16) + (1 / 32 if k >= 16 else 0)
    value = 1.0 if k < 16 else 0.7
    rgb = tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, 1.0, value))
    return ClassStyle(
        index=k, name=AVE_CATEGORIES[k],
        shape=SHAPES[k % len(SHAPES)], texture=TEXTURES[(k + k // len(SHAPES)) % len(TEXTURES)], rgb=rgb,
        pitch_hz=round(PITCH_LOW_HZ * 2 ** (PITCH_OCTAVES * _van_der_corput(k)), 2),
        timbre=TIMBRES[k % len(TIMBRES)], rhythm=RHYTHMS[(k + k // len(TIMBRES)) % len(RHYTHMS)],
    )


# ---- pictures ---------------------------------------------------------------------------------------------------
def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask of a shape on coordinates in [-1, 1]."""
    r = np.hypot(x, y)
    if shape == "disc":
        return r <= 0.95
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 0.8
    if shape == "triangle":
        return (y <= 0.8) & (np.abs(x) <= (y + 0.95) * 0.55)
    if shape == "star":
        theta = np.arctan2(y, x) + np.pi / 2
        return r <= 0.6 + 0.35 * np.cos(5 * theta)
    if shape == "cross":
        return ((np.abs(x) <= 0.3) & (np.abs(y) <= 0.95)) | ((np.abs(y) <= 0.3) & (np.abs(x) <= 0.95))
    if shape == "ring":
        return (r <= 0.95) & (r >= 0.5)
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= 0.95
    raise AssertionError(shape)


def _texture(texture: str, px: np.ndarray, py: np.ndarray, size: int) -> np.ndarray:
    """Boolean pattern on pixel coordinates: True = full colour, False = darker shade."""
    period = max(4, size // 6)
    if texture == "solid":
        return np.ones(px.shape, bool)
    if texture == "hstripes":
        return (py // (period // 2)) % 2 == 0
    if texture == "vstripes":
        return (px // (period // 2)) % 2 == 0
    if texture == "checker":
        return ((px // (period // 2)) + (py // (period // 2))) % 2 == 0
    if texture == "dots":
        cx, cy = px % period - period / 2, py % period - period / 2
        return np.hypot(cx, cy) > period / 4
    raise AssertionError(texture)


@lru_cache(maxsize=256)
def sprite(k: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(rgb [size,size,3] uint8, mask [size,size,3] bool) of class k's object, with a dark outline."""
    style = class_style(k)
    p = np.arange(size)
    py, px = np.meshgrid(p, p, indexing="ij")
    y, x = (py + 0.5) / size * 2 - 1, (px + 0.5) / size * 2 - 1
    mask = _shape_mask(style.shape, x, y)
    inner = _shape_mask(style.shape, x / 0.9, y / 0.9) if style.shape != "ring" else (
        (np.hypot(x, y) <= 0.95 * 0.93) & (np.hypot(x, y) >= 0.5 / 0.93))
    colour = np.array(style.rgb, np.float32)
    rgb = np.where(_texture(style.texture, px, py, size)[..., None], colour, colour * 0.45)
    rgb = np.where((mask & ~inner)[..., None], np.float32(20), rgb)  # outline
    return np.ascontiguousarray(rgb.astype(np.uint8)), np.ascontiguousarray(np.repeat(mask[..., None], 3, axis=2))


class Scene:
    """A per-video background: desaturated gradient, clutter and grain on a canvas larger than the frame, so the
    camera can pan slowly over it."""

    def __init__(self, rng: np.random.Generator, width: int, height: int, fps: int):
        self.w, self.h, self.fps = width, height, fps
        self.pad = pad = max(4, min(width, height) // 15)
        H, W = height + 2 * pad, width + 2 * pad
        top, bottom = (self._grey(rng, lo, hi) for lo, hi in ((90, 200), (40, 150)))
        ramp = np.linspace(0, 1, H, dtype=np.float32)[:, None, None]
        canvas = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (H, W, 3)).copy()
        for _ in range(int(rng.integers(12, 30))):  # clutter: grey-ish boxes and ellipses
            cw, ch = (int(rng.integers(max(2, s // 20), max(3, s // 4))) for s in (W, H))
            x0, y0 = int(rng.integers(0, W - cw)), int(rng.integers(0, H - ch))
            patch = canvas[y0:y0 + ch, x0:x0 + cw]
            if rng.random() < 0.5:
                yy, xx = np.ogrid[:ch, :cw]
                sel = ((yy - ch / 2 + 0.5) / (ch / 2)) ** 2 + ((xx - cw / 2 + 0.5) / (cw / 2)) ** 2 <= 1
                patch[sel] = self._grey(rng, 30, 230)
            else:
                patch[:] = self._grey(rng, 30, 230)
        # blocky low-frequency shading plus fine grain
        block = max(2, min(width, height) // 12)
        shade = rng.normal(0, 12, (H // block + 1, W // block + 1)).astype(np.float32)
        canvas += np.kron(shade, np.ones((block, block), np.float32))[:H, :W, None]
        canvas += rng.normal(0, 5, (H, W, 1)).astype(np.float32)
        self.canvas = np.clip(canvas, 0, 255).astype(np.uint8)
        self.pan_period = float(rng.uniform(6, 14))  # seconds
        self.pan_phase = float(rng.uniform(0, 2 * np.pi))

    @staticmethod
    def _grey(rng: np.random.Generator, lo: int, hi: int) -> np.ndarray:
        level = rng.uniform(lo, hi)
        return (level + rng.normal(0, 8, 3)).astype(np.float32)  # a faint tint only: objects own the colour

    def frame(self, i: int) -> np.ndarray:
        t = i / self.fps
        ox = self.pad + int(round(self.pad * 0.9 * math.sin(2 * math.pi * t / self.pan_period + self.pan_phase)))
        oy = self.pad + int(round(self.pad * 0.5 * math.cos(2 * math.pi * t / self.pan_period + self.pan_phase)))
        return self.canvas[oy:oy + self.h, ox:ox + self.w].copy()


class Motion:
    """Where the object is: a slow Lissajous drift around a per-video home position, always fully on screen."""

    def __init__(self, rng: np.random.Generator, width: int, height: int, size: int, fps: int):
        self.fps = fps
        free_x, free_y = width - size, height - size
        self.cx, self.cy = rng.uniform(0.3, 0.7) * free_x, rng.uniform(0.3, 0.7) * free_y
        self.ax, self.ay = min(self.cx, free_x - self.cx) * 0.6, min(self.cy, free_y - self.cy) * 0.6
        self.fx, self.fy = rng.uniform(0.08, 0.25), rng.uniform(0.1, 0.3)  # Hz
        self.px, self.py = rng.uniform(0, 2 * np.pi, 2)

    def at(self, i: int) -> tuple[int, int]:
        t = i / self.fps
        x = self.cx + self.ax * math.sin(2 * math.pi * self.fx * t + self.px)
        y = self.cy + self.ay * math.sin(2 * math.pi * self.fy * t + self.py)
        return int(round(x)), int(round(y))


# ---- sounds -----------------------------------------------------------------------------------------------------
def class_sound(k: int, t: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Class k's sound at times `t` (seconds), RMS about 0.7 whatever the timbre. A function of absolute time, so
    gating it per second leaves no seams and only the gated samples need computing."""
    style = class_style(k)
    f0 = style.pitch_hz * float(rng.uniform(0.985, 1.015))  # a little per-video detuning
    if style.timbre == "sine":
        partials = [(1.0, 1.0), (2.0, 0.3)]
    elif style.timbre == "odd_harmonics":
        partials = [(h, 1.0 / h) for h in (1, 3, 5, 7, 9)]
    elif style.timbre == "all_harmonics":
        partials = [(h, 1.0 / h) for h in range(1, 9)]
    else:  # bell: inharmonic partials
        partials = [(1.0, 1.0), (2.76, 0.6), (5.40, 0.4), (8.93, 0.25)]
    partials = [(m, a, rng.uniform(0, 2 * np.pi)) for m, a in partials if m * f0 < 0.45 * sr]
    phase = 2 * np.pi * f0 * t
    if style.rhythm == "trill":  # vibrato: +-3 % at 6 Hz
        phase = phase + (0.03 * f0 / 6.0) * np.sin(2 * np.pi * 6.0 * t)
    x = np.zeros(t.shape)
    for mult, amp, ph in partials:
        x += amp * np.sin(mult * phase + ph)
    x /= math.sqrt(sum(a * a for _, a, _ in partials))
    if style.rhythm == "tremolo":
        env = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t)
    elif style.rhythm == "pulses":  # struck 3 times a second, decaying
        env = 1.3 * np.exp(-((t * 3.0) % 1.0) * 4.0)
    elif style.rhythm == "trill":
        env = 0.7 + 0.3 * np.sin(2 * np.pi * 8.0 * t)
    else:
        env = 0.85 + 0.15 * np.sin(2 * np.pi * 0.5 * t)
    return x * env


def pink_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` samples of 1/f ("pink") noise scaled to peak 1, for the callers to scale: the background bed under
    every track, and the AVE generator's noise bursts. Pink rather than white: its spectrum falls off like
    ambient noise does."""
    spec = np.fft.rfft(rng.normal(size=n))
    f = np.arange(spec.size, dtype=np.float64)
    f[0] = 1
    x = np.fft.irfft(spec / np.sqrt(f), n)
    return x / max(1e-9, float(np.max(np.abs(x))))


# ---- encoding ---------------------------------------------------------------------------------------------------
def encode_mp4(path: Path, frames: Sequence[np.ndarray], samples: np.ndarray | None, *, fps: int, width: int,
               height: int, sample_rate: int) -> None:
    """yuv420p frames (and a mono float track, or None for no audio stream) -> one MP4, H.264 + AAC, interleaved
    per second, byte-deterministic (X264_PARAMS), written under a temporary name and renamed."""
    import av

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with av.open(str(tmp), "w", format="mp4") as container:
            vs = container.add_stream("libx264", rate=fps, options={**X264_OPTIONS, "x264-params": X264_PARAMS})
            vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
            vs.codec_context.thread_count = 1  # x264's output depends on its thread count: fix it
            vs.codec_context.time_base = Fraction(1, fps)
            if samples is not None:
                aud = container.add_stream("aac", rate=sample_rate)
                aud.layout = "mono"
                aud.bit_rate = 96_000
                chunk = aud.codec_context.frame_size or 1024
            audio_pos = 0

            def push_audio(until: int) -> None:  # encode audio up to sample `until`, so the file interleaves
                nonlocal audio_pos
                while samples is not None and audio_pos < min(until, samples.size):
                    frame = av.AudioFrame.from_ndarray(samples[None, audio_pos:audio_pos + chunk], format="fltp",
                                                       layout="mono")
                    frame.sample_rate, frame.pts = sample_rate, audio_pos
                    container.mux(aud.encode(frame))
                    audio_pos += chunk

            for i, yuv in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
                frame.pts = i
                container.mux(vs.encode(frame))
                if (i + 1) % fps == 0:
                    push_audio((i + 1) // fps * sample_rate)
            container.mux(vs.encode(None))
            if samples is not None:
                push_audio(samples.size)
                container.mux(aud.encode(None))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def rgb_to_yuv420(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [H,W,3] (H, W even) -> the planar yuv420p layout PyAV takes ([H*3/2, W]: Y, then U, then V).

    BT.601 limited range in integer arithmetic, chroma from the mean of each 2x2 block: FFmpeg's swscale is not
    involved, so no SIMD path or thread of its own can reach the bitstream."""
    h, w, _ = rgb.shape
    x = rgb.astype(np.int32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16
    q = x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2]  # 2x2 sums: 4 x the block mean
    r, g, b = q[..., 0], q[..., 1], q[..., 2]
    u = ((-38 * r - 74 * g + 112 * b + 512) >> 10) + 128
    v = ((112 * r - 94 * g - 18 * b + 512) >> 10) + 128
    return np.concatenate([y.astype(np.uint8).ravel(), u.astype(np.uint8).ravel(),
                           v.astype(np.uint8).ravel()]).reshape(h * 3 // 2, w)
