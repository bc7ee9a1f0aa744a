"""Sharded extraction, for both tasks: a stage's videos in fixed shards, each extracted on its own (a Dask worker,
through `flows.sharded`) into a part folder, then merged through the stage into the very files and manifest a
single-process run writes.

- Shards: the stage's videos in output order, `shard_videos` at a time; shard i is always the same videos for one
  dataset, so a rerun finds its finished parts.
- A part (`<root>/.shards/<stage>/<key>/part-<i>/`): one `.npy` per video and modality (named by the task's
  suffixes) and `part.json` (the stage key, the videos, each video's decoder record and errors, the encoders'
  descriptions and the CPU thread count). It is built under a temporary name and renamed whole: a part exists
  complete or not at all, and a part with the right key and videos is never recomputed.
- Merge: the stage opens as usual (lock, manifest, resume) and `PartSource.feed` hands each video's part files to
  the stage's writer, which moves or copies them into its own layout; the parts are removed once the stage is
  complete. This module knows no stage: the task passes its key, its suffixes and its writer in.
Bytes: a video's features depend on the video, the weights, the precision and the thread count (see
`pipeline.extraction.engine`); shards computed with the single-process run's thread count give byte-equal outputs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.extraction.engine import FolderWriter, ProgressFn
from pipeline.store import write_json_atomic

SHARDS_DIR = ".shards"
PART_FILE = "part.json"


def split(videos: list[str], per_shard: int) -> list[list[str]]:
    return [videos[i:i + per_shard] for i in range(0, len(videos), per_shard)]


def parts_dir(root: Path, stage: str, key: str) -> Path:
    return Path(root) / SHARDS_DIR / stage / key


def part_dir(root: Path, stage: str, key: str, index: int) -> Path:
    return parts_dir(root, stage, key) / f"part-{index:05d}"


def remove_parts(root: Path, stage: str, key: str) -> None:
    shutil.rmtree(parts_dir(root, stage, key), ignore_errors=True)


def read_part(path: Path) -> dict | None:
    try:
        return json.loads((Path(path) / PART_FILE).read_text())
    except (OSError, ValueError):
        return None


def valid_part(path: Path, key: str, videos: list[str]) -> bool:
    meta = read_part(path)
    return meta is not None and meta.get("stage_key") == key and meta.get("videos") == list(videos)


class Part:
    """One shard's part of one stage: written into a temporary folder by its `FolderWriter`, then `publish`ed
    whole."""

    def __init__(self, root: Path, stage: str, key: str, index: int, videos: list[str], suffixes: dict[str, str]):
        self.key, self.videos, self.suffixes = key, list(videos), dict(suffixes)
        self.path = part_dir(root, stage, key, index)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")

    @property
    def done(self) -> bool:
        return valid_part(self.path, self.key, self.videos)

    def writer(self) -> FolderWriter:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return FolderWriter(self.tmp, self.videos, self.suffixes)

    def publish(self, writer: FolderWriter, threads: int, encoders: dict[str, dict]) -> dict:
        """part.json written, the folder renamed into place; returns the summary a shard task reports."""
        items = {vid: writer.items.get(vid, {"info": {}, "errors": {m: "not decoded by the shard"
                                                                     for m in self.suffixes}})
                 for vid in self.videos}
        write_json_atomic(self.tmp / PART_FILE, {
            "stage_key": self.key, "videos": self.videos, "items": items, "threads": threads,
            "files": self.suffixes, "encoders": encoders})
        if self.path.exists():  # an invalid part (another key's leftovers cannot be here: the key is in the path)
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        failed = sum(any(e is not None for e in it["errors"].values()) for it in items.values())
        return {"path": str(self.path), "reused": False, "videos": len(self.videos), "failed": failed,
                "threads": threads}

    def reused(self) -> dict:
        return {"path": str(self.path), "reused": True, "videos": len(self.videos), "failed": None,
                "threads": read_part(self.path)["threads"]}


class PartSource:
    """The merge's view of a stage's parts: which part holds each video, and its files handed to the stage's writer
    (`write_part(video_id, files, info, errors)` where the writer can take files as they are, else `write` with the
    arrays loaded)."""

    def __init__(self, parts: list[Path], key: str):
        self.where: dict[str, tuple[Path, dict, dict]] = {}
        metas = []
        for p in map(Path, parts):
            meta = read_part(p)
            if meta is None or meta.get("stage_key") != key:
                raise UserError(f"{p}: not a finished part of this extraction (stage key {key}); delete "
                                f"{p.parent} and run again")
            metas.append(meta)
            for vid in meta["videos"]:
                self.where[vid] = (p, meta["items"][vid], meta["files"])
        if not metas:
            raise UserError("a sharded merge got no parts")
        threads = {m["threads"] for m in metas}
        # parts of one run share their encoders; their thread counts differ only when workers were told different
        # counts, and then the bytes may differ in the last bits (the manifest says which)
        self.threads = threads.pop() if len(threads) == 1 else sorted(threads)
        self.encoders: dict[str, dict] = metas[0]["encoders"]

    def feed(self, videos: list[str], writer, progress: ProgressFn | None = None) -> None:
        """Every video of `videos` the writer still needs, in that order, from its part."""
        for n, vid in enumerate(videos, 1):
            if vid not in self.where:
                raise UserError(f"no part holds video {vid}: the shards do not cover the dataset; delete the parts "
                                f"and run again")
            if writer.needs(vid):
                part, item, suffixes = self.where[vid]
                files = {m: part / f"{vid}{suffixes[m]}" for m in writer.modalities}
                errors = {m: item["errors"].get(m) for m in writer.modalities}
                if hasattr(writer, "write_part"):
                    writer.write_part(vid, files, item["info"], errors)
                else:
                    feats = {m: np.load(f) if errors[m] is None else None for m, f in files.items()}
                    writer.write(vid, feats, item["info"], errors)
            if progress:
                progress(n, len(videos), vid)
