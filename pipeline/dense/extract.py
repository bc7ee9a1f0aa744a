"""Dense feature extraction (the `dense_extract` stage): untrimmed videos of any length -> one feature file per video
and modality on a time grid, with the project's encoders.

What is the dense task's own lives here: its grid choice (UnAV's 0.96-s windows every 0.32 s by default, `grid: 1s`
for 1-s windows every second; `pipeline.extraction.grids.WindowGrid`), its writer (`NpyWriter`: `<vid>_resnet50.npy`
[T, 2048] and `<vid>_cnn14.npy` [T, 2048] in `features/`, with `features.json` saying which files form which
modality; the dense loader reads it, UnAV's released I3D+VGGish folders need none) and its stage key. The loop
(decoding, one video at a time with pinned threads, failures, progress) is the shared engine's, and so is sharding.

Per window: visual = `frames_per_window` frames evenly inside the window through ResNet-50, layer4 averaged over the
frames and over space -> 2048; audio = the window's 32-kHz samples through Cnn14 -> its 2048-d embedding. Frames are
decoded `chunk_windows` windows at a time, so memory does not grow with a video's length.
Resumable: each video's files are written atomically and recorded in the manifest, a rerun skips them. A video that
cannot be read is recorded as failed and the run goes on; the stage fails past `max_failure_share`.
Sharded (`cluster`, `flows.sharded`): `extract_shard` extracts a shard's videos on a Dask worker into a part folder,
and `dense_extract(..., parts=...)` moves their files in: the same folder and manifest as here.
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
from typing import Literal

import numpy as np
from pydantic import Field

from pipeline.config import dump_config
from pipeline.dense.annotations import load_annotations
from pipeline.dense.features import LAYOUT_FILE
from pipeline.dense.synthetic import ANNOTATIONS
from pipeline.errors import UserError
from pipeline.extraction import encoders, recipes, shards
from pipeline.extraction.engine import ProgressFn, run_videos
from pipeline.extraction.feature_sets import FeatureSet, feature_set
from pipeline.extraction.grids import TIME_GRIDS, UNAV_GRID, RecipeGrid, TimeGrid, WindowGrid
from pipeline.extraction.settings import ExtractSettings
from pipeline.runtime import default_threads, resolve_device
from pipeline.store import ArtifactStore, atomic_path, stage_key, write_json_atomic

STAGE, VERSION = "dense_extract", "1"
SUFFIXES = {"visual": "_resnet50.npy", "audio": "_cnn14.npy"}
ENCODERS = {"visual": "resnet50", "audio": "cnn14"}
RANDOM_WARNING = ("RANDOM WEIGHTS: the {modality} encoder is randomly initialised; these features are for testing "
                  "the pipeline only")
# The settings recorded in features.json (and read back by `avel dense predict` to compute the same features for a
# new video), in the order they have always been written: the dense detector's stage key digests that file.
LAYOUT_FIELDS = ("grid", "frames_per_window", "crop_size", "chunk_windows", "random_init", "resnet_weights",
                 "cnn14_weights", "seed", "device", "precision", "max_failure_share", "threads")


class DenseExtractConfig(ExtractSettings):
    grid: Literal["unav", "1s"] = "unav"
    frames_per_window: int = Field(4, ge=1, le=24)
    chunk_windows: int = Field(64, ge=1, description="windows decoded and encoded at a time")

    def key_fields(self) -> dict:
        """What changes the features: the grid, the sampling, the crop, the weights' seed and the precision that
        runs (the weight files enter as the stage's inputs). The `cace` set's keys are those of before feature sets
        existed; a released set adds its name and decoding mode."""
        keep = ("grid", "frames_per_window", "crop_size", "random_init", "seed")
        if self.released():
            keep = ("random_init", "seed", "feature_set", "decode_mode")
        fields = {k: v for k, v in dump_config(self).items() if k in keep}
        return {**fields, "precision": self.resolved_precision()}

    def layout_config(self) -> dict:
        dumped = dump_config(self)
        extra = ("feature_set", "decode_mode", "i3d_rgb_weights", "i3d_flow_weights", "raft_weights",
                 "vggish_weights") if self.released() else ()
        return {k: dumped[k] for k in (*LAYOUT_FIELDS, *extra)}

    def released(self) -> FeatureSet | None:
        """The released feature set named by `feature_set` (None for this project's `cace`)."""
        return None if self.feature_set == "cace" else feature_set(self.feature_set, "dense")

    def streams(self) -> dict[str, str]:
        """{stream: file suffix} of the feature files each video gets."""
        if self.released():
            return {s.name: s.suffix for s in self.released().streams}
        return dict(SUFFIXES)

    def encoder_spec(self, stream: str) -> encoders.EncoderSpec:
        if self.released():
            return self.stream_spec(self.released().stream(stream))
        return self.spec(stream, ENCODERS[stream], self.frames_per_window)

    def window_grid(self) -> WindowGrid | RecipeGrid:
        if self.released():
            return RecipeGrid(tuple((s.name, s.recipe) for s in self.released().streams), self.decode_mode)
        return WindowGrid(TIME_GRIDS[self.grid], self.frames_per_window, self.chunk_windows)

    def time_grid(self) -> TimeGrid:
        return UNAV_GRID if self.released() else TIME_GRIDS[self.grid]


@dataclass
class DenseExtractResult:
    dir: Path
    features: Path
    reused: bool
    videos: int
    failed: dict[str, str]


def _dataset_identity(annotations: Path, videos: list[Path]) -> str:
    h = hashlib.sha256(annotations.read_bytes())
    for v in videos:
        st = v.stat() if v.is_file() else None
        h.update(f"{v.name}:{st.st_size if st else -1}".encode())
    return h.hexdigest()


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


def locate_encoders(cfg: DenseExtractConfig) -> dict:
    """{stream: WeightsInfo}: each encoder's weight file found and checked (or random init); I3D flow's RAFT file
    as `raft`."""
    out = {m: encoders.locate(cfg.encoder_spec(m), random_init=cfg.random_init, seed=cfg.seed) for m in cfg.streams()}
    if any("raft_weights" in cfg.encoder_spec(m).options for m in out):  # I3D flow (its module registered RAFT's rules)
        from extractors.weights import locate_weights

        out["raft"] = locate_weights("raft", cfg.raft_weights, random_init=cfg.random_init, seed=cfg.seed)
    return out


def plan_extract(dataset_dir: Path, cfg: DenseExtractConfig) -> DensePlan:
    """Check the dataset and weights (clear errors before any work) and name what the stage reads."""
    dataset_dir = Path(dataset_dir)
    ds = load_annotations(dataset_dir / ANNOTATIONS if dataset_dir.is_dir() else dataset_dir)
    video_dir = ds.path.parent / "videos"
    paths = {vid: video_dir / f"{vid}.mp4" for vid in ds.videos}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if len(missing) == len(paths):
        raise UserError(f"{video_dir}: none of the {len(paths)} videos of {ds.path.name} is there (expected "
                        f"videos/<video id>.mp4 beside the annotations)")
    weights = locate_encoders(cfg)
    inputs = {"dataset": _dataset_identity(ds.path, list(paths.values())),
              **{f"{m}_weights": w.id for m, w in weights.items()}}
    return DensePlan(ds.path, paths, weights, inputs)


def make_encoders(cfg: DenseExtractConfig, weights: dict | None = None, keep: bool = False) -> dict:
    """{stream: extractor} as the config says; `weights` from `locate_encoders` (located here if None). `keep`:
    kept for the process's next call (a Dask worker's next shard)."""
    weights = weights or locate_encoders(cfg)
    device = resolve_device(cfg.device)
    built = {}
    for m in cfg.streams():
        spec = cfg.encoder_spec(m)
        if "raft_weights" in spec.options:  # the located RAFT file (checked, hashed), not the bare path
            spec = encoders.EncoderSpec(spec.name, spec.modality, spec.weights_file,
                                        {**spec.options, "raft_weights": weights["raft"]})
        built[m] = encoders.build(spec, weights[m], seed=cfg.seed, device=device, precision=cfg.resolved_precision(),
                                  keep=keep)
    return built


def _record(info: dict, errors: dict, rows: dict[str, int]) -> dict:
    """A video's manifest record: done with its steps, or failed with the first reason. A released set's streams
    keep their own row counts (`rows`); its steps are the shorter, as the loader cuts them."""
    error = next((e for e in errors.values() if e is not None), None)
    if error is not None:
        return {"status": "failed", "error": error}
    if "steps" in info:  # the cace set on its time grid
        return {"status": "done", "steps": info["steps"], "seconds": info.get("seconds", 0.0)}
    item = {"status": "done", "steps": min(rows.values()), "rows": rows, "seconds": info.get("seconds", 0.0)}
    if info.get("notes"):
        item["notes"] = list(info["notes"])
    return item


class NpyWriter:
    """The engine's writer for the dense stage: one `.npy` per video and stream in `features/`, written atomically,
    and each video's record saved in the manifest at once (a rerun skips recorded videos)."""

    def __init__(self, run, features: Path, progress: ProgressFn | None, total: int, suffixes: dict[str, str]):
        self.run, self.features, self.progress, self.total = run, features, progress, total
        self.suffixes = suffixes
        self.modalities = tuple(suffixes)
        self.done = sum(1 for it in run.manifest.items.values() if it.get("status") == "done")

    def needs(self, video_id: str) -> bool:
        return self.run.manifest.items.get(video_id, {}).get("status") != "done"

    def _record(self, video_id: str, item: dict) -> None:
        self.run.manifest.items[video_id] = item
        self.run.save()  # resumable per video
        self.done += 1
        if self.progress:
            self.progress(self.done, self.total, video_id)

    def write(self, video_id: str, features: dict, info: dict, errors: dict) -> None:
        item = _record(info, errors, {m: len(x) for m, x in features.items() if x is not None})
        if item["status"] == "done":
            for m in sorted(self.modalities):  # audio first, as the files have always been written
                with atomic_path(self.features / f"{video_id}{self.suffixes[m]}") as tmp, open(tmp, "wb") as f:
                    np.save(f, features[m])
        self._record(video_id, item)

    def write_part(self, video_id: str, files: dict[str, Path], info: dict, errors: dict) -> None:
        """From a shard's part: the files are moved (same file system: a rename). A merge cut off between a move
        and the manifest save finds the file already in place on resume."""
        rows = {m: int(np.load(f, mmap_mode="r").shape[0]) for m, f in files.items() if f.is_file()}
        item = _record(info, errors, rows)
        if item["status"] == "done":
            for m, src in files.items():
                dst = self.features / f"{video_id}{self.suffixes[m]}"
                if src.is_file():
                    os.replace(src, dst)
                elif not dst.is_file():  # neither moved before a cut-off merge nor in the part
                    raise UserError(f"{src}: missing from its part; delete {src.parent} and run again")
        self._record(video_id, item)


def dense_extract(dataset_dir: Path, cfg: DenseExtractConfig, root: Path, *, force: bool = False,
                  progress: ProgressFn | None = None, parts: list[Path] | None = None) -> DenseExtractResult:
    """The stage. `parts`: part folders of a sharded run (`extract_shard`) whose files are moved in instead of
    extracting here."""
    plan = plan_extract(dataset_dir, cfg)
    paths = plan.paths
    with ArtifactStore(root).stage(STAGE, VERSION, cfg.key_fields(), plan.inputs, force=force) as run:
        features = run.dir / "features"
        if run.reused:
            return DenseExtractResult(run.dir, features, True, len(paths), run.manifest.metrics.get("failed", {}))
        if parts is None:
            built = make_encoders(cfg, plan.weights)
            threads = cfg.threads or default_threads()
            described = {m: e.describe() for m, e in built.items()}
        else:
            source = shards.PartSource(parts, run.manifest.key)
            threads, described = source.threads, source.encoders
        shapes = {m: ["T", d["segment_shape"][-1]] for m, d in described.items()}
        features.mkdir(parents=True, exist_ok=True)
        grid, suffixes = cfg.time_grid(), cfg.streams()
        files = cfg.released().layout() if cfg.released() else {m: [s] for m, s in SUFFIXES.items()}
        layout = {**files, "grid": {"window_s": grid.window_s, "stride_s": grid.stride_s}, "encoders": described,
                  "extract_config": cfg.layout_config()}
        write_json_atomic(features / LAYOUT_FILE, layout)
        run.manifest.warnings = [RANDOM_WARNING.format(modality=m) for m in suffixes if cfg.random_init]
        if cfg.released():
            run.manifest.metrics["recipe"] = recipes.recipe_record(cfg)
        run.save()
        t_start = time.perf_counter()
        writer = NpyWriter(run, features, progress, len(paths), suffixes)
        if parts is None:
            run_videos(list(paths.items()), cfg.window_grid(), built, [writer],
                       threads={m: threads for m in built}, progress=None)
        else:
            source.feed(list(paths), writer)
        failed = {v: it["error"] for v, it in run.manifest.items.items() if it.get("status") == "failed"}
        run.manifest.metrics = {**run.manifest.metrics, "videos": len(paths), "failed": failed, "grid": layout["grid"],
                                "steps": int(sum(it.get("steps", 0) for it in run.manifest.items.values())),
                                "files": {m: f"<video id>{s}" for m, s in suffixes.items()}, "shapes": shapes,
                                "torch_threads": threads, "sharded": parts is not None}
        run.manifest.timings["total_s"] = round(time.perf_counter() - t_start, 3)
        if len(failed) > cfg.max_failure_share * len(paths):
            run.fail(f"{len(failed)} of {len(paths)} videos failed, more than max_failure_share "
                     f"{cfg.max_failure_share}: {json.dumps(failed)[:500]}")
            raise UserError(f"{len(failed)} of {len(paths)} videos could not be read ({', '.join(list(failed)[:5])});"
                            f" the reasons are in {run.dir / 'manifest.json'}; fix or remove them, or raise "
                            f"max_failure_share")
        run.add_output("layout", f"features/{LAYOUT_FILE}")
    return DenseExtractResult(run.dir, features, False, len(paths), failed)


# ---- sharded: one shard's part on a worker ----------------------------------------------------------------------
def plan_shards(dataset_dir: Path, cfg: DenseExtractConfig) -> tuple[str, list[list[str]]]:
    """(the stage key the merge will open, the shards' video lists in annotation order)."""
    plan = plan_extract(dataset_dir, cfg)
    return plan.key(cfg), shards.split(list(plan.paths), cfg.shard_videos)


def extract_shard(dataset_dir: Path, cfg: DenseExtractConfig, index: int, videos: list[str], root: Path) -> dict:
    """Extract one shard's videos into its part folder (or find it done). Returns {"path", "reused", "videos",
    "failed", "threads"}."""
    plan = plan_extract(dataset_dir, cfg)
    part = shards.Part(root, STAGE, plan.key(cfg), index, videos, cfg.streams())
    if part.done:
        return part.reused()
    unknown = [v for v in videos if v not in plan.paths]
    if unknown:
        raise UserError(f"shard {index}: videos {unknown[:5]} are not in {plan.annotations}; the dataset changed "
                        f"since the shards were planned")
    built = make_encoders(cfg, plan.weights, keep=True)  # kept for the next shard
    threads = cfg.threads or default_threads()
    writer = part.writer()
    run_videos([(vid, plan.paths[vid]) for vid in videos], cfg.window_grid(), built, [writer],
               threads={m: threads for m in built})
    return part.publish(writer, threads, {m: e.describe() for m, e in built.items()})
