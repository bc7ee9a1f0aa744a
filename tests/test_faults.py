"""Faults a shared machine brings: concurrent runs on one store, kill -9, a full or read-only disk.

Real subprocesses of the `avel` command, really killed; tiny data (random-init encoders at 1 frame per second,
tiny localizers) so that the whole file runs in a few minutes on 2 cores.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline import locks
from pipeline.ave.synth import SynthConfig, generate_dataset
from pipeline.store import ArtifactStore
from tests.features_fixture import TINY_MODEL, write_feature_folder
from tests.processes import session_members, wait_for

CLI = [sys.executable, "-m", "pipeline.cli"]


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "synth"
    generate_dataset(out, SynthConfig(videos=8, classes=2, seed=4, fps=4, width=64, height=48), workers=1)
    return out


def start(args, **kw) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)


def kill9(p: subprocess.Popen) -> None:
    os.kill(p.pid, signal.SIGKILL)
    p.communicate()


# ---- locks --------------------------------------------------------------------------------------------------------
def test_a_second_holder_waits_and_a_busy_artifact_can_be_an_error(tmp_path, monkeypatch):
    first = ArtifactStore(tmp_path).lock("extract_visual", "k1")
    first.acquire()
    other = ArtifactStore(tmp_path).lock("extract_audio", "k1")  # another artifact: never blocked
    other.acquire()
    other.release()
    monkeypatch.setattr(locks.policy, "wait", False)
    second = ArtifactStore(tmp_path).lock("extract_visual", "k1")
    result = {}
    t = threading.Thread(target=lambda: result.update(error=_error_of(second.acquire)))  # another thread waits too
    t.start()
    t.join()
    assert isinstance(result["error"], locks.ArtifactBusy)
    message = str(result["error"])
    assert f"pid {os.getpid()} on " in message and "since" in message and "--no-wait" in message
    monkeypatch.setattr(locks.policy, "wait", True)
    monkeypatch.setattr(locks.policy, "poll_s", 0.02)
    got = {}

    def wait_then_take():
        second.acquire()
        got["held"] = second.held  # the lock is per thread: ask in the thread that took it
        second.release()

    t = threading.Thread(target=wait_then_take)
    t.start()
    time.sleep(0.3)
    assert t.is_alive()  # waiting
    first.release()
    t.join(5)
    assert not t.is_alive() and got["held"]


def _error_of(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    return None


def test_a_killed_holders_lock_is_taken_over_at_once(tmp_path):
    code = ("import sys, time; from pipeline.store import ArtifactStore; "
            "lock = ArtifactStore(sys.argv[1]).lock('train', 'k'); lock.acquire(); print('held', flush=True); "
            "time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    lock = ArtifactStore(tmp_path).lock("train", "k")
    locks.policy.wait = False
    try:
        with pytest.raises(locks.ArtifactBusy, match=f"pid {p.pid} "):
            lock.acquire()
        p.kill()
        p.wait()
        lock.acquire()  # the kernel dropped the dead holder's lock: no stale lock to clean
        assert lock.held
        assert json.loads(lock.holder_path.read_text())["pid"] == os.getpid()
        lock.release()
    finally:
        locks.policy.wait = True


def extract_args(ds, root, *extra):
    return ["extract", "--dataset", str(ds), "--root", str(root), "--modality", "visual", "--random-init",
            "--frames-per-segment", "1", "--workers", "0", *extra]


def running_manifest(root: Path, stage: str):
    for m in (root / stage).glob("*/manifest.json"):
        return m
    return None


def test_two_concurrent_extractions_compute_once_and_both_succeed(ds, tmp_path):
    """Two `avel extract` of one artifact at once: both succeed, one computes, the other waits and reuses; with
    --no-wait the other ends at once with one error line. The test holds the artifact's lock itself at the start
    (the key is learnt from a clean run), so that both runs meet a busy artifact whatever the machine's speed."""
    clean = tmp_path / "clean"
    subprocess.run([*CLI, *extract_args(ds, clean)], check=True, capture_output=True)
    (clean_folder,) = (clean / "extract_visual").iterdir()
    root = tmp_path / "store"
    held = ArtifactStore(root).lock("extract_visual", clean_folder.name)
    held.acquire()
    runs = [start(extract_args(ds, root)) for _ in range(2)]
    busy = subprocess.run([*CLI, *extract_args(ds, root, "--no-wait")], capture_output=True, text=True)
    time.sleep(1.0)
    held.release()
    outs = [p.communicate(timeout=300) for p in runs]
    for p, (out, err) in zip(runs, outs):
        assert p.returncode == 0 and "Traceback" not in err, err
    # --no-wait: one error line naming the holder, exit status 2
    assert busy.returncode == 2 and "Traceback" not in busy.stderr
    lines = [ln for ln in busy.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error: extract_visual ") and f"pid {os.getpid()} on" in " ".join(lines)
    # both waited and said for whom; then exactly one computed and the other reused its file
    for _, err in outs:
        assert "waiting for extract_visual" in err and "is being computed by pid" in err
    reused = ["visual features (reused)" in out for out, _ in outs]
    assert sorted(reused) == [False, True], [o for o, _ in outs]
    (folder,) = (root / "extract_visual").iterdir()
    assert json.loads((folder / "manifest.json").read_text())["status"] == "complete"
    with h5py.File(folder / "visual.h5") as a, h5py.File(clean_folder / "visual.h5") as b:
        assert np.array_equal(a["avadataset"][()], b["avadataset"][()])


# ---- no orphans ---------------------------------------------------------------------------------------------------
def test_a_killed_extraction_leaves_no_process_behind(ds, tmp_path):
    """kill -9 of `avel extract` with 2 decoding workers: its fork server, resource tracker and workers end too."""
    args = extract_args(ds, tmp_path / "store")
    args[args.index("--workers") + 1] = "2"
    p = start(args)
    # running with its workers: the command, the fork server, its workers (and the resource tracker)
    children = wait_for(lambda: [c for c in session_members(p.pid) if c != p.pid][3:] and
                        [c for c in session_members(p.pid) if c != p.pid], 120, "the decoding workers to start")
    # the run's token, as its children inherited it (the command set it after its own exec)
    token = Path(f"/proc/{children[0]}/environ").read_bytes().split(b"AVEL_RUN_TOKEN=")[1].split(b"\0")[0].decode()
    kill9(p)
    wait_for(lambda: not session_members(p.pid), 15, "the run's processes to end")
    from pipeline.reaper import tagged

    wait_for(lambda: not tagged(token), 5, "every process of the run to end")


def test_dataloader_workers_end_with_their_process_without_the_cli(tmp_path):
    """The library path (a user's script, a Prefect worker): the workers watch the process that started them."""
    script = tmp_path / "slow_loader.py"  # a file: the fork server's workers import the Dataset class from it
    script.write_text(
        "import time, torch\n"
        "from pipeline.runtime import worker_options\n"
        "class Slow(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 1000\n"
        "    def __getitem__(self, i): time.sleep(0.2); return i\n"
        "if __name__ == '__main__':\n"
        "    for _ in torch.utils.data.DataLoader(Slow(), num_workers=2, **worker_options(2)):\n"
        "        print('item', flush=True)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True,
                         env=env)
    assert p.stdout.readline().strip() == "item"
    assert len(session_members(p.pid)) >= 3
    kill9(p)
    wait_for(lambda: not session_members(p.pid), 15, "the workers and the fork server to end")


# ---- resume after kill -9 -----------------------------------------------------------------------------------------
def train_args(folder, root):
    return ["train", "--features", str(folder), "--root", str(root), "--epochs", "10", "--device", "cpu",
            "--precision", "fp32", "--set", f"model_args={json.dumps(TINY_MODEL)}", "--set", "batch_size=4",
            "--set", "lr=0.003", "--set", "milestones=[4,8]", "--set", "seed=5"]


def lines_in(path: Path) -> int:
    try:
        return max(0, len(path.read_text().strip().splitlines()) - 1)
    except OSError:
        return 0


def run_folder(root: Path, stage: str) -> Path:
    (folder,) = (root / stage).iterdir()
    return folder


@pytest.mark.parametrize("kill_after_epochs", [1, 5])
def test_training_killed_then_resumed_equals_an_uninterrupted_run(tmp_path, kill_after_epochs):
    folder = write_feature_folder(tmp_path / "feats")
    clean, cut = tmp_path / "clean", tmp_path / "cut"
    subprocess.run([*CLI, *train_args(folder, clean)], check=True, capture_output=True)
    p = start(train_args(folder, cut))
    csv = lambda: next((cut / "train").glob("*/metrics.csv"), Path("/nonexistent"))  # noqa: E731
    wait_for(lambda: lines_in(csv()) >= kill_after_epochs, 120, f"{kill_after_epochs} epochs", step=0.01)
    kill9(p)
    assert lines_in(csv()) < 10, "the run finished before it was killed: the test proves nothing"
    resumed = subprocess.run([*CLI, *train_args(folder, cut)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = run_folder(clean, "train"), run_folder(cut, "train")
    assert a.name == b.name  # the same stage key
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for k in ("test_accuracy", "best_epoch", "best_on_test_accuracy", "last_epoch_test_accuracy"):
        assert ma[k] == mb[k], k
    sa, sb = (torch.load(d / "last.pt", weights_only=True)["state_dict"] for d in (a, b))
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-7)
    ha, hb = ((d / "metrics.csv").read_text().splitlines() for d in (a, b))
    strip = lambda rows: [",".join(r.split(",")[:-2]) for r in rows]  # noqa: E731  (drop the timing columns)
    assert strip(ha) == strip(hb)


def finetune_args(ds, root, audio):
    return ["finetune", "--dataset", str(ds), "--root", str(root), "--audio", str(audio), "--random-init",
            "--precision", "fp32", "--set", "epochs=4", "--set", "batch_size=4", "--set", "trainable_stages=[layer4]",
            "--set", "frames_per_video=2", "--set", "crop_size=32", "--set", "workers=0", "--set", "milestones=[2]",
            "--set", "holdout_fraction=0"]


def test_finetuning_killed_then_resumed_equals_an_uninterrupted_run(ds, tmp_path):
    audio_root = tmp_path / "audio"
    subprocess.run([*CLI, "extract", "--dataset", str(ds), "--root", str(audio_root), "--modality", "audio",
                    "--random-init", "--workers", "0"], check=True, capture_output=True)
    audio = next((audio_root / "extract_audio").glob("*/audio.h5"))
    clean, cut = tmp_path / "clean", tmp_path / "cut"
    subprocess.run([*CLI, *finetune_args(ds, clean, audio)], check=True, capture_output=True)
    p = start(finetune_args(ds, cut, audio))
    loss = lambda: next((cut / "finetune").glob("*/loss.csv"), Path("/nonexistent"))  # noqa: E731
    wait_for(lambda: lines_in(loss()) >= 1, 180, "one fine-tuning epoch", step=0.01)
    kill9(p)
    assert lines_in(loss()) < 4, "the run finished before it was killed: the test proves nothing"
    resumed = subprocess.run([*CLI, *finetune_args(ds, cut, audio)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = run_folder(clean, "finetune"), run_folder(cut, "finetune")
    wa, wb = (torch.load(d / "resnet50_finetuned.pt", weights_only=True) for d in (a, b))
    sa, sb = (w.get("state_dict", w) for w in (wa, wb))
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)
    la, lb = ((d / "loss.csv").read_text().splitlines() for d in (a, b))
    assert [r.split(",")[:2] for r in la] == [r.split(",")[:2] for r in lb]


# ---- disk full, read-only -----------------------------------------------------------------------------------------
def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "disk"
    if not _mount_tmpfs(mnt, "size=256k"):
        pytest.skip("cannot mount a tmpfs here (needs root in a privileged container); the writer's fault "
                    "injection test covers the same error path")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def one_error_line_and_nothing_complete(args, store: Path) -> str:
    """Run the command; it must end with exit status 2 and one `error:` line (returned), no traceback, and leave
    no artifact under `store` that says complete."""
    r = subprocess.run([*CLI, *args], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(store) in last, last
    for m in store.glob("*/*/manifest.json"):
        assert json.loads(m.read_text())["status"] != "complete"
    return last


def test_a_disk_too_small_for_the_features_fails_before_any_video(ds, tiny_disk):
    assert "MB are free there" in one_error_line_and_nothing_complete(extract_args(ds, tiny_disk), tiny_disk)


def test_a_disk_that_fills_during_training_is_one_error_line_and_no_complete_artifact(tmp_path, tiny_disk):
    folder = write_feature_folder(tmp_path / "feats")
    subprocess.run(["dd", "if=/dev/zero", f"of={tiny_disk}/filler", "bs=1k", "count=200"], capture_output=True)
    last = one_error_line_and_nothing_complete(train_args(folder, tiny_disk), tiny_disk)
    assert last.startswith("error: cannot write to ") and "No space left on device" in last


def test_a_read_only_store_is_one_error_line(ds, tmp_path):
    ro = tmp_path / "ro"
    if not _mount_tmpfs(ro, "ro,size=64k"):
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        assert "Read-only file system" in one_error_line_and_nothing_complete(extract_args(ds, ro), ro)
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_write_failures_name_the_folder_and_keep_the_artifact_incomplete(tmp_path, monkeypatch):
    """Fault injection, for machines where no tmpfs can be mounted: the checkpoint write fails with ENOSPC."""
    import errno

    from pipeline.ave import train as train_mod
    from pipeline.ave.features import from_public_folder
    from pipeline.ave.train import TrainConfig, train_stage
    from pipeline.cli import write_error

    fs = from_public_folder(write_feature_folder(tmp_path / "feats"))
    root = tmp_path / "store"

    def full(path, *a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(train_mod, "save_checkpoint", full)
    cfg = TrainConfig(epochs=2, batch_size=4, device="cpu", precision="fp32", model_args=TINY_MODEL)
    with pytest.raises(OSError) as err:
        train_stage(fs, cfg, root)
    (manifest,) = (root / "train").glob("*/manifest.json")
    assert json.loads(manifest.read_text())["status"] == "failed"
    message = write_error(err.value)
    assert message.startswith(f"cannot write to {manifest.parent}: No space left on device")
    assert write_error(OSError(errno.ENOENT, "No such file or directory")) is None  # not a write failure
    # the failed run released its lock: another thread takes it at once (it would raise ArtifactBusy otherwise)
    monkeypatch.setattr(locks.policy, "wait", False)
    lock = ArtifactStore(root).lock("train", manifest.parent.name)
    result = {}
    t = threading.Thread(target=lambda: result.update(error=_error_of(lambda: (lock.acquire(), lock.release()))))
    t.start()
    t.join()
    assert result["error"] is None
