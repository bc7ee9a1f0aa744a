"""The dense (untrimmed-video) pipeline as a Prefect flow: untrimmed videos -> dense features -> detector -> mAP.

Same conventions as `flows.pipeline`: tasks take paths and config dicts, reuse is decided by the artifact store's
stage keys (a second run reuses every stage; a changed train config retrains and re-evaluates, and reuses the
features), each stage publishes a markdown summary and its folder as Prefect artifacts, and progress is shown live.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.pictures import dense_timelines, pictures_markdown
from flows.tasks import GPU, Progress, manifest_pictures, publish, results_table
from pipeline.config import dump_config
from pipeline.dense.pipeline_config import forced_stages, resolve_dense_config
from pipeline.progress import reporter
from pipeline.store import ArtifactStore


@task(name="prepare-dense-dataset", task_run_name="prepare_dense_dataset", retries=2, retry_delay_seconds=5,
      cache_policy=NO_CACHE)
def prepare_dense_dataset(dataset: dict, root: str) -> dict:
    """{"annotations": JSON path, "features": folder or None (extract from videos)}; synthetic videos are
    generated once under <root>/datasets/ (under a lock: two runs on one store generate them once)."""
    from pipeline.dense.synthetic import ANNOTATIONS
    from pipeline.dense.videos import VideoSynthConfig, generate_video_dataset

    if dataset.get("features"):
        return {"annotations": dataset["annotations"], "features": dataset["features"]}
    if dataset.get("path"):
        path = Path(dataset["path"])
        return {"annotations": str(path / ANNOTATIONS if path.is_dir() else path), "features": None}
    synth = VideoSynthConfig(**dataset["synth"])
    digest = hashlib.sha256(json.dumps(dataset["synth"], sort_keys=True).encode()).hexdigest()[:10]
    name = f"dense-synth-{synth.train + synth.val + synth.test}v-c{synth.classes}-s{synth.seed}-{digest}"
    out = Path(root) / "datasets" / name
    done = out / ANNOTATIONS  # written last
    label = "dataset (synthetic untrimmed videos)"
    t0 = time.perf_counter()
    reused = done.is_file()
    if not reused:
        lock = ArtifactStore(Path(root)).lock("datasets", name)
        lock.acquire()
        try:
            reused = done.is_file()
            if not reused:
                n = synth.train + synth.val + synth.test
                reporter().start(label, n)
                generate_video_dataset(out, synth, progress=lambda k, total: reporter().update(label, k, total,
                                                                                              "videos"))
        finally:
            lock.release()
    reporter().finish(label, reused, time.perf_counter() - t0)
    return {"annotations": str(done), "features": None}


@task(name="dense-extract", task_run_name="dense_extract", tags=GPU, cache_policy=NO_CACHE)
def dense_extract_task(annotations: str, extract_cfg: dict, root: str, force: bool = False) -> dict:
    from pipeline.dense.extract import DenseExtractConfig, dense_extract

    cfg = DenseExtractConfig.model_validate(extract_cfg)
    progress = Progress("dense_extract")
    t0 = time.perf_counter()
    r = dense_extract(Path(annotations), cfg, Path(root), force=force,
                      progress=lambda done, total, vid: progress(done, total, "videos"))
    progress.complete()
    return publish("dense_extract", "dense_extract", r.dir, r.reused, time.perf_counter() - t0,
                   {"features": str(r.features), "failed": len(r.failed)})


def _dense_extract(annotations: str, extract_cfg: dict, root: str, force: bool) -> dict:
    """The extraction stage: a task here, or sharded over a Dask cluster (`extract.cluster`, flows.sharded) as a
    subflow; the same artifact and outcome either way."""
    if not extract_cfg.get("cluster"):
        return dense_extract_task(annotations, extract_cfg, root, force)
    from flows.sharded import run_sharded_dense_extract

    t0 = time.perf_counter()
    r = run_sharded_dense_extract(Path(annotations), extract_cfg, Path(root), force)
    return publish("dense_extract", "dense_extract", Path(r["dir"]), r["reused"], time.perf_counter() - t0,
                   {"features": r["features"], "failed": r["failed"], "cluster": extract_cfg["cluster"]})


@task(name="dense-train", task_run_name="dense_train", tags=GPU, cache_policy=NO_CACHE)
def dense_train_task(annotations: str, features: str, train_cfg: dict, root: str, warnings: list[str],
                     force: bool = False) -> dict:
    from pipeline.dense.data import load_dense_features
    from pipeline.dense.train import DenseTrainConfig, train_stage

    cfg = DenseTrainConfig.model_validate(train_cfg)
    fs = load_dense_features(Path(annotations), Path(features))
    progress = Progress("dense_train", cfg.epochs, "epochs")
    t0 = time.perf_counter()
    r = train_stage(fs, cfg, Path(root), force=force, warnings=warnings,
                    on_epoch=lambda e: progress(e["epoch"] + 1, cfg.epochs, f"epochs, loss {e['loss']:.3f}, val avg "
                                                                           f"mAP {100 * e['val_avg_map']:.1f} %"))
    progress.complete()
    return publish("dense_train", "dense_train", r.dir, r.reused, time.perf_counter() - t0,
                   {"checkpoint": str(r.dir / "best.pt"), "val_avg_map": r.metrics["val_avg_map"],
                    "best_epoch": r.metrics["best_epoch"], "parameters": r.metrics["parameters"]})


@task(name="dense-evaluate", task_run_name="dense_evaluate", tags=GPU, cache_policy=NO_CACHE)
def dense_evaluate_task(checkpoint: str, annotations: str, features: str, root: str, split: str,
                        force: bool = False) -> dict:
    from pipeline.dense.data import load_dense_features
    from pipeline.dense.train import evaluate_stage

    fs = load_dense_features(Path(annotations), Path(features))
    t0 = time.perf_counter()
    r = evaluate_stage(Path(checkpoint), fs, Path(root), split, force=force)
    m = r.metrics
    rows = "\n".join(f"| {th} | {100 * v:.2f} |" for th, v in m["mAP"].items())
    text = (f"## dense evaluation ({split})\n\n| tIoU | mAP % |\n|---|---|\n{rows}\n\n"
            f"**average mAP {100 * m['average_mAP']:.2f} %** (tIoU 0.1:0.9); mean over 0.5:0.9 "
            f"{100 * m['average_mAP_0.5:0.9']:.2f} %")
    timelines = _timelines(r.dir, r.reused, fs, m["split"])
    if timelines:
        text += f"\n\n## timelines of {len(timelines)} {m['split']} video(s)\n\n" + pictures_markdown(timelines)
    create_markdown_artifact(text, key="dense-evaluation")
    return publish("dense_evaluate", "dense_evaluate", r.dir, r.reused, time.perf_counter() - t0,
                   {"split": m["split"], "mAP": m["mAP"], "average_mAP": m["average_mAP"],
                    "average_mAP_high": m["average_mAP_0.5:0.9"]},
                   pictures=[])  # in the dense-evaluation artifact


def _timelines(folder: Path, reused: bool, fs, split: str) -> list[tuple[str, Path]]:
    """The evaluation's own PNG outputs, or else timelines of a few of the split's videos drawn here (once per
    run: a reused evaluation keeps the ones drawn when it was computed)."""
    own = manifest_pictures(ArtifactStore(folder.parent.parent).manifest(folder.parent.name, folder.name), folder)
    if own:
        return own
    drawn = sorted((folder / "timelines").glob("*_timeline.png")) if reused else []
    if drawn:
        return [(f"timeline {p.name.removesuffix('_timeline.png')}", p) for p in drawn]
    try:
        return dense_timelines(folder, fs, split)
    except Exception as e:  # a picture never fails the stage
        get_run_logger().warning(f"dense timelines not drawn: {type(e).__name__}: {e}")
        return []


@flow(name="avel-dense-pipeline", log_prints=True)
def dense_pipeline(config_path: str | None = None, overrides: list[str] | None = None,
                   force: list[str] | None = None) -> dict[str, Any]:
    """Untrimmed videos (or a released feature folder) -> dense features -> detector -> mAP on the chosen split."""
    t0 = time.perf_counter()
    cfg = resolve_dense_config(config_path, overrides)
    forced = forced_stages(force or [])
    root, c = str(cfg.root), dump_config(cfg)
    data = prepare_dense_dataset(c["dataset"], root)
    outcomes, warnings = [], []
    features = data["features"]
    if features is None:
        ex = _dense_extract(data["annotations"], c["extract"], root, "dense_extract" in forced)
        outcomes.append(ex)
        features, warnings = ex["features"], ex["warnings"]
    trained = dense_train_task(data["annotations"], features, c["train"], root, warnings, "dense_train" in forced)
    evaluated = dense_evaluate_task(trained["checkpoint"], data["annotations"], features, root, cfg.evaluate_split,
                                    "dense_evaluate" in forced)
    outcomes += [trained, evaluated]
    create_table_artifact(results_table(outcomes), key="dense-pipeline-stages",
                          description="stages: reused or computed")
    return {"annotations": data["annotations"], "features": features, "stages": outcomes,
            "split": evaluated["split"], "mAP": evaluated["mAP"], "average_mAP": evaluated["average_mAP"],
            "average_mAP_high": evaluated["average_mAP_high"], "checkpoint": trained["checkpoint"],
            "warnings": sorted(set(warnings)), "random_init": cfg.extract.random_init and data["features"] is None,
            "seconds": round(time.perf_counter() - t0, 1)}
