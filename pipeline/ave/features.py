"""Feature sets for the localizer: AVE-layout HDF5 features + segment labels + splits, from either source.

Two sources, one type (`FeatureSet`):
- the extraction stage's store (`visual.h5`, `audio.h5` of this project, labels and splits from the dataset);
- a folder in the public AVE layout a user already has: `visual_feature.h5`, `audio_feature.h5`, `labels.h5`,
  `*_order.h5` (dataset `avadataset`; AVE-ECCV18 ships VGG-19 [4143,10,7,7,512] and VGGish [4143,10,128]).

`FeatureSet.split(name)` gives a `SplitData` that serves batches as float tensors. It holds the split in memory
(float32, converted once, not per epoch) when that fits a memory budget, otherwise it reads rows from the HDF5
file per batch, so ResNet-50 maps of all AVE (16.6 GB) never need to be in RAM at once. With an `InputNoise`
(the single-modality control of `pipeline.controls`) one modality's rows are served as matched noise instead.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from pipeline import ave
from pipeline.ave.dataset import FEATURE_KEY
from pipeline.errors import UserError
from pipeline.store import digest_json, file_sha256

PUBLIC_NAMES = {"visual": "visual_feature.h5", "audio": "audio_feature.h5", "labels": "labels.h5"}


def _quick_identity(path: Path) -> str:
    """sha256 for files up to 256 MB; name + size + mtime beyond (hashing 7.7 GB of AVE features takes a minute)."""
    st = path.stat()
    if st.st_size <= 256 << 20:
        return file_sha256(path)
    return digest_json({"name": path.name, "size": st.st_size, "mtime": int(st.st_mtime)})


def _dataset(f: h5py.File, path: Path) -> h5py.Dataset:
    if FEATURE_KEY in f:
        return f[FEATURE_KEY]
    hint = (" — CACE-Net's extractor writes 'dataset': rename it with h5py (f.move('dataset', 'avadataset'))"
            if "dataset" in f else "")
    raise UserError(f"{path}: no dataset '{FEATURE_KEY}' (found {list(f.keys())}); AVE feature files keep their "
                    f"array under '{FEATURE_KEY}'" + hint)


@dataclass
class FeatureFile:
    path: Path
    shape: tuple[int, ...]
    dtype: str
    attrs: dict

    @classmethod
    def open(cls, path: Path, modality: str) -> "FeatureFile":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: {modality} feature file not found")
        try:
            with h5py.File(path, "r") as f:
                d = _dataset(f, path)
                attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
                if "valid" in f:
                    attrs["_valid"] = np.asarray(f["valid"][()], bool)
                return cls(path, tuple(d.shape), str(d.dtype), attrs)
        except OSError as e:
            raise UserError(f"{path}: not a readable HDF5 file ({e})") from None

    @property
    def random_init(self) -> bool:
        return bool(self.attrs.get("random_init", False))


@dataclass
class FeatureSet:
    visual: FeatureFile
    audio: FeatureFile
    labels: np.ndarray  # [N,10,C+1] one-hot, background last
    splits: dict[str, np.ndarray]
    class_names: list[str]
    video_ids: list[str] | None = None  # per row, for prediction files
    digests: dict[str, str] = field(default_factory=dict)
    valid: np.ndarray | None = None  # [N] rows whose features were extracted
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        n, t = self.labels.shape[:2]
        v, a = self.visual.shape, self.audio.shape
        if len(v) != 5:
            raise UserError(f"{self.visual.path}: visual features must be [N,T,H,W,C] (e.g. [N,10,7,7,2048]), got "
                            f"shape {list(v)}")
        if len(a) != 3:
            raise UserError(f"{self.audio.path}: audio features must be [N,T,C] (e.g. [N,10,2048]), got {list(a)}")
        for path, shape in ((self.visual.path, v), (self.audio.path, a)):
            if shape[:2] != (n, t):
                raise UserError(f"{path}: has {shape[0]} rows x {shape[1]} segments but the labels have {n} x {t}; "
                                f"features and labels must come from the same Annotations.txt")
        if len(self.class_names) != self.num_classes:
            raise UserError(f"{len(self.class_names)} class names for labels with {self.num_classes} classes + "
                            f"background ({self.visual.path.parent}); the class list and the labels must agree")
        if self.valid is None:
            self.valid = np.ones(n, bool)
        for modality, ff in (("visual", self.visual), ("audio", self.audio)):
            if "_valid" in ff.attrs:
                self.valid &= ff.attrs["_valid"]
            if ff.random_init:
                self.notes.append(f"RANDOM WEIGHTS: the {modality} features in {ff.path} come from a randomly "
                                  f"initialised encoder; accuracies are not comparable to published numbers")

    @property
    def video_dim(self) -> int:
        return self.visual.shape[-1]

    @property
    def audio_dim(self) -> int:
        return self.audio.shape[-1]

    @property
    def num_classes(self) -> int:
        return self.labels.shape[-1] - 1

    def rows(self, split: str) -> np.ndarray:
        if split not in self.splits:
            raise UserError(f"split {split!r} is not available here (have: {', '.join(self.splits)})")
        rows = self.splits[split]
        return rows[self.valid[rows]]

    def split(self, name: str, device: torch.device, memory_budget: int | None = None,
              norm: "FeatureNorm | None" = None, noise: "InputNoise | None" = None) -> "SplitData":
        return SplitData(self, name, self.rows(name), device, memory_budget, norm, noise)


def from_dataset(dataset_dir: Path, visual: Path, audio: Path) -> FeatureSet:
    """Features written by this project's extraction stage for the dataset at `dataset_dir`."""
    ds = ave.load_dataset(dataset_dir)
    splits = {s: ds.split_rows(s) for s in ave.SPLITS}
    fv, fa = FeatureFile.open(visual, "visual"), FeatureFile.open(audio, "audio")
    return FeatureSet(fv, fa, ds.segment_labels(), splits, ds.classes, [a.video_id for a in ds.annotations],
                      digests={"dataset": ds.digest(), "visual": _quick_identity(fv.path),
                               "audio": _quick_identity(fa.path)})


def from_public_folder(folder: Path) -> FeatureSet:
    """A folder in the public AVE layout (visual_feature.h5, audio_feature.h5, labels.h5, *_order.h5).

    labels.h5 may be absent when Annotations.txt is there (it is rebuilt from it, as tests check against AVE).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: features folder not found")
    annotations = folder / ave.ANNOTATIONS
    ds = ave.load_dataset(folder) if annotations.is_file() else None
    labels_path = folder / PUBLIC_NAMES["labels"]
    if labels_path.is_file():
        with h5py.File(labels_path, "r") as f:
            labels = np.asarray(_dataset(f, labels_path)[()], np.float32)
        if labels.ndim != 3:
            raise UserError(f"{labels_path}: labels must be [N,10,C+1] one-hot, got shape {list(labels.shape)}")
    elif ds is not None:
        labels = ds.segment_labels()
    else:
        raise UserError(f"{folder}: needs {PUBLIC_NAMES['labels']} or {ave.ANNOTATIONS} for the segment labels")
    n = labels.shape[0]
    splits = {}
    for s in ave.SPLITS:
        path = folder / f"{s}_order.h5"
        if path.is_file():
            splits[s] = ave.read_order(path, n)
    if "test" not in splits:
        raise UserError(f"{folder}: test_order.h5 not found; the public AVE layout has train/val/test_order.h5")
    if ds is not None and len(ds) != n:
        raise UserError(f"{annotations}: {len(ds)} rows but {labels_path.name} has {n}; both must describe the "
                        f"same videos, line i = row i")
    classes = _class_names(labels_path if labels_path.is_file() else annotations, ds, labels)
    fv = FeatureFile.open(folder / PUBLIC_NAMES["visual"], "visual")
    fa = FeatureFile.open(folder / PUBLIC_NAMES["audio"], "audio")
    return FeatureSet(fv, fa, labels, splits, classes, [a.video_id for a in ds.annotations] if ds else None,
                      digests={"visual": _quick_identity(fv.path), "audio": _quick_identity(fa.path),
                               "labels": hashlib.sha256(labels.tobytes()).hexdigest(),
                               "splits": digest_json({k: v.tolist() for k, v in splits.items()})})


def _class_names(labels_path: Path, ds: "ave.AVEDataset | None", labels: np.ndarray) -> list[str]:
    """Names of the label columns (all but the last, background), checked against the labels before any work.

    labels.h5 fixes the label space. Annotations.txt names the classes in order of first appearance, so it
    names fewer when its rows use only some of them: with AVE's width (28 classes + background) and names that
    are all AVE categories, the columns are AVE's class order, provided every event segment's column is its
    row's category there (checked); any other disagreement is an error naming both files."""
    from pipeline.synth_engine import AVE_CATEGORIES

    width = labels.shape[-1] - 1
    if ds is None:
        return list(AVE_CATEGORIES) if width == len(AVE_CATEGORIES) else [f"class {c}" for c in range(width)]
    if len(ds.classes) == width:
        return list(ds.classes)
    if width == len(AVE_CATEGORIES) and set(ds.classes) <= set(AVE_CATEGORIES):
        index = {c: k for k, c in enumerate(AVE_CATEGORIES)}
        for a in ds.annotations:
            cols = np.unique(labels[a.row].argmax(-1))
            cols = cols[cols != width]
            if len(cols) and set(cols.tolist()) != {index[a.category]}:
                raise UserError(f"{labels_path}: row {a.row} labels its events with column(s) {cols.tolist()} but "
                                f"Annotations.txt says {a.category!r}, column {index[a.category]} in AVE's class "
                                f"order; the two files disagree")
        return list(AVE_CATEGORIES)
    raise UserError(f"{labels_path}: {width} classes + background, but {ds.root / ave.ANNOTATIONS} names "
                    f"{len(ds.classes)} ({', '.join(ds.classes[:5])}{' ...' if len(ds.classes) > 5 else ''}); "
                    f"use the labels.h5 made from this Annotations.txt (`avel labels`), or remove labels.h5 to "
                    f"rebuild the labels from Annotations.txt")


@dataclass
class FeatureNorm:
    """Per-channel mean and std of the visual and audio features (over rows, segments and positions).

    Used when training with `standardize_features`: randomly initialised encoders give features whose raw
    scale hides the signal (Cnn14's random embeddings have std ~0.01 and cosine ~0.997 between any two
    seconds), so the localizer sees z-scores. The statistics come from the train split only and travel in the
    checkpoint, so evaluation and prediction apply exactly the same transform.
    """

    visual_mean: torch.Tensor
    visual_std: torch.Tensor
    audio_mean: torch.Tensor
    audio_std: torch.Tensor

    def apply(self, visual: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dev = visual.device
        return ((visual - self.visual_mean.to(dev)) / self.visual_std.to(dev),
                (audio - self.audio_mean.to(dev)) / self.audio_std.to(dev))

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("visual_mean", "visual_std", "audio_mean", "audio_std")}

    @classmethod
    def from_dict(cls, d: dict | None) -> "FeatureNorm | None":
        return cls(**{k: torch.as_tensor(v, dtype=torch.float32) for k, v in d.items()}) if d else None


def channel_stats(fs: FeatureSet, rows: np.ndarray, chunk: int = 64) -> FeatureNorm:
    """Streaming per-channel mean/std over `rows` (float64 sums; memory bounded by `chunk` rows)."""
    out = {}
    for name, ff in (("visual", fs.visual), ("audio", fs.audio)):
        total = np.zeros(ff.shape[-1]), np.zeros(ff.shape[-1])
        count = 0
        with h5py.File(ff.path, "r") as f:
            d = f[FEATURE_KEY]
            ordered = np.sort(rows)
            for start in range(0, len(ordered), chunk):
                x = _read_rows(d, ordered[start:start + chunk]).reshape(-1, ff.shape[-1]).astype(np.float64)
                total = total[0] + x.sum(0), total[1] + (x * x).sum(0)
                count += x.shape[0]
        mean = total[0] / max(count, 1)
        std = np.sqrt(np.maximum(total[1] / max(count, 1) - mean ** 2, 0)) + 1e-6
        out[f"{name}_mean"], out[f"{name}_std"] = (torch.tensor(mean, dtype=torch.float32),
                                                   torch.tensor(std, dtype=torch.float32))
    return FeatureNorm(**out)


@dataclass
class InputNoise:
    """The single-modality control (`pipeline.controls`): `modality`'s features (the one the model must not see)
    served as Gaussian noise with its per-channel `mean` and `std` over the train split, fixed per row by (seed,
    row index in the feature files): the same whichever split, batch or epoch reads the row. Travels in the
    checkpoint (`input_noise`) so that evaluation feeds the model what it was trained on."""

    modality: str
    mean: torch.Tensor
    std: torch.Tensor
    seed: int

    def rows(self, rows: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
        from pipeline.controls import matched_noise

        mean, std = self.mean.numpy(), self.std.numpy()
        out = np.empty((len(rows), *shape), np.float32)
        for i, row in enumerate(rows):
            out[i] = matched_noise(shape, mean, std, self.seed, int(row))
        return torch.from_numpy(out)

    def to_dict(self) -> dict:
        return {"modality": self.modality, "mean": self.mean, "std": self.std, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict | None) -> "InputNoise | None":
        if not d:
            return None
        return cls(str(d["modality"]), torch.as_tensor(d["mean"], dtype=torch.float32),
                   torch.as_tensor(d["std"], dtype=torch.float32), int(d["seed"]))


def input_noise(fs: FeatureSet, inputs: str, seed: int, stats: FeatureNorm | None = None) -> InputNoise | None:
    """The noise that replaces the modality the model must not see when it sees `inputs` (None for "both"); the
    statistics are the train split's (`stats` when already computed)."""
    from pipeline.controls import replaced_modality

    modality = replaced_modality(inputs)
    if modality is None:
        return None
    stats = stats or channel_stats(fs, fs.rows("train"))
    return InputNoise(modality, getattr(stats, f"{modality}_mean"), getattr(stats, f"{modality}_std"), seed)


def available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


class SplitData:
    """Rows of one split as batches of (visual, audio, labels) float tensors on `device`."""

    def __init__(self, fs: FeatureSet, name: str, rows: np.ndarray, device: torch.device,
                 memory_budget: int | None = None, norm: FeatureNorm | None = None, noise: InputNoise | None = None):
        self.fs, self.name, self.rows, self.device, self.norm, self.noise = fs, name, rows, device, norm, noise
        self.labels = torch.from_numpy(fs.labels[rows]).float()
        per_row = 4 * (np.prod(fs.visual.shape[1:]) + np.prod(fs.audio.shape[1:]))
        budget = available_memory() // 2 if memory_budget is None else memory_budget
        self.in_memory = per_row * len(rows) <= budget
        self._visual = self._audio = None
        if self.in_memory:  # one conversion to float32 now, none per epoch
            self._visual = self._modality("visual", np.arange(len(rows)))
            self._audio = self._modality("audio", np.arange(len(rows)))
            if norm is not None:  # once, not per batch
                self._visual, self._audio = norm.apply(self._visual, self._audio)
            if device.type == "cuda":
                self._visual, self._audio = self._visual.to(device), self._audio.to(device)
        self.labels = self.labels.to(device)

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, path: Path, positions: np.ndarray) -> torch.Tensor:
        rows = self.rows[positions]
        order = np.argsort(rows)  # h5py fancy indexing wants increasing indices
        with h5py.File(path, "r") as f:
            d = f[FEATURE_KEY]
            data = np.empty((len(rows), *d.shape[1:]), np.float32)
            if len(rows):
                data[order] = _read_rows(d, rows[order])
        return torch.from_numpy(data)

    def _modality(self, modality: str, positions: np.ndarray) -> torch.Tensor:
        """One modality's features of these positions: read from its file, or the control's noise."""
        ff = getattr(self.fs, modality)
        if self.noise is not None and self.noise.modality == modality:
            return self.noise.rows(self.rows[positions], tuple(ff.shape[1:]))
        return self._read(ff.path, positions)

    def batch(self, positions: np.ndarray | torch.Tensor):
        positions = np.asarray(positions.cpu() if isinstance(positions, torch.Tensor) else positions)
        if self.in_memory:
            idx = torch.from_numpy(positions).to(self._visual.device)
            v, a = self._visual[idx], self._audio[idx]
        else:
            v, a = self._modality("visual", positions), self._modality("audio", positions)
            if self.norm is not None:
                v, a = self.norm.apply(v, a)
        return v.to(self.device, non_blocking=True), a.to(self.device, non_blocking=True), \
            self.labels[torch.from_numpy(positions).to(self.device)]


def _read_rows(d: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Read increasing row indices; contiguous runs are read as slices (h5py point selection is slow)."""
    out, start = [], 0
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for end in [*breaks.tolist(), len(rows)]:
        out.append(np.asarray(d[rows[start]:rows[end - 1] + 1], np.float32))
        start = end
    return np.concatenate(out) if out else np.empty((0, *d.shape[1:]), np.float32)


def newest_extraction(root: Path, dataset_dir: Path, modality: str) -> Path:
    """The feature file of the newest complete `extract_<modality>` run of this dataset in the store."""
    from pipeline.store import ArtifactStore

    store, digest = ArtifactStore(root), ave.load_dataset(dataset_dir).digest()
    done = [m for m in store.list(f"extract_{modality}") if m.status == "complete"
            and m.inputs.get("dataset") == digest and modality in m.outputs]
    if not done:
        raise UserError(f"no complete {modality} extraction of {dataset_dir} under {root}; run "
                        f"`avel extract --dataset {dataset_dir} --root {root} --modality {modality}` first, or "
                        f"pass the feature file (--{modality})")
    return store.path(done[0].stage, done[0].key) / done[0].outputs[modality].path


def newest_store_features(root: Path, dataset_dir: Path) -> FeatureSet:
    """The newest complete visual and audio extraction of this dataset in the store (what `avel extract` wrote)."""
    return from_dataset(dataset_dir, newest_extraction(root, dataset_dir, "visual"),
                        newest_extraction(root, dataset_dir, "audio"))
