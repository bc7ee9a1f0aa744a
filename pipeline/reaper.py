"""Nothing a command started outlives it: a tiny watcher process that ends the run's processes when it ends.

`start(pid)` (called by the CLI before anything else) puts a run token in the environment, which every process the
command starts inherits: decoding and DataLoader workers, the multiprocessing fork server and resource tracker,
Prefect's temporary server. It then starts this file as a separate, dependency-free script (not importing the
package: it starts in milliseconds) that waits for the command's process to end, however it ends (kill -9 too),
then sends SIGTERM to every process whose environment holds the token, and SIGKILL to those still there 3 s later.

Why not process groups: killing the command's group could hit the shell or a pipeline it runs in, and a command
cannot leave its terminal's foreground group without losing Ctrl-C. Why not parent-death signals: the processes
that outlived a kill -9 (Prefect's server, the fork server) are started by libraries, not by us.
An interrupted command (Ctrl-C, SIGTERM: `pipeline.cli.catch_interrupts`) ends through `os._exit` and leaves the
rest to this watcher too: Prefect's temporary server (in a session of its own, so that Ctrl-C does not reach it
first), Dask's workers, the fork server and its DataLoader workers.
The workers also watch their parent themselves (`runtime.worker_options`), for runs not started by the CLI.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

TOKEN_VAR = "AVEL_RUN_TOKEN"
GRACE_S = 3.0


def start(pid: int | None = None) -> str:
    """Tag this process's future children with a fresh token and start the watcher for `pid` (default: this one)."""
    token = uuid.uuid4().hex
    os.environ[TOKEN_VAR] = token
    env = {k: v for k, v in os.environ.items() if k != TOKEN_VAR}  # the watcher itself is not a target
    subprocess.Popen([sys.executable, "-S", str(Path(__file__).resolve()), str(pid or os.getpid()), token],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                     start_new_session=True, close_fds=True)  # own session: a Ctrl-C leaves it to clean up
    return token


def tagged(token: str) -> list[int]:
    """Pids (other than this one) whose environment holds the token."""
    needle = f"{TOKEN_VAR}={token}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


def wait_for_exit(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        select.select([fd], [], [])
        return
    while True:  # no pidfd: poll
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass
        time.sleep(0.5)


def kill_now(token: str, spare: frozenset[int] = frozenset()) -> None:
    """SIGKILL the tagged processes (but `spare`) at once: an interrupted command is ending, and nothing it started
    may go on starting (a decoding worker the fork server is spawning) or print after the command's last line."""
    for pid in set(tagged(token)) - spare:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def reap(token: str) -> int:
    """SIGTERM the tagged processes, SIGKILL what is left after the grace period; how many were found."""
    victims = tagged(token)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and tagged(token):
        time.sleep(0.1)
    for pid in tagged(token):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(victims)


if __name__ == "__main__":
    watched, run_token = int(sys.argv[1]), sys.argv[2]
    # a terminal's Ctrl-C is for the command, not for its cleaner; so is a SIGTERM sent to every process of a
    # container or service: the watcher ends by itself once the command has, after ending what it left
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    wait_for_exit(watched)
    reap(run_token)
