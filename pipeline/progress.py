"""Live progress in the terminal for long runs (the pipeline flow, the demo), whatever runs the stages.

Stages report through `reporter()`: the flow's tasks call `start(label, total)`, `update(done, total, text)` and
`finish(label, reused, seconds)`. Nothing is shown unless a command installed a reporter (`use_reporter`), so the
stage functions and the flows stay silent in tests and in a user's own scripts.

`RichReporter` shows one live bar per running stage (what runs, n/N, elapsed, time left, the stage's own text
such as the epoch's loss and validation accuracy) and leaves one line per finished stage (computed or reused,
seconds). Off a terminal (CI logs, pipes) it prints a plain line at every 10 % instead of redrawing.

`quiet_native_output(log)` sends everything written to the process's stdout/stderr file descriptors, by this
process and by the processes it starts (Prefect's temporary server, library warnings), to a log file, and
returns a Console on the real terminal for what the person watching should see.

For an interrupted command: `running_stages()` names the stages a RichReporter saw start and not finish,
`stop_live()` takes the live bars off the terminal, and `terminal_fd(2)` is the real terminal's stderr even inside
`quiet_native_output` (where fd 2 is the log).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Reporter:
    """The silent default."""

    def start(self, label: str, total: int | None = None) -> None: ...

    def update(self, label: str, done: int, total: int | None = None, text: str = "") -> None: ...

    def finish(self, label: str, reused: bool, seconds: float, note: str = "") -> None: ...

    def note(self, text: str) -> None: ...


_current: Reporter = Reporter()
_running: dict[str, None] = {}  # labels started and not finished, in start order (a RichReporter's stages)
_terminal: dict[int, int] = {}  # inside quiet_native_output: fd 1 / 2 -> a copy of the real terminal's fd


def reporter() -> Reporter:
    return _current


def running_stages() -> list[str]:
    """The stages a RichReporter has seen start and not finish, oldest first (after an interrupt: where it stopped)."""
    return list(_running)


def stop_live() -> None:
    """Take the installed RichReporter's live bars off the terminal now (an interrupted command that ends at once,
    so that its last line does not land inside a bar)."""
    if isinstance(_current, RichReporter):
        _current.close()


def terminal_fd(fd: int) -> int:
    """The real terminal's file descriptor for `fd` (1 or 2): inside `quiet_native_output` a copy it keeps, since
    fds 1 and 2 point at the log there; `fd` itself elsewhere."""
    return _terminal.get(fd, fd)


@contextlib.contextmanager
def use_reporter(r: Reporter) -> Iterator[Reporter]:
    """Install `r` for the block. A module global, not a context variable: Prefect may run tasks in threads."""
    global _current
    before, _current = _current, r
    try:
        yield r
    finally:
        _current = before
        if isinstance(r, RichReporter):
            r.close()


class RichReporter(Reporter):
    def __init__(self, console: Console):
        self.console = console
        self.live = console.is_terminal
        self.bar = Progress(TextColumn("[bold]{task.fields[label]}[/bold] {task.description}"), BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                            console=console, transient=True, auto_refresh=self.live)
        self.tasks: dict[str, int] = {}
        self.printed: dict[str, int] = {}  # off a terminal: the last 10 % step printed per stage
        if self.live:
            self.bar.start()

    def start(self, label: str, total: int | None = None) -> None:
        if label in self.tasks:
            self.bar.reset(self.tasks[label], total=total)
        else:
            self.tasks[label] = self.bar.add_task("", total=total, label=label)
        _running[label] = None
        if not self.live:
            self.console.print(f"{label}: started", highlight=False, soft_wrap=True)

    def update(self, label: str, done: int, total: int | None = None, text: str = "") -> None:
        if label not in self.tasks:
            self.start(label, total)
        self.bar.update(self.tasks[label], completed=done, total=total, description=text)
        if not self.live and total:
            step = int(10 * done / total)
            if step > self.printed.get(label, 0):
                self.printed[label] = step
                self.console.print(f"{label}: {done}/{total} {text}".rstrip(), highlight=False, soft_wrap=True)

    def finish(self, label: str, reused: bool, seconds: float, note: str = "") -> None:
        if label in self.tasks:
            self.bar.remove_task(self.tasks.pop(label))
        _running.pop(label, None)
        how = "[dim]reused[/dim]" if reused else "[green]computed[/green]"
        self.console.print(f"  {label}: {how} in {seconds:.1f} s{'  ' + note if note else ''}", highlight=False,
                           soft_wrap=True)

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.live:
            self.bar.stop()


@contextlib.contextmanager
def quiet_native_output(log: Path) -> Iterator[Console]:
    """Point file descriptors 1 and 2 at `log` for the block; yield a Console on the real terminal. Processes
    started inside inherit the log file, so their output never reaches the terminal."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    term_out = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8", errors="replace")
    with open(log, "a", encoding="utf-8") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    outermost = not _terminal  # nested: the outer block's copies are the terminal
    if outermost:
        _terminal.update({1: saved_out, 2: saved_err})
    try:
        yield Console(file=term_out, force_terminal=term_out.isatty() or None)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        if outermost:
            _terminal.clear()
        os.close(saved_out)
        os.close(saved_err)
        term_out.close()
