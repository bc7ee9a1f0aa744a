"""Several training processes on one machine (torch.distributed): the glue that fine-tuning and training share.

What this module owns:
- `launch(fn, args, nproc, device)`: N worker processes through torch's elastic launcher (what `torchrun
  --standalone --nproc-per-node N` runs: a c10d rendezvous on a free localhost port, spawned workers, no
  restarts); each worker joins the process group (gloo on the CPU, nccl on CUDA with one device per rank, its
  LOCAL_RANK), runs `fn(*args)` and leaves the group. Rank 0's return value comes back; a `UserError` raised in a
  worker comes back as the same `UserError`, any other failure as one RuntimeError naming the rank.
- rank / world helpers (`active`, `rank`, `world_size`, `is_main`, `local_device`), `barrier`, and
  `main_writes()`: rank 0 writes, every rank then waits at a barrier.
- `shard`: this rank's contiguous share of a global batch (the global batch is what one process would train on);
  `loss_weight`: the factor that makes DDP's gradient average equal the global batch's mean-loss gradient.
- collectives for the loops: `gather_rows` (an autograd-aware all_gather of rows, sizes may differ per rank),
  `sum_all` (floats summed over ranks), `gather_objects`.
- `wrap` (DistributedDataParallel) and `sync_batchnorm`.

No training logic lives here. Stages call these helpers only when a process group is running (`active()`), so a
single-process run never touches torch.distributed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from pipeline.errors import UserError

ERROR_FILE = "rank-{rank}.error"


# ---- who am I -----------------------------------------------------------------------------------------------------
def active() -> bool:
    """True inside a worker of `launch` (a process group is initialised)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """The rank's own device: cuda:LOCAL_RANK for a CUDA run inside a process group, `device` otherwise."""
    if active() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def _comm_device() -> torch.device:
    """Where collective tensors must live: the rank's GPU under nccl, the CPU under gloo."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---- process group ------------------------------------------------------------------------------------------------
def init(device: torch.device) -> torch.device:
    """Join the process group described by the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT): nccl and cuda:LOCAL_RANK for CUDA, gloo and the CPU otherwise. Returns the rank's device."""
    if device.type == "cuda":
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
        return dev
    dist.init_process_group("gloo")
    return torch.device("cpu")


def teardown() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def main_writes():
    """`with main_writes() as main: if main: <write>`: rank 0 writes, then every rank waits for it (a barrier), so
    no rank reads or moves on before the file is there. Outside a process group: yields True, no barrier."""
    yield is_main()
    barrier()


# ---- batches ------------------------------------------------------------------------------------------------------
def shard(batch, rank_: int | None = None, world: int | None = None):
    """This rank's contiguous share of a global batch (a slice of the list or tensor), in `np.array_split` order:
    ranks 0..W-1 hold the batch in order, shares differ by at most one item (B=4, W=2: items 0-1 and 2-3; B=5: 0-2
    and 3-4; B=1: 0 and none)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    n = len(batch)
    start = rank_ * (n // world) + min(rank_, n % world)
    stop = start + n // world + (1 if rank_ < n % world else 0)
    return batch[start:stop]


def loss_weight(n_local: int, n_global: int, world: int | None = None) -> float:
    """The factor for a rank's batch-mean loss so that DDP's gradient (the average over ranks) equals the gradient
    of the mean over the global batch: sum_r (n_r W / N) g_r / W = sum_r n_r g_r / N. 0 for an empty share."""
    return n_local * (world_size() if world is None else world) / n_global if n_global else 0.0


# ---- collectives --------------------------------------------------------------------------------------------------
def sum_all(values: Sequence[float]) -> list[float]:
    """Each value summed over the ranks (float64); the values themselves outside a process group."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def all_counts(n: int) -> list[int]:
    """Every rank's `n`, in rank order ([n] outside a process group)."""
    if not active():
        return [int(n)]
    t = torch.tensor([int(n)], dtype=torch.int64, device=_comm_device())
    out = torch.empty(world_size(), dtype=torch.int64, device=t.device)
    dist.all_gather_single(out, t)
    return out.cpu().tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(all ranks' rows of x concatenated in rank order, the offset of this rank's rows), keeping the gradient.

    The gather is torch's functional all_gather with autograd (`all_gather_single_autograd`): its backward is a
    reduce-scatter (sum), so this rank's rows also receive the gradient of every other rank's loss terms that use
    them (as InfoNCE negatives). `dist.all_gather` into fresh tensors would cut exactly that part of the gradient.
    Ranks may hold different numbers of rows (a video that failed to decode): rows are padded to the largest count
    for the collective and the padding is dropped after."""
    if not active():
        return x, 0
    from torch.distributed import _functional_collectives as funcol

    counts = all_counts(x.shape[0])
    most = max(counts)
    padded = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, most - x.shape[0])) if most > x.shape[0] else x
    # an AsyncCollectiveTensor: it waits at its first use (its .wait() would return the bare tensor, off the graph)
    gathered = funcol.all_gather_single_autograd(padded.contiguous(), 0, dist.group.WORLD)
    if any(c != most for c in counts):
        keep = torch.cat([torch.arange(r * most, r * most + c, device=x.device) for r, c in enumerate(counts)])
        gathered = gathered.index_select(0, keep)
    return gathered, int(sum(counts[:rank()]))


# ---- models -------------------------------------------------------------------------------------------------------
def wrap(model: torch.nn.Module, device: torch.device, find_unused_parameters: bool = False):
    """DistributedDataParallel around `model` (gradients averaged over ranks in backward; rank 0's parameters and
    buffers broadcast at construction, its buffers again before each forward). `model` itself stays the object to
    save, evaluate and read attributes from; only the training forward goes through the wrapper."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=device.index if ids else None,
                                   find_unused_parameters=find_unused_parameters)


def sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with its BatchNorm layers as SyncBatchNorm (statistics over the global batch in training). Same
    parameters and state-dict keys. torch implements SyncBatchNorm for GPUs only, not for the CPU (gloo)."""
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)


def seed_rank(*entropy: int) -> None:
    """Seed this rank's torch RNG from (entropy..., rank): every rank draws its own dropout masks, and a resumed run
    draws what an uninterrupted one would."""
    seed = int(np.random.SeedSequence([*(int(e) for e in entropy), rank()]).generate_state(1)[0])
    torch.manual_seed(seed)


# ---- launching ----------------------------------------------------------------------------------------------------
def cpu_threads_per_rank(nproc: int) -> int:
    """Intra-op threads per CPU rank: the machine's cores shared out (as torchrun's OMP_NUM_THREADS=1 default
    avoids oversubscription; here each rank keeps its share)."""
    from pipeline.runtime import default_threads

    return max(1, default_threads() // max(nproc, 1))


def picklable(callback: Callable | None, fallback: Callable) -> Callable | None:
    """`callback` if it can be sent to a worker process (a module-level function), else `fallback` (None stays)."""
    import pickle

    if callback is None:
        return None
    try:
        pickle.dumps(callback)
    except Exception:  # noqa: BLE001  (closures and lambdas raise several types)
        return fallback
    return callback


def launch(fn: Callable[..., Any], args: Sequence[Any], nproc: int, device: torch.device) -> Any:
    """Run `fn(*args)` in `nproc` processes (ranks 0..nproc-1) through torch's elastic launcher and return rank 0's
    result. `fn` must be importable by name (spawned workers import it) and `args` picklable.

    Standalone rendezvous as `torchrun --standalone`: c10d on localhost, a free port, a fresh run id; no restarts
    (a failed rank ends the others). CUDA: one GPU per rank, so nproc must not exceed the visible GPUs."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise UserError(f"--nproc {nproc} on CUDA needs {nproc} GPUs (one per process), {torch.cuda.device_count()} "
                        f"visible; lower --nproc or use --device cpu")
    with tempfile.TemporaryDirectory(prefix="avel-ddp-") as tmp:
        # SIGINT and SIGTERM stay with the caller (the CLI's one-line interrupt, or Python's KeyboardInterrupt):
        # the agent's handlers would pass a Ctrl-C on to the ranks, which ignore it (see `_worker`), and wait 30 s
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                              monitor_interval=0.1, start_method="spawn", local_addr="localhost",
                              logs_specs=DefaultLogsSpecs(log_dir=str(Path(tmp) / "logs")),
                              signals_to_handle="SIGHUP,SIGQUIT")
        threads = cpu_threads_per_rank(nproc) if device.type == "cpu" else 0
        try:
            with _quiet_elastic_logs(), _signal_handlers_kept():
                results = elastic_launch(config, _worker)(fn, tuple(args), device, threads, tmp, os.getpid())
        except ChildFailedError as e:
            messages = sorted(Path(tmp).glob("rank-*.error"))
            if messages:  # a UserError in a rank (the others then fail for want of it: not news)
                raise UserError(messages[0].read_text(encoding="utf-8")) from None
            first, failure = e.get_first_failure()
            why = failure.message
            if isinstance(why, dict):  # the worker's error record: its message and traceback
                stack = why.get("extraInfo", {}).get("py_callstack")
                if stack:
                    sys.stderr.write(f"rank {first}: {stack}")
                why = why.get("message", why)
            raise RuntimeError(f"{nproc}-process run failed (rank {first}): {why}") from None
    return results.get(0)


@contextlib.contextmanager
def _signal_handlers_kept():
    """The process's signal handlers as they were before the block: the elastic agent installs its own for the
    signals it handles and leaves them behind. An interrupt (KeyboardInterrupt from the caller's handler) ends the
    agent's loop; its shutdown sends the ranks SIGTERM."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            if handler is not None:
                signal.signal(s, handler)


@contextlib.contextmanager
def _quiet_elastic_logs():
    """The elastic agent logs every worker failure with its traceback, and the ranks that fail because another one
    did; `launch` reports the root failure itself, once."""
    import logging

    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name.startswith("torch.distributed.elastic")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _worker(fn: Callable[..., Any], args: tuple, device: torch.device, threads: int, tmp: str,
            parent: int) -> Any:
    """One rank: the process settings of the CLI, the process group, `fn(*args)`, and a note for the launcher if
    `fn` raised a UserError (the launcher turns it back into one)."""
    import signal

    from pipeline.runtime import ExitWithProcess, configure_process

    # a terminal's Ctrl-C reaches every process of its group: the launching process decides, and its agent ends the
    # ranks with SIGTERM (a rank that acted on it alone could leave its peer waiting in a collective, or print)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ExitWithProcess(parent)()  # nothing outlives the command that launched the ranks
    configure_process()
    if threads:
        torch.set_num_threads(threads)
    init(device)
    try:
        return fn(*args)
    except UserError as e:  # for the launcher, which raises it again; exit without a traceback in the log
        Path(tmp, ERROR_FILE.format(rank=rank())).write_text(str(e), encoding="utf-8")
        raise SystemExit(2) from None
    finally:
        teardown()
