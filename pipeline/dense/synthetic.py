"""A synthetic untrimmed dataset written directly as feature files in the UnAV-100 layout (spec §8, our design).

For fast tests of everything downstream of extraction (loader, models, NMS, evaluator) without videos: the
annotation JSON plus `<vid>_rgb.npy`, `<vid>_flow.npy`, `<vid>_vggish.npy` per video on UnAV's grid (0.96-s windows
every 0.32 s). Deterministic per seed (one numpy Generator per video, seeded by (seed, video index)).

What is in it, as spec §8 designs it:
- K classes (`syn_00`...), one unit prototype per class and modality;
- video lengths uniform in [20, 120] s (T = 60...373 steps: longer than UnAV's 224-step training window);
- background 0.5 N(0, I) + 0.5 AR(1) (rho 0.95) per video and modality;
- 1-5 events per video, classes uniform, durations log-uniform in [1 s, min(40 s, L)], starts uniform; at least 40 %
  of videos hold a pair of different classes overlapping >= 2 s; same-class events that overlap are merged;
- rendering at the step centres: amplitude U[1.5, 3] times a trapezoid envelope with 0.5-s ramps, the audio
  envelope shifted by U[-0.3, 0.3] s (the label stays the visual interval);
- in 10 % of videos the visual files are one step longer (the loader cuts to the shorter modality).

Distractors (unlabelled: an event must be audible AND visible, so predicting one is a false positive). Version 1
(spec §8's text) put one audio-only or visual-only span into half of the videos: so few that one modality alone
does almost as well as both (issue 29), i.e. the benchmark did not need the correspondence. Version 2
(the default, issue 29) plans them with `plan_distractors`: about `distractors_per_event` spans per event that
each single modality takes for an event, in three kinds, equally often:
- "visible_silent": a class's picture without its sound (what plays there is other events' sounds or nothing);
- "audible_unseen": a class's sound without its picture;
- "mismatched": one class's picture while another class's sound plays (a sound without its picture AND a picture
  without its sound: to each single modality it looks like an event);
with the events' durations (each as long as one of its video's events, +-40 %: short and long alike), the events'
audio-visual offsets, 1 s away from any span of their classes. The annotation JSON records the version and every
distractor under its top-level `generator` key (the UnAV loader reads `database` only).
`FeatureSynthConfig(version=1)` still writes version-1 data byte for byte.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.dense.annotations import DenseVideo, Event, write_annotations
from pipeline.dense.features import MODALITY_FILES
from pipeline.errors import UserError
from pipeline.extraction.grids import UNAV_GRID

ANNOTATIONS = "unav100_annotations.json"  # the name the UnAV repository gives its annotation file
GENERATOR = "avel.dense.synthetic"
GENERATOR_VERSION = 2  # bump when the content for a given seed changes; older versions stay writable (`version`)
VERSIONS = (1, 2)

# The distractor kinds (module docstring); what each single modality takes for an event
VISIBLE_SILENT, AUDIBLE_UNSEEN, MISMATCHED = "visible_silent", "audible_unseen", "mismatched"
DISTRACTOR_KINDS = (VISIBLE_SILENT, AUDIBLE_UNSEEN, MISMATCHED)
PICTURE_WITHOUT_SOUND = (VISIBLE_SILENT, MISMATCHED)  # the visual-only model's false events
SOUND_WITHOUT_PICTURE = (AUDIBLE_UNSEEN, MISMATCHED)  # the audio-only model's
DISTRACTOR_GAP_S = 1.0  # a distractor keeps this far from every span of its classes (never extends an event)
PLACEMENT_TRIES = 30


@dataclass(frozen=True)
class Distractor:
    """One unlabelled span: `visual` on screen over [start, end], `audio` audible over [start, end] + offset (either
    may be None)."""

    kind: str
    start: float
    end: float
    visual: int | None
    audio: int | None
    offset: float = 0.0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "segment": [round(self.start, 3), round(self.end, 3)],
                "visual_label_id": self.visual, "audio_label_id": self.audio, "audio_offset_s": round(self.offset, 3)}


def check_version(version: int) -> None:
    if version not in VERSIONS:
        raise UserError(f"version must be one of {', '.join(map(str, VERSIONS))} (the generator's content designs: "
                        f"1 = one distractor in half of the videos, 2 = distractors that need both modalities), got "
                        f"{version}")


def plan_distractors(rng: np.random.Generator, length: float, events: list[tuple[float, float, int]], classes: int,
                     per_event: float, max_event_s: float, max_offset_s: float) -> list[Distractor]:
    """About `per_event` x len(events) spans in each modality that a single modality takes for an event (kinds
    equally often: a mismatched span counts in both), each as long as one of the video's events (+-40 %), placed
    1 s away from every span (visual or audio) of their classes; one that finds no room in `PLACEMENT_TRIES` draws
    is left out (crowded short videos get fewer)."""
    busy: dict[int, list[tuple[float, float]]] = {c: [] for c in range(classes)}
    for s, e, c in events:  # an event's audio may run max_offset_s beyond its visual span
        busy[c].append((s - max_offset_s, e + max_offset_s))

    def free(c: int, s: float, e: float) -> bool:
        return all(e + DISTRACTOR_GAP_S <= a or s - DISTRACTOR_GAP_S >= b for a, b in busy[c])

    want = 1.5 * per_event * len(events)  # a third of the spans are mismatched, so 2/3 of them per modality
    n = int(want) + int(rng.random() < want - int(want))
    out = []
    for _ in range(n):
        kind = DISTRACTOR_KINDS[int(rng.integers(len(DISTRACTOR_KINDS)))]
        # as long as one of this video's events, give or take 40 %: a length that tells events from distractors
        # would let a single modality pass; kept while placing, so that long ones are not the ones left out
        s, e, _ = events[int(rng.integers(len(events)))]
        dur = float(np.clip((e - s) * np.exp(rng.uniform(-0.5, 0.5)), 1.0, min(max_event_s, length)))
        for _ in range(PLACEMENT_TRIES):
            start = float(rng.uniform(0, length - dur))
            offset = float(rng.uniform(-max_offset_s, max_offset_s))
            a = int(rng.integers(classes))
            b = int((a + rng.integers(1, classes)) % classes)
            visual, audio = {VISIBLE_SILENT: (a, None), AUDIBLE_UNSEEN: (None, a), MISMATCHED: (a, b)}[kind]
            if all(free(c, start - max_offset_s, start + dur + max_offset_s) for c in (visual, audio)
                   if c is not None):
                for c in {visual, audio} - {None}:
                    busy[c].append((start - max_offset_s, start + dur + max_offset_s))
                out.append(Distractor(kind, start, start + dur, visual, audio, offset))
                break
    return sorted(out, key=lambda d: (d.start, d.kind))


def generator_record(name: str, version: int, config: dict, distractors: dict[str, list[Distractor]]) -> dict:
    """What a version-2 generator writes under the annotation JSON's top-level `generator` key."""
    kinds = {k: sum(d.kind == k for ds in distractors.values() for d in ds) for k in DISTRACTOR_KINDS}
    return {"name": name, "version": version, "config": config, "distractor_counts": kinds,
            "distractors": {vid: [d.to_dict() for d in ds] for vid, ds in distractors.items()}}


@dataclass(frozen=True)
class FeatureSynthConfig:
    train: int = 120
    val: int = 30
    test: int = 30
    classes: int = 6
    seed: int = 0
    min_length_s: float = 20.0
    max_length_s: float = 120.0
    rgb_dim: int = 16
    flow_dim: int = 16
    audio_dim: int = 16
    overlap_share: float = 0.4
    distractor_share: float = 0.5  # version 1: videos with one audio-only or visual-only span
    distractors_per_event: float = 1.0  # version 2: spans per event that each single modality takes for an event
    longer_visual_share: float = 0.1
    version: int = GENERATOR_VERSION  # the content's design (module docstring); 1 = the data of earlier releases

    def __post_init__(self) -> None:
        check_version(self.version)
        if self.classes < 2:
            raise UserError(f"classes must be >= 2, got {self.classes}")
        if min(self.train, self.val, self.test) < 0 or self.train + self.val + self.test == 0:
            raise UserError("the split sizes must be >= 0 and not all 0")
        if not 2.0 <= self.min_length_s <= self.max_length_s:
            raise UserError(f"video lengths must satisfy 2 <= min ({self.min_length_s}) <= max ({self.max_length_s})")
        if self.distractors_per_event < 0:
            raise UserError(f"distractors_per_event must be >= 0, got {self.distractors_per_event}")


def _unit(rng: np.random.Generator, k: int, d: int) -> np.ndarray:
    x = rng.normal(size=(k, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _background(rng: np.random.Generator, t: int, d: int, rho: float = 0.95) -> np.ndarray:
    ar = np.zeros((t, d))
    noise = rng.normal(size=(t, d)) * np.sqrt(1 - rho ** 2)
    ar[0] = rng.normal(size=d)
    for i in range(1, t):
        ar[i] = rho * ar[i - 1] + noise[i]
    return 0.5 * rng.normal(size=(t, d)) + 0.5 * ar


def _envelope(centres: np.ndarray, start: float, end: float, ramp: float = 0.5) -> np.ndarray:
    """Trapezoid: 0 outside [start, end], linear ramps of `ramp` s inside its edges, 1 between."""
    r = min(ramp, (end - start) / 2)
    up = np.clip((centres - start) / r, 0, 1)
    down = np.clip((end - centres) / r, 0, 1)
    return np.minimum(up, down)


def _events(rng: np.random.Generator, length: float, k: int, overlap: bool) -> list[tuple[float, float, int]]:
    n = int(rng.integers(1, 6))
    out = []
    for _ in range(n):
        dur = float(np.exp(rng.uniform(np.log(1.0), np.log(min(40.0, length)))))
        start = float(rng.uniform(0, length - dur))
        out.append((start, start + dur, int(rng.integers(k))))
    if overlap:  # a pair of different classes overlapping >= 2 s
        dur = float(rng.uniform(4.0, min(20.0, length)))
        start = float(rng.uniform(0, length - dur))
        c1 = int(rng.integers(k))
        c2 = int((c1 + rng.integers(1, k)) % k)
        shift = float(rng.uniform(0, dur - 2.0))
        out += [(start, start + dur, c1), (start + shift, min(length, start + shift + dur), c2)]
    merged = []  # same-class events never overlap: merge them
    for c in sorted({e[2] for e in out}):
        spans = sorted((s, e) for s, e, cc in out if cc == c)
        cur = list(spans[0])
        for s, e in spans[1:]:
            if s <= cur[1]:
                cur[1] = max(cur[1], e)
            else:
                merged.append((cur[0], cur[1], c))
                cur = [s, e]
        merged.append((cur[0], cur[1], c))
    return sorted(merged)


def generate_feature_dataset(out: Path, cfg: FeatureSynthConfig = FeatureSynthConfig()) -> Path:
    """Write the annotation JSON and the feature files into `out`; returns the JSON's path."""
    out = Path(out)
    (out / "features").mkdir(parents=True, exist_ok=True)
    base = np.random.default_rng([cfg.seed, 0xDE45E])
    proto = {"rgb": _unit(base, cfg.classes, cfg.rgb_dim), "flow": _unit(base, cfg.classes, cfg.flow_dim),
             "audio": _unit(base, cfg.classes, cfg.audio_dim)}
    names = [f"syn_{c:02d}" for c in range(cfg.classes)]
    dims = {"rgb": cfg.rgb_dim, "flow": cfg.flow_dim, "audio": cfg.audio_dim}
    subsets = ["train"] * cfg.train + ["validation"] * cfg.val + ["test"] * cfg.test
    videos, distractors = [], {}
    for i, subset in enumerate(subsets):
        rng = np.random.default_rng([cfg.seed, i])
        vid = f"syn{cfg.seed:02d}_{i:05d}"
        length = float(rng.uniform(cfg.min_length_s, cfg.max_length_s))
        t = UNAV_GRID.steps(length)
        centres = UNAV_GRID.centres(t + 1)
        events = _events(rng, length, cfg.classes, overlap=rng.random() < cfg.overlap_share)
        feats = {m: _background(rng, t + 1, d) for m, d in dims.items()}
        for s, e, c in events:
            amp = rng.uniform(1.5, 3.0)
            delta = rng.uniform(-0.3, 0.3)
            vis, aud = _envelope(centres, s, e), _envelope(centres, s + delta, e + delta)
            for m in ("rgb", "flow"):
                feats[m] += amp * vis[:, None] * proto[m][c]
            feats["audio"] += amp * aud[:, None] * proto["audio"][c]
        if cfg.version == 1:
            if rng.random() < cfg.distractor_share:  # audible only or visible only: not an event
                dur = float(rng.uniform(1.0, min(10.0, length)))
                s = float(rng.uniform(0, length - dur))
                c = int(rng.integers(cfg.classes))
                env = _envelope(centres, s, s + dur)[:, None] * rng.uniform(1.5, 3.0)
                for m in (("audio",) if rng.random() < 0.5 else ("rgb", "flow")):
                    feats[m] += env * proto[m][c]
        else:  # its own stream: the events (and everything drawn before) are version 1's
            drng = np.random.default_rng([cfg.seed, i, 0xD15])
            planned = plan_distractors(drng, length, events, cfg.classes, cfg.distractors_per_event, 40.0, 0.3)
            for d in planned:
                amp = drng.uniform(1.5, 3.0)
                if d.visual is not None:
                    vis = _envelope(centres, d.start, d.end)[:, None] * amp
                    for m in ("rgb", "flow"):
                        feats[m] += vis * proto[m][d.visual]
                if d.audio is not None:
                    feats["audio"] += _envelope(centres, d.start + d.offset, d.end + d.offset)[:, None] * amp * \
                        proto["audio"][d.audio]
            distractors[vid] = planned
        longer = rng.random() < cfg.longer_visual_share
        for m, suffix in MODALITY_FILES.items():
            steps = t + 1 if (longer and m != "audio") else t
            np.save(out / "features" / f"{vid}{suffix}", feats[m][:steps].astype(np.float32))
        videos.append(DenseVideo(vid, subset, round(length, 3),
                                 [Event(round(s, 3), round(e, 3), names[c], c) for s, e, c in events]))
    path = out / ANNOTATIONS
    extra = {"generator": generator_record(GENERATOR, cfg.version, asdict(cfg), distractors)} if cfg.version >= 2 \
        else None  # version 1's files stay byte for byte what they were
    write_annotations(path, videos, extra)
    return path
