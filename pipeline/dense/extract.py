"""Dense feature extraction (the `dense_extract` stage): untrimmed videos of any length -> one feature file per video
and modality on a time grid, with the project's encoders.

Per window of the grid (UnAV's by default: 0.96 s every 0.32 s; `grid: 1s` for 1-s windows every second):
- visual: `frames_per_window` frames evenly inside the window through ResNet-50 (the extractor of the AVE stage),
  layer4 averaged over the frames and over space -> 2048;
- audio: the window's 32-kHz samples through Cnn14 -> its 2048-d embedding.
Files: `<vid>_resnet50.npy` [T, 2048] and `<vid>_cnn14.npy` [T, 2048] in `features/`, with `features.json` saying
which files form which modality (the dense loader reads it; UnAV's released I3D+VGGish folders need none).

Streaming: frames are decoded `chunk_windows` windows at a time, so memory does not grow with a video's length or
the number of videos (the audio track, ~4 MB per minute at 32 kHz, is read whole). Resumable: each video's files are
written atomically and recorded in the manifest, a rerun skips them. A video that cannot be read is recorded as
failed and the run goes on; the stage fails past `max_failure_share`.

Sharded (`cluster`, `pipeline.dense.shards` + `flows.sharded`): shards of videos are extracted on Dask workers into
part folders, and `dense_extract(..., parts=...)` moves their files in: the same folder and manifest as here.
Bytes: a video's features depend on the video, the weights, the precision and the CPU thread count (`threads`,
pinned per video and recorded): the same thread count gives the same bytes, sharded or not.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import Field

from pipeline import media
from pipeline.config import StrictModel, dump_config
from pipeline.dense.annotations import load_annotations
from pipeline.dense.features import LAYOUT_FILE, TimeGrid
from pipeline.dense.synthetic import ANNOTATIONS
from pipeline.errors import UserError
from pipeline.runtime import default_threads, pinned_threads, resolve_device, resolve_precision
from pipeline.store import ArtifactStore, stage_key, write_json_atomic

STAGE, VERSION = "dense_extract", "1"
GRIDS = {"unav": TimeGrid(window_s=0.96, stride_s=0.32), "1s": TimeGrid(window_s=1.0, stride_s=1.0)}
SUFFIXES = {"visual": "_resnet50.npy", "audio": "_cnn14.npy"}
RANDOM_WARNING = ("RANDOM WEIGHTS: the {modality} encoder is randomly initialised; these features are for testing "
                  "the pipeline only")


class DenseExtractConfig(StrictModel):
    grid: Literal["unav", "1s"] = "unav"
    frames_per_window: int = Field(4, ge=1, le=24)
    crop_size: int | None = Field(None, ge=32, description="None: the weights' 224 px")
    chunk_windows: int = Field(64, ge=1, description="windows decoded and encoded at a time")
    random_init: bool = False
    resnet_weights: Path | None = None
    cnn14_weights: Path | None = None
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    max_failure_share: float = Field(0.0, ge=0, le=1)
    threads: int = Field(0, ge=0, description="CPU threads of the encoders (0: torch's default); recorded")
    # Sharded on a Dask cluster (flows.sharded): "local:N" or "tcp://HOST:8786"; None: this process. Like the
    # thread count and the device, neither enters the stage key: a sharded run writes the same artifact.
    cluster: str | None = None
    shard_videos: int = Field(8, ge=1, description="videos per shard (one Prefect task and part folder each)")

    def key_fields(self) -> dict:
        fields = {k: v for k, v in dump_config(self).items()
                  if k not in ("device", "chunk_windows", "resnet_weights", "cnn14_weights", "max_failure_share",
                               "threads", "cluster", "shard_videos")}
        return {**fields, "precision": resolve_precision(self.precision, resolve_device(self.device))}


@dataclass
class DenseExtractResult:
    dir: Path
    features: Path
    reused: bool
    videos: int
    failed: dict[str, str]


def window_frame_times(grid: TimeGrid, start: int, stop: int, per_window: int) -> np.ndarray:
    """[n * per_window] frame times: `per_window` evenly spaced inside each window start..stop-1 (centred)."""
    t0 = np.arange(start, stop, dtype=np.float64)[:, None] * grid.stride_s
    k = (np.arange(per_window, dtype=np.float64)[None, :] + 0.5) / per_window
    return (t0 + k * grid.window_s).reshape(-1)


def window_audio(samples: np.ndarray, grid: TimeGrid, start: int, stop: int, rate: int) -> np.ndarray:
    """[n, window samples] float32, zero-padded past the end of the track."""
    width = int(round(grid.window_s * rate))
    out = np.zeros((stop - start, width), np.float32)
    for j, i in enumerate(range(start, stop)):
        lo = int(round(i * grid.stride_s * rate))
        part = samples[lo:lo + width]
        out[j, :part.size] = part
    return out


def _dataset_identity(annotations: Path, videos: list[Path]) -> str:
    h = hashlib.sha256(annotations.read_bytes())
    for v in videos:
        st = v.stat() if v.is_file() else None
        h.update(f"{v.name}:{st.st_size if st else -1}".encode())
    return h.hexdigest()


def _save_npy(path: Path, x: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, x)
    os.replace(tmp, path)


@dataclass
class DensePlan:
    """What the stage will read: the annotations, each video's path, the located weights, and the stage inputs
    (the digests that, with the config, make the stage key)."""
    annotations: Path
    paths: dict[str, Path]
    weights: dict
    inputs: dict[str, str]

    def key(self, cfg: DenseExtractConfig) -> str:
        return stage_key(STAGE, VERSION, cfg.key_fields(), self.inputs)


def plan_extract(dataset_dir: Path, cfg: DenseExtractConfig) -> DensePlan:
    """Check the dataset and weights (clear errors before any work) and name what the stage reads."""
    from extractors.weights import locate_weights

    dataset_dir = Path(dataset_dir)
    ds = load_annotations(dataset_dir / ANNOTATIONS if dataset_dir.is_dir() else dataset_dir)
    video_dir = ds.path.parent / "videos"
    paths = {vid: video_dir / f"{vid}.mp4" for vid in ds.videos}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if len(missing) == len(paths):
        raise UserError(f"{video_dir}: none of the {len(paths)} videos of {ds.path.name} is there (expected "
                        f"videos/<video id>.mp4 beside the annotations)")
    weights = {"visual": locate_weights("resnet50", cfg.resnet_weights, random_init=cfg.random_init, seed=cfg.seed),
               "audio": locate_weights("cnn14", cfg.cnn14_weights, random_init=cfg.random_init, seed=cfg.seed)}
    inputs = {"dataset": _dataset_identity(ds.path, list(paths.values())),
              **{f"{m}_weights": w.id for m, w in weights.items()}}
    return DensePlan(ds.path, paths, weights, inputs)


def make_encoders(cfg: DenseExtractConfig, weights: dict | None = None, keep: bool = False):
    """(ResNet-50, Cnn14) extractors as the config says; `weights` from `locate_weights` (located here if None).
    `keep`: kept for the process's next call (a Dask worker's next shard, `extractors.kept_extractor`)."""
    from extractors import create_extractor, kept_extractor
    from extractors.weights import locate_weights

    if weights is None:
        weights = {"visual": locate_weights("resnet50", cfg.resnet_weights, random_init=cfg.random_init,
                                            seed=cfg.seed),
                   "audio": locate_weights("cnn14", cfg.cnn14_weights, random_init=cfg.random_init, seed=cfg.seed)}
    device = resolve_device(cfg.device)

    def build(name: str, modality: str, **kwargs):
        kwargs.update(weights=weights[modality].path, random_init=cfg.random_init, seed=cfg.seed, device=device,
                      precision=cfg.precision)
        return kept_extractor(name, weights[modality].id, **kwargs) if keep else create_extractor(name, **kwargs)

    visual = build("resnet50", "visual", frames_per_segment=cfg.frames_per_window,
                   **({"crop_size": cfg.crop_size} if cfg.crop_size else {}))
    return visual, build("cnn14", "audio")


def dense_extract(dataset_dir: Path, cfg: DenseExtractConfig, root: Path, *, force: bool = False,
                  progress: Callable[[int, int, str], None] | None = None,
                  parts: list[Path] | None = None) -> DenseExtractResult:
    """The stage. `parts`: part folders of a sharded run (`pipeline.dense.shards`) whose files are moved in instead
    of extracting here."""
    plan = plan_extract(dataset_dir, cfg)
    paths = plan.paths
    store = ArtifactStore(root)
    run = store.open(STAGE, VERSION, cfg.key_fields(), plan.inputs)
    features = run.dir / "features"
    if run.is_complete and not force:
        return DenseExtractResult(run.dir, features, True, len(paths), run.manifest.metrics.get("failed", {}))
    if force:
        run.restart()
        run.manifest.items = {}
    grid = GRIDS[cfg.grid]
    if parts is None:
        visual, audio = make_encoders(cfg, plan.weights)
        threads = cfg.threads or default_threads()
        encoders = {"visual": visual.describe(), "audio": audio.describe()}
        shapes = {"visual": ["T", visual.segment_shape[-1]], "audio": ["T", audio.segment_shape[-1]]}

        def one_video(vid: str) -> dict:
            return extract_item(paths[vid], features, vid, grid, cfg, visual, audio, threads)
    else:
        from pipeline.dense.shards import PartSource

        source = PartSource(parts, run.manifest.key)
        threads, encoders, shapes = source.threads, source.encoders, source.shapes

        def one_video(vid: str) -> dict:
            return source.take(vid, features)
    features.mkdir(parents=True, exist_ok=True)
    # the extraction config travels with the features (and into a detector's checkpoint), so `avel dense predict`
    # can compute the same features for a new video
    layout = {"visual": [SUFFIXES["visual"]], "audio": [SUFFIXES["audio"]], "grid": {
        "window_s": grid.window_s, "stride_s": grid.stride_s}, "encoders": encoders,
        "extract_config": {k: v for k, v in dump_config(cfg).items() if k not in ("cluster", "shard_videos")}}
    write_json_atomic(features / LAYOUT_FILE, layout)
    run.manifest.warnings = [RANDOM_WARNING.format(modality=m) for m in ("visual", "audio") if cfg.random_init]
    run.save()
    t_start = time.perf_counter()
    try:
        todo = [vid for vid in paths if run.manifest.items.get(vid, {}).get("status") != "done"]
        done_before = len(paths) - len(todo)
        for n, vid in enumerate(todo, 1):
            run.manifest.items[vid] = one_video(vid)
            run.save()  # resumable per video
            if progress:
                progress(done_before + n, len(paths), vid)
    except BaseException as e:
        run.fail(f"interrupted: {type(e).__name__}: {e}")
        raise
    failed = {v: it["error"] for v, it in run.manifest.items.items() if it.get("status") == "failed"}
    run.manifest.metrics = {"videos": len(paths), "failed": failed, "grid": layout["grid"],
                            "steps": int(sum(it.get("steps", 0) for it in run.manifest.items.values())),
                            "files": {m: f"<video id>{s}" for m, s in SUFFIXES.items()}, "shapes": shapes,
                            "torch_threads": threads, "sharded": parts is not None}
    run.manifest.timings["total_s"] = round(time.perf_counter() - t_start, 3)
    if len(failed) > cfg.max_failure_share * len(paths):
        run.fail(f"{len(failed)} of {len(paths)} videos failed, more than max_failure_share {cfg.max_failure_share}: "
                 f"{json.dumps(failed)[:500]}")
        raise UserError(f"{len(failed)} of {len(paths)} videos could not be read ({', '.join(list(failed)[:5])}); the "
                        f"reasons are in {run.dir / 'manifest.json'}; fix or remove them, or raise max_failure_share")
    run.add_output("layout", f"features/{LAYOUT_FILE}")
    run.complete()
    return DenseExtractResult(run.dir, features, False, len(paths), failed)


def extract_item(path: Path, out: Path, vid: str, grid: TimeGrid, cfg: DenseExtractConfig, visual, audio,
                 threads: int) -> dict:
    """One video's files in `out` and its manifest record (done with its steps, or failed with the reason)."""
    t0 = time.perf_counter()
    try:
        with pinned_threads(threads):
            steps = extract_video(path, out, vid, grid, cfg, visual, audio)
    except media.MediaError as e:
        return {"status": "failed", "error": str(e)}
    return {"status": "done", "steps": steps, "seconds": round(time.perf_counter() - t0, 3)}


@torch.inference_mode()
def extract_video(path: Path, out: Path, vid: str, grid: TimeGrid, cfg: DenseExtractConfig, visual, audio) -> int:
    info = media.probe(path)
    if not info.duration_s:
        raise media.MediaError("no duration: not a readable video")
    steps = grid.steps(info.duration_s)
    track = media.decode(path, video=False, audio=True, start=0, segments=max(1, int(np.ceil(info.duration_s))))
    samples = track.audio if track.audio is not None else np.zeros(0, np.float32)
    v_parts, a_parts = [], []
    for start in range(0, steps, cfg.chunk_windows):
        stop = min(steps, start + cfg.chunk_windows)
        frames, _ = media.frames_at(path, window_frame_times(grid, start, stop, cfg.frames_per_window))
        maps = visual.encode(visual.prepare(frames))  # [n, h, w, 2048], mean over the window's frames
        v_parts.append(maps.flatten(1, -2).mean(1).numpy())
        a_parts.append(audio.encode(torch.from_numpy(window_audio(samples, grid, start, stop, media.SAMPLE_RATE)))
                       .numpy())
    _save_npy(out / f"{vid}{SUFFIXES['audio']}", np.concatenate(a_parts).astype(np.float32))
    _save_npy(out / f"{vid}{SUFFIXES['visual']}", np.concatenate(v_parts).astype(np.float32))
    return steps
