"""The extraction stages: AVE videos -> `visual.h5` ([N,10,7,7,2048], ResNet-50) and `audio.h5` ([N,10,2048], Cnn14).

Two stages in the store, `extract_visual` and `extract_audio`, so a fine-tuned visual encoder changes only the
visual key (the audio features are reused untouched). A stage's key digests the dataset (`AVEDataset.digest()`),
the weights (the file's sha256, or `random-init:<seed>`) and the config fields that change the numbers (encoder,
frames per segment, crop, dtype, the precision that runs with `auto` resolved: "fp32" or "bf16" autocast); workers,
threads and the device do not enter it.

Output (what the public CACE-Net / AVE code reads unchanged): dataset `avadataset`, row i = Annotations.txt line i,
chunked by row, float32 (or float16). Beside it: `valid` [N] bool (False for rows whose video failed; their
features are zeros), `done` [N] bool (all True in a finished file), and attributes (encoder, weights sha256 or
RANDOM-INIT, random_init, frames_per_segment / sample_rate, dtype, stage key).

How it runs:
- Unique videos go through a torch DataLoader (`workers` processes from a fork server decode while the encoder
  runs, replaced every WORKER_VIDEOS videos); each video is decoded once for all its rows and, with
  `modality="both"`, once for both encoders.
- Each video is prepared on the device (resize/crop for frames) and encoded on its own: one forward of exactly its
  S x units_per_segment units (AVE: 10 x 16 frames, 10 one-second chunks), never mixed with another video's.
  The CPU's kernels round differently for different batch shapes (and fp32 convolutions for different thread
  counts), so a video's features would otherwise depend on its neighbours in the batch, the number of decoding
  workers and where a run was cut off. With one fixed shape per video and the thread count pinned (`threads`,
  recorded in the file; a resumed run takes the recorded one), the bytes of a row depend only on its video, the
  weights, the precision and that thread count. Features are written as soon as a video is done, so memory does
  not grow with the number of videos (`release_memory` keeps glibc from holding freed per-video buffers).
- Resumable: the features go into `.visual.h5.partial` whose chunks are all allocated when it is created (no HDF5
  metadata changes afterwards, so a kill cannot corrupt its structure); after a video's rows are written and
  flushed, its rows are marked in `done` and flushed again. A per-video record is appended to `items.jsonl` before
  that. A rerun validates the partial file (same key, shapes, dtype; otherwise it starts over, with a warning) and
  decodes only videos with rows not done. `visual.h5` appears (`os.replace`) only when every row is done.
- A video no decoder can read is recorded (manifest items, reason), its rows get zeros and valid=False, and the
  others go on. If the failed share of rows passes `max_failure_share`, the stage is marked failed and
  `TooManyFailures` is raised (the partial file stays; rerunning with a higher threshold finishes it at once).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import h5py
import numpy as np
import torch
from pydantic import Field

from pipeline import ave, media
from pipeline.config import StrictModel
from pipeline.errors import UserError
from pipeline.runtime import default_threads, pinned_threads, resolve_device, resolve_precision, worker_options
from pipeline.store import ArtifactStore, Manifest, StageRun, stage_key

log = logging.getLogger(__name__)

# Bump when the output for the same inputs changes (sampler, length rule, layout). 2: encoders in channels_last
# (other fp32 bits)
VERSION = "2"
MODALITIES = ("visual", "audio")
STAGES = {"visual": "extract_visual", "audio": "extract_audio"}
OUTPUT_FILES = {"visual": "visual.h5", "audio": "audio.h5"}
FEATURE_KEY = "avadataset"  # what AVE's and CACE-Net's loaders read
ITEMS_LOG = "items.jsonl"
MANIFEST_SAVE_EVERY_S = 10.0
WORKER_VIDEOS = 500  # decoding workers are replaced after this many videos
RANDOM_WARNING = ("RANDOM WEIGHTS: the {modality} features come from a randomly initialised {encoder} "
                  "(--random-init); they are for testing the pipeline only, not for results")

VISUAL_INFO = ("decoder", "fallback_reason", "frames_decoded", "fps", "duration_s", "width", "height",
               "length_rule", "padded_s", "trimmed_s", "notes")
AUDIO_INFO = ("audio_status", "audio_decoder", "audio_samples", "audio_padded_samples", "audio_trimmed_samples",
              "audio_error", "duration_s", "notes")


class ExtractConfig(StrictModel):
    modality: Literal["visual", "audio", "both"] = "both"
    visual_encoder: str = "resnet50"
    audio_encoder: str = "cnn14"
    frames_per_segment: int = Field(media.FRAMES_PER_SEGMENT, ge=1, le=64,
                                    description="frames averaged per 1-s segment (AVE: 16)")
    dtype: Literal["float32", "float16"] = "float32"
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="compute precision of the encoders: auto = bf16 autocast where the device has native "
                            "bf16 (CUDA; a CPU with AMX/AVX512-BF16), else fp32. Features are stored as `dtype`")
    crop_size: int | None = Field(None, ge=32, description="visual center crop in px; None = the ImageNet weights' "
                                                          "224 (after a 232 resize). Smaller: a CPU demo's knob")
    threads: int = Field(0, ge=0, description="CPU threads of the encoders' forward (0: torch's default, the "
                                              "machine's cores); a resumed run uses the one its partial file records")
    workers: int = Field(2, ge=0, description="decoding processes (0: decode in the main process)")
    decode_threads: int = Field(0, ge=0, description="threads per decoder (0: the decoder's default)")
    max_failure_share: float = Field(0.01, ge=0.0, le=1.0,
                                     description="fail the stage if more than this share of rows failed")
    resnet_weights: Path | None = None
    cnn14_weights: Path | None = None
    random_init: bool = False
    seed: int = 0
    # Sharded on a Dask cluster (flows.sharded): "local:N" or "tcp://HOST:8786"; None: this process. Neither field
    # enters the stage key: a sharded run writes the same artifact as a single-process one.
    cluster: str | None = None
    shard_videos: int = Field(32, ge=1, description="videos per shard (one Prefect task and part file each)")

    def modalities(self) -> tuple[str, ...]:
        return MODALITIES if self.modality == "both" else (self.modality,)

    def encoder(self, modality: str) -> str:
        return self.visual_encoder if modality == "visual" else self.audio_encoder

    def weights_path(self, modality: str) -> Path | None:
        return self.resnet_weights if modality == "visual" else self.cnn14_weights


@dataclass
class ExtractResult:
    modality: str
    stage: str
    key: str
    dir: Path
    path: Path  # the feature file (visual.h5 / audio.h5); exists when status is complete
    reused: bool
    manifest: Manifest
    random_init: bool
    failed_rows: list[int] = field(default_factory=list)
    rows: int = 0

    @property
    def failure_share(self) -> float:
        return len(self.failed_rows) / self.rows if self.rows else 0.0


class TooManyFailures(UserError):
    """More rows failed than `max_failure_share` allows. `results` holds every modality's result."""

    def __init__(self, message: str, results: dict[str, ExtractResult]):
        super().__init__(message)
        self.results = results


ProgressFn = Callable[[int, int, str], None]  # (videos done, videos to do, video id)


# ---- keys -------------------------------------------------------------------------------------------------------
def precision(cfg: ExtractConfig, device: torch.device) -> str:
    """The precision that runs ("fp32" or "bf16"): `auto` resolved on this device, so it is part of the key."""
    return resolve_precision(cfg.precision, device)


def key_config(cfg: ExtractConfig, modality: str, device: torch.device) -> dict:
    """The config fields that change this modality's output (and nothing else)."""
    out = {"encoder": cfg.encoder(modality), "dtype": cfg.dtype, "precision": precision(cfg, device),
           "window_start": 0, "segments": ave.SEGMENTS}
    if modality == "visual":
        out["frames_per_segment"] = cfg.frames_per_segment
        if cfg.crop_size is not None:
            out["crop_size"] = cfg.crop_size
    else:
        out["sample_rate"] = media.SAMPLE_RATE
    return out


def _weights_info(cfg: ExtractConfig, modality: str):
    from extractors import get_extractor_class
    from extractors.weights import WeightsInfo, locate_weights

    name = cfg.encoder(modality)
    cls = get_extractor_class(name)
    if cls.modality != modality:
        raise UserError(f"extractor {name!r} is a {cls.modality} encoder, not a {modality} one")
    if name in ("resnet50", "cnn14"):
        return locate_weights(name, cfg.weights_path(modality), random_init=cfg.random_init, seed=cfg.seed)
    if not cfg.random_init:  # other registered extractors (tests) have no weight files
        raise UserError(f"extractor {name!r} has no weight files; use --random-init")
    return WeightsInfo(name, None, None, True, cfg.seed, "random init")


# ---- the partial / final feature file ---------------------------------------------------------------------------
def _create_dataset(f: h5py.File, name: str, shape: tuple[int, ...], dtype, chunks: tuple[int, ...] | None):
    """A dataset whose storage is allocated now (early allocation, never filled): later writes change raw data only,
    never HDF5 metadata, so a process killed mid-write cannot break the file's structure."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    if chunks is not None:
        dcpl.set_chunk(chunks)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    dcpl.set_obj_track_times(False)
    space = h5py.h5s.create_simple(shape)
    h5py.h5d.create(f.id, name.encode(), h5py.h5t.py_create(np.dtype(dtype)), space, dcpl=dcpl)


class _Sink:
    """One modality's output: encoder, queue of prepared videos, partial file, per-video records."""

    def __init__(self, modality: str, extractor, run: StageRun, ds: ave.AVEDataset, cfg: ExtractConfig,
                 attrs: dict):
        self.modality, self.extractor, self.run, self.ds, self.cfg = modality, extractor, run, ds, cfg
        self.attrs = attrs
        self.final = run.dir / OUTPUT_FILES[modality]
        self.partial = run.dir / f".{OUTPUT_FILES[modality]}.partial"
        self.items_log = run.dir / ITEMS_LOG
        self.n = len(ds)
        self.shape = (self.n, ave.SEGMENTS, *extractor.segment_shape)
        self.dtype = np.dtype(cfg.dtype)
        self.rows_of = ds.rows_by_video()
        self.ups = extractor.units_per_segment
        self.forward_units = ave.SEGMENTS * self.ups  # one video per forward, always this shape
        self.threads = int(attrs["torch_threads"])  # a resumed partial file may replace it (open)
        self.f: h5py.File | None = None
        self.done = np.zeros(self.n, bool)
        self.items: dict[str, dict] = {}
        self.stats = {"videos": 0, "units": 0, "encode_s": 0.0, "prepare_s": 0.0, "write_s": 0.0}
        self._last_save = time.monotonic()
        self._log_file = None

    # -- opening / resuming ---------------------------------------------------------------------------------------
    def open(self) -> None:
        if self.final.is_file() and self._valid_file(self.final, final=True):
            self.done[:] = True  # killed after the rename, before the manifest said complete
            self._read_items_log()
            return
        if self.partial.exists() and not self._valid_file(self.partial, final=False):
            self.partial.unlink()
        if not self.partial.exists():
            with contextlib.suppress(FileNotFoundError):
                self.items_log.unlink()
            self._create_partial()
        self._check_space()
        self.f = h5py.File(self.partial, "r+")
        self.done = np.asarray(self.f["done"][()], bool)
        recorded = int(self.f.attrs.get("torch_threads", self.threads))
        if recorded != self.threads:  # every row of one file is computed with one thread count
            if self.done.any():
                self.run.manifest.warnings.append(
                    f"resumed with {recorded} CPU threads as the partial file was started (asked: {self.threads})")
            self.threads = recorded
        self._read_items_log()
        self._log_file = open(self.items_log, "a", encoding="utf-8")

    def _check_space(self) -> None:
        """Before any video: the disk must hold what the file still needs (a full disk mid-run is an HDF5 write
        error inside the file, and the file is then unusable; this check turns the common case into one clear
        message before the work starts)."""
        need = int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize
        missing = need - self.partial.stat().st_blocks * 512  # a resumed file has already allocated its rows
        free = shutil.disk_usage(self.run.dir).free
        if missing > free:
            raise UserError(f"{self.run.dir}: the {self.modality} features need {_megabytes(need)} "
                            f"({_megabytes(missing)} not yet written) but only {_megabytes(free)} are free there; "
                            f"free space or point --root at another disk")

    def _create_partial(self) -> None:
        tmp = self.partial.with_name(self.partial.name + ".new")
        with h5py.File(tmp, "w") as f:
            _create_dataset(f, FEATURE_KEY, self.shape, self.dtype, (1, *self.shape[1:]))
            _create_dataset(f, "valid", (self.n,), bool, None)
            _create_dataset(f, "done", (self.n,), bool, None)
            f["valid"][...] = False
            f["done"][...] = False
            for k, v in self.attrs.items():
                f.attrs[k] = v
        os.replace(tmp, self.partial)

    def _valid_file(self, path: Path, final: bool) -> bool:
        """A partial (or final) file from this very key with the expected layout; anything else is not trusted."""
        try:
            with h5py.File(path, "r") as f:
                d = f[FEATURE_KEY]
                ok = (tuple(d.shape) == self.shape and d.dtype == self.dtype
                      and f.attrs.get("stage_key") == self.attrs["stage_key"]
                      and tuple(f["done"].shape) == (self.n,) and tuple(f["valid"].shape) == (self.n,))
                if ok and final:
                    ok = bool(np.all(f["done"][()]))
        except Exception as e:  # unreadable HDF5 (killed while being created): start over
            self.run.manifest.warnings.append(f"{path.name} was unreadable ({str(e).splitlines()[0][:120]}); "
                                              f"starting this stage's output over")
            return False
        if not ok:
            self.run.manifest.warnings.append(f"{path.name} did not match this stage's key or layout; starting over")
        return ok

    def _read_items_log(self) -> None:
        """Per-video records of videos whose rows are all done (later records win; a torn last line is skipped)."""
        if self.items_log.is_file():
            for line in self.items_log.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                vid = rec.get("video")
                if vid in self.rows_of and self.done[self.rows_of[vid]].all():
                    self.items[vid] = rec["item"]
        for vid, rows in self.rows_of.items():
            if self.done[rows].all() and vid not in self.items:
                valid = self.f is None or bool(np.all(self.f["valid"][sorted(rows)]))
                self.items[vid] = {"status": "ok" if valid else "failed", "rows": rows,
                                   "note": "recovered from the partial file"}
        self.run.manifest.items.update(self.items)

    def needs(self, video_id: str) -> bool:
        return not self.done[self.rows_of[video_id]].all()

    # -- adding videos, batching, writing -------------------------------------------------------------------------
    def add(self, video_id: str, raw, info: dict, error: str | None) -> None:
        """Prepare and encode one video, then write its rows."""
        feats, error = encode_video(self.extractor, video_id, raw, error, self.threads, self.stats)
        self.write(video_id, feats, info, error)
        del feats
        release_memory()

    def write(self, video_id: str, feats: np.ndarray | None, info: dict, error: str | None) -> None:
        t0 = time.perf_counter()
        rows = sorted(self.rows_of[video_id])
        keep = VISUAL_INFO if self.modality == "visual" else AUDIO_INFO
        item = {"status": "ok" if error is None else "failed", "rows": rows,
                **{k: info[k] for k in keep if k in info and info[k] not in (None, [], "")}}
        if error is not None:
            item["reason"] = error
            feats = np.zeros(self.shape[1:], self.dtype)
        elif feats.shape != self.shape[1:]:
            raise RuntimeError(f"{self.extractor.name} produced {feats.shape} for {video_id}, expected "
                               f"{self.shape[1:]}")
        # 1) the record, 2) the rows, flushed, 3) the done marks, flushed: a kill between steps redoes the video
        self._log_file.write(json.dumps({"video": video_id, "item": item}) + "\n")
        self._log_file.flush()
        d, v = self.f[FEATURE_KEY], self.f["valid"]
        data = feats.astype(self.dtype, copy=False)
        for r in rows:
            d[r] = data
            v[r] = error is None
        self.f.flush()
        done = self.f["done"]
        for r in rows:
            done[r] = True
        self.f.flush()
        self.done[rows] = True
        self.items[video_id] = item
        self.run.manifest.items[video_id] = item
        self.stats["videos"] += 1
        self.stats["write_s"] += time.perf_counter() - t0
        if error is not None or time.monotonic() - self._last_save > MANIFEST_SAVE_EVERY_S:
            self.run.save()
            self._last_save = time.monotonic()

    # -- the end --------------------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.f is not None:
            self.f.close()
            self.f = None

    def failed_rows(self) -> list[int]:
        return sorted(r for item in self.items.values() if item.get("status") == "failed" for r in item["rows"])

    def publish(self) -> None:
        """All rows done: the partial file becomes the output, in one rename."""
        self.close()
        if not self.final.is_file():
            os.replace(self.partial, self.final)


def encode_video(extractor, video_id: str, raw, error: str | None, threads: int, stats: dict
                 ) -> tuple[np.ndarray | None, str | None]:
    """(features, None) of one decoded video, or (None, why) when it cannot be encoded. One forward of exactly the
    video's S x units_per_segment units, with `threads` CPU threads: the bytes depend on the video only."""
    if error is not None or raw is None:
        return None, error or "nothing decoded"
    t0 = time.perf_counter()
    try:
        units = extractor.prepare(raw)
    except Exception as e:  # e.g. a frame size the resize cannot take: this video fails, others go on
        return None, f"prepare failed: {media._short(e)}"
    expected = ave.SEGMENTS * extractor.units_per_segment
    if units.shape[0] != expected:  # the length rule makes every video S segments
        raise RuntimeError(f"{extractor.name} prepared {units.shape[0]} units for {video_id}, expected {expected}")
    t1 = time.perf_counter()
    stats["prepare_s"] = stats.get("prepare_s", 0.0) + t1 - t0
    with pinned_threads(threads):
        feats = extractor.encode(units)
    stats["encode_s"] = stats.get("encode_s", 0.0) + time.perf_counter() - t1
    stats["units"] = stats.get("units", 0) + units.shape[0]
    return feats.numpy(), None


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


# ---- decoding in worker processes -------------------------------------------------------------------------------
class _DecodeJobs(torch.utils.data.Dataset):
    """Item i: decode video i for the modalities that still need it. Failures come back as data, not exceptions,
    so one bad file never stops the DataLoader."""

    def __init__(self, jobs: list[tuple[str, str, bool, bool]], frames_per_segment: int, threads: int):
        self.jobs, self.fps, self.threads = jobs, frames_per_segment, threads

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> dict:
        vid, path, need_v, need_a = self.jobs[i]
        t0, c0 = time.perf_counter(), time.process_time()
        out = {"video": vid, "frames": None, "audio": None, "info": {}, "errors": {}}
        try:
            d = media.decode(path, video=need_v, audio=need_a, frames_per_segment=self.fps, threads=self.threads)
        except media.MediaError as e:
            out["errors"]["visual"] = str(e)
            d = None
            if need_a and need_v:  # the frames failed; the audio may still be there
                try:
                    d = media.decode(path, video=False, audio=True, threads=self.threads)
                except media.MediaError as e2:
                    out["errors"]["audio"] = str(e2)
            else:
                out["errors"]["audio"] = str(e)
        except Exception as e:  # an unexpected decoder crash is still one video's problem
            out["errors"] = {"visual": f"unexpected: {media._short(e)}", "audio": f"unexpected: {media._short(e)}"}
            d = None
        if d is not None:
            out["info"] = d.info.to_dict()
            if d.frames is not None:
                out["frames"] = torch.from_numpy(d.frames)
            if d.audio is not None:
                out["audio"] = torch.from_numpy(d.audio)
            elif need_a and "audio" not in out["errors"]:
                out["errors"]["audio"] = d.info.audio_error or "audio could not be decoded"
        out["decode_s"] = time.perf_counter() - t0
        out["decode_cpu_s"] = time.process_time() - c0  # this process, all its threads (decoder threads too)
        return out


def _identity(x):
    return x


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


# ---- the stage --------------------------------------------------------------------------------------------------
def _open_result(store: ArtifactStore, modality: str, key: str, manifest: Manifest, reused: bool,
                 n: int) -> ExtractResult:
    dir_ = store.path(STAGES[modality], key)
    out = manifest.outputs.get(modality)
    path = dir_ / (out.path if out else OUTPUT_FILES[modality])
    failed = sorted(r for item in manifest.items.values() if item.get("status") == "failed"
                    for r in item.get("rows", []))
    random_init = any(w.startswith("RANDOM WEIGHTS") for w in manifest.warnings)
    return ExtractResult(modality, STAGES[modality], key, dir_, path, reused, manifest, random_init, failed, n)


def load_video_dataset(dataset_dir: Path) -> ave.AVEDataset:
    """The dataset, which must have its video folder (extraction decodes from it)."""
    ds = ave.load_dataset(dataset_dir)
    if not ds.video_dir.is_dir():
        raise UserError(f"{ds.video_dir}: video folder not found (an AVE dataset folder holds videos/<ID>.mp4 or "
                        f"AVE/<ID>.mp4)")
    return ds


def planned_weights(cfg: ExtractConfig) -> dict:
    """{modality: WeightsInfo}: locates and checks each encoder's weight file (a UserError if missing or wrong)."""
    return {m: _weights_info(cfg, m) for m in cfg.modalities()}


def planned_keys(dataset_dir: Path, cfg: ExtractConfig = ExtractConfig()) -> dict[str, str]:
    """{modality: stage key} this config would use (locates and hashes the weight files; decodes nothing)."""
    ds = ave.load_dataset(dataset_dir)
    device = resolve_device(cfg.device)
    digest = ds.digest()
    return {m: stage_key(STAGES[m], VERSION, key_config(cfg, m, device),
                         {"dataset": digest, "weights": _weights_info(cfg, m).id}) for m in cfg.modalities()}


def extract(dataset_dir: Path, cfg: ExtractConfig = ExtractConfig(), root: Path = Path("artifacts"), *,
            force: bool = False, progress: ProgressFn | None = None,
            parts: dict[str, list[Path]] | None = None) -> dict[str, ExtractResult]:
    """Run (or reuse, or resume) the extraction stages `cfg.modality` names; returns {modality: ExtractResult}.

    `parts` ({modality: shard part files}, `pipeline.ave.shards`): the videos' features were computed elsewhere
    (Dask workers); their rows are written from the parts instead of being decoded and encoded here. The output
    file and manifest are the same as a single-process run's.

    Raises UserError for bad input (dataset, weights, config) before any work, and TooManyFailures (a UserError)
    after the work if the failed share of rows passes `cfg.max_failure_share` in any modality.
    """
    from extractors import create_extractor
    from extractors.weights import trained_from_random

    t_start = time.perf_counter()
    ds = load_video_dataset(dataset_dir)
    device = resolve_device(cfg.device)
    store = ArtifactStore(root)
    digest = ds.digest()

    plans = {}
    for m in cfg.modalities():
        weights = _weights_info(cfg, m)  # a missing or wrong path fails here, before any work
        config = key_config(cfg, m, device)
        inputs = {"dataset": digest, "weights": weights.id}
        key = stage_key(STAGES[m], VERSION, config, inputs)
        plans[m] = (weights, config, inputs, key)

    results: dict[str, ExtractResult] = {}
    extractors = {}
    for m, (weights, config, inputs, key) in plans.items():
        stage_dir = store.path(STAGES[m], key)
        if not force and store.is_complete(STAGES[m], key) and (stage_dir / OUTPUT_FILES[m]).is_file():
            results[m] = _open_result(store, m, key, store.manifest(STAGES[m], key), True, len(ds))
            continue
        # every encoder is built (and its weight file checked) before any stage folder is touched
        extractors[m] = create_extractor(cfg.encoder(m), weights=weights.path, random_init=weights.random_init,
                                         seed=cfg.seed, device=device, precision=config["precision"],
                                         frames_per_segment=cfg.frames_per_segment,
                                         **({"crop_size": cfg.crop_size} if m == "visual" and cfg.crop_size else {}))

    sinks: dict[str, _Sink] = {}
    try:
        for m, extractor in extractors.items():
            weights, config, inputs, key = plans[m]
            stage_dir = store.path(STAGES[m], key)
            if force:  # under the artifact's lock: no other run reads the folder while it is removed
                lock = store.lock(STAGES[m], key)
                lock.acquire()
                shutil.rmtree(stage_dir, ignore_errors=True)
                run = store.open(STAGES[m], VERSION, config, inputs)
                lock.release()  # the run holds it (the lock is re-entrant within this thread)
            else:
                run = store.open(STAGES[m], VERSION, config, inputs)
            if run.manifest.key != key:
                raise RuntimeError(f"stage key computed twice differently: {key} vs {run.manifest.key}")
            if run.is_complete and (stage_dir / OUTPUT_FILES[m]).is_file():  # computed by a run we waited for
                results[m] = _open_result(store, m, key, run.manifest, True, len(ds))
                continue
            random_lineage = trained_from_random(weights)  # random init, or fine-tuned from it
            attrs = {"stage": STAGES[m], "stage_key": key, "version": VERSION, "encoder": extractor.name,
                     "weights_sha256": weights.label, "random_init": random_lineage, "seed": cfg.seed,
                     "dtype": cfg.dtype, "segments": ave.SEGMENTS, "precision": config["precision"],
                     "dataset_digest": digest, "rows": "row i = line i of Annotations.txt",
                     "torch_threads": cfg.threads or default_threads()}
            if m == "visual":
                attrs["frames_per_segment"] = cfg.frames_per_segment
                if hasattr(extractor, "crop_size"):  # what predict must rebuild the encoder with
                    attrs["crop_size"] = int(extractor.crop_size[0])
            else:
                attrs["sample_rate"] = media.SAMPLE_RATE
            run.manifest.metrics["encoder"] = extractor.describe()
            run.manifest.metrics["run"] = {"device": str(device), "workers": cfg.workers,
                                           "max_failure_share": cfg.max_failure_share}
            if random_lineage:
                warning = RANDOM_WARNING.format(modality=m, encoder=extractor.name)
                if not weights.random_init:
                    warning += " (fine-tuned from random initialisation)"
                if warning not in run.manifest.warnings:
                    run.manifest.warnings.insert(0, warning)
            sink = _Sink(m, extractor, run, ds, cfg, attrs)
            sinks[m] = sink
            sink.open()
            run.manifest.metrics["run"]["torch_threads"] = sink.threads
            run.save()

        if sinks and parts is not None:
            from pipeline.ave.shards import fill_from_parts

            fill_from_parts(sinks, parts, progress)
        elif sinks:
            _run_sinks(ds, cfg, device, sinks, progress)
        failures = []
        for m, sink in sinks.items():
            results[m] = _finish(store, sink, cfg, len(ds), t_start)
            if results[m].manifest.status == "failed":
                failures.append(results[m])
    except BaseException as e:
        for sink in sinks.values():
            sink.close()
            if sink.run.manifest.status == "running":
                sink.run.fail(f"interrupted: {type(e).__name__}: {e}" if str(e) else type(e).__name__)
        raise
    if failures:
        parts = [f"{r.modality}: {len(r.failed_rows)} of {r.rows} rows failed ({100 * r.failure_share:.1f} %)"
                 for r in failures]
        raise TooManyFailures(f"{'; '.join(parts)}, more than --max-failure-share {cfg.max_failure_share:g} "
                              f"allows; the reasons are in {', '.join(str(r.dir / 'manifest.json') for r in failures)}"
                              f" (`avel inspect`). Fix or remove those videos, or raise --max-failure-share to "
                              f"accept zero features (valid=False) for them", results)
    return results


def _run_sinks(ds: ave.AVEDataset, cfg: ExtractConfig, device: torch.device, sinks: dict[str, _Sink],
               progress: ProgressFn | None) -> None:
    jobs = []
    for vid in ds.video_ids():
        need_v = "visual" in sinks and sinks["visual"].needs(vid)
        need_a = "audio" in sinks and sinks["audio"].needs(vid)
        if need_v or need_a:
            jobs.append((vid, str(ds.video_path(vid)), need_v, need_a))
    total = len(jobs)
    if progress:
        progress(0, total, "")
    if not jobs:
        return
    workers = min(cfg.workers, total)

    step = WORKER_VIDEOS if workers else total
    worker_opts = worker_options(workers)  # a fork server's workers, ending when this process ends

    def items():
        # fresh worker processes every WORKER_VIDEOS videos: whatever a decoder library keeps per file stays bounded
        for start in range(0, total, step):
            yield from torch.utils.data.DataLoader(
                _DecodeJobs(jobs[start:start + step], cfg.frames_per_segment, cfg.decode_threads),
                batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity,
                pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None, persistent_workers=False,
                **worker_opts)

    wait = decode = decode_cpu = 0.0
    t0 = time.perf_counter()
    for i, item in enumerate(items()):
        wait += time.perf_counter() - t0
        decode += item.get("decode_s", 0.0)
        decode_cpu += item.get("decode_cpu_s", 0.0)
        for m, sink in sinks.items():
            if not sink.needs(item["video"]):
                continue
            raw = item["frames"] if m == "visual" else item["audio"]
            sink.add(item["video"], raw, item["info"], item["errors"].get(m))
        del item
        if progress:
            progress(i + 1, total, jobs[i][0])
        t0 = time.perf_counter()
    for sink in sinks.values():
        sink.stats["decode_wait_s"] = wait
        sink.stats["decode_s"] = decode
        sink.stats["decode_cpu_s"] = decode_cpu


def _summary_warnings(sink: _Sink) -> list[str]:
    items = sink.items
    out = []

    def ids(pred):
        found = [v for v, it in items.items() if pred(it)]
        return found, ", ".join(found[:10]) + (" ..." if len(found) > 10 else "")

    failed, names = ids(lambda it: it.get("status") == "failed")
    if failed:
        out.append(f"{len(failed)} videos failed ({names}); their rows are zeros with valid=False")
    if sink.modality == "visual":
        odd, names = ids(lambda it: it.get("length_rule") in ("padded", "trimmed"))
        if odd:
            out.append(f"{len(odd)} videos are not {ave.SEGMENTS} s long ({names}): shorter ones are padded by "
                       f"repeating the last frame, longer ones use the first {ave.SEGMENTS} s (see items)")
        fb, names = ids(lambda it: bool(it.get("fallback_reason")))
        if fb:
            out.append(f"{len(fb)} videos were decoded by PyAV after decord failed ({names})")
    else:
        silent, names = ids(lambda it: it.get("audio_status") == "missing")
        if silent:
            out.append(f"{len(silent)} videos have no audio track ({names}): their audio features encode silence")
    return out


def _finish(store: ArtifactStore, sink: _Sink, cfg: ExtractConfig, n: int, t_start: float) -> ExtractResult:
    run, m = sink.run, sink.modality
    if not sink.done.all():  # cannot happen unless a video vanished from the job list
        raise RuntimeError(f"{m}: {int((~sink.done).sum())} rows not done at the end")
    for w in _summary_warnings(sink):
        if w not in run.manifest.warnings:
            run.manifest.warnings.append(w)
    failed = sink.failed_rows()
    share = len(failed) / n if n else 0.0
    s = sink.stats
    run.manifest.metrics.update({
        "rows": n, "videos": len(sink.rows_of), "videos_this_run": s["videos"], "failed_rows": failed,
        "failed_videos": sorted(v for v, it in sink.items.items() if it.get("status") == "failed"),
        "failure_share": round(share, 6),
        "units_per_s": round(s["units"] / s["encode_s"], 2) if s["encode_s"] else None,
        "videos_per_s": round(s["videos"] / (time.perf_counter() - t_start), 3) if s["videos"] else None,
    })
    run.manifest.timings.update({k: round(s.get(k, 0.0), 3) for k in
                                 ("encode_s", "prepare_s", "write_s", "decode_s", "decode_cpu_s",
                                  "decode_wait_s")})
    run.manifest.timings["total_s"] = round(time.perf_counter() - t_start, 3)
    sink.close()
    if share > cfg.max_failure_share:
        run.fail(f"{len(failed)} of {n} rows failed ({100 * share:.1f} %), more than max_failure_share "
                 f"{cfg.max_failure_share:g}; the partial output is kept and a rerun with a higher threshold "
                 f"finishes it without recomputing")
        return _open_result(store, m, run.manifest.key, run.manifest, False, n)
    sink.publish()
    run.manifest.items = dict(sink.items)
    with h5py.File(sink.final, "r") as f:
        shape, dtype = f[FEATURE_KEY].shape, f[FEATURE_KEY].dtype
    run.add_output(m, OUTPUT_FILES[m], shape=shape, dtype=dtype)
    run.complete()
    with contextlib.suppress(FileNotFoundError):
        sink.items_log.unlink()  # its content is in the manifest now
    return _open_result(store, m, run.manifest.key, run.manifest, False, n)


def extract_visual(dataset_dir: Path, cfg: ExtractConfig = ExtractConfig(), root: Path = Path("artifacts"),
                   **kwargs) -> ExtractResult:
    return extract(dataset_dir, cfg.model_copy(update={"modality": "visual"}), root, **kwargs)["visual"]


def extract_audio(dataset_dir: Path, cfg: ExtractConfig = ExtractConfig(), root: Path = Path("artifacts"),
                  **kwargs) -> ExtractResult:
    return extract(dataset_dir, cfg.model_copy(update={"modality": "audio"}), root, **kwargs)["audio"]
