"""Where computation runs and how it is seeded: resolve the device once, seed once, load torch files safely."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def flush_denormals():
    """Treat subnormal floats as zero on the CPU for the block (then back to torch's default, off).

    The localizer's training on the demo slowed from 3.9 s to 12.6 s per epoch over its first 4 epochs as values
    in the optimizer state and activations became subnormal (x86 handles them in microcode); flushed, it stays at
    3.4-4 s. The mode is per CPU thread: torch's worker threads started before this (by the encoders earlier in
    a pipeline process) keep theirs, so there it only reaches the calling thread. Scoped to training so that
    extraction in the same process is computed exactly as in any other."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA only: on CPU it is about 6x slower here (../shared/notes/stack.md)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def load_torch_file(path: Path, what: str) -> Any:
    """torch.load with weights_only (no code execution from a downloaded file) and a clear error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean "not a checkpoint we can read"
        raise UserError(f"{path}: not a readable PyTorch {what} ({str(e).splitlines()[0][:160]})") from None


def worker_context(workers: int):
    """Multiprocessing context for DataLoader workers: a fork server, not a fork of this process.

    Under Prefect the process has an event-loop thread and log handlers; a worker forked from it can die at exit
    (seen: "DataLoader worker exited unexpectedly with exit code 1" in the fine-tuning stage). The fork server is
    a clean process that imports torch and the decoders once, so each worker still starts in milliseconds.
    """
    if workers == 0:
        return None
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "numpy", "decord", "av", "pipeline.media"])
    return ctx
