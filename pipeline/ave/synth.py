"""Synthetic AVE-format datasets: the project's demo data and test data.

`generate_dataset(out, SynthConfig(...))` writes a folder in exactly the AVE layout: `videos/<ID>.mp4` (H.264
video + AAC audio, 10 s), `Annotations.txt` (`Category&ID&good&Start&End`, no header), the three `*_order.h5`
split files (dataset `order`, int64 rows, shuffled as AVE's are), the `*Set.txt` files, and `synth.json` (the
parameters and, per row and second, which object is on screen and which sound plays: ground truth for tests).

Why the content is built as it is:
- AVE defines an event segment as one where the event is both visible and audible. So each class pairs a visual
  object (shape + colour + texture) with a sound (pitch + timbre + rhythm), and the background segments break that
  correspondence in every way AVE's do: the object on screen with only noise ("visual_only"), the class's sound
  over an empty scene ("audio_only"), the object with another class's sound ("mismatch"), or neither ("empty").
  Neither modality alone can therefore tell event from background; the category of an event needs either one.
- The classes must be separable by *randomly initialised* ResNet-50 / Cnn14 features (the demo trains on those):
  objects are large (about half the frame height), fully saturated and far apart in hue, on a desaturated cluttered
  scene; sounds sit an octave or more apart for the first classes (pitches follow a van der Corput sequence over
  four octaves) and also differ in harmonic content and amplitude rhythm.
- Event lengths vary like AVE's (about half the rows are fully event, the rest 1-9 s at any start).
- Everything random comes from `numpy.random.default_rng` seeded from the config seed (per video, from
  (seed, video index)); frames are converted to YUV in numpy, x264 runs single-threaded on its plain C code
  (X264_PARAMS says why), and no timestamps are written: the same seed gives the same files byte for byte on the same
  library versions, whatever the number of rendering threads or syntheses running at the same time (tested).
"""

from __future__ import annotations

import colorsys
import json
import logging
import math
import os
import shutil
import string
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.errors import UserError

log = logging.getLogger(__name__)

GENERATOR = "avel.synth"
GENERATOR_VERSION = 2  # bump when the content for a given seed changes
SEGMENTS = 10  # AVE videos are 10 s, one label per 1-s segment
SPLITS = ("train", "val", "test")
MARKER = "synth.json"  # written last; its presence (with "generator": GENERATOR) marks a finished synth output
LAYOUT = ("Annotations.txt", "videos", *(f"{s}_order.h5" for s in SPLITS), *(f"{s}Set.txt" for s in SPLITS), MARKER)

# The 28 AVE categories in AVE's class order (order of first appearance in its Annotations.txt), spelled as AVE does.
AVE_CATEGORIES: tuple[str, ...] = (
    "Church bell", "Male speech, man speaking", "Bark", "Fixed-wing aircraft, airplane", "Race car, auto racing",
    "Female speech, woman speaking", "Helicopter", "Violin, fiddle", "Flute", "Ukulele", "Frying (food)", "Truck",
    "Shofar", "Motorcycle", "Acoustic guitar", "Train horn", "Clock", "Banjo", "Goat", "Baby cry, infant cry", "Bus",
    "Chainsaw", "Cat", "Horse", "Toilet flush", "Rodents, rats, mice", "Accordion", "Mandolin",
)
MAX_CLASSES = len(AVE_CATEGORIES)

# Background kinds (see module docstring); "event" marks an event segment.
EVENT, VISUAL_ONLY, AUDIO_ONLY, MISMATCH, EMPTY = "event", "visual_only", "audio_only", "mismatch", "empty"
BACKGROUND_KINDS = (VISUAL_ONLY, AUDIO_ONLY, MISMATCH, EMPTY)

FULL_EVENT_PROB = 0.5  # AVE: 66 % of rows are fully event; a little less here so background is learnable
ID_ALPHABET = string.ascii_letters + string.digits + "-_"
AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
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


# ---- configuration ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SynthConfig:
    """What to generate. Every field changes the content; the number of worker threads does not (not a field)."""

    videos: int = 24  # unique video files; duplicate rows come on top
    classes: int = 4  # the first `classes` AVE categories
    seed: int = 0
    fps: int = 25
    width: int = 320
    height: int = 240
    sample_rate: int = 44100  # the pipeline decodes at 32 kHz, so resampling is exercised
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)  # train, val, test fractions of the videos
    duplicates: int | None = None  # extra test rows re-using a train video; None -> 1 if videos >= 10 else 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "split", tuple(float(x) for x in self.split))  # accept lists (JSON, CLI)
        if not 1 <= self.classes <= MAX_CLASSES:
            raise UserError(f"classes must be 1..{MAX_CLASSES} (the AVE categories), got {self.classes}")
        if self.videos < self.classes:
            raise UserError(f"videos ({self.videos}) must be at least classes ({self.classes}) so every class "
                            f"appears; raise --videos or lower --classes")
        if self.seed < 0:
            raise UserError(f"seed must be >= 0, got {self.seed}")
        if not 1 <= self.fps <= 120:
            raise UserError(f"fps must be 1..120, got {self.fps}")
        if self.width % 2 or self.height % 2 or min(self.width, self.height) < 32 or max(self.width, self.height) > 4096:
            raise UserError(f"width and height must be even and 32..4096 (H.264 yuv420p), got {self.width}x{self.height}")
        if self.sample_rate not in AAC_RATES:
            raise UserError(f"sample_rate must be one AAC supports ({', '.join(map(str, AAC_RATES))}), "
                            f"got {self.sample_rate}")
        if len(self.split) != 3 or min(self.split) < 0 or self.split[0] <= 0:
            raise UserError(f"split must be three fractions (train, val, test), non-negative, train > 0; "
                            f"got {self.split}")
        if self.duplicates is not None and self.duplicates < 0:
            raise UserError(f"duplicates must be >= 0 (or None for the default), got {self.duplicates}")

    @property
    def resolved_duplicates(self) -> int:
        return self.duplicates if self.duplicates is not None else (1 if self.videos >= 10 else 0)


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


# ---- the dataset plan (pure, deterministic) ---------------------------------------------------------------------
@dataclass(frozen=True)
class SynthRow:
    row: int
    video_id: str
    category: str
    label: int
    start: int
    end: int
    split: str
    video_seed: int
    visual: tuple[int | None, ...]  # per second: class whose object is on screen, None = empty scene
    audio: tuple[int | None, ...]  # per second: class whose sound plays, None = noise / near silence
    kinds: tuple[str, ...]  # per second: "event" or a background kind
    duplicate_of: int | None = None  # row whose video (and labels) this row re-uses

    def line(self) -> str:
        return f"{self.category}&{self.video_id}&good&{self.start}&{self.end}"


@dataclass(frozen=True)
class SynthPlan:
    config: SynthConfig
    rows: tuple[SynthRow, ...]
    orders: dict[str, tuple[int, ...]] = field(default_factory=dict)  # split -> rows, AVE-style shuffled

    def videos(self) -> list[SynthRow]:
        """One row per video file (duplicates re-use their original's file)."""
        return [r for r in self.rows if r.duplicate_of is None]


def _rng(seed: int, *path: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *path]))


def _video_ids(rng: np.random.Generator, n: int) -> list[str]:
    ids: list[str] = []
    seen = set()
    while len(ids) < n:
        vid = "".join(ID_ALPHABET[i] for i in rng.integers(0, len(ID_ALPHABET), size=11))
        if vid not in seen:
            seen.add(vid)
            ids.append(vid)
    return ids


def _event_span(rng: np.random.Generator) -> tuple[int, int]:
    if rng.random() < FULL_EVENT_PROB:
        return 0, SEGMENTS
    length = int(rng.integers(1, SEGMENTS))  # 1..9
    start = int(rng.integers(0, SEGMENTS - length + 1))
    return start, start + length


def _segments(rng: np.random.Generator, label: int, start: int, end: int, num_classes: int):
    """Per-second visual class, audio class and kind for one row: events in [start, end), background elsewhere."""
    kinds_allowed = [k for k in BACKGROUND_KINDS if k != MISMATCH or num_classes > 1]
    others = [c for c in range(num_classes) if c != label]
    visual: list[int | None] = [label] * SEGMENTS
    audio: list[int | None] = [label] * SEGMENTS
    kinds = [EVENT] * SEGMENTS
    for run in (range(0, start), range(end, SEGMENTS)):  # the background runs before and after the event
        if not run:
            continue
        first = rng.choice(kinds_allowed)
        split_at = run.stop
        if len(run) >= 3 and rng.random() < 0.5:  # a long background run sometimes changes kind midway
            split_at = int(rng.integers(run.start + 1, run.stop))
        second = rng.choice([k for k in kinds_allowed if k != first] or [first])
        other = int(rng.choice(others)) if others else None
        for t in run:
            kind = str(first if t < split_at else second)
            kinds[t] = kind
            visual[t] = label if kind in (VISUAL_ONLY, MISMATCH) else None
            audio[t] = {AUDIO_ONLY: label, MISMATCH: other}.get(kind)
    return tuple(visual), tuple(audio), tuple(kinds)


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def _split_counts(n: int, split: tuple[float, float, float], num_classes: int) -> tuple[int, int, int]:
    total = sum(split)
    val, test = (_round(n * f / total) for f in split[1:])
    if n >= 3:  # every split asked for gets at least one video
        val, test = (max(1, c) if f > 0 else 0 for c, f in zip((val, test), split[1:]))
    # keep one train video per class where possible, then at least one train video
    while n - val - test < max(num_classes, 1) and max(val, test) > 1:
        if val >= test:
            val -= 1
        else:
            test -= 1
    while n - val - test < 1:
        if val >= test and val > 0:
            val -= 1
        else:
            test -= 1
    return n - val - test, val, test


def plan_dataset(cfg: SynthConfig) -> SynthPlan:
    """Everything about the dataset except the pixels and samples: rows, segments, splits. Deterministic."""
    rng = _rng(cfg.seed, 0)
    n, k = cfg.videos, cfg.classes
    # Classes as balanced as possible, rows grouped by category like AVE's Annotations.txt (so first appearance
    # order = class order).
    labels = sorted(i % k for i in range(n))
    ids = _video_ids(rng, n)
    spans = [_event_span(rng) for _ in range(n)]
    segs = [_segments(rng, labels[i], *spans[i], k) for i in range(n)]

    # Stratified split: each class keeps its first (shuffled) row in train; the rest are dealt round-robin over
    # the classes into test, then val, then train.
    n_train, n_val, n_test = _split_counts(n, cfg.split, k)
    by_class = [[i for i in range(n) if labels[i] == c] for c in range(k)]
    for rows in by_class:
        rng.shuffle(rows)
    reserved = [rows[0] for rows in by_class]
    pool: list[int] = []
    depth = max(len(r) for r in by_class)
    offset = int(rng.integers(0, k))
    for d in range(1, depth):
        for c in range(k):
            rows = by_class[(c + offset) % k]
            if d < len(rows):
                pool.append(rows[d])
    pool += reserved[::-1]  # only used when there are fewer videos than classes + val + test
    split_of = {}
    for i in pool[:n_test]:
        split_of[i] = "test"
    for i in pool[n_test:n_test + n_val]:
        split_of[i] = "val"
    if n_test + n_val > len(pool) - len(reserved):
        log.warning("synth: %d videos are too few for %d classes plus val and test; some classes have no "
                    "train video", n, k)

    rows = [SynthRow(row=i, video_id=ids[i], category=AVE_CATEGORIES[labels[i]], label=labels[i],
                     start=spans[i][0], end=spans[i][1], split=split_of.get(i, "train"),
                     video_seed=int(_rng(cfg.seed, 1, i).integers(0, 2**31 - 1)),
                     visual=segs[i][0], audio=segs[i][1], kinds=segs[i][2])
            for i in range(n)]

    # Duplicate rows (AVE has test rows sharing a video file with train rows): appended, in test.
    train_rows = [r.row for r in rows if r.split == "train"]
    n_dup = cfg.resolved_duplicates
    if n_dup > len(train_rows):
        raise UserError(f"duplicates ({n_dup}) must not exceed the train videos ({len(train_rows)})")
    originals = sorted(int(i) for i in rng.choice(train_rows, size=n_dup, replace=False)) if n_dup else []
    for j, orig in enumerate(originals):
        r = rows[orig]
        rows.append(SynthRow(row=n + j, video_id=r.video_id, category=r.category, label=r.label, start=r.start,
                             end=r.end, split="test", video_seed=r.video_seed, visual=r.visual, audio=r.audio,
                             kinds=r.kinds, duplicate_of=orig))

    orders = {}
    for s in SPLITS:
        order = np.array([r.row for r in rows if r.split == s], dtype=np.int64)
        rng.shuffle(order)  # AVE's *_order.h5 are not sorted either
        orders[s] = tuple(int(i) for i in order)
    return SynthPlan(cfg, tuple(rows), orders)


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
def _sprite(k: int, size: int) -> tuple[np.ndarray, np.ndarray]:
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


class _Scene:
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


class _Motion:
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
def _class_sound(k: int, t: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
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


def _pink_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    spec = np.fft.rfft(rng.normal(size=n))
    f = np.arange(spec.size, dtype=np.float64)
    f[0] = 1
    x = np.fft.irfft(spec / np.sqrt(f), n)
    return x / max(1e-9, float(np.max(np.abs(x))))


def _gate(per_second: Sequence[bool], sr: int, ramp: int) -> np.ndarray:
    """0/1 per second -> per sample, with `ramp`-sample linear fades at the switches (moving average)."""
    step = np.repeat(np.asarray(per_second, np.float64), sr)
    if ramp <= 1:
        return step
    c = np.concatenate([[0.0], np.cumsum(np.pad(step, (ramp // 2, ramp - ramp // 2 - 1), mode="edge"))])
    return (c[ramp:] - c[:-ramp]) / ramp


def render_audio(audio: Sequence[int | None], *, seed: int = 0, sample_rate: int = 44100) -> np.ndarray:
    """Mono float32 track, one second per entry: class sounds where given, a noise bed everywhere, and on some
    silent (None) seconds a louder noise burst."""
    rng = _rng(seed, 2)
    n = len(audio) * sample_rate
    ramp = sample_rate // 100  # 10 ms fades
    noise = _pink_noise(rng, n)
    bed_level = float(rng.uniform(0.004, 0.02))
    burst = [a is None and rng.random() < 0.4 for a in audio]
    out = noise * (bed_level + float(rng.uniform(0.05, 0.12)) * _gate(burst, sample_rate, ramp))
    gain = float(rng.uniform(0.25, 0.4))
    for k in sorted({a for a in audio if a is not None}):
        gate = _gate([a == k for a in audio], sample_rate, ramp)
        idx = np.flatnonzero(gate)
        out[idx] += gain * gate[idx] * _class_sound(k, idx / sample_rate, sample_rate, _rng(seed, 3, k))
    return np.clip(out, -1, 1).astype(np.float32)


# ---- writing one video ------------------------------------------------------------------------------------------
def _check_per_second(name: str, values: Sequence[int | None], num_classes: int) -> None:
    for t, v in enumerate(values):
        if v is not None and not (isinstance(v, (int, np.integer)) and 0 <= v < num_classes):
            raise UserError(f"{name}[{t}] must be None or a class index 0..{num_classes - 1}, got {v!r}")


def write_video(path: Path, visual: Sequence[int | None], audio: Sequence[int | None] | None, *, seed: int = 0,
                fps: int = 25, width: int = 320, height: int = 240, sample_rate: int = 44100,
                num_classes: int = 4) -> None:
    """Write one MP4 (H.264 yuv420p + mono AAC), one second per entry of `visual`.

    visual[t]: class whose object is on screen in second t (None = empty scene). audio[t]: class whose sound plays
    (None = noise or near silence); `audio=None` writes no audio stream at all. `seed` fixes the scene, motion,
    detuning and noise. The file appears atomically (written under a temporary name, then renamed)."""
    import av

    path = Path(path)
    if len(visual) < 1:
        raise UserError("visual must have at least one entry (one per second)")
    if audio is not None and len(audio) != len(visual):
        raise UserError(f"audio has {len(audio)} entries but visual has {len(visual)}; give one per second each")
    if not 1 <= num_classes <= MAX_CLASSES:
        raise UserError(f"num_classes must be 1..{MAX_CLASSES}, got {num_classes}")
    _check_per_second("visual", visual, num_classes)
    if audio is not None:
        _check_per_second("audio", audio, num_classes)
    if width % 2 or height % 2 or min(width, height) < 32:
        raise UserError(f"width and height must be even and >= 32, got {width}x{height}")
    missing = [c for c in ("libx264", "aac") if c not in av.codecs_available]
    if missing:
        raise RuntimeError(f"this PyAV/FFmpeg build lacks the encoder(s) {', '.join(missing)}")

    rng = _rng(seed, 1)
    scene = _Scene(rng, width, height, fps)
    size = int(round(min(width, height) * 0.5 * rng.uniform(0.9, 1.1))) // 2 * 2
    motion = _Motion(rng, width, height, size, fps)
    sprites = {k: _sprite(int(k), size) for k in set(visual) if k is not None}

    samples = render_audio(audio, seed=seed, sample_rate=sample_rate) if audio is not None else None
    frames = []
    for i in range(len(visual) * fps):
        img = scene.frame(i)
        k = visual[i // fps]
        if k is not None:
            rgb, mask = sprites[k]
            x, y = motion.at(i)
            np.copyto(img[y:y + size, x:x + size], rgb, where=mask)
        frames.append(rgb_to_yuv420(img))
    encode_mp4(path, frames, samples, fps=fps, width=width, height=height, sample_rate=sample_rate)


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


# ---- the dataset ------------------------------------------------------------------------------------------------
def is_synth_output(folder: Path) -> bool:
    try:
        return json.loads((Path(folder) / MARKER).read_text(encoding="utf-8")).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose a new or empty folder for the dataset")
    if out.is_dir() and any(out.iterdir()) and not is_synth_output(out):
        raise UserError(f"{out} is not empty and is not a previous `avel synth` output (no {MARKER}); refusing to "
                        f"write into it. Choose a new or empty folder.")


def describe(plan: SynthPlan) -> dict:
    """The content of synth.json: parameters, class designs, per-row ground truth. No timestamps (deterministic)."""
    cfg = plan.config
    return {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "seed": cfg.seed,
        "config": {**asdict(cfg), "split": list(cfg.split), "duplicates_resolved": cfg.resolved_duplicates},
        "segments": SEGMENTS,
        "video_codec": {"codec": "libx264", "pix_fmt": "yuv420p", **X264_OPTIONS},
        "audio_codec": {"codec": "aac", "channels": 1, "sample_rate": cfg.sample_rate},
        "background_kinds": {
            VISUAL_ONLY: "object of the row's class on screen, noise or near silence",
            AUDIO_ONLY: "empty scene, the row's class's sound",
            MISMATCH: "object of the row's class on screen, another class's sound",
            EMPTY: "empty scene, noise or near silence",
        },
        "classes": [asdict(class_style(k)) for k in range(cfg.classes)],
        "splits": {s: list(o) for s, o in plan.orders.items()},
        "rows": [{**asdict(r), "visual": list(r.visual), "audio": list(r.audio), "kinds": list(r.kinds)}
                 for r in plan.rows],
    }


def _write_h5_order(path: Path, order: Sequence[int]) -> None:
    import h5py

    with h5py.File(path, "w", track_order=False) as f:
        f.create_dataset("order", data=np.asarray(order, dtype=np.int64), track_times=False)


def _default_workers(n: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, n, 8))


def generate_dataset(out: Path, cfg: SynthConfig = SynthConfig(), *, workers: int | None = None,
                     progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a synthetic AVE-format dataset into `out` (created; or a previous synth output, replaced) and return it.

    Raises UserError (a ValueError) if `out` is a non-empty folder that is not a previous synth output. The dataset
    is built in a hidden sibling folder and swapped in at the end, so an interrupted run leaves the old state.
    `workers` threads render videos in parallel (default: one per core); it does not change the output.
    `progress(done, total)` is called as videos are written."""
    given, out = Path(out), Path(out).resolve()  # resolved: a symlinked folder is replaced at its target
    _check_target(out)
    plan = plan_dataset(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.synth-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        (tmp / "videos").mkdir()
        videos = plan.videos()

        def render(r: SynthRow) -> None:
            write_video(tmp / "videos" / f"{r.video_id}.mp4", r.visual, r.audio, seed=r.video_seed, fps=cfg.fps,
                        width=cfg.width, height=cfg.height, sample_rate=cfg.sample_rate, num_classes=cfg.classes)

        n_workers = workers or _default_workers(len(videos))
        if progress:
            progress(0, len(videos))
        # numpy releases the GIL for the heavy parts; threads avoid re-importing in processes
        with ThreadPoolExecutor(n_workers) as pool:
            for done, _ in enumerate(pool.map(render, videos), 1):
                if progress:
                    progress(done, len(videos))

        lines = {r.row: r.line() for r in plan.rows}
        (tmp / "Annotations.txt").write_text("".join(lines[r.row] + "\n" for r in plan.rows), encoding="utf-8")
        for s in SPLITS:
            _write_h5_order(tmp / f"{s}_order.h5", plan.orders[s])
            (tmp / f"{s}Set.txt").write_text("".join(lines[i] + "\n" for i in plan.orders[s]), encoding="utf-8")
        (tmp / MARKER).write_text(json.dumps(describe(plan), indent=1) + "\n", encoding="utf-8")
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("synth: wrote %d rows (%d videos, %d classes) to %s", len(plan.rows), len(plan.videos()),
             cfg.classes, out)
    return given


def _swap_in(new: Path, out: Path) -> None:
    """Put the finished folder `new` at `out`. A previous synth output there is replaced; files in it that are not
    part of the synth layout (say, features someone wrote beside it) are carried over."""
    if not out.exists():
        os.rename(new, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.rename(new, out)
        return
    old = out.with_name(f".{out.name}.synth-old-{os.getpid()}")
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    for entry in old.iterdir():
        if entry.name not in LAYOUT:
            os.rename(entry, out / entry.name)
    shutil.rmtree(old, ignore_errors=True)
