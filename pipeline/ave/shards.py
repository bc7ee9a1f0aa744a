"""Sharded AVE extraction: the stage's videos split into fixed shards, each encoded on its own (a Dask worker, through
`flows.sharded`) into a part file, then merged into the very file and manifest a single-process run writes.

- Shards: the dataset's videos in `video_ids()` order, `shard_videos` at a time; shard i is always the same videos
  for one dataset, so a rerun finds its finished parts. One shard task decodes each video once for every modality
  still to do and writes one part per modality; its encoders are kept in the worker for its next shard.
- A part (`<root>/.shards/<stage>/<key>/part-<i>.h5`): one feature row per video, the decoder's info and any error,
  the stage key, the videos and the CPU thread count, written to a temporary name and renamed: a part either exists
  whole or not at all. A part with the right key and videos is never recomputed.
- Merge (`extract(..., parts=...)`): the stage opens as usual (lock, manifest, partial file) and each video's rows
  are written from its part; then the usual checks, manifest and rename. The parts are deleted once the stage is
  complete.
Decoding in a shard runs in the worker's own process (Dask's worker processes are daemonic and cannot start
decoder processes); no HDF5 handle ever crosses a process boundary (each task opens and closes its own file).
Bytes: a video's features depend on its video, the weights, the precision and the thread count (see
`pipeline.ave.extract`); shards computed with the single-process run's thread count give a byte-equal file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from pipeline import ave
from pipeline.ave.extract import (STAGES, VERSION, ExtractConfig, ProgressFn, _run_sinks, _weights_info, encode_video,
                                  key_config, load_video_dataset, release_memory)
from pipeline.runtime import default_threads, resolve_device
from pipeline.store import stage_key

SHARDS_DIR = ".shards"


def plan_shards(dataset_dir: Path, shard_videos: int) -> list[list[str]]:
    ids = load_video_dataset(dataset_dir).video_ids()
    return [ids[i:i + shard_videos] for i in range(0, len(ids), shard_videos)]


def planned_key(dataset_dir: Path, cfg: ExtractConfig, modality: str, ds=None, weights=None) -> str:
    """The stage key the merge will open (the dataset and weights info may be passed in when already at hand)."""
    ds = ds or load_video_dataset(dataset_dir)
    weights = weights or _weights_info(cfg, modality)
    return stage_key(STAGES[modality], VERSION, key_config(cfg, modality, resolve_device(cfg.device)),
                     {"dataset": ds.digest(), "weights": weights.id})


def parts_dir(root: Path, modality: str, key: str) -> Path:
    return Path(root) / SHARDS_DIR / STAGES[modality] / key


def part_path(root: Path, modality: str, key: str, index: int) -> Path:
    return parts_dir(root, modality, key) / f"part-{index:05d}.h5"


def valid_part(path: Path, key: str, videos: list[str]) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return f.attrs["stage_key"] == key and json.loads(f.attrs["videos"]) == list(videos)
    except (OSError, KeyError, ValueError):
        return False


class _PartSink:
    """What `_run_sinks` feeds: the shard's videos, encoded and kept in memory until the part is written."""

    def __init__(self, extractor, videos: list[str], threads: int):
        self.extractor, self.threads = extractor, threads
        self.todo = set(videos)
        self.results: dict[str, tuple[np.ndarray | None, dict, str | None]] = {}
        self.stats: dict = {}

    def needs(self, video_id: str) -> bool:
        return video_id in self.todo and video_id not in self.results

    def add(self, video_id: str, raw, info: dict, error: str | None) -> None:
        feats, error = encode_video(self.extractor, video_id, raw, error, self.threads, self.stats)
        self.results[video_id] = (feats, info, error)
        release_memory()


def extract_shard(dataset_dir: Path, cfg: ExtractConfig, modalities: list[str], index: int, videos: list[str],
                  root: Path, progress: ProgressFn | None = None) -> dict[str, dict]:
    """Encode one shard's videos into its part file per modality (or find it done), decoding each video once for
    all of them. Returns {modality: {"path", "reused", "videos", "failed", "threads"}}."""
    from extractors import kept_extractor

    ds = load_video_dataset(dataset_dir)
    device = resolve_device(cfg.device)
    threads = cfg.threads or default_threads()
    out, sinks, paths = {}, {}, {}
    for modality in modalities:
        weights = _weights_info(cfg, modality)  # the weight file is hashed once per worker (extractors.weights)
        key = planned_key(dataset_dir, cfg, modality, ds, weights)
        path = part_path(root, modality, key, index)
        if valid_part(path, key, videos):
            out[modality] = {"path": str(path), "reused": True, "videos": len(videos), "failed": None}
            continue
        config = key_config(cfg, modality, device)
        # kept between the shards this worker runs (building the encoders cost more than a shard's videos)
        extractor = kept_extractor(
            cfg.encoder(modality), weights.id, weights=weights.path, random_init=weights.random_init, seed=cfg.seed,
            device=device, precision=config["precision"], frames_per_segment=cfg.frames_per_segment,
            **({"crop_size": cfg.crop_size} if modality == "visual" and cfg.crop_size else {}))
        sinks[modality] = _PartSink(extractor, videos, threads)
        paths[modality] = (key, path)
    if sinks:
        _run_sinks(ds, cfg.model_copy(update={"workers": 0}), device, sinks, progress)
    for modality, sink in sinks.items():
        key, path = paths[modality]
        errors = _write_part(path, key, modality, videos, sink)
        out[modality] = {"path": str(path), "reused": False, "videos": len(videos),
                         "failed": sum(e is not None for e in errors), "threads": threads}
    return out


def _write_part(path: Path, key: str, modality: str, videos: list[str], sink: _PartSink) -> list[str | None]:
    shape = (len(videos), ave.SEGMENTS, *sink.extractor.segment_shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with h5py.File(tmp, "w") as f:
        d = f.create_dataset("features", shape=shape, dtype=np.float32)
        infos, errors = [], []
        for i, vid in enumerate(videos):
            feats, info, error = sink.results.get(vid, (None, {}, "not decoded by the shard"))
            if feats is not None:
                d[i] = feats
            infos.append(info)
            errors.append(error)
        f.attrs.update({"stage_key": key, "modality": modality, "videos": json.dumps(list(videos)),
                        "infos": json.dumps(infos, default=str), "errors": json.dumps(errors),
                        "torch_threads": sink.threads, "segments": ave.SEGMENTS})
    os.replace(tmp, path)
    return errors


def part_threads(parts: list[Path]) -> set[int]:
    out = set()
    for p in parts:
        with h5py.File(p, "r") as f:
            out.add(int(f.attrs["torch_threads"]))
    return out


def fill_from_parts(sinks: dict, parts: dict[str, list[Path]], progress: ProgressFn | None = None) -> None:
    """Write every video's rows from its part (the merge); videos already done in a resumed partial are skipped."""
    todo = [(m, p) for m in sinks for p in parts[m]]
    total = sum(len(s.rows_of) for s in sinks.values())  # every video is in exactly one part per modality
    done = 0
    for m, p in todo:
        sink = sinks[m]
        with h5py.File(p, "r") as f:
            videos, infos = json.loads(f.attrs["videos"]), json.loads(f.attrs["infos"])
            errors = json.loads(f.attrs["errors"])
            for i, vid in enumerate(videos):
                if sink.needs(vid):
                    feats = f["features"][i] if errors[i] is None else None
                    sink.write(vid, None if feats is None else feats.astype(sink.dtype, copy=False), infos[i],
                               errors[i])
                done += 1
                if progress:
                    progress(done, total, vid)


def remove_parts(root: Path, modality: str, key: str) -> None:
    shutil.rmtree(parts_dir(root, modality, key), ignore_errors=True)
