"""Dense feature files in the layout UnAV-100 releases and its loader reads (the time grid they sit on is
`pipeline.extraction.grids.TimeGrid`).

One folder, three files per video: `<vid>_rgb.npy` [T, 1024], `<vid>_flow.npy` [T, 1024] (I3D) and
`<vid>_vggish.npy` [T, 128] (VGGish); visual = rgb (+) flow, both modalities cut to the shorter length
(`shared/reference/dense-avel-spec.md` §2.3). Folders written by `avel dense extract` hold other files (ResNet-50,
Cnn14) and a `features.json` that names them; the reader follows it. The grid: step i covers frames [8i, 8i + 24)
at 25 fps, i.e. 0.96-s windows every 0.32 s, centred at t = 0.32 i + 0.48 s.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

MODALITY_FILES = {"rgb": "_rgb.npy", "flow": "_flow.npy", "audio": "_vggish.npy"}
LAYOUT_FILE = "features.json"  # in a feature folder made by `avel dense extract`: which files form which modality
UNAV_LAYOUT = {"visual": ["_rgb.npy", "_flow.npy"], "audio": ["_vggish.npy"]}  # the released I3D + VGGish files


def folder_layout(folder: Path) -> dict[str, list[str]]:
    """Which file suffixes make each modality: the folder's features.json, else UnAV-100's released layout."""
    path = Path(folder) / LAYOUT_FILE
    if not path.is_file():
        return UNAV_LAYOUT
    try:
        layout = json.loads(path.read_text(encoding="utf-8"))
        return {"visual": list(layout["visual"]), "audio": list(layout["audio"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a readable feature layout ({e}); it must say {{'visual': [suffixes], "
                        f"'audio': [suffixes]}}") from None


def feature_paths(folder: Path, vid: str) -> dict[str, Path]:
    """Every file of one video, by suffix ("_rgb.npy": path)."""
    layout = folder_layout(folder)
    return {suffix: Path(folder) / f"{vid}{suffix}" for m in ("visual", "audio") for suffix in layout[m]}


def load_video_features(folder: Path, vid: str) -> tuple[np.ndarray, np.ndarray]:
    """(visual [T, Dv], audio [T, Da]) float32, each the concatenation of its files (UnAV: rgb + flow), cut to the
    shorter modality, as the UnAV loader does."""
    layout = folder_layout(folder)
    arrays = {}
    for suffix, p in feature_paths(folder, vid).items():
        if not p.is_file():
            raise UserError(f"{p}: feature file of video {vid!r} not found (expected "
                            f"{', '.join(s for m in layout.values() for s in m)} per video in {folder})")
        try:
            x = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"{p}: not a readable .npy file ({str(e).splitlines()[0]})") from None
        if x.ndim != 2 or x.shape[0] < 1:
            raise UserError(f"{p}: features must be [T, D] with T >= 1, got shape {list(x.shape)}")
        arrays[suffix] = x.astype(np.float32, copy=False)
    t = min(a.shape[0] for a in arrays.values())
    visual = np.concatenate([arrays[s][:t] for s in layout["visual"]], axis=1)
    audio = np.concatenate([arrays[s][:t] for s in layout["audio"]], axis=1)
    return visual, audio


def check_folder(folder: Path, videos: list[str]) -> list[str]:
    """Problems of a feature folder for these videos: missing or unreadable files, widths that differ between
    videos, modalities whose lengths differ by more than one step."""
    problems, widths = [], {}
    if not Path(folder).is_dir():
        return [f"{folder}: feature folder not found"]
    for vid in videos:
        shapes = {}
        for m, p in feature_paths(folder, vid).items():  # m: the file suffix
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
