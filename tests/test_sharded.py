"""Sharded extraction on a local Dask cluster through Prefect: every row once, and the same file (byte-equal
features) and manifest as the single-process stage; finished parts are skipped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import pytest

pytest.importorskip("prefect_dask")

from pipeline.ave.extract import ExtractConfig, extract, extract_shard, plan_shards, planned_key  # noqa: E402
from pipeline.ave.synth import SynthConfig, generate_dataset  # noqa: E402

CFG = {"random_init": True, "frames_per_segment": 1, "crop_size": 32, "workers": 0, "threads": 1, "device": "cpu",
       "precision": "fp32"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shard-ds")
    # 5 videos, one of them with two rows: shards of 2 videos give 3 shards, the last one short
    generate_dataset(out, SynthConfig(videos=5, classes=2, seed=4, duplicates=1, fps=2, width=32, height=32))
    return out


def _read(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in ("avadataset", "valid", "done")} | {"attrs": dict(f.attrs)}


def test_a_finished_part_is_not_recomputed(dataset, tmp_path):
    cfg = ExtractConfig(**CFG, modality="audio")
    shards = plan_shards(dataset, 2)
    assert [len(s) for s in shards] == [2, 2, 1] and len(set(sum(shards, []))) == 5
    first = extract_shard(dataset, cfg, ["audio"], 2, shards[2], tmp_path)["audio"]
    again = extract_shard(dataset, cfg, ["audio"], 2, shards[2], tmp_path)["audio"]
    assert not first["reused"] and again["reused"] and again["path"] == first["path"]
    assert planned_key(dataset, cfg, "audio") in first["path"]


def test_local_cluster_of_two_gives_the_single_process_files(prefect_harness, dataset, tmp_path):
    from flows.sharded import run_sharded_extract

    single = extract(dataset, ExtractConfig(**CFG), tmp_path / "single")
    out = run_sharded_extract(dataset, CFG, tmp_path / "sharded", "local:2", shard_videos=2)
    for m in ("visual", "audio"):
        a, b = _read(single[m].path), _read(Path(out[m]["path"]))
        assert a["avadataset"].shape == b["avadataset"].shape
        assert a["avadataset"].tobytes() == b["avadataset"].tobytes()  # byte-equal: one thread, one forward a video
        assert (a["valid"] == b["valid"]).all() and b["done"].all()
        assert {k: v for k, v in a["attrs"].items()} == {k: v for k, v in b["attrs"].items()}
        assert out[m]["key"] == single[m].key
        ma = json.loads((single[m].dir / "manifest.json").read_text())
        mb = json.loads((Path(out[m]["path"]).parent / "manifest.json").read_text())
        assert ma["key"] == mb["key"] and ma["status"] == mb["status"] == "complete"
        assert set(ma["items"]) == set(mb["items"])  # every video once
        assert [it["rows"] for it in ma["items"].values()] == [mb["items"][v]["rows"] for v in ma["items"]]
        rows = sorted(r for it in mb["items"].values() for r in it["rows"])
        assert rows == list(range(a["avadataset"].shape[0]))  # every row once
        assert len(out[m]["shards"]) == 3 and os.getpid() not in {sh["pid"] for sh in out[m]["shards"]}
    assert not (tmp_path / "sharded" / ".shards" / "extract_visual").exists() or not any(
        (tmp_path / "sharded" / ".shards" / "extract_visual").rglob("*.h5"))  # parts removed after the merge
    again = run_sharded_extract(dataset, CFG, tmp_path / "sharded", "local:2", shard_videos=2)
    assert all(r["reused"] for r in again.values())


def test_bad_cluster_is_one_clear_error():
    from flows.sharded import task_runner
    from pipeline.errors import UserError

    for bad in ("local:0", "local:x", "http://x"):
        with pytest.raises(UserError, match="--cluster"):
            task_runner(bad)


@pytest.mark.slow
def test_pipeline_with_a_cluster_writes_what_a_single_process_run_reuses(prefect_harness, tmp_path):
    from flows.pipeline import full_pipeline
    from tests.test_flows import by_label, tiny_config

    cfg = tiny_config(tmp_path)
    sharded = full_pipeline(config={**cfg, "extract": {**cfg["extract"], "cluster": "local:2", "shard_videos": 2}})
    stages = by_label(sharded)
    assert stages["extract_audio"]["cluster"] == "local:2" and not stages["extract_audio"]["reused"]
    single = full_pipeline(config=cfg)
    assert all(o["reused"] for o in single["stages"])
    assert [o["key"] for o in single["stages"]] == [o["key"] for o in sharded["stages"]]


# ---- dense ------------------------------------------------------------------------------------------------------
DENSE_CFG = {"random_init": True, "frames_per_window": 1, "crop_size": 32, "device": "cpu", "precision": "fp32",
             "threads": 1, "shard_videos": 2}


@pytest.fixture(scope="module")
def dense_dataset(tmp_path_factory) -> Path:
    from pipeline.dense.videos import VideoSynthConfig, generate_video_dataset

    out = tmp_path_factory.mktemp("dense-shard") / "ds"
    # 3 videos: shards of 2 give 2 shards, the last one short
    generate_video_dataset(out, VideoSynthConfig(train=2, val=0, test=1, classes=2, min_length_s=20,
                                                 max_length_s=22, fps=4, width=48, height=32))
    return out


def test_dense_part_is_reused_and_a_cut_off_merge_resumes(dense_dataset, tmp_path):
    from pipeline.dense.extract import DenseExtractConfig, dense_extract, extract_shard, plan_shards

    cfg = DenseExtractConfig(**DENSE_CFG)
    key, shards = plan_shards(dense_dataset, cfg)
    assert [len(s) for s in shards] == [2, 1]
    parts = [extract_shard(dense_dataset, cfg, i, vids, tmp_path) for i, vids in enumerate(shards)]
    assert not any(p["reused"] for p in parts) and key in parts[0]["path"]
    assert extract_shard(dense_dataset, cfg, 1, shards[1], tmp_path)["reused"]
    # a merge cut off after it moved the first video's files: the rerun finds them in place
    vid = shards[0][0]
    features = tmp_path / "dense_extract" / key / "features"
    features.mkdir(parents=True)
    for suffix in ("_resnet50.npy", "_cnn14.npy"):
        os.replace(Path(parts[0]["path"]) / f"{vid}{suffix}", features / f"{vid}{suffix}")
    r = dense_extract(dense_dataset, cfg, tmp_path, parts=[Path(p["path"]) for p in parts])
    assert r.dir.name == key and not r.failed and len(list(r.features.glob("*.npy"))) == 6
    manifest = json.loads((r.dir / "manifest.json").read_text())
    assert manifest["metrics"]["sharded"] and manifest["metrics"]["torch_threads"] == 1


def test_dense_local_cluster_of_two_gives_the_single_process_folder(prefect_harness, dense_dataset, tmp_path):
    from flows.sharded import run_sharded_dense_extract
    from pipeline.dense.extract import DenseExtractConfig, dense_extract

    single = dense_extract(dense_dataset, DenseExtractConfig(**DENSE_CFG), tmp_path / "single")
    out = run_sharded_dense_extract(dense_dataset, {**DENSE_CFG, "cluster": "local:2"}, tmp_path / "sharded")
    assert out["key"] == single.dir.name and not out["reused"] and out["failed"] == 0
    a = {f.name: f.read_bytes() for f in single.features.iterdir()}
    b = {f.name: f.read_bytes() for f in Path(out["features"]).iterdir()}
    assert a == b  # byte-equal .npy files and features.json: one thread, the same forward per window chunk
    ma = json.loads((single.dir / "manifest.json").read_text())
    mb = json.loads((Path(out["dir"]) / "manifest.json").read_text())
    assert list(ma["items"]) == list(mb["items"]) and mb["status"] == "complete"  # every video once, in order
    assert [it["steps"] for it in ma["items"].values()] == [it["steps"] for it in mb["items"].values()]
    assert len(out["shards"]) == 2 and os.getpid() not in {sh["pid"] for sh in out["shards"]}
    assert not (tmp_path / "sharded" / ".shards" / "dense_extract" / out["key"]).exists()  # parts removed
    again = run_sharded_dense_extract(dense_dataset, {**DENSE_CFG, "cluster": "local:2"}, tmp_path / "sharded")
    assert again["reused"]


@pytest.mark.slow
def test_dense_pipeline_with_a_cluster_writes_what_a_single_process_run_reuses(prefect_harness, tmp_path):
    from flows.dense import dense_pipeline
    from tests.test_dense_train import TINY

    cfg = {"root": str(tmp_path / "store"),
           "dataset": {"synth": {"train": 2, "val": 1, "test": 1, "classes": 2, "seed": 1, "min_length_s": 8,
                                 "max_length_s": 12}},
           "extract": {"random_init": True, "frames_per_window": 1, "crop_size": 64, "device": "cpu",
                       "cluster": "local:2", "shard_videos": 2},
           "train": {**TINY, "epochs": 1, "batch_size": 2}}
    path = tmp_path / "dense.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    sharded = dense_pipeline(config_path=str(path))
    extract = sharded["stages"][0]
    assert extract["stage"] == "dense_extract" and extract["cluster"] == "local:2" and not extract["reused"]
    single = dense_pipeline(config_path=str(path), overrides=["extract.cluster=null"])
    assert all(o["reused"] for o in single["stages"])
    assert [o["key"] for o in single["stages"]] == [o["key"] for o in sharded["stages"]]
