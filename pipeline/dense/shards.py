"""Sharded dense extraction: the stage's videos split into fixed shards, each extracted on its own (a Dask worker,
through `flows.sharded`) into a part folder, then moved into the very folder and manifest a single-process run
writes. The same design as `pipeline.ave.shards`, with folders of per-video .npy files instead of one HDF5 file.

- Shards: the annotation file's videos in its order, `shard_videos` at a time; shard i is always the same videos
  for one dataset, so a rerun finds its finished parts.
- A part (`<root>/.shards/dense_extract/<key>/part-<i>/`): each video's `<vid>_resnet50.npy` / `<vid>_cnn14.npy`
  and `part.json` (the stage key, the videos, each video's manifest record, the encoders, the thread count). It is
  built under a temporary name and renamed whole: a part folder exists complete or not at all, and a part with the
  right key and videos is never recomputed.
- Merge (`dense_extract(..., parts=...)`): the stage opens as usual (lock, manifest, resume) and each video's
  files are moved (same file system: a rename) from its part into `features/`; the parts are deleted once the stage
  is complete. A merge cut off between a move and the manifest save finds the file already in place on resume.
Extraction in a shard runs in the worker's process (decord and PyAV decode in-process).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pipeline.dense.extract import (GRIDS, STAGE, SUFFIXES, DenseExtractConfig, extract_item, make_encoders,
                                    plan_extract)
from pipeline.errors import UserError
from pipeline.runtime import default_threads
from pipeline.store import write_json_atomic

SHARDS_DIR = ".shards"
PART_FILE = "part.json"


def plan_shards(dataset_dir: Path, cfg: DenseExtractConfig) -> tuple[str, list[list[str]]]:
    """(the stage key the merge will open, the shards' video lists)."""
    plan = plan_extract(dataset_dir, cfg)
    ids = list(plan.paths)
    k = cfg.shard_videos
    return plan.key(cfg), [ids[i:i + k] for i in range(0, len(ids), k)]


def parts_dir(root: Path, key: str) -> Path:
    return Path(root) / SHARDS_DIR / STAGE / key


def part_dir(root: Path, key: str, index: int) -> Path:
    return parts_dir(root, key) / f"part-{index:05d}"


def read_part(path: Path) -> dict | None:
    try:
        return json.loads((Path(path) / PART_FILE).read_text())
    except (OSError, ValueError):
        return None


def valid_part(path: Path, key: str, videos: list[str]) -> bool:
    meta = read_part(path)
    return meta is not None and meta.get("stage_key") == key and meta.get("videos") == list(videos)


def extract_shard(dataset_dir: Path, cfg: DenseExtractConfig, index: int, videos: list[str], root: Path) -> dict:
    """Extract one shard's videos into its part folder (or find it done). Returns {"path", "reused", "videos",
    "failed", "threads"}."""
    plan = plan_extract(dataset_dir, cfg)
    key = plan.key(cfg)
    path = part_dir(root, key, index)
    if valid_part(path, key, videos):
        return {"path": str(path), "reused": True, "videos": len(videos), "failed": None,
                "threads": read_part(path)["threads"]}
    unknown = [v for v in videos if v not in plan.paths]
    if unknown:
        raise UserError(f"shard {index}: videos {unknown[:5]} are not in {plan.annotations}; the dataset changed "
                        f"since the shards were planned")
    visual, audio = make_encoders(cfg, plan.weights, keep=True)  # kept for the next shard
    threads = cfg.threads or default_threads()
    grid = GRIDS[cfg.grid]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    items = {vid: extract_item(plan.paths[vid], tmp, vid, grid, cfg, visual, audio, threads) for vid in videos}
    write_json_atomic(tmp / PART_FILE, {
        "stage_key": key, "videos": list(videos), "items": items, "threads": threads,
        "encoders": {"visual": visual.describe(), "audio": audio.describe()},
        "shapes": {"visual": ["T", visual.segment_shape[-1]], "audio": ["T", audio.segment_shape[-1]]}})
    if path.exists():  # an invalid part (another key's leftovers cannot be here: the key is in the path)
        shutil.rmtree(path)
    os.replace(tmp, path)
    return {"path": str(path), "reused": False, "videos": len(videos),
            "failed": sum(it["status"] == "failed" for it in items.values()), "threads": threads}


class PartSource:
    """The merge's view of the parts: which part holds each video, and the move of its files into `features/`."""

    def __init__(self, parts: list[Path], key: str):
        self.where: dict[str, tuple[Path, dict]] = {}
        metas = []
        for p in map(Path, parts):
            meta = read_part(p)
            if meta is None or meta.get("stage_key") != key:
                raise UserError(f"{p}: not a finished part of this extraction (stage key {key}); delete "
                                f"{p.parent} and run again")
            metas.append(meta)
            for vid in meta["videos"]:
                self.where[vid] = (p, meta["items"][vid])
        if not metas:
            raise UserError("a sharded merge got no parts")
        threads = {m["threads"] for m in metas}
        # parts of one run share their encoders; their thread counts differ only when workers were told different
        # counts, and then the bytes may differ in the last bits (the manifest says which)
        self.threads = threads.pop() if len(threads) == 1 else sorted(threads)
        self.encoders, self.shapes = metas[0]["encoders"], metas[0]["shapes"]

    def take(self, vid: str, features: Path) -> dict:
        if vid not in self.where:
            raise UserError(f"no part holds video {vid}: the shards do not cover the dataset; delete the parts and "
                            f"run again")
        part, item = self.where[vid]
        if item["status"] == "done":
            for suffix in SUFFIXES.values():
                src, dst = part / f"{vid}{suffix}", features / f"{vid}{suffix}"
                if src.is_file():
                    os.replace(src, dst)
                elif not dst.is_file():  # neither moved before a cut-off merge nor in the part
                    raise UserError(f"{src}: missing from its part; delete {part} and run again")
        return item


def remove_parts(root: Path, key: str) -> None:
    shutil.rmtree(parts_dir(root, key), ignore_errors=True)
