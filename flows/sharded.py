"""Sharded extraction on a Dask cluster, through Prefect (`prefect_dask.DaskTaskRunner`): AVE and dense.

One Prefect task per shard (fixed shards of videos, one part each, a finished part is skipped), run on the cluster's
workers; then one merge task writes the same artifact and manifest as a single-process run:
- AVE (`pipeline.ave.extract.extract_shard`): part folders -> `visual.h5` / `audio.h5`, as `avel extract`;
- dense (`pipeline.dense.extract.extract_shard`): part folders -> the `dense_extract` folder, as `avel dense extract`.
Parts, their validation and the merge are `pipeline.extraction.shards`, the same for both tasks.
`cluster`:
- `local:N`: a temporary local cluster of N worker processes, one task at a time each. With GPUs, one worker per
  GPU (N of them at most), each pinned to its GPU by CUDA_VISIBLE_DEVICES and offering the resource GPU=1;
  without, CPU workers with cores / N torch threads each (set at spawn: a nanny's default is 1).
- `tcp://HOST:8786`: an existing scheduler (start it with `dask scheduler`, and per GPU
  `CUDA_VISIBLE_DEVICES=k dask worker tcp://HOST:8786 --nthreads 1 --resources GPU=1`).
Shard tasks are annotated with resources GPU=1 when the encoders run on CUDA (`gpu_tasks`), so a CPU-only worker
never gets one. Pitfalls avoided (`shared/notes/scale-out.md`): the workers reach the flow's Prefect server through
PREFECT_API_URL (otherwise each starts its own temporary server); decoding stays in the worker's process (Dask's
workers are daemonic); each task opens and closes its own HDF5 file. A worker keeps its encoders between shards
(`extractors.kept_extractor`), and an AVE shard decodes each video once for both modalities.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipeline.errors import UserError


@task(name="extract-shard", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def extract_shard_task(dataset: str, extract_cfg: dict, root: str, modalities: list[str], index: int,
                       videos: list[str]) -> dict:
    from pipeline.ave.extract import ExtractConfig, extract_shard

    cfg = ExtractConfig.model_validate(extract_cfg)
    parts = extract_shard(Path(dataset), cfg, modalities, index, videos, Path(root))
    return {"index": index, "pid": os.getpid(), "reused": all(p["reused"] for p in parts.values()),
            "parts": parts}


@task(name="merge-shards", task_run_name="merge {modality} shards", cache_policy=NO_CACHE)
def merge_task(dataset: str, extract_cfg: dict, root: str, modality: str, parts: list[str], force: bool) -> dict:
    from pipeline.ave.extract import STAGES, ExtractConfig, extract
    from pipeline.extraction.shards import read_part, remove_parts
    from pipeline.progress import reporter

    cfg = ExtractConfig.model_validate(extract_cfg)
    threads = {read_part(Path(p))["threads"] for p in parts}
    if len(threads) == 1:  # the final file records the thread count its rows were computed with
        cfg = cfg.model_copy(update={"threads": threads.pop()})
    label = f"merge {modality}"
    reporter().start(label, None)
    t0 = time.perf_counter()
    r = extract(Path(dataset), cfg.model_copy(update={"modality": modality}), Path(root), force=force,
                parts={modality: [Path(p) for p in parts]},
                progress=lambda d, n, vid: reporter().update(label, d, n, "videos"))[modality]
    reporter().finish(label, r.reused, time.perf_counter() - t0)
    if r.manifest.status == "complete":
        remove_parts(Path(root), STAGES[modality], r.key)
    return {"modality": modality, "path": str(r.path), "key": r.key, "reused": r.reused,
            "failed_rows": len(r.failed_rows), "random_init": r.random_init}


@flow(name="avel-sharded-extract", log_prints=True)
def sharded_extract_flow(dataset: str, extract_cfg: dict, root: str, shard_videos: int = 32, force: bool = False,
                         gpu_tasks: bool = False) -> dict:
    from pipeline.ave.extract import STAGES, ExtractConfig, plan_shards, planned_key
    from pipeline.extraction.shards import remove_parts
    from pipeline.store import ArtifactStore

    cfg = ExtractConfig.model_validate(extract_cfg)
    shards = plan_shards(Path(dataset), shard_videos)
    store = ArtifactStore(Path(root))
    out, todo = {}, []
    for m in cfg.modalities():
        key = planned_key(Path(dataset), cfg, m)
        if not force and store.is_complete(STAGES[m], key):
            out[m] = merge_task(dataset, extract_cfg, root, m, [], False)  # reused: opens nothing new
            continue
        if force:
            remove_parts(Path(root), STAGES[m], key)
        todo.append(m)
    if not todo:
        return out
    # one task per shard for all the modalities to do: each video is decoded once
    done = run_shards(f"extract {'+'.join(todo)} shards", extract_shard_task,
                      [(dataset, extract_cfg, root, todo, i, vids) for i, vids in enumerate(shards)], gpu_tasks)
    for m in todo:
        per_shard = [{"index": d["index"], "pid": d["pid"], **d["parts"][m]} for d in done]
        out[m] = {**merge_task(dataset, extract_cfg, root, m, [d["path"] for d in per_shard], force),
                  "shards": per_shard}
    return out


def run_shards(label: str, shard_task, shard_args: list[tuple], gpu_tasks: bool) -> list[dict]:
    """Submit one task per shard (annotated GPU=1 when the encoders run on CUDA) and collect the results in shard
    order (the merge writes rows in the single-process order), with live progress."""
    import dask

    from pipeline.progress import reporter

    reporter().start(label, len(shard_args))
    name = label.removesuffix("s")  # each shard's task run: "extract audio+visual shard 3/12"
    with dask.annotate(**({"resources": {"GPU": 1}} if gpu_tasks else {})):
        futures = [shard_task.with_options(task_run_name=f"{name} {i}/{len(shard_args)}").submit(*args)
                   for i, args in enumerate(shard_args, 1)]
    done = []
    t0 = time.perf_counter()
    for n, f in enumerate(futures, 1):
        done.append(f.result())
        reporter().update(label, n, len(shard_args), "shards")
    reporter().finish(label, all(d["reused"] for d in done), time.perf_counter() - t0)
    return done


# ---- dense ------------------------------------------------------------------------------------------------------
@task(name="dense-extract-shard", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def dense_shard_task(annotations: str, extract_cfg: dict, root: str, index: int, videos: list[str]) -> dict:
    from pipeline.dense.extract import DenseExtractConfig, extract_shard

    cfg = DenseExtractConfig.model_validate(extract_cfg)
    return {"index": index, "pid": os.getpid(), **extract_shard(Path(annotations), cfg, index, videos, Path(root))}


@task(name="dense-merge-shards", task_run_name="dense merge shards", cache_policy=NO_CACHE)
def dense_merge_task(annotations: str, extract_cfg: dict, root: str, parts: list[str], force: bool) -> dict:
    from pipeline.dense.extract import STAGE, DenseExtractConfig, dense_extract
    from pipeline.extraction.shards import remove_parts
    from pipeline.progress import reporter

    cfg = DenseExtractConfig.model_validate(extract_cfg)
    label = "merge dense parts"
    reporter().start(label, None)
    t0 = time.perf_counter()
    r = dense_extract(Path(annotations), cfg, Path(root), force=force, parts=[Path(p) for p in parts],
                      progress=lambda d, n, vid: reporter().update(label, d, n, "videos"))
    reporter().finish(label, r.reused, time.perf_counter() - t0)
    if not r.reused:
        remove_parts(Path(root), STAGE, r.dir.name)
    return {"dir": str(r.dir), "features": str(r.features), "key": r.dir.name, "reused": r.reused,
            "failed": len(r.failed)}


@flow(name="avel-sharded-dense-extract", log_prints=True)
def sharded_dense_extract_flow(annotations: str, extract_cfg: dict, root: str, force: bool = False,
                               gpu_tasks: bool = False) -> dict:
    from pipeline.dense.extract import STAGE, DenseExtractConfig, plan_shards
    from pipeline.extraction.shards import remove_parts
    from pipeline.store import ArtifactStore

    cfg = DenseExtractConfig.model_validate(extract_cfg)
    key, shards = plan_shards(Path(annotations), cfg)
    if not force and ArtifactStore(Path(root)).is_complete(STAGE, key):
        return dense_merge_task(annotations, extract_cfg, root, [], False)  # reused: computes nothing
    if force:
        remove_parts(Path(root), STAGE, key)
    done = run_shards("dense extract shards", dense_shard_task,
                      [(annotations, extract_cfg, root, i, vids) for i, vids in enumerate(shards)], gpu_tasks)
    return {**dense_merge_task(annotations, extract_cfg, root, [d["path"] for d in done], force), "shards": done}


def run_sharded_dense_extract(annotations: Path, extract_cfg: dict, root: Path, force: bool = False,
                              gpu_tasks: bool | None = None) -> dict:
    """The sharded dense extraction flow on `extract_cfg["cluster"]` (see `run_sharded_extract`)."""
    runner = task_runner(extract_cfg["cluster"])
    ensure_api_url()
    return sharded_dense_extract_flow.with_options(task_runner=runner)(
        annotations=str(annotations), extract_cfg=extract_cfg, root=str(root), force=force,
        gpu_tasks=_gpu_tasks(extract_cfg, gpu_tasks))


def _gpu_tasks(extract_cfg: dict, gpu_tasks: bool | None) -> bool:
    """None: annotate GPU=1 when this machine has CUDA and the config does not force the CPU."""
    import torch

    if gpu_tasks is None:
        return torch.cuda.is_available() and extract_cfg.get("device", "auto") != "cpu"
    return gpu_tasks


def task_runner(cluster: str):
    """A DaskTaskRunner for `local:N` or a scheduler address; a clear error for anything else."""
    from prefect_dask import DaskTaskRunner

    if cluster.startswith("local:"):
        try:
            n = int(cluster.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise UserError(f"--cluster {cluster!r}: local:N with N >= 1 workers, e.g. local:2")
        return DaskTaskRunner(cluster_class="distributed.SpecCluster", cluster_kwargs=local_cluster_spec(n))
    if cluster.startswith(("tcp://", "tls://", "ucx://")):
        return DaskTaskRunner(address=cluster)
    raise UserError(f"--cluster {cluster!r}: local:N (a local Dask cluster of N workers) or tcp://HOST:PORT (an "
                    f"existing scheduler)")


def local_cluster_spec(n: int) -> dict:
    """SpecCluster arguments: n worker processes running one task at a time; with GPUs one per GPU, pinned and
    GPU=1; without, cores / n torch threads each.

    The thread count goes through dask's `distributed.nanny.pre-spawn-environ` (this process's dask config, read
    when the cluster starts): a nanny starts its worker with OMP_NUM_THREADS=1 there, and torch fixes its thread
    count at import, before a nanny's `env` applies (measured: a CPU worker of `local:1` on 2 cores ran on 1
    thread)."""
    import dask
    import torch
    from distributed import Scheduler

    gpus = torch.cuda.device_count()
    threads = 1 if gpus else max(1, (os.cpu_count() or 1) // n)
    dask.config.set({"distributed.nanny.pre-spawn-environ.OMP_NUM_THREADS": threads,
                     "distributed.nanny.pre-spawn-environ.MKL_NUM_THREADS": threads})
    workers = {}
    for i in range(min(n, gpus) if gpus else n):
        options = {"nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": str(i) if gpus else ""},
                   "dashboard_address": None, "silence_logs": 40, "preload": [__name__]}  # dask_setup below
        if gpus:
            options["resources"] = {"GPU": 1}
        workers[f"worker-{i}"] = {"cls": _quick_nanny, "options": options}
    return {"workers": workers, "scheduler": {"cls": Scheduler, "options": {"dashboard_address": None}},
            "silence_logs": 40}


def _quick_nanny(*args, **kwargs):
    """A Nanny that kills its worker process 1.6 s after asking it to close (Dask's: 4 s). An interrupted command
    closes its cluster while the workers are inside a shard, which only ends with the process (its part is built
    under a temporary name, so a killed one is redone by the next run); the cluster's close waited the 4 s."""
    from distributed import Nanny

    class QuickNanny(Nanny):
        async def close(self, timeout: float = 2, reason: str = "nanny-close"):
            return await super().close(timeout=timeout, reason=reason)

    return QuickNanny(*args, **kwargs)


def dask_setup(worker) -> None:
    """Run in each worker process of a `local:N` cluster as it starts (this module is its preload): ignore SIGINT.
    A terminal's Ctrl-C reaches every process of its group; a worker that acted on it died mid-shard and its nanny
    waited 4 s before killing it, while the command, which owns the cluster, stops and closes it anyway."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def ensure_api_url() -> None:
    """Workers must report to this flow's Prefect server: give them its URL in the environment they inherit.
    Without a configured server, start Prefect's temporary one now (the flow then uses it too)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        url = start_temporary_server().api_url
    os.environ["PREFECT_API_URL"] = url


def start_temporary_server():
    """Start Prefect's temporary local server now (the instance its client would start on first use, so the flows
    use this one), in a session of its own: a terminal's Ctrl-C goes to the whole foreground process group, and
    the server, killed first, left the interrupted flow to retry its last API calls for minutes. The command stops
    it (`flows.pipeline.stop_temporary_server`, also on an interrupt); after a kill -9 the reaper does, as the
    server carries the run's token. No-op once started."""
    import functools
    import subprocess
    import types

    from prefect.server.api import server as prefect_server

    server = prefect_server.SubprocessASGIServer()
    if server.running:
        return server
    spawn = server._run_uvicorn_command

    def in_own_session():  # the same command, with Popen(start_new_session=True), for this call only
        own = types.SimpleNamespace(**vars(subprocess))
        own.Popen = functools.partial(subprocess.Popen, start_new_session=True)
        prefect_server.subprocess, before = own, prefect_server.subprocess
        try:
            return spawn()
        finally:
            prefect_server.subprocess = before

    server._run_uvicorn_command = in_own_session
    server.start()
    return server


def run_sharded_extract(dataset: Path, extract_cfg: dict, root: Path, cluster: str, shard_videos: int = 32,
                        force: bool = False, gpu_tasks: bool | None = None) -> dict:
    """The sharded AVE extraction flow on `cluster`; `gpu_tasks` None: annotate GPU=1 when this machine has CUDA
    and the config does not force the CPU."""
    runner = task_runner(cluster)
    gpu_tasks = _gpu_tasks(extract_cfg, gpu_tasks)
    ensure_api_url()
    return sharded_extract_flow.with_options(task_runner=runner)(
        dataset=str(dataset), extract_cfg=extract_cfg, root=str(root), shard_videos=shard_videos, force=force,
        gpu_tasks=gpu_tasks)
