"""Where computation runs and how it is seeded: resolve the device once, seed once, load torch files safely."""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` -> cuda when available, else cpu. An explicit device that is not there is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available here; use --device cpu or auto")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds CUDA too


_DEFAULT_THREADS = torch.get_num_threads()  # torch's choice at import (the machine's cores), before any pinning


def default_threads() -> int:
    return _DEFAULT_THREADS


@contextlib.contextmanager
def pinned_threads(n: int):
    """Run the block with exactly `n` intra-op CPU threads (restored after). fp32 convolutions on the CPU give
    different bits for different thread counts (measured: ResNet-50, 1 vs 2 threads), so a stage that promises
    byte-identical output pins the count and records it."""
    before = torch.get_num_threads()
    if n and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


# ---- precision ---------------------------------------------------------------------------------------------------
PRECISIONS = ("auto", "fp32", "bf16")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with native bf16 matrix arithmetic


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The CPU's native-bf16 feature flags (AMX-BF16, AVX512-BF16), read from /proc/cpuinfo; [] where unknown.

    Detected, never assumed: without them oneDNN emulates bf16 and it is far slower than fp32 (measured on an
    AMD EPYC with AVX2 only: ResNet-50 1.6 frames/s in bf16 against 17.0 in fp32; a 512x512 product 1.5 against
    127 GFLOPS); with AMX the same trunk ran 4.9x faster than fp32. `AVEL_CPU_FLAGS="amx_bf16"` (or "") stands in
    for the CPU's flags, to run the bf16 path's tests on a CPU without it."""
    if cpuinfo is None and os.environ.get("AVEL_CPU_FLAGS") is not None:
        cpuinfo = "flags : " + os.environ["AVEL_CPU_FLAGS"]  # stands in for the CPU's flags (testing the bf16 path)
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return [f for f in CPU_BF16_FLAGS if f in flags]


def fast_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(cpu_bf16_flags())


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` -> "bf16" where the device computes bf16 natively (CUDA with bf16; a CPU with AMX or AVX512-BF16),
    "fp32" elsewhere. An explicit choice is kept (bf16 on a CPU without those units is slow but correct)."""
    if name not in PRECISIONS:
        raise UserError(f"unknown precision {name!r}; use {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return name


def precision_note(name: str, device: torch.device) -> str:
    """One line saying which precision runs and why (for the terminal)."""
    used = resolve_precision(name, device)
    if device.type == "cpu":
        flags = cpu_bf16_flags()
        why = f"CPU has {', '.join(flags)}" if flags else "CPU has no AMX/AVX512-BF16 (bf16 would be emulated)"
    else:
        why = "CUDA bf16 " + ("supported" if fast_bf16(device) else "not supported")
    if used == "bf16" and not fast_bf16(device):
        why += ": expect it several times slower than fp32 (measured 10x for ResNet-50 on an AVX2 CPU)"
    return f"precision {used} ({'auto: ' if name == 'auto' else 'asked; '}{why})"


def autocast(device: torch.device, precision: str):
    """bf16 autocast when `precision` (resolved) is bf16, on the CPU or CUDA; a no-op context for fp32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# ---- process-wide CPU settings ------------------------------------------------------------------------------------
_flush_denormal = False


def configure_process() -> None:
    """Settings for a whole pipeline process, called by its entry points (the CLI, the flows, the tests) before any
    torch work, so that torch's CPU worker threads, created later, inherit them:
    flush subnormal floats to zero. The mode is per thread and new threads copy their creator's: set later, it
    would reach only the calling thread (seen: the localizer's epochs slowed from 3.4 to 9.5 s in a flow whose
    extraction had already started the thread pool; 12.6 s with no flushing, on an Intel CPU whose microcode
    handles subnormals slowly. An AMD EPYC measured here shows no such penalty). Every stage of such a process,
    extraction included, then computes with the same mode, so its bytes do not depend on which stage ran first."""
    global _flush_denormal
    _flush_denormal = bool(torch.set_flush_denormal(True))


@contextlib.contextmanager
def flush_denormals():
    """Flush subnormals for the block on the calling thread (for library callers that did not configure the
    process); a process configured by `configure_process` keeps its setting after the block."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(_flush_denormal)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters
_GLIBC_DEFAULT_MMAP_MAX, _GLIBC_DEFAULT_TRIM = 65536, 128 * 1024


@contextlib.contextmanager
def heap_allocations():
    """Serve large tensors from the malloc heap for the block, instead of a fresh mmap for each (glibc only).

    glibc maps every allocation over its mmap threshold (at most 32 MB) afresh and unmaps it on free, so a training
    step that allocates the localizer's [640, 49, 512] maps (64 MB each) dozens of times pays a page fault per 4 KB
    each time: 47 s of system time in 107 s for 3+3 benchmark steps. With mmap off and trimming deferred, the
    freed blocks are reused: 4.30 -> 3.41 s per step (measured, AVE-sized batch of 64, 2 threads). After the block
    the defaults come back and free heap memory is returned to the system (malloc_trim)."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**30)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _GLIBC_DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_TRIM)
        libc.malloc_trim(0)


def _glibc():
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def load_torch_file(path: Path, what: str) -> Any:
    """torch.load with weights_only (no code execution from a downloaded file) and a clear error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean "not a checkpoint we can read"
        raise UserError(f"{path}: not a readable PyTorch {what} ({str(e).splitlines()[0][:160]})") from None


def worker_options(workers: int) -> dict[str, Any]:
    """DataLoader arguments for `workers` worker processes: a fork server's context, and an init function that ends
    each worker when the process that started the loader dies (however it dies, kill -9 included).

    Why the fork server: under Prefect the process has an event-loop thread and log handlers; a worker forked from
    it can die at exit (seen: "DataLoader worker exited unexpectedly with exit code 1" in the fine-tuning stage).
    The fork server is a clean process that imports torch and the decoders once, so each worker still starts in
    milliseconds.

    Why the watch: torch's own worker watchdog checks the worker's parent, which here is the fork server, and the
    fork server only exits when every process holding its "alive" pipe has, workers included. So after a kill -9 of
    the main process the workers and the fork server kept each other alive, orphaned, indefinitely (measured:
    more than 20 minutes). Each worker now watches the main process itself (a pidfd, so a reused pid cannot fool
    it) and exits when it is gone; the fork server follows once its last worker has.
    """
    if workers == 0:
        return {}
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "numpy", "decord", "av", "pipeline.media"])
    return {"multiprocessing_context": ctx, "worker_init_fn": ExitWithProcess(os.getpid())}


class ExitWithProcess:
    """Picklable worker_init_fn: a daemon thread in the worker that ends it when process `pid` has ended."""

    def __init__(self, pid: int):
        self.pid = pid

    def __call__(self, worker_id: int | None = None) -> None:
        import threading

        threading.Thread(target=_exit_when_gone, args=(self.pid,), daemon=True, name="avel-exit-with-parent").start()


def _exit_when_gone(pid: int) -> None:
    import select
    import time

    try:
        fd = os.pidfd_open(pid)  # Linux >= 5.3: readable once the process has exited
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd here: poll the pid (a reused pid would keep the worker alive)
        fd = None
    if fd is not None:
        select.select([fd], [], [])
    else:
        while True:
            time.sleep(1.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                continue
    os._exit(1)  # no cleanup: the process we worked for is gone, and nothing of ours must outlive it
