"""The artifact store: stage keys, manifests, atomic writes; and the config loader."""

import json

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
