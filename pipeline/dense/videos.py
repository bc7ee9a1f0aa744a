"""Synthetic untrimmed videos (real MP4 files) in the UnAV-100 layout, made with `pipeline.synth_engine`.

Each class keeps the object and the sound the engine gives it (shape, colour, texture / pitch, timbre, rhythm: the
same as in the AVE generator, `pipeline.ave.synth`); what is new is time: events start and end anywhere (frame and
sample precision), several classes can be on screen and audible at once (each class's object drifts around its own
home position), and a video lasts 20-120 s.
An event is audible AND visible: its label is its visual interval, and its sound plays over the same interval shifted
by a small audio-visual offset (audio leading or lagging by up to `max_offset_s`).

Distractors (unlabelled): the picture without its sound, the sound without its picture, or one class's picture with
another class's sound, planned as in the feature-level generator (`pipeline.dense.synthetic.plan_distractors`, whose
docstring says why): in version 2 (the default) about `distractors_per_event` such spans per event in each modality,
short and long like the events, so that a localizer must match what it hears to what it sees; version 1 (one
visible-only or audible-only span in half of the videos, which a single modality nearly solved) stays writable with
`version=1`, byte for byte. The annotation JSON of version 2 records the generator, its version and config, and
every distractor under its top-level `generator` key. Deterministic per seed; byte-identical files for the same
seed (the engine's x264 settings).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.dense.annotations import DenseVideo, Event, write_annotations
from pipeline.dense.synthetic import (
    ANNOTATIONS,
    GENERATOR_VERSION,
    Distractor,
    check_version,
    generator_record,
    plan_distractors,
)
from pipeline.errors import UserError
from pipeline.synth_engine import (
    AVE_CATEGORIES,
    MAX_CLASSES,
    Motion,
    Scene,
    class_sound,
    encode_mp4,
    pink_noise,
    rgb_to_yuv420,
    seeded_rng,
    sprite,
)

VIDEOS = "videos"
GENERATOR = "avel.dense.videos"


@dataclass(frozen=True)
class Span:
    start: float
    end: float
    label_id: int


@dataclass(frozen=True)
class VideoSynthConfig:
    train: int = 24
    val: int = 6
    test: int = 6
    classes: int = 4
    seed: int = 0
    min_length_s: float = 20.0
    max_length_s: float = 120.0
    max_event_s: float = 40.0
    fps: int = 8
    width: int = 160
    height: int = 120
    sample_rate: int = 32000
    max_offset_s: float = 0.3  # audio-visual offset of an event, uniform in [-max, max]
    overlap_share: float = 0.5  # videos with a pair of different classes overlapping >= 2 s
    distractor_share: float = 0.5  # version 1: videos with one visible-only or audible-only span
    distractors_per_event: float = 1.0  # version 2: spans per event that each single modality takes for an event
    version: int = GENERATOR_VERSION  # the content's design (module docstring); 1 = the data of earlier releases

    def __post_init__(self) -> None:
        check_version(self.version)
        if self.distractors_per_event < 0:
            raise UserError(f"distractors_per_event must be >= 0, got {self.distractors_per_event}")
        if not 2 <= self.classes <= MAX_CLASSES:
            raise UserError(f"classes must be 2..{MAX_CLASSES}, got {self.classes}")
        if not 4.0 <= self.min_length_s <= self.max_length_s:
            raise UserError(f"lengths must satisfy 4 <= min ({self.min_length_s}) <= max ({self.max_length_s})")
        if self.width % 2 or self.height % 2 or min(self.width, self.height) < 32:
            raise UserError(f"width and height must be even and >= 32, got {self.width}x{self.height}")


def plan_events(rng: np.random.Generator, length: float, cfg: VideoSynthConfig) -> tuple[list[Span], list[Span],
                                                                                          list[Span]]:
    """(labelled events = visual spans, their audio spans (offset), version 1's distractors: visual-only or
    audio-only spans tagged by a negative label_id - 1 for audio-only; none in version 2, whose distractors
    `plan_distractors` draws from a stream of their own)."""
    spans = []
    for _ in range(int(rng.integers(1, 6))):
        dur = float(np.exp(rng.uniform(0.0, np.log(min(cfg.max_event_s, length)))))
        start = float(rng.uniform(0, length - dur))
        spans.append(Span(start, start + dur, int(rng.integers(cfg.classes))))
    if rng.random() < cfg.overlap_share:
        dur = float(rng.uniform(4.0, min(20.0, length)))
        start = float(rng.uniform(0, length - dur))
        a = int(rng.integers(cfg.classes))
        b = int((a + rng.integers(1, cfg.classes)) % cfg.classes)
        shift = float(rng.uniform(0, dur - 2.0))
        spans += [Span(start, start + dur, a), Span(start + shift, min(length, start + shift + dur), b)]
    events = []
    for c in sorted({s.label_id for s in spans}):  # same-class spans that touch are one event
        cur = None
        for s in sorted((s for s in spans if s.label_id == c), key=lambda s: s.start):
            if cur is not None and s.start <= cur.end + 0.5:
                cur = Span(cur.start, max(cur.end, s.end), c)
            else:
                if cur is not None:
                    events.append(cur)
                cur = s
        events.append(cur)
    events.sort(key=lambda s: (s.start, s.label_id))
    audio = []
    for e in events:
        d = float(rng.uniform(-cfg.max_offset_s, cfg.max_offset_s))
        audio.append(Span(max(0.0, e.start + d), min(length, e.end + d), e.label_id))
    distractors = []
    if cfg.version == 1 and rng.random() < cfg.distractor_share:
        dur = float(rng.uniform(1.0, min(10.0, length)))
        start = float(rng.uniform(0, length - dur))
        c = int(rng.integers(cfg.classes))
        distractors.append(Span(start, start + dur, c if rng.random() < 0.5 else -c - 1))
    return events, audio, distractors


def render_video(path: Path, length: float, visible: list[Span], audible: list[Span], *, seed: int,
                 cfg: VideoSynthConfig) -> None:
    """One MP4 of `length` s: each class's object on screen over its visible spans, its sound over its audible ones."""
    rng = seeded_rng(seed, 1)
    fps, w, h, sr = cfg.fps, cfg.width, cfg.height, cfg.sample_rate
    scene = Scene(rng, w, h, fps)
    size = int(round(min(w, h) * 0.38)) // 2 * 2
    classes = sorted({s.label_id for s in visible})
    motion = {}
    for j, c in enumerate(classes):  # homes spread over the frame, so that objects on screen together stay apart
        m = Motion(seeded_rng(seed, 4, c), w, h, size, fps)
        m.cx = (w - size) * (j + 0.5) / len(classes)
        m.cy = (h - size) * (0.3 + 0.4 * (j % 2))
        m.ax = min(m.ax, (w - size) / (2 * len(classes)) * 0.8, m.cx, w - size - m.cx)
        m.ay = min(m.ay, m.cy, h - size - m.cy)
        motion[c] = m
    sprites = {c: sprite(c, size) for c in classes}
    n_frames = max(1, int(round(length * fps)))
    frames = []
    for i in range(n_frames):
        t = (i + 0.5) / fps
        img = scene.frame(i)
        for c in classes:
            if any(s.start <= t < s.end for s in visible if s.label_id == c):
                rgb, mask = sprites[c]
                x, y = motion[c].at(i)
                np.copyto(img[y:y + size, x:x + size], rgb, where=mask)
        frames.append(rgb_to_yuv420(img))
    n = int(round(length * sr))
    out = pink_noise(seeded_rng(seed, 2), n) * float(rng.uniform(0.004, 0.02))
    ramp = sr // 100  # 10-ms fades
    gain = float(rng.uniform(0.2, 0.3))  # several sounds can overlap: a little lower than the AVE generator's
    for s in audible:
        a, b = int(round(s.start * sr)), min(n, int(round(s.end * sr)))
        if b - a < 2:
            continue
        idx = np.arange(a, b)
        gate = np.minimum(1.0, np.minimum(idx - a + 1, b - idx) / ramp)
        out[a:b] += gain * gate * class_sound(s.label_id, idx / sr, sr, seeded_rng(seed, 3, s.label_id))
    samples = np.clip(out, -1, 1).astype(np.float32)
    encode_mp4(path, frames, samples, fps=fps, width=w, height=h, sample_rate=sr)


def generate_video_dataset(out: Path, cfg: VideoSynthConfig = VideoSynthConfig(),
                           progress: Callable[[int, int], None] | None = None) -> Path:
    """Write `out/videos/<vid>.mp4` and `out/unav100_annotations.json`; returns the JSON's path."""
    out = Path(out)
    (out / VIDEOS).mkdir(parents=True, exist_ok=True)
    names = AVE_CATEGORIES[:cfg.classes]
    subsets = ["train"] * cfg.train + ["validation"] * cfg.val + ["test"] * cfg.test
    videos, planned = [], {}
    for i, subset in enumerate(subsets):
        rng = np.random.default_rng([cfg.seed, 0x7E0, i])
        vid = f"dsyn{cfg.seed:02d}_{i:04d}"
        length = round(float(rng.uniform(cfg.min_length_s, cfg.max_length_s)) * cfg.fps) / cfg.fps  # whole frames
        events, audio, distractors = plan_events(rng, length, cfg)
        visible = events + [d for d in distractors if d.label_id >= 0]
        audible = audio + [Span(d.start, d.end, -d.label_id - 1) for d in distractors if d.label_id < 0]
        if cfg.version >= 2:  # their own stream: the events (and all drawn before) are version 1's
            ds = plan_distractors(np.random.default_rng([cfg.seed, 0x7E0, i, 0xD15]), length,
                                  [(e.start, e.end, e.label_id) for e in events], cfg.classes,
                                  cfg.distractors_per_event, cfg.max_event_s, cfg.max_offset_s)
            visible, audible = visible + _visual_spans(ds), audible + _audio_spans(ds, length)
            planned[vid] = ds
        render_video(out / VIDEOS / f"{vid}.mp4", length, visible, audible, seed=int(rng.integers(2**31)), cfg=cfg)
        videos.append(DenseVideo(vid, subset, length, [Event(round(e.start, 3), round(e.end, 3), names[e.label_id],
                                                             e.label_id) for e in events]))
        if progress:
            progress(i + 1, len(subsets))
    path = out / ANNOTATIONS
    extra = {"generator": generator_record(GENERATOR, cfg.version, asdict(cfg), planned)} if cfg.version >= 2 \
        else None  # version 1's files stay byte for byte what they were
    write_annotations(path, videos, extra)
    return path


def _visual_spans(ds: list[Distractor]) -> list[Span]:
    return [Span(d.start, d.end, d.visual) for d in ds if d.visual is not None]


def _audio_spans(ds: list[Distractor], length: float) -> list[Span]:
    return [Span(max(0.0, d.start + d.offset), min(length, d.end + d.offset), d.audio) for d in ds
            if d.audio is not None]
