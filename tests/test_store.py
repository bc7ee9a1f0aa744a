"""The artifact store: stage keys, manifests, atomic writes; and the config loader."""

import json
import threading

import pytest

from pipeline.config import StrictModel, load_config
from pipeline.errors import UserError
from pipeline.store import ArtifactStore, atomic_path, stage_key, write_json_atomic


def test_stage_key_is_a_digest_of_what_determines_the_output():
    base = stage_key("extract", "1", {"a": 1, "b": [1, 2]}, {"dataset": "d1", "weights": "w1"})
    assert base == stage_key("extract", "1", {"b": [1, 2], "a": 1}, {"weights": "w1", "dataset": "d1"})
    changed = [stage_key("extract", "2", {"a": 1, "b": [1, 2]}, {"dataset": "d1", "weights": "w1"}),
               stage_key("extract", "1", {"a": 2, "b": [1, 2]}, {"dataset": "d1", "weights": "w1"}),
               stage_key("extract", "1", {"a": 1, "b": [1, 2]}, {"dataset": "d1", "weights": "w2"}),
               stage_key("train", "1", {"a": 1, "b": [1, 2]}, {"dataset": "d1", "weights": "w1"})]
    assert len({base, *changed}) == 5


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_stage_run_lifecycle_and_resume(tmp_path):
    store = ArtifactStore(tmp_path)
    run = store.open("extract", "1", {"batch": 8}, {"dataset": "abc"})
    assert run.dir == tmp_path / "extract" / run.manifest.key
    assert store.manifest("extract", run.manifest.key).status == "running"
    run.manifest.items["vid1"] = {"status": "ok"}
    run.save()
    # a killed run re-opened with the same inputs resumes with its per-item records
    again = store.open("extract", "1", {"batch": 8}, {"dataset": "abc"})
    assert again.manifest.items == {"vid1": {"status": "ok"}}
    (again.dir / "visual.h5").write_bytes(b"x" * 10)
    again.add_output("visual", "visual.h5", shape=(2, 10), dtype="float32")
    again.manifest.outputs["ghost"] = again.manifest.outputs["visual"].model_copy(update={"path": "nope.h5"})
    with pytest.raises(RuntimeError, match="outputs missing"):
        again.complete()
    del again.manifest.outputs["ghost"]
    again.complete()
    assert store.is_complete("extract", again.manifest.key)
    m = store.manifest("extract", again.manifest.key)
    assert m.outputs["visual"].shape == [2, 10] and m.environment["python"]
    assert store.find(m.key[:6]) == again.dir and store.find("extract") == again.dir
    with pytest.raises(UserError, match="no artifact matches"):
        store.find("zzz")


class _Train(StrictModel):
    epochs: int = 200
    lr: float = 7e-4


class _Run(StrictModel):
    train: _Train = _Train()
    name: str = "x"


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: demo\ntrain:\n  epochs: 5\n")
    cfg = load_config(_Run, path, ["train.lr=0.01"])
    assert (cfg.name, cfg.train.epochs, cfg.train.lr) == ("demo", 5, 0.01)
    with pytest.raises(UserError, match=r"run.yaml: train.epochs: Input should be a valid integer"):
        load_config(_Run, path, ["train.epochs=many"])
    with pytest.raises(UserError, match=r"train.epoch: Extra inputs are not permitted"):
        load_config(_Run, None, ["train.epoch=3"])
    with pytest.raises(UserError, match="not of the form key=value"):
        load_config(_Run, None, ["train.epochs"])


def test_reopening_a_complete_stage_reuses_it_and_restart_forgets_it(tmp_path):
    store = ArtifactStore(tmp_path)
    run = store.open("train", "1", {"epochs": 2}, {"features": "f"})
    run.complete()
    again = store.open("train", "1", {"epochs": 2}, {"features": "f"})
    assert again.is_complete and store.is_complete("train", run.manifest.key)
    again.restart()
    assert not store.is_complete("train", run.manifest.key)


def _lock_is_free(store: ArtifactStore, stage: str, key: str) -> bool:
    """Whether another thread could take the artifact's lock at once (the lock is per thread)."""
    from pipeline import locks

    got = {}

    def take():
        lock = store.lock(stage, key)
        try:
            lock.acquire()
        except locks.ArtifactBusy:
            got["free"] = False
            return
        got["free"] = True
        lock.release()

    wait, locks.policy.wait = locks.policy.wait, False
    try:
        t = threading.Thread(target=take)
        t.start()
        t.join(10)
    finally:
        locks.policy.wait = wait
    return got["free"]


def test_stage_context_reuses_forces_fails_and_recomputes_missing_outputs(tmp_path):
    store = ArtifactStore(tmp_path)
    args = ("train", "1", {"epochs": 2}, {"features": "f"})

    def compute(run, text: str) -> None:
        (run.dir / "model.pt").write_text(text)
        run.add_output("model", "model.pt")
        run.manifest.metrics = {"text": text}

    with store.stage(*args) as run:  # first run: computed, completed at the end of the block
        assert not run.reused and run.manifest.status == "running"
        assert not _lock_is_free(store, "train", run.manifest.key)  # held while the stage computes
        compute(run, "first")
    key = run.manifest.key
    assert store.is_complete("train", key) and store.manifest("train", key).metrics == {"text": "first"}
    assert _lock_is_free(store, "train", key)

    with store.stage(*args) as run:  # same key: reused, untouched, no lock held
        assert run.reused and run.is_complete and not run.lock.held
    assert (run.dir / "model.pt").read_text() == "first" and _lock_is_free(store, "train", key)

    (run.dir / "stale.tmp").write_text("left over")
    (run.dir / "sub").mkdir()
    (run.dir / "sub" / "part.h5").write_text("x")
    with store.stage(*args, force=True) as run:  # force: the folder emptied, a fresh manifest
        assert not run.reused and run.manifest.status == "running" and not run.manifest.outputs
        assert sorted(p.name for p in run.dir.iterdir()) == ["manifest.json"]
        compute(run, "forced")
    assert store.manifest("train", key).metrics == {"text": "forced"} and _lock_is_free(store, "train", key)

    (run.dir / "model.pt").unlink()  # complete, but an output is gone: recomputed, not reused
    (run.dir / "stale.tmp").write_text("left over")
    with store.stage(*args) as run:
        assert not run.reused and sorted(p.name for p in run.dir.iterdir()) == ["manifest.json"]
        compute(run, "again")
    assert store.manifest("train", key).metrics == {"text": "again"}

    class Boom(Exception):
        pass

    other = ("train", "1", {"epochs": 3}, {"features": "f"})
    with pytest.raises(Boom):  # an exception: marked failed with the reason, lock released, error raised
        with store.stage(*other) as run:
            run.manifest.items["v1"] = {"status": "ok"}
            (run.dir / "last.pt").write_text("epoch 1")
            run.save()
            raise Boom("killed at epoch 1")
    key2 = run.manifest.key
    failed = store.manifest("train", key2)
    assert failed.status == "failed" and "Boom" in failed.error and "killed at epoch 1" in failed.error
    assert _lock_is_free(store, "train", key2)
    with store.stage(*other) as run:  # re-opened, not complete: resumes with its files and per-item records
        assert not run.reused and run.manifest.status == "running" and run.manifest.error is None
        assert run.manifest.items == {"v1": {"status": "ok"}} and (run.dir / "last.pt").read_text() == "epoch 1"
        run.fail("no usable items")  # a failure recorded without raising stays failed
    assert store.manifest("train", key2).status == "failed" and store.manifest("train", key2).error == \
        "no usable items"
    assert _lock_is_free(store, "train", key2)
