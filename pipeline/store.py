"""The artifact store: content-addressed stage outputs under `<root>/<stage>/<key>/`.

A stage's key is a digest of (stage name, stage code version, the config fields it uses, the digests of its
inputs). Same inputs -> same key -> the finished output is reused; a changed input (say, fine-tuned encoder
weights) changes only the keys of the stages that read it. Each stage folder holds a `manifest.json` saying
what was computed from what, how long it took, and whether it is complete.

Writes are atomic (temporary name, then `os.replace`): a killed run leaves either the old file or a `.tmp`
leftover that is never mistaken for output, and a manifest says `complete` only after every output exists.
A run that computes an artifact holds its lock (`pipeline.locks`) from `open` to `complete`/`fail`, so runs that
share a store compute each artifact once: the second waits, then finds it complete and reuses it.

A complete artifact is reused only while its outputs are still the files the manifest recorded (`check_output`):
the size always; the sha256 of a file up to DIGEST_MAX_BYTES; for a bigger file (an AVE feature file is 16 GB: it
is never hashed on reuse) what its format says cheaply: an HDF5 file opens and holds a dataset of the recorded shape,
a .npy header gives the recorded shape. Only what a manifest recorded is checked (an old one without digests: the
size). A changed output is one `notice:` line and the stage recomputes, as `--force` would; with the process-wide
`reuse_policy.recompute` off (`--no-recompute`, `set_recompute`) it is one UserError naming the file.

This module knows nothing of particular stages; they describe themselves through `StageRun`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, Field

from pipeline.errors import UserError
from pipeline.locks import ArtifactLock

MANIFEST = "manifest.json"
KEY_CHARS = 16  # 64 bits of sha256: collisions are not a concern for a few thousand artifacts
# Outputs up to this size get a sha256 when written and have it checked when reused. sha256 runs at ~2 GB/s here
# (SHA-NI; ~0.5 GB/s without), so a file at the limit costs ~30-130 ms from the page cache and ~0.3-0.6 s from a
# 100-200 MB/s disk, and a pipeline reuses a few dozen outputs: reuse stays well under a second or two. What falls
# under it: manifests' JSON/CSV/PNG, CACE-Net checkpoints, small (test, demo) feature files. What does not: the AVE
# feature files (GBs) and fine-tuned encoder weights (~100 MB): their size and format checks are what reuse costs.
DIGEST_MAX_BYTES = 64 * 2**20
TRACKED_LIBRARIES = ("torch", "torchvision", "torchaudio", "numpy", "h5py", "decord", "panns-inference", "librosa")


# ---- digests ----------------------------------------------------------------------------------------------------
def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest_json(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stage_key(stage: str, version: str, config: dict, inputs: dict[str, str]) -> str:
    """Digest of everything that determines a stage's output. `inputs` maps input names to digests or keys."""
    return digest_json({"stage": stage, "version": version, "config": config, "inputs": inputs})[:KEY_CHARS]


# ---- atomic writes ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one step, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_comparison(out_dir: Path, notes: list[str], table: str, data: dict) -> tuple[Path, Path]:
    """A comparison's `comparison.md` (the notes in bold above the markdown table) and `comparison.json` (`data`
    with the notes), each written atomically; both tasks' compare commands write theirs so."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "comparison.md", out_dir / "comparison.json"
    with atomic_path(md) as tmp:
        Path(tmp).write_text("\n".join([*(f"**{n}**\n" for n in notes), table, ""]), encoding="utf-8")
    write_json_atomic(js, {**data, "notes": notes})
    return md, js


# ---- manifests --------------------------------------------------------------------------------------------------
class OutputFile(BaseModel):
    path: str  # relative to the stage folder
    bytes: int
    sha256: str | None = None
    shape: list[int] | None = None
    dtype: str | None = None


class Manifest(BaseModel):
    stage: str
    key: str
    version: str
    status: Literal["running", "complete", "failed"] = "running"
    created: str
    finished: str | None = None
    config: dict[str, Any] = {}
    inputs: dict[str, str] = {}
    outputs: dict[str, OutputFile] = {}
    timings: dict[str, float] = {}
    metrics: dict[str, Any] = {}
    items: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-item (e.g. per-video) status")
    warnings: list[str] = []
    error: str | None = None
    environment: dict[str, str] = {}


def environment() -> dict[str, str]:
    env = {"python": platform.python_version(), "platform": platform.platform()}
    for lib in TRACKED_LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            env[lib] = metadata.version(lib)
    return env


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StageRun:
    """An open stage folder: the stage writes its files into `dir`, records what it did, then calls `complete`."""

    def __init__(self, store: "ArtifactStore", manifest: Manifest, lock: ArtifactLock | None = None):
        self.store = store
        self.manifest = manifest
        self.dir = store.path(manifest.stage, manifest.key)
        self.lock = lock or store.lock(manifest.stage, manifest.key)
        self.reused = False  # set by `ArtifactStore.stage`: a complete artifact handed back as it is
        self._t0 = time.perf_counter()

    def save(self) -> None:
        write_json_atomic(self.dir / MANIFEST, self.manifest.model_dump())

    def add_output(self, name: str, relpath: str, *, shape=None, dtype=None, sha256: bool = False) -> None:
        """Record an output file: its size, and its sha256 when it is at most DIGEST_MAX_BYTES (what a reuse
        checks), or whatever its size when `sha256` asks (a digest the stage reports, e.g. fine-tuned weights')."""
        path = self.dir / relpath
        size = path.stat().st_size
        self.manifest.outputs[name] = OutputFile(
            path=relpath, bytes=size, sha256=file_sha256(path) if sha256 or size <= DIGEST_MAX_BYTES else None,
            shape=list(shape) if shape is not None else None, dtype=str(dtype) if dtype is not None else None)

    def output_path(self, name: str) -> Path:
        return self.dir / self.manifest.outputs[name].path

    @property
    def is_complete(self) -> bool:
        return self.manifest.status == "complete"

    @property
    def outputs_present(self) -> bool:
        """Every output the manifest records is still there (a complete artifact whose files were removed is not
        reused)."""
        return all((self.dir / o.path).is_file() for o in self.manifest.outputs.values())

    def changed(self) -> str | None:
        """'<file> changed since it was written (<what>)' for the first recorded output that is not what the stage
        wrote (`check_output`), None when every one still is."""
        return changed_output(self.dir, self.manifest)

    def restart(self) -> None:
        """Forget a previous result (`--force`): a fresh running manifest; the stage overwrites its files. Takes
        the artifact's lock first (waiting for a run that computes it), so no other run reads a half-rewritten
        folder."""
        self.lock.acquire()
        m = self.manifest
        self.manifest = Manifest(stage=m.stage, key=m.key, version=m.version, created=_now(), config=m.config,
                                 inputs=m.inputs, environment=environment())
        self.save()

    def complete(self) -> Manifest:
        missing = [o.path for o in self.manifest.outputs.values() if not (self.dir / o.path).is_file()]
        if missing:  # a stage bug, not user input: never mark complete what is not there
            raise RuntimeError(f"stage {self.manifest.stage}: outputs missing at completion: {missing}")
        self.manifest.timings.setdefault("total_s", round(time.perf_counter() - self._t0, 3))
        self.manifest.status, self.manifest.finished, self.manifest.error = "complete", _now(), None
        try:
            self.save()
        finally:
            self.lock.release()
        return self.manifest

    def fail(self, error: BaseException | str) -> None:
        """Record the failure (best effort: on a full or read-only disk the manifest stays `running`, which is
        not complete either) and release the lock; the original error is what the caller raises."""
        self.manifest.status, self.manifest.finished = "failed", _now()
        self.manifest.error = str(error)
        try:
            self.save()
        except (OSError, RuntimeError):
            pass
        finally:
            self.lock.release()


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lock(self, stage: str, key: str) -> ArtifactLock:
        return ArtifactLock(self.root, stage, key)

    def manifest(self, stage: str, key: str) -> Manifest | None:
        path = self.path(stage, key) / MANIFEST
        if not path.is_file():
            return None
        return read_manifest(path)

    def is_complete(self, stage: str, key: str) -> bool:
        """Complete and reusable as it is (`reusable`): a complete artifact whose outputs changed is not."""
        return self.reusable(stage, key)

    def reusable(self, stage: str, key: str, manifest: Manifest | None = None) -> bool:
        """Whether the artifact is complete and its recorded outputs are still what was written: the check a stage
        that looks before it opens (to skip building encoders) makes, the same as `stage`'s. A changed output is
        False here (the stage prints the notice when it recomputes), or with `--no-recompute` the UserError."""
        m = manifest if manifest is not None else self.manifest(stage, key)
        if m is None or m.status != "complete":
            return False
        change = changed_output(self.path(stage, key), m)
        if change is not None and not reuse_policy.recompute:
            raise UserError(_refusal(stage, key, change))
        return change is None

    def open(self, stage: str, version: str, config: dict, inputs: dict[str, str]) -> StageRun:
        """Open (or re-open, to resume) the folder of this stage + config + inputs.

        A re-opened folder keeps its manifest's per-item records so a stage can skip finished work. A folder that
        is not complete is returned with its lock held (after waiting for another run computing it, which may
        have completed it meanwhile: then it is returned complete, for reuse, without the lock).
        """
        key = stage_key(stage, version, config, inputs)
        previous = self.manifest(stage, key)
        if previous is not None and previous.status == "complete":
            return StageRun(self, previous)  # the caller reuses it (or calls restart() to force a recompute)
        lock = self.lock(stage, key)
        lock.acquire()
        previous = self.manifest(stage, key)  # what the run we may have waited for left
        if previous is not None and previous.status == "complete":
            lock.release()
            return StageRun(self, previous, lock)
        if previous is not None:
            previous.status, previous.error = "running", None
            run = StageRun(self, previous, lock)
        else:
            run = StageRun(self, Manifest(stage=stage, key=key, version=version, created=_now(), config=config,
                                          inputs=inputs, environment=environment()), lock)
        try:
            run.dir.mkdir(parents=True, exist_ok=True)
            run.save()
        except BaseException:
            lock.release()
            raise
        return run

    @contextlib.contextmanager
    def stage(self, stage: str, version: str, config: dict, inputs: dict[str, str], *,
              force: bool = False) -> Iterator[StageRun]:
        """The one way a stage runs in the store: open, reuse, restart on `force`, fail, complete.

            with store.stage(STAGE, VERSION, cfg.key_fields(), inputs, force=force) as run:
                if run.reused:
                    return result_of(run)
                ...write files into run.dir, run.add_output(...), run.manifest.metrics = ...

        - A complete artifact whose recorded outputs are all there as written (`StageRun.changed`) is handed back
          with `run.reused` True, no lock held, and left untouched by the block's end.
        - `force`, or a complete artifact with an output missing or changed (one `notice:` line; a UserError
          instead with `--no-recompute`): the folder is emptied under the artifact's lock and the stage starts
          from nothing (a fresh manifest).
        - Otherwise the folder is opened (or re-opened, so the stage can resume from its per-item records) with
          the lock held.
        - The block ends normally: a run still `running` is completed (its outputs must exist); one the block
          marked failed (`run.fail`) stays failed. The block raises: the run is marked failed with the reason.
          Either way the lock is released when the block ends.
        """
        run = self.open(stage, version, config, inputs)
        try:
            if run.is_complete and not force:
                seen = run.manifest
                change = run.changed()
                if change is not None:
                    if not reuse_policy.recompute:
                        raise UserError(_refusal(stage, seen.key, change))
                    _notify(f"notice: {stage} {seen.key}: {change}; recomputing")
                    run.lock.acquire()  # a run recomputing it meanwhile holds it: wait, then look again
                    now = self.manifest(stage, seen.key)
                    if now is not None and now.status == "complete" and now != seen:
                        run.manifest = now
                        change = run.changed()
                if change is None:
                    run.lock.release()
                    run.reused = True
                    yield run
                    return
            if run.is_complete or force:
                run.restart()
                _empty_folder(run.dir)
                run.save()
            try:
                yield run
            except BaseException as e:
                if run.manifest.status == "running":
                    run.fail(f"interrupted: {type(e).__name__}: {e}" if str(e) else f"interrupted: "
                                                                                    f"{type(e).__name__}")
                raise
            if run.manifest.status == "running":
                run.complete()
        finally:
            run.lock.release()

    def list(self, stage: str | None = None) -> list[Manifest]:
        """Every readable manifest under the root (or of one stage), newest first."""
        if not self.root.is_dir():
            return []
        pattern = f"{stage}/*/{MANIFEST}" if stage else f"*/*/{MANIFEST}"
        found = []
        for path in self.root.glob(pattern):
            with contextlib.suppress(UserError):
                found.append(read_manifest(path))
        return sorted(found, key=lambda m: m.created, reverse=True)

    def find(self, ref: str) -> Path:
        """Resolve what a user typed (a stage folder, a manifest file, `stage/key`, a key or key prefix)."""
        for candidate in (Path(ref), self.root / ref):
            if candidate.is_file() and candidate.name == MANIFEST:
                return candidate.parent
            if (candidate / MANIFEST).is_file():
                return candidate
        matches = [self.path(m.stage, m.key) for m in self.list() if m.key.startswith(ref) or m.stage == ref]
        if len(matches) == 1 or (matches and all(p.parent == matches[0].parent for p in matches)):
            return matches[0]  # a key, or a stage name: its newest artifact
        if not matches:
            raise UserError(f"no artifact matches {ref!r} under {self.root}; `avel inspect --root {self.root}` "
                            f"lists them")
        raise UserError(f"{ref!r} matches {len(matches)} artifacts; give more of the key")


# ---- reuse checks -----------------------------------------------------------------------------------------------
@dataclass
class ReusePolicy:
    recompute: bool = True  # False: a reused artifact whose output changed is an error (`--no-recompute`)


reuse_policy = ReusePolicy()


def set_recompute(recompute: bool) -> None:
    reuse_policy.recompute = recompute


def check_output(path: Path, recorded: OutputFile) -> str | None:
    """What differs between the file at `path` and its manifest record (`size 1000 != 5678`, ...), or None.

    Size first (a stat); then the sha256 where one was recorded and the file is at most DIGEST_MAX_BYTES; a file
    not checked by digest (bigger, or an old record without one) by its format's header: HDF5 opens and has a
    dataset of the recorded shape and dtype, a .npy header gives them. Never reads a big file's data."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if recorded.bytes is not None and size != recorded.bytes:
        return f"size {size} != {recorded.bytes}"
    if recorded.sha256 and size <= DIGEST_MAX_BYTES:
        digest = file_sha256(path)
        return None if digest == recorded.sha256 else f"sha256 {digest[:12]}... != {recorded.sha256[:12]}..."
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        return _check_hdf5(path, recorded.shape, recorded.dtype)
    if suffix == ".npy":
        return _check_npy(path, recorded.shape, recorded.dtype)
    return None


def changed_output(folder: Path, manifest: Manifest) -> str | None:
    """'<file> changed since it was written (<what>)' for the first of `manifest`'s outputs that differs."""
    for o in manifest.outputs.values():
        what = check_output(Path(folder) / o.path, o)
        if what is not None:
            return f"{Path(folder) / o.path} changed since it was written ({what})"
    return None


def _check_hdf5(path: Path, shape: list[int] | None, dtype: str | None) -> str | None:
    import h5py

    try:
        with h5py.File(path, "r", locking=False) as f:  # a reader elsewhere is no reason to recompute
            if shape is None:
                return None
            found: list[tuple[list[int], str]] = []
            f.visititems(lambda _, obj: found.append((list(obj.shape), str(obj.dtype)))
                         if isinstance(obj, h5py.Dataset) else None)
    except (OSError, ValueError, RuntimeError) as e:
        return f"not readable as HDF5: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if any(s == shape and (dtype is None or d == dtype) for s, d in found):
        return None
    return f"no dataset of shape {shape}{f' {dtype}' if dtype else ''} in it"


def _check_npy(path: Path, shape: list[int] | None, dtype: str | None) -> str | None:
    from numpy.lib import format as npy

    try:  # the header only
        with open(path, "rb") as f:
            version = npy.read_magic(f)
            found, _, found_dtype = (npy.read_array_header_1_0(f) if version == (1, 0) else
                                     npy.read_array_header_2_0(f))
    except (OSError, ValueError) as e:
        return f"not readable as .npy: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if shape is not None and list(found) != shape:
        return f"shape {list(found)} != {shape}"
    if dtype is not None and str(found_dtype) != dtype:
        return f"dtype {found_dtype} != {dtype}"
    return None


def _refusal(stage: str, key: str, change: str) -> str:
    return f"{stage} {key}: {change}; run again without --no-recompute to recompute it, or with --force"


def _notify(text: str) -> None:
    """One line for the person watching: the live display's, or stderr without one."""
    import sys

    from pipeline.progress import Reporter, reporter

    r = reporter()
    if type(r) is Reporter:
        print(text, file=sys.stderr, flush=True)
    else:
        r.note(text)


def _empty_folder(folder: Path) -> None:
    """Remove everything in a stage folder but its manifest (a forced or invalid artifact starts from nothing)."""
    for child in Path(folder).iterdir():
        if child.name == MANIFEST:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink(missing_ok=True)


def read_manifest(path: Path) -> Manifest:
    try:
        return Manifest.model_validate_json(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable manifest ({str(e).splitlines()[0]})") from None
