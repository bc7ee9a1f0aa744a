"""Ctrl-C and SIGTERM to real `avel` commands, and results lines that scripts can read.

A terminal's Ctrl-C sends SIGINT to the whole foreground process group, so each command runs here in a session of
its own (`start_new_session=True`) and the signal goes to that group (`os.killpg`) once the command's stages run.
Then: exit status 130 (143 for SIGTERM) within 10 s, one `interrupted: ...` line last on the output (stdout and
stderr together, as a terminal shows them), no traceback, no process of the run left (its group, and the processes
holding its run token: Prefect's temporary server runs in a session of its own), and the same command again
resumes and finishes. Tiny data (random-init encoders at 32 px, tiny models), CPU.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from io import StringIO
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from pipeline import reaper
from tests.features_fixture import TINY_MODEL, write_feature_folder
from tests.processes import session_members, wait_for

CLI = [sys.executable, "-m", "pipeline.cli"]
ENV = {**os.environ, "COLUMNS": "80"}  # piped at 80 columns: what `avel demo > log` gets
RESUME = "; run the same command again to resume (finished stages are reused)"


def tiny_ave_config(root: Path) -> dict:
    """The flow tests' tiny pipeline, smaller still: no fine-tuning, 32-px crops, fp32."""
    return {
        "root": str(root),
        "dataset": {"synth": {"videos": 6, "classes": 2, "seed": 3, "fps": 4, "width": 64, "height": 48}},
        "extract": {"random_init": True, "frames_per_segment": 1, "workers": 0, "crop_size": 32, "precision": "fp32"},
        "skip_finetune": True, "finetune": {"precision": "fp32"},  # one precision named in the results line
        "train": {"epochs": 2, "batch_size": 4, "device": "cpu", "precision": "fp32", "model_args": TINY_MODEL},
    }


DENSE_TRAIN = {"size": "cpu", "epochs": 3, "warmup_epochs": 1, "batch_size": 4, "lr": 1e-3, "ema_decay": 0.9,
               "device": "cpu", "model_args": {"embd_dim": 32, "head_dim": 32, "dependency_dim": 8, "max_seq_len": 128}}


# ---- running a command as a terminal's foreground job -------------------------------------------------------------
class Job:
    """An `avel` command in its own session; its output (stdout and stderr merged, in order) collected by line."""

    def __init__(self, args: list[str]):
        self.p = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True, env=ENV)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.p.stdout), daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_until(self, predicate, what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.p.poll() is not None:
                self.reader.join(5)
                raise AssertionError(f"the command ended (status {self.p.returncode}) before {what}:\n{self.output}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.output}")
            time.sleep(0.05)

    def wait_for_line(self, text: str, timeout: float = 180) -> None:
        self.wait_until(lambda: any(text in line for line in list(self.lines)), repr(text), timeout)

    def token(self) -> str | None:
        """The run's token, as the command's children inherited it (the command set it after its own exec)."""
        for pid in session_members(self.p.pid) + [c for c in _children(self.p.pid)]:
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for entry in env:
                if entry.startswith(f"{reaper.TOKEN_VAR}=".encode()):
                    return entry.split(b"=", 1)[1].decode()
        return None

    def interrupt(self, sig: int) -> tuple[float, str | None]:
        """Send `sig` to the job's process group; (seconds until the command exited, the run's token)."""
        token = self.token()
        t0 = time.monotonic()
        os.killpg(self.p.pid, sig)
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            raise AssertionError(f"still running 30 s after {signal.Signals(sig).name}:\n{self.output}") from None
        seconds = time.monotonic() - t0
        self.reader.join(10)
        return seconds, token


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def assert_interrupted(job: Job, sig: int, seconds: float, token: str | None, line: str) -> None:
    """Status 128 + sig within 10 s, `line` last and alone of its kind, no traceback, nothing of the run left."""
    lines = [ln.rstrip("\n") for ln in job.lines if ln.strip()]
    assert job.p.returncode == 128 + sig, job.output
    assert seconds < 10, f"{seconds:.1f} s from {signal.Signals(sig).name} to exit"
    assert lines and lines[-1] == line, job.output
    assert sum(ln.startswith("interrupted:") for ln in lines) == 1, job.output
    assert "Traceback" not in job.output and "Error logging to API" not in job.output, job.output
    # nothing of the run left: its process group (the command, workers, the fork server, ranks, Dask's workers)
    # and what holds its token (Prefect's temporary server, in its own session); zombies wait for init's reaping
    wait_for(lambda: not session_members(job.p.pid), 5, "the run's processes to end")
    if token is not None:
        wait_for(lambda: not reaper.tagged(token), 5, "the processes holding the run's token to end")
    wait_for(lambda: group_gone(job.p.pid), 10, "the process group to be gone")


def manifest(root: Path, stage: str) -> dict:
    (path,) = (root / stage).glob("*/manifest.json")
    return json.loads(path.read_text())


def finishes(args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    return done


# ---- the flows ----------------------------------------------------------------------------------------------------
def test_ctrl_c_stops_a_pipeline_run_at_once_and_the_same_command_resumes(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_ave_config(tmp_path / "store")))
    args = ["run", "--config", str(config)]
    job = Job(args)
    job.wait_for_line("extract_visual (initial encoder): 1/6")  # audio done, the visual stage under way
    seconds, token = job.interrupt(signal.SIGINT)
    assert_interrupted(job, signal.SIGINT, seconds, token,
                       "interrupted: avel run stopped by SIGINT during extract_visual (initial encoder)" + RESUME)
    assert token is not None  # the temporary server holds it
    stopped = manifest(tmp_path / "store", "extract_visual")
    assert stopped["status"] == "failed" and stopped["error"].startswith("interrupted")
    assert manifest(tmp_path / "store", "extract_audio")["status"] == "complete"
    log = next((tmp_path / "store" / "logs").glob("pipeline-*.log")).read_text()
    assert "Crash detected! Execution was aborted by an interrupt signal" in log  # recorded on a live server

    again = finishes(args)
    out = again.stdout.splitlines()
    assert "  extract_audio: reused in" in "\n".join(out)
    assert any(ln.startswith("  extract_visual (initial encoder): computed") for ln in out)
    assert stopped["key"] == manifest(tmp_path / "store", "extract_visual")["key"]
    assert manifest(tmp_path / "store", "extract_visual")["status"] == "complete"
    # the results line, longer than 80 columns, is whole on the last line of the piped output
    assert re.fullmatch(r"test accuracy: \d+\.\d\d % \(all-background baseline \d+\.\d\d %\) in \d+ s, "
                        r"precision fp32 \(RANDOM WEIGHTS\)", out[-1]), again.stdout


@pytest.fixture(scope="module")
def dense_features(tmp_path_factory) -> Path:
    from pipeline.dense.synthetic import FeatureSynthConfig, generate_feature_dataset

    out = tmp_path_factory.mktemp("dense-features")
    generate_feature_dataset(out, FeatureSynthConfig(train=6, val=2, test=2, classes=2, seed=2, min_length_s=16,
                                                     max_length_s=24))
    return out


def test_sigterm_stops_a_dense_run_with_143_and_the_same_command_resumes(dense_features, tmp_path):
    from pipeline.dense.synthetic import ANNOTATIONS

    config = tmp_path / "dense.yaml"
    config.write_text(yaml.safe_dump({"root": str(tmp_path / "store"),
                                      "dataset": {"features": str(dense_features / "features"),
                                                  "annotations": str(dense_features / ANNOTATIONS)},
                                      "train": DENSE_TRAIN}))
    args = ["dense", "run", "--config", str(config)]
    job = Job(args)
    job.wait_for_line("dense_train: 1/3 epochs")
    seconds, token = job.interrupt(signal.SIGTERM)
    assert_interrupted(job, signal.SIGTERM, seconds, token,
                       "interrupted: avel dense run stopped by SIGTERM during dense_train" + RESUME)
    assert manifest(tmp_path / "store", "dense_train")["status"] == "failed"

    again = finishes(args).stdout.splitlines()
    assert any(ln.startswith("  dense_train: computed") for ln in again)
    assert re.fullmatch(r"test average mAP: \d+\.\d\d % \(tIoU 0\.1:0\.9\)", again[-1]), again


# ---- processes the commands start ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    from pipeline.ave.synth import SynthConfig, generate_dataset

    out = tmp_path_factory.mktemp("interrupt-videos") / "synth"
    generate_dataset(out, SynthConfig(videos=6, classes=2, seed=4, fps=4, width=64, height=48), workers=1)
    return out


def extract_args(videos: Path, root: Path, *extra: str) -> list[str]:
    return ["extract", "--dataset", str(videos), "--root", str(root), "--random-init", "--frames-per-segment", "1",
            "--precision", "fp32", *extra]


def test_ctrl_c_ends_an_extraction_with_its_decoding_workers(videos, tmp_path):
    args = extract_args(videos, tmp_path / "store", "--workers", "2")
    job = Job(args)
    # under way with its workers: the command, the fork server and its 2 workers (and the resource tracker)
    job.wait_until(lambda: len(session_members(job.p.pid)) >= 4
                   and list((tmp_path / "store").glob("extract_*/*/.*.h5.partial")),
                   "the decoding workers and a feature file being written")
    seconds, token = job.interrupt(signal.SIGINT)
    assert_interrupted(job, signal.SIGINT, seconds, token, "interrupted: avel extract stopped by SIGINT" + RESUME)
    assert token is not None
    assert "features (wrote)" in finishes(args).stdout


def test_a_command_that_does_not_stop_is_ended_by_the_deadline_or_a_second_signal(tmp_path):
    """Whatever the running code does with the KeyboardInterrupt (here: swallows it and sleeps on), the command
    ends INTERRUPT_DEADLINE_S after the signal, or at once on a second one, with the same line and status."""
    # every KeyboardInterrupt is swallowed, one that lands right after 'ready' too (an outer handler that finished
    # the command there ended it in 10 ms on a fast CI machine): only the deadline or the second signal end it
    script = ("import sys, time\n"
              "sys.argv = ['avel', 'demo']\n"
              "from pipeline.cli import catch_interrupts\n"
              "catch_interrupts()\n"
              "ready = False\n"
              "while True:\n"
              "    try:\n"
              "        if not ready:\n"
              "            ready = True\n"
              "            print('ready', flush=True)\n"
              "        time.sleep(60)\n"
              "    except KeyboardInterrupt:\n"
              "        pass  # stuck: a stage that ignores it\n")
    from pipeline.cli import INTERRUPT_DEADLINE_S

    line = "interrupted: avel demo stopped by SIGINT" + RESUME
    for second_signal, within in ((False, INTERRUPT_DEADLINE_S + 3), (True, 3)):
        p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True, cwd=Path(__file__).resolve().parents[1])
        assert p.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        os.killpg(p.pid, signal.SIGINT)
        if second_signal:
            time.sleep(0.5)
            os.killpg(p.pid, signal.SIGINT)
        out = p.communicate(timeout=30)[0]
        seconds = time.monotonic() - t0
        assert p.returncode == 130 and out.strip().splitlines()[-1] == line, out
        assert seconds < within, seconds
        if not second_signal:
            assert seconds >= INTERRUPT_DEADLINE_S - 0.5, seconds


@pytest.mark.slow
def test_ctrl_c_stops_a_sharded_extraction_and_its_dask_cluster(videos, tmp_path):
    args = extract_args(videos, tmp_path / "store", "--cluster", "local:2", "--shard-videos", "1", "--set",
                        "crop_size=32")
    job = Job(args)
    job.wait_for_line("shards: 1/6")
    seconds, token = job.interrupt(signal.SIGINT)
    assert_interrupted(job, signal.SIGINT, seconds, token,
                       "interrupted: avel extract stopped by SIGINT during extract visual+audio shards" + RESUME)
    assert token is not None
    assert "features (sharded on local:2, or reused)" in finishes(args).stdout


@pytest.mark.slow
def test_ctrl_c_stops_a_two_process_training_and_the_same_command_resumes(tmp_path):
    folder = write_feature_folder(tmp_path / "feats")
    args = ["train", "--features", str(folder), "--root", str(tmp_path / "store"), "--epochs", "60", "--device",
            "cpu", "--precision", "fp32", "--set", f"model_args={json.dumps(TINY_MODEL)}", "--set", "batch_size=4",
            "--nproc", "2"]
    job = Job(args)
    job.wait_for_line("train epoch 2:")
    seconds, token = job.interrupt(signal.SIGINT)
    assert_interrupted(job, signal.SIGINT, seconds, token, "interrupted: avel train stopped by SIGINT" + RESUME)
    assert manifest(tmp_path / "store", "train")["status"] == "failed"
    again = finishes(args).stdout.splitlines()
    assert re.fullmatch(r"test accuracy: \d+\.\d\d %", again[-1]), again


# ---- results lines are never wrapped ------------------------------------------------------------------------------
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def last_line(text: str) -> str:
    return ANSI.sub("", text).rstrip("\n").splitlines()[-1]


@pytest.mark.parametrize("terminal", [False, True], ids=["piped", "terminal"])
def test_the_flows_results_lines_are_whole_at_80_columns(tmp_path, terminal):
    from pipeline.cli.ave import _pipeline_run
    from pipeline.cli.dense import _dense_pipeline_run

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_ave_config(tmp_path / "store")))
    run = _pipeline_run(config, [], [])
    retrieval = ("a->v R@1: before 6.7 % after 20.0 % (chance 6.7 %, 15 held-out videos); v->a R@1: before 6.7 % "
                 "after 13.3 %")
    out = StringIO()
    run.report(Console(file=out, width=80, force_terminal=terminal), {
        "warnings": [], "retrieval": retrieval, "baseline": None, "split": "test", "accuracy": 98.333,
        "all_background_accuracy": 20.833}, 243.2)
    text = ANSI.sub("", out.getvalue())
    assert f"fine-tuning, held-out {retrieval}\n" in text
    assert last_line(text) == ("test accuracy: 98.33 % (all-background baseline 20.83 %) in 243 s, precision fp32 "
                               "(RANDOM WEIGHTS)")

    dense = tmp_path / "dense.yaml"
    dense.write_text(yaml.safe_dump({"root": str(tmp_path / "store"), "dataset": {"synth": {"train": 2}},
                                     "extract": {"random_init": True}}))
    run = _dense_pipeline_run(dense, [], [])
    out = StringIO()
    run.report(Console(file=out, width=80, force_terminal=terminal), {
        "split": "test", "mAP": {"0.1": 0.5, "0.9": 0.01}, "checkpoint": str(tmp_path / ("x" * 90) / "best.pt"),
        "average_mAP_high": 0.0523, "average_mAP": 0.1386}, 612.0)
    text = ANSI.sub("", out.getvalue())
    assert f"detector: {tmp_path / ('x' * 90) / 'best.pt'}\n" in text
    assert last_line(text) == "test average mAP: 13.86 % (tIoU 0.1:0.9) (RANDOM WEIGHTS)"


@pytest.fixture
def console_at_80(monkeypatch):
    """The commands' shared console, writing to a buffer at 80 columns (as off a terminal)."""
    from pipeline.cli.options import console

    out = StringIO()
    monkeypatch.setattr(console, "_file", out)
    monkeypatch.setattr(console, "_width", 80)
    return out


def test_the_commands_last_lines_are_whole_at_80_columns(console_at_80, ave_meta, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.cli.ave import print_dataset_summary

    print_dataset_summary(ave_meta)  # `avel dataset summary`, `avel synth`: 28 classes on one line
    assert last_line(console_at_80.getvalue()) == ("classes: " + "; ".join(f"{i} {c}" for i, c in
                                                                           enumerate(ave_meta.classes))
                                                   + f"; {ave_meta.background} background")
    folder = write_feature_folder(tmp_path / "feats")
    res = CliRunner().invoke(app, ["train", "--features", str(folder), "--root", str(tmp_path / "store"), "--epochs",
                                   "1", "--device", "cpu", "--precision", "fp32", "--seeds", "1,2", "--set",
                                   f"model_args={json.dumps(TINY_MODEL)}", "--set", "batch_size=4"])
    assert res.exit_code == 0, res.output
    lines = ANSI.sub("", console_at_80.getvalue()).splitlines()
    assert re.fullmatch(r"test accuracy of the val-selected checkpoint: \d+\.\d\d \+- \d+\.\d\d % over seeds "
                        r"\[1, 2\]", lines[-2]), lines[-4:]
    assert re.fullmatch(r"test accuracy: \d+\.\d\d %", lines[-1]), lines[-4:]
