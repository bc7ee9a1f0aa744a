"""One lock per artifact (stage + key) in a store, so that runs sharing a store compute each artifact once.

The lock is an OS file lock (`filelock`, flock on Linux) on `<root>/.locks/<stage>-<key>.lock`, held by the run
that computes the artifact from the moment it opens the stage folder until it marks it complete or failed. The
kernel drops the lock when its process dies, however it dies, so a killed run's lock is never stale: the next run
takes it over at once and resumes the partial work. Beside the lock, `<stage>-<key>.holder.json` says who holds
it (pid, host, since, command), for the message of the run that waits.

Another run for the same artifact waits for it and then reuses the finished result (the caller re-reads the
manifest after `acquire`); with the policy's `wait` off (`--no-wait`) it ends at once with one `error:` line.
Runs for different artifacts never touch the same lock. Within one process the lock is per thread: the same
thread re-entering is free, another thread of the process waits like another process would.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from pipeline.errors import UserError

LOCK_DIR = ".locks"


@dataclass
class LockPolicy:
    wait: bool = True  # False: a busy artifact is an error (`--no-wait`)
    poll_s: float = 1.0


policy = LockPolicy()


def set_wait(wait: bool) -> None:
    policy.wait = wait


class ArtifactBusy(UserError):
    """Another run is computing this artifact and the policy says not to wait."""


def _notify(text: str) -> None:
    from pipeline.progress import Reporter, reporter

    r = reporter()
    if type(r) is Reporter:  # no live display installed (a plain command, a script): stderr
        print(text, file=sys.stderr, flush=True)
    else:
        r.note(text)


class ArtifactLock:
    def __init__(self, root: Path, stage: str, key: str):
        self.stage, self.key = stage, key
        folder = Path(root) / LOCK_DIR
        self.path = folder / f"{stage}-{key}.lock"
        self.holder_path = folder / f"{stage}-{key}.holder.json"
        self._lock: FileLock | None = None

    @property
    def held(self) -> bool:
        return self._lock is not None and self._lock.is_locked

    def holder(self) -> str:
        """Who holds the lock, from its holder file: 'pid 123 on host since 12:00:01 UTC (4 min ago): avel ...'."""
        try:
            h = json.loads(self.holder_path.read_text(encoding="utf-8"))
            since = datetime.fromisoformat(h["since"])
            ago = (datetime.now(timezone.utc) - since).total_seconds()
            return (f"pid {h['pid']} on {h['host']} since {since:%Y-%m-%d %H:%M:%S} UTC ({_duration(ago)} ago): "
                    f"{h.get('command', '?')}")
        except (OSError, ValueError, KeyError):
            return "another run (its holder file is not readable yet)"

    def acquire(self) -> None:
        if self.held:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.path, is_singleton=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            who = self.holder()
            if not policy.wait:
                raise ArtifactBusy(f"{self.stage} {self.key} is being computed by {who}; run again without "
                                   f"--no-wait to wait for it and reuse its result") from None
            _notify(f"waiting for {self.stage} {self.key}: it is being computed by {who}; this run will reuse "
                    f"the result (--no-wait ends at once instead)")
            t0 = time.perf_counter()
            lock.acquire(poll_interval=policy.poll_s)
            _notify(f"{self.stage} {self.key}: the other run ended after {_duration(time.perf_counter() - t0)} "
                    f"of waiting")
        self._lock = lock
        self._write_holder()

    def release(self) -> None:
        if self.held:
            lock, self._lock = self._lock, None
            lock.release()

    def _write_holder(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
        tmp = self.holder_path.with_name(f".{self.holder_path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(info), encoding="utf-8")
            os.replace(tmp, self.holder_path)
        except OSError:  # the holder file is for messages only: never fail a run over it
            tmp.unlink(missing_ok=True)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
