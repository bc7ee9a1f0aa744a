"""Dense feature files in the layout UnAV-100 releases and its loader reads, and the time grid they sit on.

One folder, three files per video: `<vid>_rgb.npy` [T, 1024], `<vid>_flow.npy` [T, 1024] (I3D) and
`<vid>_vggish.npy` [T, 128] (VGGish); visual = rgb (+) flow, both modalities cut to the shorter length
(`shared/reference/dense-avel-spec.md` §2.3). The grid: step i covers frames [8i, 8i + 24) at 25 fps, i.e. 0.96-s
windows every 0.32 s, centred at t = 0.32 i + 0.48 s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

MODALITY_FILES = {"rgb": "_rgb.npy", "flow": "_flow.npy", "audio": "_vggish.npy"}


@dataclass(frozen=True)
class TimeGrid:
    """Windows of `window` frames every `stride` frames at `fps` (UnAV: 24, 8, 25)."""

    fps: float = 25.0
    window: int = 24
    stride: int = 8

    @property
    def step_s(self) -> float:
        return self.stride / self.fps

    def to_grid(self, seconds: float) -> float:
        """Seconds -> grid units (the window whose centre is at `seconds`): g = (fps t - window / 2) / stride."""
        return (self.fps * seconds - self.window / 2) / self.stride

    def to_seconds(self, g: float) -> float:
        return (self.stride * g + self.window / 2) / self.fps

    def steps(self, duration_s: float) -> int:
        """Windows that fit in a video of this length (at least 1)."""
        frames = int(np.floor(duration_s * self.fps + 1e-9))
        return max(1, (frames - self.window) // self.stride + 1)

    def centres(self, n: int) -> np.ndarray:
        return self.to_seconds(np.arange(n, dtype=np.float64))


UNAV_GRID = TimeGrid()


def feature_paths(folder: Path, vid: str) -> dict[str, Path]:
    return {m: Path(folder) / f"{vid}{suffix}" for m, suffix in MODALITY_FILES.items()}


def load_video_features(folder: Path, vid: str) -> tuple[np.ndarray, np.ndarray]:
    """(visual [T, rgb + flow], audio [T, A]) float32, cut to the shorter modality, as the UnAV loader does."""
    paths = feature_paths(folder, vid)
    arrays = {}
    for m, p in paths.items():
        if not p.is_file():
            raise UserError(f"{p}: feature file of video {vid!r} not found (expected {', '.join(MODALITY_FILES.values())} "
                            f"per video in {folder})")
        try:
            x = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"{p}: not a readable .npy file ({str(e).splitlines()[0]})") from None
        if x.ndim != 2 or x.shape[0] < 1:
            raise UserError(f"{p}: features must be [T, D] with T >= 1, got shape {list(x.shape)}")
        arrays[m] = x.astype(np.float32, copy=False)
    t = min(a.shape[0] for a in arrays.values())
    visual = np.concatenate([arrays["rgb"][:t], arrays["flow"][:t]], axis=1)
    return visual, arrays["audio"][:t]


def check_folder(folder: Path, videos: list[str]) -> list[str]:
    """Problems of a feature folder for these videos: missing or unreadable files, widths that differ between
    videos, modalities whose lengths differ by more than one step."""
    problems, widths = [], {}
    if not Path(folder).is_dir():
        return [f"{folder}: feature folder not found"]
    for vid in videos:
        shapes = {}
        for m, p in feature_paths(folder, vid).items():
            if not p.is_file():
                problems.append(f"video {vid!r}: {p.name} missing")
                continue
            try:
                shapes[m] = np.load(p, mmap_mode="r", allow_pickle=False).shape
            except (OSError, ValueError) as e:
                problems.append(f"video {vid!r}: {p.name} unreadable ({str(e).splitlines()[0]})")
                continue
            if len(shapes[m]) != 2:
                problems.append(f"video {vid!r}: {p.name} has shape {list(shapes[m])}, expected [T, D]")
                continue
            widths.setdefault(m, {}).setdefault(shapes[m][1], []).append(vid)
        lengths = {m: s[0] for m, s in shapes.items() if len(s) == 2}
        if lengths and max(lengths.values()) - min(lengths.values()) > 1:
            problems.append(f"video {vid!r}: modalities have {lengths} steps (more than one step apart)")
    for m, by_width in widths.items():
        if len(by_width) > 1:
            problems.append(f"{m} features have different widths: "
                            + ", ".join(f"{w} ({len(v)} videos, e.g. {v[0]!r})" for w, v in sorted(by_width.items())))
    return problems
