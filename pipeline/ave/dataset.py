"""The AVE data layer: annotations, classes, segment labels, splits and video files of an AVE-format dataset.

An AVE-format dataset is a folder with
- `Annotations.txt`: `Category&YouTubeID&Quality&StartSec&EndSec`, no header; line i is row i of every AVE h5 file;
- `train_order.h5` / `val_order.h5` / `test_order.h5`: dataset `order`, int64 row indices (the split every
  published AVE number uses);
- optionally AVE's `trainSet.txt` / `valSet.txt` / `testSet.txt` (Annotations format; known to disagree slightly
  with the *_order.h5 split);
- a video folder of `<YouTubeID>.mp4` (`videos/`, or `AVE/` as the official download has it).

Facts this module encodes (checked against the real files in ../shared/ave by tests/test_ave.py):
class index = order of first appearance of the category in Annotations.txt; background = len(classes) (28 for AVE);
a segment t is an event segment for t in [start, end); one video file may serve several rows.
This module reads metadata only; decoding videos belongs to pipeline/media.py.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import UserError

ANNOTATIONS = "Annotations.txt"
SEGMENTS = 10  # AVE videos are 10 s, one label per 1-s segment
FEATURE_KEY = "avadataset"  # the HDF5 dataset of AVE feature and label files (what AVE and CACE-Net code read)
SPLITS = ("train", "val", "test")
VIDEO_DIRS = ("videos", "AVE")  # our layout, then the official AVE download's


@dataclass(frozen=True)
class Annotation:
    row: int
    category: str
    video_id: str
    quality: str
    start: int
    end: int

    def line(self) -> str:
        return f"{self.category}&{self.video_id}&{self.quality}&{self.start}&{self.end}"


def parse_annotation_line(text: str, row: int, where: str) -> Annotation:
    """Parse one `Category&ID&Quality&Start&End` line; `where` names file and line for the error message."""
    parts = text.rstrip("\r\n").split("&")
    if len(parts) != 5:
        raise UserError(f"{where}: expected 5 '&'-separated fields (Category&YouTubeID&Quality&Start&End), "
                        f"got {len(parts)}: {text.strip()!r}")
    category, video_id, quality, start_s, end_s = parts
    try:
        start, end = int(start_s), int(end_s)
    except ValueError:
        raise UserError(f"{where}: start and end must be whole seconds, got {start_s!r} and {end_s!r}") from None
    if not category or not video_id:
        raise UserError(f"{where}: empty category or video ID: {text.strip()!r}")
    if not (0 <= start <= end <= SEGMENTS):
        raise UserError(f"{where}: need 0 <= start <= end <= {SEGMENTS}, got start={start} end={end}")
    return Annotation(row, category, video_id, quality, start, end)


def parse_annotations(path: Path) -> list[Annotation]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: annotation file not found (an AVE dataset folder holds {ANNOTATIONS})")
    rows: list[Annotation] = []
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue  # tolerate a trailing blank line
            rows.append(parse_annotation_line(text, len(rows), f"{path}:{lineno}"))
    if not rows:
        raise UserError(f"{path}: no annotation lines")
    return rows


def read_order(path: Path, num_rows: int) -> np.ndarray:
    """Row indices of one `*_order.h5` split file (dataset `order`), checked against the annotation count."""
    try:
        with h5py.File(path, "r") as f:
            if "order" not in f:
                raise UserError(f"{path}: no dataset 'order' (found {list(f.keys())}); AVE split files hold "
                                f"int row indices under 'order'")
            order = np.asarray(f["order"][()]).astype(np.int64).reshape(-1)
    except OSError as e:
        raise UserError(f"{path}: not a readable HDF5 file ({e})") from None
    bad = np.flatnonzero((order < 0) | (order >= num_rows))
    if bad.size:
        raise UserError(f"{path}: entry {bad[0]} is row {order[bad[0]]}, outside Annotations.txt's "
                        f"{num_rows} rows (0..{num_rows - 1}); is this split file from another dataset?")
    if np.unique(order).size != order.size:
        raise UserError(f"{path}: a row index appears twice")
    return order


@dataclass(frozen=True)
class DatasetCheck:
    rows: int
    videos: int
    present: int
    missing: list[str]
    unreadable: dict[str, str]

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unreadable


class AVEDataset:
    """Metadata of one AVE-format dataset folder. Cheap to build: reads text and small h5 files only."""

    def __init__(self, root: Path, annotations: list[Annotation], video_dir: Path | None = None):
        self.root = Path(root)
        self.annotations = annotations
        self._video_dir = Path(video_dir) if video_dir else None

    def __len__(self) -> int:
        return len(self.annotations)

    @cached_property
    def classes(self) -> list[str]:
        """Category names in order of first appearance (AVE's class index)."""
        return list(dict.fromkeys(a.category for a in self.annotations))

    @property
    def background(self) -> int:
        return len(self.classes)

    def class_index(self, category: str) -> int:
        try:
            return self.classes.index(category)
        except ValueError:
            raise UserError(f"unknown category {category!r}; known: {', '.join(self.classes)}") from None

    # ---- labels -------------------------------------------------------------------------------------------------
    def event_mask(self) -> np.ndarray:
        """[N,10] float32: 1 where segment t is in [start, end) (AVE's labels_closs.h5)."""
        t = np.arange(SEGMENTS)
        starts = np.array([a.start for a in self.annotations])[:, None]
        ends = np.array([a.end for a in self.annotations])[:, None]
        return ((t >= starts) & (t < ends)).astype(np.float32)

    def video_labels(self) -> np.ndarray:
        """[N, C+1] float32 one-hot of the row's category (AVE's mil_labels.h5; background column never set)."""
        out = np.zeros((len(self), self.background + 1), np.float32)
        out[np.arange(len(self)), [self.class_index(a.category) for a in self.annotations]] = 1
        return out

    def segment_labels(self) -> np.ndarray:
        """[N,10,C+1] float32 one-hot as AVE's labels.h5: the category on event segments, background elsewhere."""
        mask = self.event_mask()[:, :, None]
        background = np.zeros(self.background + 1, np.float32)
        background[self.background] = 1
        return mask * self.video_labels()[:, None, :] + (1 - mask) * background

    # ---- splits -------------------------------------------------------------------------------------------------
    def split_rows(self, split: str) -> np.ndarray:
        """Rows of a split from `<split>_order.h5`, the split published AVE numbers use."""
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        path = self.root / f"{split}_order.h5"
        if not path.is_file():
            raise UserError(f"{path}: split file not found; an AVE dataset folder holds "
                            f"{', '.join(s + '_order.h5' for s in SPLITS)}")
        return read_order(path, len(self))

    def set_file_rows(self, split: str) -> np.ndarray | None:
        """Rows listed in AVE's `<split>Set.txt`, matched to Annotations rows by their full line; None if absent."""
        path = self.root / f"{split}Set.txt"
        if not path.is_file():
            return None
        unused: dict[str, list[int]] = defaultdict(list)
        for a in self.annotations:
            unused[a.line()].append(a.row)
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                a = parse_annotation_line(text, -1, f"{path}:{lineno}")
                candidates = unused.get(a.line())
                if not candidates:
                    raise UserError(f"{path}:{lineno}: {text.strip()!r} matches no (unused) line of {ANNOTATIONS}")
                rows.append(candidates.pop(0))
        return np.array(rows, np.int64)

    # ---- videos -------------------------------------------------------------------------------------------------
    @property
    def video_dir(self) -> Path:
        if self._video_dir is not None:
            return self._video_dir
        for name in VIDEO_DIRS:
            if (self.root / name).is_dir():
                return self.root / name
        return self.root / VIDEO_DIRS[0]

    def video_path(self, video_id: str) -> Path:
        return self.video_dir / f"{video_id}.mp4"

    def video_ids(self) -> list[str]:
        """Unique video IDs in order of first appearance (45 AVE IDs serve 2-3 rows each)."""
        return list(dict.fromkeys(a.video_id for a in self.annotations))

    def rows_by_video(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = defaultdict(list)
        for a in self.annotations:
            out[a.video_id].append(a.row)
        return dict(out)

    def digest(self) -> str:
        """Identity of the dataset for stage keys: the annotation rows, the split files, and each video's name and
        size. Hashing every video's bytes (about 20 GB for AVE) would cost minutes per run; a re-encoded video of
        the same size would go unnoticed, which `--force` covers."""
        from pipeline.store import digest_json, file_sha256

        splits = {s: file_sha256(self.root / f"{s}_order.h5") for s in SPLITS
                  if (self.root / f"{s}_order.h5").is_file()}
        videos = {}
        for vid in self.video_ids():
            path = self.video_path(vid)
            videos[vid] = path.stat().st_size if path.is_file() else None
        return digest_json({"annotations": [a.line() for a in self.annotations], "splits": splits, "videos": videos})

    def check(self, open_files: bool = True) -> DatasetCheck:
        """Which video files are missing or cannot be opened. Opening reads the container header only."""
        missing, unreadable, present = [], {}, 0
        for vid in self.video_ids():
            path = self.video_path(vid)
            if not path.is_file():
                missing.append(vid)
                continue
            present += 1
            if path.stat().st_size == 0:
                unreadable[vid] = "empty file"
            elif open_files:
                reason = _open_error(path)
                if reason:
                    unreadable[vid] = reason
        return DatasetCheck(len(self), len(self.video_ids()), present, missing, unreadable)


def _open_error(path: Path) -> str | None:
    import decord  # imported here: metadata-only users of this module need no video library

    try:
        vr = decord.VideoReader(str(path))
        if len(vr) == 0:
            return "no video frames"
    except Exception as e:  # decord raises its own DECORDError for any container/codec failure
        return str(e).splitlines()[0][:200]
    return None


def load_dataset(root: Path, video_dir: Path | None = None) -> AVEDataset:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder not found (expected a folder holding {ANNOTATIONS}, the "
                        f"*_order.h5 split files and videos/)")
    return AVEDataset(root, parse_annotations(root / ANNOTATIONS), video_dir)


def write_labels(ds: AVEDataset, out: Path) -> Path:
    """Write AVE's `labels.h5` ([N,10,C+1], dataset `avadataset`) atomically."""
    from pipeline.store import atomic_path

    with atomic_path(Path(out)) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset(FEATURE_KEY, data=ds.segment_labels())
    return Path(out)
