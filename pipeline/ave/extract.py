"""The AVE extraction stages: videos -> `visual.h5` ([N,10,7,7,2048], ResNet-50) and `audio.h5` ([N,10,2048], Cnn14).

What is AVE's own lives here: its grid (ten 1-s segments, `pipeline.extraction.grids.SegmentGrid`), its writer (HDF5
rows in Annotations.txt order, `RowWriter`), its stages and keys. The loop (decoding workers, one forward per video,
pinned threads, failures, progress) is the shared engine's (`pipeline.extraction.engine`), and so is sharding
(`pipeline.extraction.shards`).

Two stages in the store, `extract_visual` and `extract_audio`, so a fine-tuned visual encoder changes only the
visual key (the audio features are reused untouched). A stage's key digests the dataset (`AVEDataset.digest()`),
the weights (the file's sha256, or `random-init:<seed>`) and the config fields that change the numbers (encoder,
frames per segment, crop, dtype, the precision that runs with `auto` resolved: "fp32" or "bf16" autocast); workers,
threads and the device do not enter it.

Output (what the public CACE-Net / AVE code reads unchanged): dataset `avadataset`, row i = Annotations.txt line i,
chunked by row, float32 (or float16). Beside it: `valid` [N] bool (False for rows whose video failed; their
features are zeros), `done` [N] bool (all True in a finished file), and attributes (encoder, weights sha256 or
RANDOM-INIT, random_init, frames_per_segment / sample_rate, dtype, stage key, torch_threads).

How it runs:
- Unique videos go through the engine: each video is decoded once for all its rows and, with `modality="both"`,
  once for both encoders; one forward of exactly its 10 x units_per_segment units per encoder. With the thread count
  pinned (`threads`, recorded in the file; a resumed run takes the recorded one), the bytes of a row depend only on
  its video, the weights, the precision and that thread count.
- Resumable: the features go into `.visual.h5.partial` whose chunks are all allocated when it is created (no HDF5
  metadata changes afterwards, so a kill cannot corrupt its structure); after a video's rows are written and
  flushed, its rows are marked in `done` and flushed again. A per-video record is appended to `items.jsonl` before
  that. A rerun validates the partial file (same key, shapes, dtype; otherwise it starts over, with a warning) and
  decodes only videos with rows not done. `visual.h5` appears (`os.replace`) only when every row is done.
- A video no decoder can read is recorded (manifest items, reason), its rows get zeros and valid=False, and the
  others go on. If the failed share of rows passes `max_failure_share`, the stage is marked failed and
  `TooManyFailures` is raised (the partial file stays; rerunning with a higher threshold finishes it at once).
- Sharded (`cluster`, `flows.sharded`): `extract_shard` writes a shard's part per stage on a Dask worker, and
  `extract(..., parts=...)` merges them through the same writer: the same file and manifest as here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import torch
from pydantic import Field

from pipeline import ave, media
from pipeline.ave.dataset import FEATURE_KEY
from pipeline.errors import UserError
from pipeline.extraction import encoders, recipes, shards
from pipeline.extraction.engine import ProgressFn, run_videos
from pipeline.extraction.feature_sets import FeatureSet, feature_set
from pipeline.extraction.grids import RecipeGrid, SegmentGrid
from pipeline.extraction.settings import ExtractSettings
from pipeline.runtime import default_threads, resolve_device
from pipeline.store import ArtifactStore, Manifest, StageRun, stage_key

# Bump when the output for the same inputs changes (sampler, length rule, layout). 2: encoders in channels_last
# (other fp32 bits)
VERSION = "2"
MODALITIES = ("visual", "audio")
STAGES = {"visual": "extract_visual", "audio": "extract_audio"}
OUTPUT_FILES = {"visual": "visual.h5", "audio": "audio.h5"}
PART_FILES = {"visual": ".visual.npy", "audio": ".audio.npy"}  # a video's features in a shard's part folder
ITEMS_LOG = "items.jsonl"
MANIFEST_SAVE_EVERY_S = 10.0
RANDOM_WARNING = ("RANDOM WEIGHTS: the {modality} features come from a randomly initialised {encoder} "
                  "(--random-init); they are for testing the pipeline only, not for results")

VISUAL_INFO = ("decoder", "fallback_reason", "frames_decoded", "fps", "duration_s", "width", "height",
               "length_rule", "padded_s", "trimmed_s", "notes")
AUDIO_INFO = ("audio_status", "audio_decoder", "audio_samples", "audio_padded_samples", "audio_trimmed_samples",
              "audio_error", "duration_s", "notes")


class ExtractConfig(ExtractSettings):
    modality: Literal["visual", "audio", "both"] = "both"
    visual_encoder: str = "resnet50"
    audio_encoder: str = "cnn14"
    frames_per_segment: int = Field(media.FRAMES_PER_SEGMENT, ge=1, le=64,
                                    description="frames averaged per 1-s segment (AVE: 16)")
    dtype: Literal["float32", "float16"] = Field("float32", description="how the features are stored")
    workers: int = Field(2, ge=0, description="decoding processes (0: decode in the main process)")
    decode_threads: int = Field(0, ge=0, description="threads per decoder (0: the decoder's default)")
    max_failure_share: float = Field(0.01, ge=0.0, le=1.0,
                                     description="fail the stage if more than this share of rows failed")
    shard_videos: int = Field(32, ge=1, description="videos per shard (one Prefect task and part folder each)")

    def modalities(self) -> tuple[str, ...]:
        return MODALITIES if self.modality == "both" else (self.modality,)

    def released(self) -> FeatureSet | None:
        """The released feature set named by `feature_set` (None for this project's `cace`)."""
        return None if self.feature_set == "cace" else feature_set(self.feature_set, "ave")

    def encoder(self, modality: str) -> str:
        if self.released():
            return self.released().stream(modality).encoder
        return self.visual_encoder if modality == "visual" else self.audio_encoder

    def encoder_spec(self, modality: str) -> encoders.EncoderSpec:
        if self.released():
            return self.stream_spec(self.released().stream(modality))
        return self.spec(modality, self.encoder(modality), self.frames_per_segment)

    def grid(self) -> SegmentGrid | RecipeGrid:
        if self.released():
            return RecipeGrid(tuple((s.name, s.recipe) for s in self.released().streams), self.decode_mode)
        return SegmentGrid(frames_per_segment=self.frames_per_segment, segments=ave.SEGMENTS)

    def key_fields(self, modality: str) -> dict:
        """The fields that change one modality's output (one stage per modality: `key_config`)."""
        return key_config(self, modality, resolve_device(self.device))


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


# ---- keys and plans ---------------------------------------------------------------------------------------------
def key_config(cfg: ExtractConfig, modality: str, device: torch.device) -> dict:
    """The config fields that change this modality's output (and nothing else). The `cace` set's keys are those
    of before feature sets existed."""
    out = {"encoder": cfg.encoder(modality), "dtype": cfg.dtype, "precision": cfg.precision_on(device),
           "window_start": 0, "segments": ave.SEGMENTS}
    released = cfg.released()
    if released:
        stream = released.stream(modality)
        return {**out, "feature_set": released.name, "recipe": stream.recipe, "decode_mode": cfg.decode_mode,
                **stream.options}
    if modality == "visual":
        out["frames_per_segment"] = cfg.frames_per_segment
        if cfg.crop_size is not None:
            out["crop_size"] = cfg.crop_size
    else:
        out["sample_rate"] = media.SAMPLE_RATE
    return out


@dataclass
class StagePlan:
    """One modality's stage as the config, dataset and weights fix it, before anything runs."""

    modality: str
    weights: object  # extractors.weights.WeightsInfo
    config: dict
    inputs: dict[str, str]
    key: str

    @property
    def stage(self) -> str:
        return STAGES[self.modality]


def load_video_dataset(dataset_dir: Path) -> ave.AVEDataset:
    """The dataset, which must have its video folder (extraction decodes from it)."""
    ds = ave.load_dataset(dataset_dir)
    if not ds.video_dir.is_dir():
        raise UserError(f"{ds.video_dir}: video folder not found (an AVE dataset folder holds videos/<ID>.mp4 or "
                        f"AVE/<ID>.mp4)")
    return ds


def planned_weights(cfg: ExtractConfig) -> dict:
    """{modality: WeightsInfo}: locates and checks each encoder's weight file (a UserError if missing or wrong)."""
    return {m: encoders.locate(cfg.encoder_spec(m), random_init=cfg.random_init, seed=cfg.seed)
            for m in cfg.modalities()}


def plan_stages(ds: ave.AVEDataset, cfg: ExtractConfig, device: torch.device) -> dict[str, StagePlan]:
    """{modality: StagePlan} for the modalities `cfg` names: every weight file located and checked (a missing or
    wrong one fails here, before any work) and every stage key computed."""
    digest = ds.digest()
    plans = {}
    for m, weights in planned_weights(cfg).items():
        config, inputs = key_config(cfg, m, device), {"dataset": digest, "weights": weights.id}
        plans[m] = StagePlan(m, weights, config, inputs, stage_key(STAGES[m], VERSION, config, inputs))
    return plans


def _random_lineage_warning(plan: StagePlan, encoder_name: str) -> str | None:
    from extractors.weights import trained_from_random

    if not trained_from_random(plan.weights):  # random init, or fine-tuned from it
        return None
    warning = RANDOM_WARNING.format(modality=plan.modality, encoder=encoder_name)
    if not plan.weights.random_init:
        warning += " (fine-tuned from random initialisation)"
    return warning


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


class RowWriter:
    """One modality's output (the engine's writer for one stage): the partial HDF5 file, its done marks and the
    per-video records. `encoder`: the extractor's description (its name and segment shape fix the file's layout)."""

    def __init__(self, modality: str, encoder: dict, run: StageRun, ds: ave.AVEDataset, cfg: ExtractConfig,
                 attrs: dict):
        self.modality, self.encoder, self.run, self.ds, self.cfg = modality, encoder, run, ds, cfg
        self.modalities = (modality,)
        self.attrs = attrs
        self.final = run.dir / OUTPUT_FILES[modality]
        self.partial = run.dir / f".{OUTPUT_FILES[modality]}.partial"
        self.items_log = run.dir / ITEMS_LOG
        self.n = len(ds)
        self.shape = (self.n, ave.SEGMENTS, *encoder["segment_shape"])
        self.dtype = np.dtype(cfg.dtype)
        self.rows_of = ds.rows_by_video()
        self.threads = int(attrs["torch_threads"])  # a resumed partial file may replace it (open)
        self.f: h5py.File | None = None
        self.done = np.zeros(self.n, bool)
        self.items: dict[str, dict] = {}
        self.stats = {"videos": 0, "write_s": 0.0}
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

    # -- writing ------------------------------------------------------------------------------------------------
    def write(self, video_id: str, features: dict, info: dict, errors: dict) -> None:
        t0 = time.perf_counter()
        feats, error = features[self.modality], errors[self.modality]
        rows = sorted(self.rows_of[video_id])
        keep = VISUAL_INFO if self.modality == "visual" else AUDIO_INFO
        item = {"status": "ok" if error is None else "failed", "rows": rows,
                **{k: info[k] for k in keep if k in info and info[k] not in (None, [], "")}}
        if error is not None:
            item["reason"] = error
            feats = np.zeros(self.shape[1:], self.dtype)
        elif feats.shape != self.shape[1:]:
            raise RuntimeError(f"{self.encoder['encoder']} produced {feats.shape} for {video_id}, expected "
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



def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


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


def _file_attrs(plan: StagePlan, encoder: dict, cfg: ExtractConfig, digest: str) -> dict:
    """The feature file's attributes: what the rows are and how they were made (predict rebuilds the encoder from
    them)."""
    from extractors.weights import trained_from_random

    attrs = {"stage": plan.stage, "stage_key": plan.key, "version": VERSION, "encoder": encoder["encoder"],
             "weights_sha256": plan.weights.label, "random_init": trained_from_random(plan.weights),
             "seed": cfg.seed, "dtype": cfg.dtype, "segments": ave.SEGMENTS, "precision": plan.config["precision"],
             "dataset_digest": digest, "rows": "row i = line i of Annotations.txt",
             "torch_threads": cfg.threads or default_threads()}
    released = cfg.released()
    if released:  # a released set's recipe: what the manifest's recipe record says, in the file too
        attrs.update({"feature_set": released.name, "decode_mode": cfg.decode_mode,
                      "recipe": released.stream(plan.modality).recipe, **released.stream(plan.modality).options})
    elif plan.modality == "visual":
        attrs["frames_per_segment"] = cfg.frames_per_segment
        crop = encoder.get("preprocessing", {}).get("crop_size")
        if crop:  # what predict must rebuild the encoder with
            attrs["crop_size"] = int(crop[0])
    else:
        attrs["sample_rate"] = media.SAMPLE_RATE
    return attrs



def extract(dataset_dir: Path, cfg: ExtractConfig = ExtractConfig(), root: Path = Path("artifacts"), *,
            force: bool = False, progress: ProgressFn | None = None,
            parts: dict[str, list[Path]] | None = None) -> dict[str, ExtractResult]:
    """Run (or reuse, or resume) the extraction stages `cfg.modality` names; returns {modality: ExtractResult}.

    `parts` ({modality: shard part folders}, `extract_shard`): the videos' features were computed elsewhere (Dask
    workers); their rows are written from the parts instead of being decoded and encoded here. The output file and
    manifest are the same as a single-process run's.

    Raises UserError for bad input (dataset, weights, config) before any work, and TooManyFailures (a UserError)
    after the work if the failed share of rows passes `cfg.max_failure_share` in any modality.
    """
    t_start = time.perf_counter()
    ds = load_video_dataset(dataset_dir)
    device = resolve_device(cfg.device)
    store = ArtifactStore(root)
    digest = ds.digest()
    plans = plan_stages(ds, cfg, device)

    results: dict[str, ExtractResult] = {}
    todo = {}
    for m, plan in plans.items():
        manifest = store.manifest(plan.stage, plan.key)
        # the store's own reuse check (outputs as written; --no-recompute's error), before any encoder is built
        if not force and store.reusable(plan.stage, plan.key, manifest) and \
                (store.path(plan.stage, plan.key) / OUTPUT_FILES[m]).is_file():
            results[m] = _open_result(store, m, plan.key, manifest, True, len(ds))
        else:
            todo[m] = plan
    sources = {m: shards.PartSource(parts[m], plan.key) for m, plan in todo.items()} if parts is not None else {}
    built = {}
    if parts is None:  # every encoder is built (and its weight file checked) before any stage folder is touched
        built = {m: encoders.build(cfg.encoder_spec(m), plan.weights, seed=cfg.seed, device=device,
                                   precision=plan.config["precision"]) for m, plan in todo.items()}
    described = {m: built[m].describe() if m in built else sources[m].encoders[m] for m in todo}

    writers: dict[str, RowWriter] = {}
    failures = []
    workers = 0 if cfg.released() else cfg.workers  # a recipe decodes while it encodes: no decoding workers
    with contextlib.ExitStack() as stack:
        try:
            for m, plan in todo.items():
                run = stack.enter_context(store.stage(plan.stage, VERSION, plan.config, plan.inputs, force=force))
                if run.reused:  # computed by a run we waited for
                    results[m] = _open_result(store, m, plan.key, run.manifest, True, len(ds))
                    continue
                writer = RowWriter(m, described[m], run, ds, cfg, _file_attrs(plan, described[m], cfg, digest))
                run.manifest.metrics["encoder"] = described[m]
                run.manifest.metrics["run"] = {"device": str(device), "workers": workers,
                                               "max_failure_share": cfg.max_failure_share}
                if cfg.released():
                    run.manifest.metrics["recipe"] = recipes.recipe_record(cfg)
                warning = _random_lineage_warning(plan, described[m]["encoder"])
                if warning and warning not in run.manifest.warnings:
                    run.manifest.warnings.insert(0, warning)
                writers[m] = writer
                writer.open()
                run.manifest.metrics["run"]["torch_threads"] = writer.threads
                run.save()
            stats = {}
            if writers and parts is not None:
                for m, writer in writers.items():
                    sources[m].feed(ds.video_ids(), writer, progress)
            elif writers:
                stats = run_videos([(vid, ds.video_path(vid)) for vid in ds.video_ids()], cfg.grid(),
                                   {m: built[m] for m in writers}, list(writers.values()),
                                   threads={m: w.threads for m, w in writers.items()}, workers=workers,
                                   decode_threads=cfg.decode_threads, progress=progress)
            for m, writer in writers.items():
                results[m] = _finish(store, writer, stats.get(m, {}), cfg, len(ds), t_start)
                if results[m].manifest.status == "failed":
                    failures.append(results[m])
        finally:
            for writer in writers.values():
                writer.close()
    if failures:
        lines = [f"{r.modality}: {len(r.failed_rows)} of {r.rows} rows failed ({100 * r.failure_share:.1f} %)"
                 for r in failures]
        raise TooManyFailures(f"{'; '.join(lines)}, more than --max-failure-share {cfg.max_failure_share:g} "
                              f"allows; the reasons are in {', '.join(str(r.dir / 'manifest.json') for r in failures)}"
                              f" (`avel inspect`). Fix or remove those videos, or raise --max-failure-share to "
                              f"accept zero features (valid=False) for them", results)
    return results


def _summary_warnings(writer: RowWriter) -> list[str]:
    items = writer.items
    out = []

    def ids(pred):
        found = [v for v, it in items.items() if pred(it)]
        return found, ", ".join(found[:10]) + (" ..." if len(found) > 10 else "")

    failed, names = ids(lambda it: it.get("status") == "failed")
    if failed:
        out.append(f"{len(failed)} videos failed ({names}); their rows are zeros with valid=False")
    if writer.modality == "visual":
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


def _finish(store: ArtifactStore, writer: RowWriter, stats: dict, cfg: ExtractConfig, n: int,
            t_start: float) -> ExtractResult:
    run, m = writer.run, writer.modality
    if not writer.done.all():  # cannot happen unless a video vanished from the job list
        raise RuntimeError(f"{m}: {int((~writer.done).sum())} rows not done at the end")
    for w in _summary_warnings(writer):
        if w not in run.manifest.warnings:
            run.manifest.warnings.append(w)
    failed = writer.failed_rows()
    share = len(failed) / n if n else 0.0
    s = {**writer.stats, **stats}
    run.manifest.metrics.update({
        "rows": n, "videos": len(writer.rows_of), "videos_this_run": s["videos"], "failed_rows": failed,
        "failed_videos": sorted(v for v, it in writer.items.items() if it.get("status") == "failed"),
        "failure_share": round(share, 6),
        "units_per_s": round(s["units"] / s["encode_s"], 2) if s.get("encode_s") else None,
        "videos_per_s": round(s["videos"] / (time.perf_counter() - t_start), 3) if s["videos"] else None,
    })
    run.manifest.timings.update({k: round(s.get(k, 0.0), 3) for k in
                                 ("encode_s", "prepare_s", "write_s", "decode_s", "decode_cpu_s",
                                  "decode_wait_s")})
    run.manifest.timings["total_s"] = round(time.perf_counter() - t_start, 3)
    writer.close()
    if share > cfg.max_failure_share:
        run.fail(f"{len(failed)} of {n} rows failed ({100 * share:.1f} %), more than max_failure_share "
                 f"{cfg.max_failure_share:g}; the partial output is kept and a rerun with a higher threshold "
                 f"finishes it without recomputing")
        return _open_result(store, m, run.manifest.key, run.manifest, False, n)
    writer.publish()
    run.manifest.items = dict(writer.items)
    with h5py.File(writer.final, "r") as f:
        shape, dtype = f[FEATURE_KEY].shape, f[FEATURE_KEY].dtype
    run.add_output(m, OUTPUT_FILES[m], shape=shape, dtype=dtype)
    run.complete()
    with contextlib.suppress(FileNotFoundError):
        writer.items_log.unlink()  # its content is in the manifest now
    return _open_result(store, m, run.manifest.key, run.manifest, False, n)


def extract_visual(dataset_dir: Path, cfg: ExtractConfig = ExtractConfig(), root: Path = Path("artifacts"),
                   **kwargs) -> ExtractResult:
    return extract(dataset_dir, cfg.model_copy(update={"modality": "visual"}), root, **kwargs)["visual"]


def extract_audio(dataset_dir: Path, cfg: ExtractConfig = ExtractConfig(), root: Path = Path("artifacts"),
                  **kwargs) -> ExtractResult:
    return extract(dataset_dir, cfg.model_copy(update={"modality": "audio"}), root, **kwargs)["audio"]


# ---- sharded: one shard's parts on a worker ---------------------------------------------------------------------
def plan_shards(dataset_dir: Path, shard_videos: int) -> list[list[str]]:
    """The dataset's videos in row order, `shard_videos` at a time (shard i is always the same videos)."""
    return shards.split(load_video_dataset(dataset_dir).video_ids(), shard_videos)


def planned_key(dataset_dir: Path, cfg: ExtractConfig, modality: str) -> str:
    """The stage key a merge of `modality` will open (locates and hashes the weight file; decodes nothing)."""
    ds = load_video_dataset(dataset_dir)
    one = cfg.model_copy(update={"modality": modality})
    return plan_stages(ds, one, resolve_device(cfg.device))[modality].key


def extract_shard(dataset_dir: Path, cfg: ExtractConfig, modalities: list[str], index: int, videos: list[str],
                  root: Path, progress: ProgressFn | None = None) -> dict[str, dict]:
    """Encode one shard's videos into its part folder per stage (or find it done), decoding each video once for
    all of them. Returns {modality: {"path", "reused", "videos", "failed", "threads"}}."""
    ds = load_video_dataset(dataset_dir)
    device = resolve_device(cfg.device)
    threads = cfg.threads or default_threads()
    # only the modalities asked for: a re-extraction of the fine-tuned visual features has no audio weights to locate
    plans = plan_stages(ds, cfg.model_copy(update={"modality": modalities[0] if len(modalities) == 1 else "both"}),
                        device)
    out, todo, built = {}, {}, {}
    for m in modalities:
        part = shards.Part(root, STAGES[m], plans[m].key, index, videos, {m: PART_FILES[m]})
        if part.done:
            out[m] = part.reused()
            continue
        todo[m] = (part, part.writer())
        # kept between the shards this worker runs (building the encoders cost more than a shard's videos)
        built[m] = encoders.build(cfg.encoder_spec(m), plans[m].weights, seed=cfg.seed, device=device,
                                  precision=plans[m].config["precision"], keep=True)
    if todo:
        by_id = {vid: ds.video_path(vid) for vid in videos}
        run_videos(list(by_id.items()), cfg.grid(), built, [w for _, w in todo.values()],
                   threads={m: threads for m in todo}, workers=0, decode_threads=cfg.decode_threads,
                   progress=progress)  # Dask's worker processes are daemonic: no decoding processes of their own
    for m, (part, writer) in todo.items():
        out[m] = part.publish(writer, threads, {m: built[m].describe()})
    return out
