"""The Prefect flows on a tiny generated dataset: completes, reuses, re-runs only what a change touches, fails cleanly.

One Prefect test harness (a temporary server, `prefect_harness` in conftest) for the whole session: 10-20 s.
"""

from pathlib import Path

import h5py
import pytest

pytest.importorskip("prefect")

from flows.pipeline import full_pipeline  # noqa: E402  (after the importorskip)
from pipeline.progress import Reporter, use_reporter  # noqa: E402
from pipeline.store import ArtifactStore  # noqa: E402
from tests.features_fixture import TINY_MODEL  # noqa: E402
from tests.test_flow_artifacts import (  # noqa: E402
    assert_embeds_pictures,
    assert_stage_names,
    flow_run_artifacts,
    task_run_names,
)


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


class Recorder(Reporter):
    def __init__(self):
        self.events = []

    def start(self, label, total=None):
        self.events.append(("start", label, total, ""))

    def update(self, label, done, total=None, text=""):
        self.events.append(("update", label, (done, total), text))

    def finish(self, label, reused, seconds, note=""):
        self.events.append(("finish", label, reused, note))


def test_pipeline_runs_reuses_and_reruns_only_what_changed(prefect_harness, tmp_path):
    cfg = tiny_config(tmp_path)
    with use_reporter(Recorder()) as rec:
        state = full_pipeline(config=cfg, return_state=True)
    first = state.result()
    stages = by_label(first)
    # live progress: every stage starts, counts up to its total and finishes; epochs show loss and val accuracy
    finished = [e[1] for e in rec.events if e[0] == "finish"]
    assert finished == ["dataset (synthetic)", *stages]
    updates = {}
    for kind, label, value, text in rec.events:
        if kind == "update":
            updates.setdefault(label, []).append((value, text))
    assert updates["dataset (synthetic)"][-1][0] == (6, 6)
    assert updates["extract_audio"][-1][0] == (6, 6)
    assert updates["train"][-1][0] == (2, 2) and "loss" in updates["train"][-1][1] and "val" in updates["train"][-1][1]
    assert any("loss" in text for _, text in updates["finetune"])
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
    # what the Prefect UI shows: pictures embedded in the artifacts, task runs named after their stage
    artifacts = flow_run_artifacts(state.state_details.flow_run_id)
    assert len(assert_embeds_pictures(artifacts["evaluation-report"], at_least=2)) == 2  # confusion, per class
    assert_embeds_pictures(artifacts["train"])  # training curves
    assert_embeds_pictures(artifacts["finetune"])  # loss and retrieval
    assert "data:image" not in artifacts["extract-audio"]
    names = task_run_names(state.state_details.flow_run_id, {"extract_audio", "finetune", "train", "evaluate"})
    assert_stage_names(names, {"prepare_dataset", "extract_audio", "extract_visual (initial encoder)", "finetune",
                               "extract_visual (fine-tuned)", "train", "evaluate"})

    second = full_pipeline(config=cfg)
    assert all(o["reused"] for o in second["stages"])
    assert [o["key"] for o in second["stages"]] == [o["key"] for o in first["stages"]]

    changed = full_pipeline(config=cfg, overrides=["finetune.lr=0.005"])
    rerun = {label for label, o in by_label(changed).items() if not o["reused"]}
    assert rerun == {"finetune", "extract_visual (fine-tuned)", "train", "evaluate"}

    forced = full_pipeline(config=cfg, force=["train"])
    assert {label for label, o in by_label(forced).items() if not o["reused"]} == {"train", "evaluate"}

    # the other localizer, by name in the config (`train.model` held CACE's overrides before the registry: the
    # tiny config above still says so, and is read as CACE's model_args)
    other = full_pipeline(config=cfg, overrides=["train.model=aveclip", "train.model_args={d_model: 16, num_heads: 2, "
                                                 "feature_heads: 2, ff_mult: 2}"])
    assert {label for label, o in by_label(other).items() if not o["reused"]} == {"train", "evaluate"}
    assert by_label(other)["train"]["model"] == "aveclip" and 0 <= other["accuracy"] <= 100

    # the baseline comparison: the localizer on the initial and on the fine-tuned features, the same seeds
    compared = full_pipeline(config=cfg, overrides=["baseline=true"])
    rows = compared["baseline"]["rows"]
    assert [r["visual features"] for r in rows] == ["initial encoder", "fine-tuned encoder"]
    assert all(r["seeds"] == "3917, 3918, 3919" and len(r["per seed"].split(", ")) == 3 for r in rows)
    labels = by_label(compared)
    main = labels["train (fine-tuned encoder, seed 3917)"]
    assert main["key"] == labels["train"]["key"] and main["reused"]  # the main run is the first seed
    assert labels["train (initial encoder, seed 3917)"]["key"] != labels["train"]["key"]
    report = Path(compared["baseline"]["report"]).read_text()
    assert "| initial encoder |" in report and "| fine-tuned encoder |" in report and "RANDOM WEIGHTS" in report


def test_a_failing_stage_fails_the_run_and_keeps_finished_artifacts(prefect_harness, tmp_path, monkeypatch):
    import pipeline.ave.train

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure in train")

    monkeypatch.setattr(pipeline.ave.train, "train_stage", broken)
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


def test_bad_config_is_one_error_line_before_prefect_starts(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset:\n  path: /nonexistent\n  synth: {videos: 4}\n")
    missing = tmp_path / "missing.yaml"
    missing.write_text(f"dataset: {{path: {tmp_path / 'nowhere'}}}\n")
    avel = Path(sys.executable).with_name("avel")
    for cfg, message in ((bad, "give exactly one of dataset.path"), (missing, "nowhere")):
        proc = subprocess.run([str(avel), "run", "--config", str(cfg), "--root", str(tmp_path / "art")],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stdout == ""
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


@pytest.mark.slow
def test_two_pipeline_runs_on_one_store_compute_each_stage_once(tmp_path):
    """Two `avel run` at once (each with its own temporary Prefect server) on one store: both finish, every
    stage is computed by exactly one of them and reused by the other, and the artifacts are those of one run."""
    import subprocess
    import sys

    import yaml

    cfg = tiny_config(tmp_path / "store")
    cfg["train"] = {**cfg["train"], "model_args": cfg["train"].pop("model")}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--config", str(path)]
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in runs]
    for p, (out, err) in zip(runs, outs):
        assert p.returncode == 0, err[-3000:]
    stages = ["extract_audio", "extract_visual (initial encoder)", "finetune", "extract_visual (fine-tuned)", "train",
              "evaluate"]

    def outcome(out: str, label: str) -> str:
        row = next(ln for ln in out.splitlines() if ln.strip("│ ").startswith(label + " ") or f"│ {label} " in ln)
        return "computed" if "computed" in row else "reused"

    for label in stages:
        assert sorted(outcome(out, label) for out, _ in outs) == ["computed", "reused"], label
    store = ArtifactStore(tmp_path / "store")
    assert all(m.status == "complete" for m in store.list())
    assert len(store.list("train")) == 1 and len(store.list("extract_visual")) == 2
    last = [out.strip().splitlines()[-1] for out, _ in outs]
    assert last[0].split(" in ")[0] == last[1].split(" in ")[0]  # the same accuracy line (its time aside)
