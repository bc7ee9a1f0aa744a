"""The Prefect flows on a tiny generated dataset: completes, reuses, re-runs only what a change touches, fails cleanly.

One Prefect test harness (a temporary server) for the whole session: starting it costs 10-20 s.
"""

import h5py
import pytest

pytest.importorskip("prefect")

from flows.pipeline import full_pipeline  # noqa: E402  (after the importorskip)
from pipeline.store import ArtifactStore  # noqa: E402
from tests.features_fixture import TINY_MODEL  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def tiny_config(root):
    return {
        "root": str(root),
        "dataset": {"synth": {"videos": 6, "classes": 2, "seed": 3, "fps": 4, "width": 64, "height": 48}},
        "extract": {"random_init": True, "frames_per_segment": 1, "workers": 0},
        "finetune": {"epochs": 1, "batch_size": 4, "trainable_stages": ["layer4"], "frames_per_video": 2,
                     "crop_size": 32, "workers": 0, "holdout_fraction": 0.0},
        "train": {"epochs": 2, "batch_size": 4, "device": "cpu", "model": TINY_MODEL},
    }


def by_label(result):
    return {o["label"]: o for o in result["stages"]}


def test_pipeline_runs_reuses_and_reruns_only_what_changed(prefect_harness, tmp_path):
    cfg = tiny_config(tmp_path)
    first = full_pipeline(config=cfg)
    stages = by_label(first)
    assert list(stages) == ["extract_audio", "extract_visual (initial encoder)", "finetune",
                            "extract_visual (fine-tuned)", "train", "evaluate"]
    assert not any(o["reused"] for o in first["stages"])
    assert 0 <= first["accuracy"] <= 100
    assert any(w.startswith("RANDOM WEIGHTS") for w in first["warnings"])
    # fine-tuned from a random trunk: the re-extracted features still say RANDOM WEIGHTS
    assert stages["extract_visual (fine-tuned)"]["random_init"]
    with h5py.File(stages["extract_visual (fine-tuned)"]["path"]) as f:
        assert f.attrs["random_init"]
        assert f["avadataset"].shape[:2] == (6, 10)  # one row per video (no duplicate rows below 10 videos)

    second = full_pipeline(config=cfg)
    assert all(o["reused"] for o in second["stages"])
    assert [o["key"] for o in second["stages"]] == [o["key"] for o in first["stages"]]

    changed = full_pipeline(config=cfg, overrides=["finetune.lr=0.005"])
    rerun = {label for label, o in by_label(changed).items() if not o["reused"]}
    assert rerun == {"finetune", "extract_visual (fine-tuned)", "train", "evaluate"}

    forced = full_pipeline(config=cfg, force=["train"])
    assert {label for label, o in by_label(forced).items() if not o["reused"]} == {"train", "evaluate"}


def test_a_failing_stage_fails_the_run_and_keeps_finished_artifacts(prefect_harness, tmp_path, monkeypatch):
    import pipeline.train

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure in train")

    monkeypatch.setattr(pipeline.train, "train_stage", broken)
    state = full_pipeline(config=tiny_config(tmp_path), return_state=True)
    assert state.is_failed()
    with pytest.raises(RuntimeError, match="injected failure in train"):
        state.result()
    store = ArtifactStore(tmp_path)
    finished = {m.stage for m in store.list() if m.status == "complete"}
    assert finished == {"extract_audio", "extract_visual", "finetune"}
    for m in store.list("extract_visual"):
        with h5py.File(store.path(m.stage, m.key) / m.outputs["visual"].path) as f:
            assert f["avadataset"][()].any()  # complete and readable
