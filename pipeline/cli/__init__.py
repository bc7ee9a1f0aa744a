"""The `avel` command line: builds `app` from the AVE commands (`pipeline.cli.ave`) and the dense sub-app
(`pipeline.cli.dense`, as `avel dense`), and runs it (`main`, the `avel` entry point).

The commands are thin: they parse arguments, call the stage functions and print with rich. The options both tasks
share are written once in `pipeline.cli.options`; `avel run`, `avel demo` and their dense twins run their flow
through `pipeline.cli.runner`. A `UserError` from anywhere below becomes one `error: ...` line and exit status 2 (no
traceback); so does a store that cannot be written (`write_error`). Ctrl-C (SIGINT) and SIGTERM end any command
within seconds with one `interrupted: ...` line and exit status 130 / 143 (`catch_interrupts`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.cli.ave import app as ave_app
from pipeline.cli.dense import dense_app
from pipeline.cli.options import DEFAULT_ROOT
from pipeline.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Audio-visual event localization on AVE-format data (CACE-Net and beyond).")
app.add_typer(ave_app)  # no name: the AVE commands are `avel`'s own
app.add_typer(dense_app, name="dense")

# Commands that start processes (decoders, DataLoader workers, Prefect's server): a watcher ends them with the command
STARTS_PROCESSES = {"synth", "extract", "finetune", "train", "compare", "evaluate", "predict", "run", "demo",
                    "schedule"}
DENSE_STARTS_PROCESSES = {"synth", "extract", "train", "evaluate", "predict", "run", "demo"}


def main() -> None:
    catch_interrupts()  # first: a Ctrl-C from here on is one line, never a traceback
    try:
        _main()
    except BaseException as e:
        signum = interrupt_signal(e)
        if signum:
            finish_interrupted(signum)
        raise


def _main() -> None:
    from pipeline.runtime import configure_process

    if len(sys.argv) > 1 and (sys.argv[1] in STARTS_PROCESSES or (sys.argv[1] == "dense" and sys.argv[2:3] and
                                                                  sys.argv[2] in DENSE_STARTS_PROCESSES)):
        from pipeline import reaper

        reaper.start()  # before any child process exists, so that each inherits the run's token
    configure_process()  # before any torch work, so torch's worker threads inherit it
    try:
        app()
    except UserError as e:  # escaped: "C.yaml [extract]: ..." is text, not rich markup
        Console(stderr=True).print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (OSError, RuntimeError) as e:  # HDF5 and torch.save report write failures as RuntimeError
        message = write_error(e)
        if message is None:
            raise
        Console(stderr=True).print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
        sys.stdout.flush()
        sys.stderr.flush()
        # Not sys.exit: after a failed write, HDF5's handles are broken and closing them at interpreter exit can
        # crash (measured: a segfault after "No space left on device"). What had to be saved is saved.
        os._exit(2)


WRITE_ERRNOS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
                errno.EROFS: "Read-only file system", errno.EACCES: "Permission denied"}


def write_error(e: BaseException) -> str | None:
    """One line for a store that cannot be written (full, over quota, read-only, not ours), naming the folder; None
    for other errors. HDF5 reports its errno inside the message; torch.save's zip writer says only "file write
    failed" or "unexpected pos": then the free space of the store decides."""
    text = str(e)
    code = getattr(e, "errno", None)
    if code not in WRITE_ERRNOS:
        code = next((c for c, t in WRITE_ERRNOS.items() if t in text or f"errno = {c}," in text), None)
    root = _root_argument()
    if code is None and any(k in text for k in ("file write failed", "PytorchStreamWriter", "inline_container")):
        import shutil

        with contextlib.suppress(OSError):
            if shutil.disk_usage(root).free < 2**20:
                code = errno.ENOSPC
    if code is None:
        return None
    filename = getattr(e, "filename", None)
    where = Path(filename).parent if filename else root
    return (f"cannot write to {where}: {WRITE_ERRNOS[code]}. Nothing unfinished is marked complete; free space (or "
            f"fix the permissions) there, or point --root at another disk, and run the command again to resume")


def _root_argument() -> str:
    argv = sys.argv
    for i, arg in enumerate(argv):
        if arg == "--root" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--root="):
            return arg.split("=", 1)[1]
    return str(DEFAULT_ROOT)


# ---- interrupts: Ctrl-C (SIGINT) and SIGTERM ----------------------------------------------------------------------
INTERRUPT_DEADLINE_S = 6.0  # after the first signal the command has ended by then, whatever it was doing
NO_RESUME = {"schedule", "inspect", "dataset", "labels"}  # commands whose line offers no resume
_interrupt = {"signal": 0}
_finishing = threading.Lock()


def catch_interrupts() -> None:
    """How SIGINT (a terminal's Ctrl-C, sent to the whole foreground process group) and SIGTERM (schedulers,
    containers) end a command. The first raises KeyboardInterrupt in the main thread: the running stage stops there
    and unwinds (ArtifactStore.stage marks it failed, keeps its partial work for the resume and releases its lock),
    Prefect records the crash on its temporary server (alive: it runs in its own session, and the flow runner stops
    it after), and `main` prints one line and exits with 128 + the signal (130, 143). A second signal, or
    INTERRUPT_DEADLINE_S after the first, ends the command at once from wherever it hangs (`finish_interrupted`).
    What the command started ends with it: DataLoader workers and Dask workers get the terminal's SIGINT too, and
    the reaper's watcher (`pipeline.reaper`) ends every process carrying the run's token once the command is gone."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)


def _on_signal(signum: int, frame) -> None:
    if _interrupt["signal"]:
        finish_interrupted(_interrupt["signal"])  # a second signal: now
    _interrupt["signal"] = signum
    threading.Thread(target=_deadline, args=(signum,), daemon=True, name="avel-interrupt-deadline").start()
    raise KeyboardInterrupt


def _deadline(signum: int) -> None:
    time.sleep(INTERRUPT_DEADLINE_S)
    finish_interrupted(signum)


def interrupt_signal(e: BaseException | None) -> int:
    """The signal that ended the command: the one `catch_interrupts` saw, else one found in the exception's chain
    (a KeyboardInterrupt; Prefect's TerminationSignal and torch's elastic SignalException, whose handlers replace
    ours while a flow or a multi-process launch runs); 0 for none."""
    if _interrupt["signal"]:
        return _interrupt["signal"]
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, KeyboardInterrupt):
            return signal.SIGINT
        number = getattr(e, "signal", None) or getattr(e, "sigval", None)
        if isinstance(number, int) and number in (signal.SIGINT, signal.SIGTERM):
            return int(number)
        e = e.__cause__ or e.__context__
    return 0


def interrupted_line(signum: int) -> str:
    """`interrupted: avel demo stopped by SIGINT during train; run the same command again to resume (...)`."""
    from pipeline.progress import running_stages

    args = sys.argv[1:3] if sys.argv[1:2] == ["dense"] else sys.argv[1:2]
    command = " ".join(["avel", *args])
    stages = running_stages()
    line = f"interrupted: {command} stopped by {signal.Signals(signum).name}"
    if stages:
        line += f" during {', '.join(stages)}"
    if not set(args) & NO_RESUME:
        line += "; run the same command again to resume (finished stages are reused)"
    return line


def finish_interrupted(signum: int) -> None:
    """End an interrupted command now: Prefect's API logging off (nothing may retry against a stopped server and
    print), its temporary server told to stop if it still runs, the one line on the terminal's stderr, exit
    128 + signum. No interpreter shutdown (`os._exit`): the stages have unwound already (or hang, on the
    deadline), and what shutdown would add is Prefect's at-exit retries and Dask's and torch's teardown noise;
    the processes the command started are ended by the reaper's watcher when this one is gone."""
    if not _finishing.acquire(blocking=False):  # another thread is finishing the command: it exits in a moment
        while True:
            time.sleep(1)
    import logging

    logging.raiseExceptions = False  # Prefect's log worker prints "--- Error logging to API ---" only if set
    with contextlib.suppress(Exception):
        handlers = sys.modules.get("prefect.logging.handlers")
        if handlers is not None:
            handlers.set_api_log_sink(lambda log: None)
    with contextlib.suppress(Exception):
        server = sys.modules.get("prefect.server.api.server")
        for instance in list(server.SubprocessASGIServer._instances.values()) if server else []:
            process = instance.server_process
            if process is not None and process.poll() is None:
                process.terminate()
    # the run's children ended now, not by the watcher after this process: a DataLoader worker the fork server was
    # still spawning would otherwise find the semaphores below unlinked and print a traceback after the line (seen
    # under load)
    from pipeline import reaper

    if os.environ.get(reaper.TOKEN_VAR):
        from multiprocessing import resource_tracker

        # spared: the finalizers below tell it what they unlinked (a dead tracker's pipe would raise, and print)
        tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
        reaper.kill_now(os.environ[reaper.TOKEN_VAR], frozenset({tracker} - {None}))
    # multiprocessing's own first exit step: its semaphores unlinked, which its resource tracker (on the terminal's
    # stderr) would otherwise find "leaked" and warn about after this line; bounded, in case a finalizer hangs
    from multiprocessing import util

    finalizers = threading.Thread(target=util._run_finalizers, args=(0,), daemon=True)
    finalizers.start()
    finalizers.join(timeout=1.0)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    from pipeline.progress import stop_live, terminal_fd

    bars = threading.Thread(target=stop_live, daemon=True)  # on the deadline: a live bar may still be drawn
    bars.start()
    bars.join(timeout=0.5)
    with contextlib.suppress(OSError):
        os.write(terminal_fd(2), (interrupted_line(signum) + "\n").encode())
    os._exit(128 + signum)

