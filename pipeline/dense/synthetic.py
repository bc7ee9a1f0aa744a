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
- in half of the videos one unlabelled audio-only or visual-only distractor (1-10 s): an event must be audible AND
  visible, so predicting it is a false positive;
- in 10 % of videos the visual files are one step longer (the loader cuts to the shorter modality).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.dense.annotations import DenseVideo, Event, write_annotations
from pipeline.dense.features import MODALITY_FILES
from pipeline.errors import UserError
from pipeline.extraction.grids import UNAV_GRID

ANNOTATIONS = "unav100_annotations.json"  # the name the UnAV repository gives its annotation file


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
    distractor_share: float = 0.5
    longer_visual_share: float = 0.1

    def __post_init__(self) -> None:
        if self.classes < 2:
            raise UserError(f"classes must be >= 2, got {self.classes}")
        if min(self.train, self.val, self.test) < 0 or self.train + self.val + self.test == 0:
            raise UserError("the split sizes must be >= 0 and not all 0")
        if not 2.0 <= self.min_length_s <= self.max_length_s:
            raise UserError(f"video lengths must satisfy 2 <= min ({self.min_length_s}) <= max ({self.max_length_s})")


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
    videos = []
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
        if rng.random() < cfg.distractor_share:  # audible only or visible only: not an event
            dur = float(rng.uniform(1.0, min(10.0, length)))
            s = float(rng.uniform(0, length - dur))
            c = int(rng.integers(cfg.classes))
            env = _envelope(centres, s, s + dur)[:, None] * rng.uniform(1.5, 3.0)
            for m in (("audio",) if rng.random() < 0.5 else ("rgb", "flow")):
                feats[m] += env * proto[m][c]
        longer = rng.random() < cfg.longer_visual_share
        for m, suffix in MODALITY_FILES.items():
            steps = t + 1 if (longer and m != "audio") else t
            np.save(out / "features" / f"{vid}{suffix}", feats[m][:steps].astype(np.float32))
        videos.append(DenseVideo(vid, subset, round(length, 3),
                                 [Event(round(s, 3), round(e, 3), names[c], c) for s, e, c in events]))
    path = out / ANNOTATIONS
    write_annotations(path, videos)
    return path
