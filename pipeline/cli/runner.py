"""The one runner of a pipeline flow from the command line: `avel run`, `avel demo`, `avel dense run` and
`avel dense demo` all go through `run_flow`.

It owns what those four commands share: the inputs checked before anything starts (by the task's `prepare`), the
RANDOM WEIGHTS banner, the first lines, Prefect started quietly (its own output in <root>/logs/<name>-<time>.log
unless --verbose), the stages' live progress, the table of stages, and the temporary Prefect server stopped at the
end. What each task prints after the table (accuracy, mAP, the last line) is the task's `report`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from pipeline.cli.options import console


@dataclass
class FlowRun:
    """One task's pipeline run, its inputs checked: what to call and what to print around it."""

    name: str  # "pipeline": the first line starts "pipeline: ", the log is <root>/logs/pipeline-<time>.log
    root: Path  # the store (the config's root)
    source: str  # what runs on: "dataset /data/ave", "synthetic untrimmed videos {...}"
    flow: Callable[[], dict]  # imports and calls the flow (inside the quiet output, with the progress reporter)
    report: Callable[[Console, dict, float], None]  # the lines after the stage table (result, seconds since start)
    random_banner: Optional[str] = None  # the RANDOM WEIGHTS panel's text, when the run uses random encoders
    notes: list[str] = field(default_factory=list)  # lines after the first, before Prefect starts
    table_title: Callable[[dict], str] | None = None  # of the stage table (default: the name)


def run_flow(prepare: Callable[[], FlowRun], verbose: bool) -> dict:
    """Check the inputs (`prepare`: a bad config, stage, dataset or weight file is one `error:` line, never a flow
    traceback), run the flow with live progress, print the stage table and the task's report; the flow's result."""
    from pipeline.progress import RichReporter, quiet_native_output, use_reporter

    t0 = time.perf_counter()
    run = prepare()
    log = Path(run.root) / "logs" / f"{run.name.replace(' ', '-')}-{datetime.datetime.now():%Y%m%d-%H%M%S}.log"
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")  # into the log file, or on the terminal with --verbose
    quiet = contextlib.nullcontext(console) if verbose else quiet_native_output(log)
    with quiet as term:
        if run.random_banner:
            term.print(Panel(run.random_banner, style="bold red"))
        term.print(f"{run.name}: {run.source}, store {run.root}" + ("" if verbose else f"; Prefect's log: {log}"),
                   highlight=False, soft_wrap=True)
        for line in run.notes:
            term.print(line, highlight=False, soft_wrap=True)
        term.print("starting Prefect (a temporary local server unless PREFECT_API_URL is set; ~15 s)...",
                   highlight=False, soft_wrap=True)
        with use_reporter(RichReporter(term)):
            from flows.pipeline import stop_temporary_server
            from flows.sharded import ensure_api_url

            try:
                ensure_api_url()  # the temporary server, in its own session: a Ctrl-C reaches it only through us
                result = run.flow()
            except BaseException as e:
                if not isinstance(e, Exception):  # Ctrl-C, SIGTERM: the server goes now, with little draining
                    stop_temporary_server(drain_s=2)
                elif not verbose:
                    stop_temporary_server()
                raise
            if not verbose:
                stop_temporary_server()  # now, while its output still goes to the log
        table = Table(title=run.table_title(result) if run.table_title else run.name)
        for col in ("stage", "", "seconds", "key"):
            table.add_column(col)
        for o in result["stages"]:
            table.add_row(o["label"], "reused" if o["reused"] else "computed", f"{o['seconds']:.1f}", o["key"])
        term.print(table)
        run.report(term, result, time.perf_counter() - t0)
    return result
