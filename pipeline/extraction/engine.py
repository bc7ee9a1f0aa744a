"""The extraction loop: each video decoded once for every modality still to do, encoded one video per forward with
the thread count pinned, and handed to the writers that need it.

    run_videos(videos, grid, encoders, writers, threads=..., workers=..., progress=...)

- `videos`: (video id, path) in the order the outputs want them. A video no writer needs is skipped (resume).
- Decoding runs in `workers` processes of a torch DataLoader (a fork server's, replaced every WORKER_VIDEOS videos,
  so whatever a decoder library keeps per file stays bounded); 0 decodes in this process. Decoding failures come
  back as data: one bad file never stops the run.
- Encoding runs here, one video at a time, under `pinned_threads(threads)`: the CPU's kernels round differently
  for different batch shapes and thread counts, so a video's features would otherwise depend on its neighbours,
  the number of workers or where a run was cut off. With one fixed shape per video (the grid's) and one thread
  count, the bytes of a video's features depend only on the video, the weights, the precision and that count.
- A writer (`Writer`) receives each video's features, the decoder's record and the per-modality errors as soon as
  the video is done, so memory does not grow with the number of videos and a killed run keeps what it wrote.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from pipeline import media
from pipeline.extraction.grids import DecodedVideo, VideoFailed
from pipeline.runtime import pinned_threads, worker_options
from pipeline.store import atomic_path

WORKER_VIDEOS = 500  # decoding workers are replaced after this many videos
ProgressFn = Callable[[int, int, str], None]  # (videos done, videos to do, video id)


class Writer(Protocol):
    """Where one stage's (or one shard's) features go. `modalities`: the encoders' outputs it takes."""

    modalities: tuple[str, ...]

    def needs(self, video_id: str) -> bool: ...

    def write(self, video_id: str, features: dict[str, np.ndarray | None], info: dict,
              errors: dict[str, str | None]) -> None: ...


class FolderWriter:
    """The simplest writer: one `.npy` per video and modality in a folder (`<video id><suffix>`), each video's
    decoder record and errors kept in `items` (a shard's part folder; a predicted video's features)."""

    def __init__(self, folder: Path, videos: list[str], suffixes: dict[str, str]):
        self.folder, self.suffixes = Path(folder), suffixes
        self.modalities = tuple(suffixes)
        self.todo = set(videos)
        self.items: dict[str, dict] = {}

    def needs(self, video_id: str) -> bool:
        return video_id in self.todo and video_id not in self.items

    def write(self, video_id: str, features: dict, info: dict, errors: dict) -> None:
        for m, x in features.items():
            if x is not None and errors.get(m) is None:
                with atomic_path(self.folder / f"{video_id}{self.suffixes[m]}") as tmp, open(tmp, "wb") as f:
                    np.save(f, x)
        self.items[video_id] = {"info": info, "errors": errors}


class _DecodeJobs(torch.utils.data.Dataset):
    """Item i: video i decoded on the grid for the modalities that still need it."""

    def __init__(self, jobs: list[tuple[str, str, tuple[str, ...]]], grid, threads: int):
        self.jobs, self.grid, self.threads = jobs, grid, threads

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> tuple[str, tuple[str, ...], DecodedVideo]:
        vid, path, modalities = self.jobs[i]
        return vid, modalities, self.grid.decode(Path(path), modalities, self.threads)


def _identity(x):
    return x


def _decoded(jobs, grid, workers: int, decode_threads: int, pin_memory: bool):
    """The jobs' decoded videos, in order; fresh worker processes every WORKER_VIDEOS videos."""
    if not workers:
        for vid, path, modalities in jobs:
            yield vid, modalities, grid.decode(Path(path), modalities, decode_threads)
        return
    options = worker_options(workers)  # a fork server's workers, ending when this process ends
    for start in range(0, len(jobs), WORKER_VIDEOS):
        yield from torch.utils.data.DataLoader(
            _DecodeJobs(jobs[start:start + WORKER_VIDEOS], grid, decode_threads), batch_size=None, shuffle=False,
            num_workers=workers, collate_fn=_identity, pin_memory=pin_memory, prefetch_factor=2,
            persistent_workers=False, **options)


def encode_video(grid, extractor, modality: str, decoded: DecodedVideo, threads: int,
                 stats: dict) -> tuple[np.ndarray | None, str | None]:
    """(features, None) of one decoded video in one modality, or (None, why) when it cannot be encoded."""
    raw = decoded.inputs.get(modality)
    error = decoded.errors.get(modality)
    if error is not None or raw is None:
        return None, error or "nothing decoded"
    try:
        with pinned_threads(threads), torch.inference_mode():
            return grid.encode(extractor, modality, raw, stats), None
    except (VideoFailed, media.MediaError) as e:
        return None, str(e)


def run_videos(videos: list[tuple[str, Path]], grid, encoders: dict, writers: list[Writer], *,
               threads: dict[str, int], workers: int = 0, decode_threads: int = 0,
               progress: ProgressFn | None = None) -> dict[str, dict]:
    """Extract every video some writer still needs; returns per-modality timing stats (seconds, units).

    `encoders` and `threads`: {modality: extractor} and {modality: CPU thread count of its forward} (a resumed
    output keeps the count it was started with)."""
    jobs = []
    for vid, path in videos:
        modalities = tuple(m for m in encoders if any(m in w.modalities and w.needs(vid) for w in writers))
        if modalities:
            jobs.append((vid, str(path), modalities))
    stats: dict[str, dict] = {m: {} for m in encoders}
    total = len(jobs)
    if progress:
        progress(0, total, "")
    if not jobs:
        return stats
    devices = {getattr(e, "device", torch.device("cpu")) for e in encoders.values()}
    pin = any(d.type == "cuda" for d in devices)
    wait = decode = decode_cpu = 0.0
    t0 = time.perf_counter()
    for n, (vid, modalities, decoded) in enumerate(_decoded(jobs, grid, min(workers, total), decode_threads, pin),
                                                   1):
        wait += time.perf_counter() - t0
        decode += decoded.decode_s
        decode_cpu += decoded.decode_cpu_s
        t_video = time.perf_counter()
        feats, errors, info = {}, {}, decoded.info
        for m in modalities:
            feats[m], errors[m] = encode_video(grid, encoders[m], m, decoded, threads[m], stats[m])
        info = {**info, "seconds": round(decoded.decode_s + time.perf_counter() - t_video, 3)}
        del decoded
        for w in writers:
            if w.needs(vid) and any(m in modalities for m in w.modalities):
                w.write(vid, {m: feats.get(m) for m in w.modalities}, info, {m: errors.get(m) for m in w.modalities})
        del feats
        release_memory()
        if progress:
            progress(n, total, vid)
        t0 = time.perf_counter()
    for s in stats.values():
        s.update(decode_wait_s=wait, decode_s=decode + s.get("decode_s", 0.0), decode_cpu_s=decode_cpu)
    return stats


_LIBC = None


def release_memory() -> None:
    """Give freed heap pages back to the OS (glibc only; elsewhere a no-op). The per-video tensors vary in size
    and glibc keeps the freed pages: without this the main process grew by ~6 MB per video with decoding workers
    (0.8 -> 1.35 GB over 100 videos, benchmarks/extraction.py); with it, it stays flat."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
