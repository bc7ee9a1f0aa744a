"""Synthetic AVE-format datasets: the project's demo data and test data.

`generate_dataset(out, SynthConfig(...))` writes a folder in exactly the AVE layout: `videos/<ID>.mp4` (H.264
video + AAC audio, 10 s), `Annotations.txt` (`Category&ID&good&Start&End`, no header), the three `*_order.h5`
split files (dataset `order`, int64 rows, shuffled as AVE's are), the `*Set.txt` files, and `synth.json` (the
parameters and, per row and second, which object is on screen and which sound plays: ground truth for tests).

Why the content is built as it is:
- AVE defines an event segment as one where the event is both visible and audible. So each class pairs a visual
  object (shape + colour + texture) with a sound (pitch + timbre + rhythm), and the background segments break that
  correspondence in every way AVE's do: the picture without its sound, i.e. the object on screen with only noise
  ("visual_only") or with another class's sound ("mismatch"); the sound without its picture, i.e. over an empty
  scene ("audio_only") or over another class's object ("other_picture"); or neither ("empty").
- Version 3 makes the correspondence NECESSARY, not just present (version 2, the earlier default, was mostly an
  audio-classification task: a CACE trained on its audio alone scored 90.8 % against 96.9 % with both): few rows
  are fully event (`full_event_share` 0.1, so about 45 % of the seconds are background), and 80 % of the
  background is one modality's half of an event (picture-without-sound and sound-without-picture in equal
  parts), so a model that sees one modality is wrong on about a fifth of the seconds whatever it learns. Events
  are short and long (1-9 s at any start, or all 10). `SynthConfig(version=2)` still writes the version-2 data
  byte for byte (the stage-key tests pin it; old experiments can be regenerated).
- The classes must be separable by *randomly initialised* ResNet-50 / Cnn14 features (the demo trains on those):
  objects are large (about half the frame height), fully saturated and far apart in hue, on a desaturated cluttered
  scene; sounds sit an octave or more apart for the first classes (pitches follow a van der Corput sequence over
  four octaves) and also differ in harmonic content and amplitude rhythm.
- Event lengths vary like AVE's (about half the rows are fully event, the rest 1-9 s at any start).
- Everything random comes from `numpy.random.default_rng` seeded from the config seed (per video, from
  (seed, video index)); frames are converted to YUV in numpy, x264 runs single-threaded on its plain C code
  (`pipeline.synth_engine.X264_PARAMS` says why), and no timestamps are written: the same seed gives the same files
  byte for byte on the same library versions, whatever the number of rendering threads or syntheses running at the
  same time (tested).

What each class looks and sounds like, the scene, and the MP4 encoding are `pipeline.synth_engine`'s (shared with
the untrimmed generator, `pipeline.dense.videos`); this module owns the AVE layout: which object and sound play in
which second, the rows, splits and annotation files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import string
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.errors import UserError
from pipeline.synth_engine import (
    AVE_CATEGORIES,
    MAX_CLASSES,
    X264_OPTIONS,
    Motion,
    Scene,
    class_sound,
    class_style,
    encode_mp4,
    pink_noise,
    rgb_to_yuv420,
    seeded_rng,
    sprite,
)

log = logging.getLogger(__name__)

GENERATOR = "avel.synth"
GENERATOR_VERSION = 3  # bump when the content for a given seed changes; older versions stay writable (`version`)
VERSIONS = (2, 3)
SEGMENTS = 10  # AVE videos are 10 s, one label per 1-s segment
SPLITS = ("train", "val", "test")
MARKER = "synth.json"  # written last; its presence (with "generator": GENERATOR) marks a finished synth output
LAYOUT = ("Annotations.txt", "videos", *(f"{s}_order.h5" for s in SPLITS), *(f"{s}Set.txt" for s in SPLITS), MARKER)

# Background kinds (see module docstring); "event" marks an event segment.
EVENT, VISUAL_ONLY, AUDIO_ONLY, MISMATCH, EMPTY = "event", "visual_only", "audio_only", "mismatch", "empty"
OTHER_PICTURE = "other_picture"  # the row's class's sound over another class's object (version 3)
BACKGROUND_KINDS = (VISUAL_ONLY, AUDIO_ONLY, MISMATCH, OTHER_PICTURE, EMPTY)
KINDS_V2 = (VISUAL_ONLY, AUDIO_ONLY, MISMATCH, EMPTY)
# What a single modality sees of each kind: a model that sees only one modality takes these for the event
PICTURE_WITHOUT_SOUND = (VISUAL_ONLY, MISMATCH)
SOUND_WITHOUT_PICTURE = (AUDIO_ONLY, OTHER_PICTURE)
# Version 3's share of each kind in the background runs: 40 % picture-without-sound, 40 % sound-without-picture
# (each a single modality's blind spot: its errors), 20 % neither or another class's half
KIND_WEIGHTS_V3 = {VISUAL_ONLY: 0.28, MISMATCH: 0.12, AUDIO_ONLY: 0.28, OTHER_PICTURE: 0.12, EMPTY: 0.2}

FULL_EVENT_PROB = {2: 0.5, 3: 0.1}  # AVE: 66 % of rows are fully event; fewer here so that background matters
ID_ALPHABET = string.ascii_letters + string.digits + "-_"
AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)


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
    version: int = GENERATOR_VERSION  # the content's design (module docstring); 2 = the data of earlier releases

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise UserError(f"version must be one of {', '.join(map(str, VERSIONS))} (the generator's content "
                            f"designs), got {self.version}")
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
        w, h = self.width, self.height
        if w % 2 or h % 2 or min(w, h) < 32 or max(w, h) > 4096:
            raise UserError(f"width and height must be even and 32..4096 (H.264 yuv420p), got {w}x{h}")
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


def _video_ids(rng: np.random.Generator, n: int) -> list[str]:
    ids: list[str] = []
    seen = set()
    while len(ids) < n:
        vid = "".join(ID_ALPHABET[i] for i in rng.integers(0, len(ID_ALPHABET), size=11))
        if vid not in seen:
            seen.add(vid)
            ids.append(vid)
    return ids


def _event_span(rng: np.random.Generator, version: int) -> tuple[int, int]:
    if rng.random() < FULL_EVENT_PROB[version]:
        return 0, SEGMENTS
    length = int(rng.integers(1, SEGMENTS))  # 1..9
    start = int(rng.integers(0, SEGMENTS - length + 1))
    return start, start + length


def _pick_kind(rng: np.random.Generator, allowed: list[str], version: int, exclude: str | None = None) -> str:
    """One background kind: uniform over the allowed ones (version 2), or by KIND_WEIGHTS_V3."""
    choices = [k for k in allowed if k != exclude] or allowed
    if version == 2:
        return str(rng.choice(choices))
    w = np.array([KIND_WEIGHTS_V3[k] for k in choices])
    return choices[int(rng.choice(len(choices), p=w / w.sum()))]


def _segments(rng: np.random.Generator, label: int, start: int, end: int, num_classes: int, version: int):
    """Per-second visual class, audio class and kind for one row: events in [start, end), background elsewhere."""
    kinds_allowed = [k for k in (KINDS_V2 if version == 2 else BACKGROUND_KINDS)
                     if k not in (MISMATCH, OTHER_PICTURE) or num_classes > 1]
    others = [c for c in range(num_classes) if c != label]
    visual: list[int | None] = [label] * SEGMENTS
    audio: list[int | None] = [label] * SEGMENTS
    kinds = [EVENT] * SEGMENTS
    for run in (range(0, start), range(end, SEGMENTS)):  # the background runs before and after the event
        if not run:
            continue
        first = _pick_kind(rng, kinds_allowed, version)
        split_at = run.stop
        if len(run) >= 3 and rng.random() < 0.5:  # a long background run sometimes changes kind midway
            split_at = int(rng.integers(run.start + 1, run.stop))
        second = _pick_kind(rng, kinds_allowed, version, exclude=first)
        other = int(rng.choice(others)) if others else None
        for t in run:
            kind = str(first if t < split_at else second)
            kinds[t] = kind
            visual[t] = {VISUAL_ONLY: label, MISMATCH: label, OTHER_PICTURE: other}.get(kind)
            audio[t] = {AUDIO_ONLY: label, OTHER_PICTURE: label, MISMATCH: other}.get(kind)
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
    rng = seeded_rng(cfg.seed, 0)
    n, k = cfg.videos, cfg.classes
    # Classes as balanced as possible, rows grouped by category like AVE's Annotations.txt (so first appearance
    # order = class order).
    labels = sorted(i % k for i in range(n))
    ids = _video_ids(rng, n)
    spans = [_event_span(rng, cfg.version) for _ in range(n)]
    segs = [_segments(rng, labels[i], *spans[i], k, cfg.version) for i in range(n)]

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
                     video_seed=int(seeded_rng(cfg.seed, 1, i).integers(0, 2**31 - 1)),
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


# ---- sounds -----------------------------------------------------------------------------------------------------
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
    rng = seeded_rng(seed, 2)
    n = len(audio) * sample_rate
    ramp = sample_rate // 100  # 10 ms fades
    noise = pink_noise(rng, n)
    bed_level = float(rng.uniform(0.004, 0.02))
    burst = [a is None and rng.random() < 0.4 for a in audio]
    out = noise * (bed_level + float(rng.uniform(0.05, 0.12)) * _gate(burst, sample_rate, ramp))
    gain = float(rng.uniform(0.25, 0.4))
    for k in sorted({a for a in audio if a is not None}):
        gate = _gate([a == k for a in audio], sample_rate, ramp)
        idx = np.flatnonzero(gate)
        out[idx] += gain * gate[idx] * class_sound(k, idx / sample_rate, sample_rate, seeded_rng(seed, 3, k))
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

    rng = seeded_rng(seed, 1)
    scene = Scene(rng, width, height, fps)
    size = int(round(min(width, height) * 0.5 * rng.uniform(0.9, 1.1))) // 2 * 2
    motion = Motion(rng, width, height, size, fps)
    sprites = {k: sprite(int(k), size) for k in set(visual) if k is not None}

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


# ---- the dataset ------------------------------------------------------------------------------------------------
def is_synth_output(folder: Path) -> bool:
    try:
        return json.loads((Path(folder) / MARKER).read_text(encoding="utf-8")).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def made_with(folder: Path, cfg: SynthConfig) -> bool:
    """Whether `folder` is a finished synth output of exactly `cfg` (the same generator version and fields): a
    folder of an older version, or of other settings, must be regenerated, not reused."""
    try:
        meta = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
        written = {k: v for k, v in meta["config"].items() if k != "duplicates_resolved"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    written.setdefault("version", meta.get("version"))  # version-2 files recorded it at the top only
    expected = {**asdict(cfg), "split": list(cfg.split)}
    return meta.get("generator") == GENERATOR and written == expected


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
        "version": cfg.version,
        "seed": cfg.seed,
        "config": {**asdict(cfg), "split": list(cfg.split), "duplicates_resolved": cfg.resolved_duplicates},
        "segments": SEGMENTS,
        "video_codec": {"codec": "libx264", "pix_fmt": "yuv420p", **X264_OPTIONS},
        "audio_codec": {"codec": "aac", "channels": 1, "sample_rate": cfg.sample_rate},
        "background_kinds": {
            VISUAL_ONLY: "object of the row's class on screen, noise or near silence",
            AUDIO_ONLY: "empty scene, the row's class's sound",
            MISMATCH: "object of the row's class on screen, another class's sound",
            **({OTHER_PICTURE: "another class's object on screen, the row's class's sound"} if cfg.version >= 3
               else {}),
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
