"""The `avel` command line: builds `app` from the AVE commands (`pipeline.cli.ave`) and the dense sub-app
(`pipeline.cli.dense`, as `avel dense`), and runs it (`main`, the `avel` entry point).

The commands are thin: they parse arguments, call the stage functions and print with rich. The options both tasks
share are written once in `pipeline.cli.options`; `avel run`, `avel demo` and their dense twins run their flow
through `pipeline.cli.runner`. A `UserError` from anywhere below becomes one `error: ...` line and exit status 2 (no
traceback); so does a store that cannot be written (`write_error`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
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
