"""Feature folders where an event needs BOTH modalities: a test bed for audio-visual fusion (our design).

`build_correspondence_features(out, CorrespondenceConfig(...))` writes, in the public AVE features layout that
`pipeline.ave.features.from_public_folder` reads:
- `visual_feature.h5`: dataset `avadataset`, float32 [N, 10, H, W, Dv] (small "maps", e.g. 2 x 2 x 32);
- `audio_feature.h5`: dataset `avadataset`, float32 [N, 10, Da];
- `labels.h5`: dataset `avadataset`, float32 one-hot [N, 10, C + 1], background last;
- `train_order.h5`, `val_order.h5`, `test_order.h5`: dataset `order`, int64 row indices (a shuffled partition);
- `synth_features.json`: the config, and per row its class, event span and each second's kind (ground truth).
No `Annotations.txt`: the loader then names the classes "class 0", "class 1", ...

What is in it, and why:
- Each class has a visual prototype and an audio prototype, random unit vectors. A second "shows the picture" of a
  class when every cell of its visual map is that prototype plus Gaussian noise, and "plays the sound" when its
  audio vector is that prototype plus noise; otherwise the modality is noise alone (same standard deviation).
- Every video has one class (AVE annotates one category per video) and one event run: some videos are all event,
  the others have an event of 1-9 s at any start, so that short and long events both occur.
- An event second carries both prototypes of the video's class. A background second breaks the correspondence in
  one of the ways AVE's background does: the picture with noise for sound (`visual_only`), the sound with noise for
  picture (`audio_only`), another class's picture with the class's sound (`other_picture`), the class's picture
  with another class's sound (`other_sound`), or noise in both (`empty`).
- The default mix makes much of the background look like an event to one modality: a model that sees only the
  pictures cannot tell `visual_only` and `other_sound` seconds from event seconds, one that hears only the sounds
  cannot tell `audio_only` and `other_picture` ones; each is 45 % of the background seconds (0.3 + 0.15), so either
  single modality stays far below what both together allow (measured in issue 29: a tiny AVE-CLIP at noise 0.6 on
  80 videos, 80 % with both, 70 % with the pictures alone, 66 % with the sounds alone).
Everything random comes from `numpy.random.default_rng(seed)`: the same config writes the same numbers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pipeline.ave.dataset import FEATURE_KEY
from pipeline.ave.features import PUBLIC_NAMES
from pipeline.errors import UserError

__all__ = ["EVENT", "BACKGROUND_KINDS", "CorrespondenceConfig", "CorrespondenceTruth",
           "build_correspondence_features", "SEGMENTS"]

SEGMENTS = 10  # seconds per video, as in AVE
EVENT = "event"
VISUAL_ONLY, AUDIO_ONLY, OTHER_PICTURE, OTHER_SOUND, EMPTY = (
    "visual_only", "audio_only", "other_picture", "other_sound", "empty")
BACKGROUND_KINDS = (VISUAL_ONLY, AUDIO_ONLY, OTHER_PICTURE, OTHER_SOUND, EMPTY)
TRUTH_FILE = "synth_features.json"


def _default_mix() -> dict[str, float]:
    return {VISUAL_ONLY: 0.3, AUDIO_ONLY: 0.3, OTHER_PICTURE: 0.15, OTHER_SOUND: 0.15, EMPTY: 0.1}


@dataclass
class CorrespondenceConfig:
    """What `build_correspondence_features` writes. Small dims keep a CPU training of a few seconds possible."""

    videos: int = 80
    classes: int = 4
    seed: int = 0
    visual_dim: int = 32
    audio_dim: int = 16
    map_size: int = 2  # visual maps are map_size x map_size cells
    noise: float = 0.3  # standard deviation of the Gaussian noise per channel (prototypes have norm 1)
    full_event_fraction: float = 0.25  # videos that are event from the first to the last second
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    background_mix: dict[str, float] = field(default_factory=_default_mix)  # relative weights of the kinds

    def __post_init__(self) -> None:
        for name in ("videos", "classes", "visual_dim", "audio_dim", "map_size"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"correspondence features: {name} must be >= 1, got {getattr(self, name)}")
        if self.classes < 2:
            raise UserError("correspondence features: classes must be >= 2 (a mismatch needs another class)")
        if self.noise < 0:
            raise UserError(f"correspondence features: noise must be >= 0, got {self.noise}")
        if not 0.0 <= self.full_event_fraction <= 1.0:
            raise UserError(f"full_event_fraction must be in [0, 1], got {self.full_event_fraction}")
        if self.val_fraction < 0 or self.test_fraction <= 0 or self.val_fraction + self.test_fraction >= 1:
            raise UserError(f"val_fraction={self.val_fraction}, test_fraction={self.test_fraction}: need >= 0, > 0 "
                            f"and a sum below 1 (the rest is the train split)")
        unknown = sorted(set(self.background_mix) - set(BACKGROUND_KINDS))
        if unknown or any(w < 0 for w in self.background_mix.values()) or sum(self.background_mix.values()) <= 0:
            raise UserError(f"background_mix {self.background_mix}: weights >= 0 (not all 0) for the kinds "
                            f"{', '.join(BACKGROUND_KINDS)}")
        n_test = round(self.videos * self.test_fraction)
        if n_test < 1 or self.videos - n_test - round(self.videos * self.val_fraction) < 1:
            raise UserError(f"{self.videos} videos leave an empty train or test split; use more videos")


@dataclass
class CorrespondenceTruth:
    """Ground truth per row: its class, its event span [start, end) and each second's kind."""

    classes: list[int]
    spans: list[tuple[int, int]]
    kinds: list[list[str]]
    splits: dict[str, list[int]]

    def segment_labels(self, num_classes: int) -> np.ndarray:
        """[N, 10] int: the class in event seconds, num_classes (background) elsewhere."""
        labels = np.full((len(self.classes), SEGMENTS), num_classes, np.int64)
        for i, (c, (s, e)) in enumerate(zip(self.classes, self.spans)):
            labels[i, s:e] = c
        return labels


def _unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _spans(rng: np.random.Generator, cfg: CorrespondenceConfig) -> list[tuple[int, int]]:
    spans = []
    for _ in range(cfg.videos):
        if rng.random() < cfg.full_event_fraction:
            spans.append((0, SEGMENTS))
        else:
            length = int(rng.integers(1, SEGMENTS))  # 1..9
            start = int(rng.integers(0, SEGMENTS - length + 1))
            spans.append((start, start + length))
    return spans


def _kinds(rng: np.random.Generator, cfg: CorrespondenceConfig, spans: list[tuple[int, int]]) -> list[list[str]]:
    names = list(BACKGROUND_KINDS)
    weights = np.array([cfg.background_mix.get(k, 0.0) for k in names], float)
    draws = rng.choice(len(names), size=(cfg.videos, SEGMENTS), p=weights / weights.sum())
    return [[EVENT if s <= t < e else names[draws[i, t]] for t in range(SEGMENTS)] for i, (s, e) in enumerate(spans)]


def _sources(kind: str, c: int, other: int) -> tuple[int | None, int | None]:
    """(class whose picture is shown, class whose sound plays) in a second of this kind; None: noise only."""
    return {EVENT: (c, c), VISUAL_ONLY: (c, None), AUDIO_ONLY: (None, c), OTHER_PICTURE: (other, c),
            OTHER_SOUND: (c, other), EMPTY: (None, None)}[kind]


def _splits(rng: np.random.Generator, cfg: CorrespondenceConfig) -> dict[str, list[int]]:
    perm = rng.permutation(cfg.videos)
    n_test, n_val = round(cfg.videos * cfg.test_fraction), round(cfg.videos * cfg.val_fraction)
    n_train = cfg.videos - n_test - n_val
    return {"train": sorted(perm[:n_train].tolist()), "val": sorted(perm[n_train:n_train + n_val].tolist()),
            "test": sorted(perm[n_train + n_val:].tolist())}


def _write(path: Path, name: str, data: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset(name, data=data)


def build_correspondence_features(out: Path, cfg: CorrespondenceConfig | None = None) -> CorrespondenceTruth:
    """Write the folder (created if needed; the files named above are overwritten) and return its ground truth."""
    cfg = cfg or CorrespondenceConfig()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    proto_v, proto_a = _unit_rows(rng, cfg.classes, cfg.visual_dim), _unit_rows(rng, cfg.classes, cfg.audio_dim)
    classes = [int(i) % cfg.classes for i in rng.permutation(cfg.videos)]  # balanced, in a shuffled order
    spans = _spans(rng, cfg)
    kinds = _kinds(rng, cfg, spans)
    others = rng.integers(1, cfg.classes, size=(cfg.videos, SEGMENTS))  # offset of "another class"
    m = cfg.map_size
    visual = rng.standard_normal((cfg.videos, SEGMENTS, m, m, cfg.visual_dim)) * cfg.noise
    audio = rng.standard_normal((cfg.videos, SEGMENTS, cfg.audio_dim)) * cfg.noise
    for i in range(cfg.videos):
        for t in range(SEGMENTS):
            picture, sound = _sources(kinds[i][t], classes[i], (classes[i] + int(others[i, t])) % cfg.classes)
            if picture is not None:
                visual[i, t] += proto_v[picture]
            if sound is not None:
                audio[i, t] += proto_a[sound]
    truth = CorrespondenceTruth(classes, spans, kinds, _splits(rng, cfg))
    labels = np.eye(cfg.classes + 1, dtype=np.float32)[truth.segment_labels(cfg.classes)]
    _write(out / PUBLIC_NAMES["visual"], FEATURE_KEY, visual.astype(np.float32))
    _write(out / PUBLIC_NAMES["audio"], FEATURE_KEY, audio.astype(np.float32))
    _write(out / PUBLIC_NAMES["labels"], FEATURE_KEY, labels)
    for split, rows in truth.splits.items():
        _write(out / f"{split}_order.h5", "order", np.asarray(rows, np.int64))
    (out / TRUTH_FILE).write_text(json.dumps({"config": asdict(cfg), **asdict(truth)}, indent=1) + "\n")
    return truth
