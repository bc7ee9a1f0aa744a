"""Sharded extraction on a local Dask cluster through Prefect: every row once, and the same file (byte-equal
features) and manifest as the single-process stage; finished parts are skipped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

pytest.importorskip("prefect_dask")

from pipeline.ave.extract import ExtractConfig, extract  # noqa: E402
from pipeline.ave.shards import extract_shard, plan_shards, planned_key  # noqa: E402
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
    first = extract_shard(dataset, cfg, "audio", 2, shards[2], tmp_path)
    again = extract_shard(dataset, cfg, "audio", 2, shards[2], tmp_path)
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
