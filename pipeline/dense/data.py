"""The dense task's training data: a feature folder + annotation file -> per-video arrays with events on the time
grid, the training crops of `shared/reference/dense-avel-spec.md` §2.4, and padded batches with their targets.

- Events are converted to grid units with the folder's grid (`features.json`; UnAV's 0.32-s grid otherwise).
- Training crop: a video longer than `max_seq_len` steps gets a random `max_seq_len` window; a shorter one a random
  window of ratio [0.9, 1.0] of its length. A crop is redrawn (up to 200 times) until one event keeps at least
  `trunc_thresh` of its length; events are clipped to the window and those under `trunc_thresh` dropped.
- Batches are padded to `max_seq_len` (training) with a mask; inference takes whole videos (`infer.py`).
- Optional per-channel standardisation with train-split statistics (for randomly initialised encoders, whose raw
  outputs have tiny, uneven scales); the statistics travel in the checkpoint.
- Single-modality controls (`ModalityControl`, `pipeline.controls`): the other modality replaced by noise with its
  per-channel train-split mean and std, fixed per video by (the training seed, the video id), in every split, before
  any standardisation (so the model's input scale is what it would be); the statistics travel in the checkpoint,
  so evaluating it later replaces the same modality by the same noise.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.dense.targets import Points, assign
from pipeline.controls import BOTH, matched_noise, replaced_modality
from pipeline.dense.annotations import DenseDataset, load_annotations, normalise_subset
from pipeline.dense.features import LAYOUT_FILE, feature_paths, load_video_features
from pipeline.dense.synthetic import ANNOTATIONS
from pipeline.errors import UserError
from pipeline.extraction.grids import UNAV_GRID, TimeGrid


@dataclass
class DenseVideoData:
    id: str
    visual: np.ndarray  # [T, Dv] float32
    audio: np.ndarray  # [T, Da]
    segments: np.ndarray  # [N, 2] grid units
    labels: np.ndarray  # [N] int
    duration: float

    @property
    def steps(self) -> int:
        return self.visual.shape[0]


@dataclass
class FeatureStats:
    visual_mean: np.ndarray
    visual_std: np.ndarray
    audio_mean: np.ndarray
    audio_std: np.ndarray

    def apply(self, v: DenseVideoData) -> DenseVideoData:
        return DenseVideoData(v.id, ((v.visual - self.visual_mean) / self.visual_std).astype(np.float32),
                              ((v.audio - self.audio_mean) / self.audio_std).astype(np.float32), v.segments,
                              v.labels, v.duration)

    def to_dict(self) -> dict:
        return {k: getattr(self, k).tolist() for k in ("visual_mean", "visual_std", "audio_mean", "audio_std")}

    @classmethod
    def from_dict(cls, d: dict | None) -> "FeatureStats | None":
        return cls(**{k: np.asarray(v, np.float32) for k, v in d.items()}) if d else None

    @classmethod
    def of(cls, videos: list[DenseVideoData]) -> "FeatureStats":
        def stats(xs):
            x = np.concatenate(xs).astype(np.float64)
            return x.mean(0).astype(np.float32), np.maximum(x.std(0), 1e-6).astype(np.float32)

        vm, vs = stats([v.visual for v in videos])
        am, as_ = stats([v.audio for v in videos])
        return cls(vm, vs, am, as_)


@dataclass
class ModalityControl:
    """A single-modality control: `replaced` ("audio" or "visual") becomes noise of these per-channel statistics
    (the train split's), seeded by (`seed`, video id): the same numbers in every split, batch, epoch and run."""

    inputs: str  # what the model sees: "audio" or "visual"
    replaced: str
    mean: np.ndarray
    std: np.ndarray
    seed: int

    @classmethod
    def of(cls, inputs: str, train: list[DenseVideoData], seed: int) -> "ModalityControl | None":
        """None for "both"; else the statistics of the replaced modality over the (raw) train videos."""
        replaced = replaced_modality(inputs)
        if replaced is None:
            return None
        x = np.concatenate([getattr(v, replaced) for v in train]).astype(np.float64)
        return cls(inputs, replaced, x.mean(0).astype(np.float32), x.std(0).astype(np.float32), int(seed))

    def apply(self, v: DenseVideoData) -> DenseVideoData:
        noise = matched_noise(getattr(v, self.replaced).shape, self.mean, self.std, self.seed, v.id)
        return DenseVideoData(v.id, noise if self.replaced == "visual" else v.visual,
                              noise if self.replaced == "audio" else v.audio, v.segments, v.labels, v.duration)

    def to_dict(self) -> dict:
        return {"inputs": self.inputs, "replaced": self.replaced, "mean": self.mean.tolist(),
                "std": self.std.tolist(), "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict | None) -> "ModalityControl | None":
        if not d or d.get("inputs", BOTH) == BOTH:
            return None
        return cls(d["inputs"], d["replaced"], np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32),
                   int(d["seed"]))


@dataclass
class DenseFeatures:
    """One dataset: its annotations, grid, dims and (lazily) each split's videos."""

    dataset: DenseDataset
    folder: Path
    grid: TimeGrid
    layout: dict

    @property
    def num_classes(self) -> int:
        return max(self.dataset.classes) + 1

    @property
    def class_names(self) -> list[str]:
        return [self.dataset.classes.get(i, f"class_{i}") for i in range(self.num_classes)]

    @property
    def notes(self) -> list[str]:
        """RANDOM WEIGHTS warnings for features made by randomly initialised encoders (from features.json)."""
        encoders = self.layout.get("encoders") or {}
        return [f"RANDOM WEIGHTS: the {m} features in {self.folder} come from a randomly initialised encoder; "
                f"results on them test the pipeline only" for m, e in encoders.items()
                if (e.get("weights") or {}).get("random_init")]

    def dims(self) -> tuple[int, int]:
        first = next(iter(self.dataset.videos))
        v, a = load_video_features(self.folder, first)
        return v.shape[1], a.shape[1]

    def split(self, subset: str, stats: FeatureStats | None = None,
              control: ModalityControl | None = None) -> list[DenseVideoData]:
        """A split's videos; `control` replaces a modality by its noise first, then `stats` standardises."""
        out = []
        for video in self.dataset.split(normalise_subset(subset)):
            v, a = load_video_features(self.folder, video.id)
            segs = np.array([[self.grid.to_grid(e.start), self.grid.to_grid(e.end)] for e in video.events],
                            np.float32).reshape(-1, 2)
            labels = np.array([e.label_id for e in video.events], np.int64)
            duration = video.duration if video.duration is not None else self.grid.to_seconds(v.shape[0])
            item = DenseVideoData(video.id, v, a, segs, labels, float(duration))
            if control is not None:
                item = control.apply(item)
            out.append(stats.apply(item) if stats is not None else item)
        return out

    def digest(self) -> str:
        """The inputs' identity for the artifact store: the annotation file, the layout file, and every feature
        file's name and size (content hashing of UnAV-size folders, ~20 GB, would cost minutes per run)."""
        h = hashlib.sha256(self.dataset.path.read_bytes())
        layout = self.folder / LAYOUT_FILE
        if layout.is_file():
            h.update(layout.read_bytes())
        for vid in sorted(self.dataset.videos):
            for p in feature_paths(self.folder, vid).values():
                h.update(f"{p.name}:{p.stat().st_size if p.is_file() else -1}".encode())
        return h.hexdigest()


def load_dense_features(annotations: Path, features: Path | None = None) -> DenseFeatures:
    """The annotation JSON (or a folder holding it) and its feature folder (default: `features/` beside it)."""
    annotations = Path(annotations)
    path = annotations / ANNOTATIONS if annotations.is_dir() else annotations
    ds = load_annotations(path)
    if ds.problems:
        raise UserError(f"{path}: {len(ds.problems)} problem(s), e.g. {ds.problems[0]}; `avel dense dataset check "
                        f"{path}` lists them all")
    if not ds.classes:
        raise UserError(f"{path}: no events, so no classes to learn")
    folder = Path(features) if features is not None else path.parent / "features"
    if not folder.is_dir():
        raise UserError(f"{folder}: feature folder not found (give --features, or put the .npy files in features/ "
                        f"beside {path.name})")
    layout = json.loads((folder / LAYOUT_FILE).read_text()) if (folder / LAYOUT_FILE).is_file() else {}
    g = layout.get("grid")
    grid = TimeGrid(float(g["window_s"]), float(g["stride_s"])) if g else UNAV_GRID
    return DenseFeatures(ds, folder, grid, layout)


def random_crop(video: DenseVideoData, max_len: int, rng: np.random.Generator, crop_ratio=(0.9, 1.0),
                trunc_thresh: float = 0.5, tries: int = 200) -> tuple[int, int, np.ndarray, np.ndarray]:
    """(start, stop, segments, labels) of a training window; the segments relative to `start`."""
    t = video.steps
    lengths = video.segments[:, 1] - video.segments[:, 0]
    for _ in range(tries):
        n = max_len if t > max_len else max(1, int(round(rng.uniform(*crop_ratio) * t)))
        start = int(rng.integers(0, t - n + 1))
        stop = start + n
        clipped = np.clip(video.segments, start, stop)
        kept = (clipped[:, 1] - clipped[:, 0]) >= trunc_thresh * np.maximum(lengths, 1e-6)
        if kept.any() or len(lengths) == 0:
            break
    return start, stop, clipped[kept] - start, video.labels[kept]


@dataclass
class Batch:
    visual: torch.Tensor  # [B, Dv, L]
    audio: torch.Tensor  # [B, Da, L]
    mask: torch.Tensor  # [B, 1, L] bool
    cls_targets: torch.Tensor  # [B, P, C]
    reg_targets: torch.Tensor  # [B, P, C, 2]


def training_batch(videos: list[DenseVideoData], max_len: int, points: Points, num_classes: int,
                   rng: np.random.Generator, crop_ratio=(0.9, 1.0), trunc_thresh: float = 0.5) -> Batch:
    b, dv, da = len(videos), videos[0].visual.shape[1], videos[0].audio.shape[1]
    visual, audio = np.zeros((b, dv, max_len), np.float32), np.zeros((b, da, max_len), np.float32)
    mask = np.zeros((b, 1, max_len), bool)
    cls_t, reg_t = [], []
    for i, v in enumerate(videos):
        start, stop, segs, labels = random_crop(v, max_len, rng, crop_ratio, trunc_thresh)
        n = stop - start
        visual[i, :, :n], audio[i, :, :n], mask[i, 0, :n] = v.visual[start:stop].T, v.audio[start:stop].T, True
        c, r = assign(points, torch.from_numpy(segs), torch.from_numpy(labels), num_classes)
        cls_t.append(c)
        reg_t.append(r)
    return Batch(torch.from_numpy(visual), torch.from_numpy(audio), torch.from_numpy(mask), torch.stack(cls_t),
                 torch.stack(reg_t))
