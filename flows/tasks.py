"""Prefect tasks: thin wrappers over the stage functions of `pipeline/`, plus what the Prefect UI shows of them.

Each task takes paths, config dicts and flags (never tensors) and returns a small JSON-ready dict, the
`outcome`: stage, key, folder, reused or computed, seconds, and the stage's own numbers. Reuse is decided by the
artifact store's stage keys, so Prefect's own result cache is off (`NO_CACHE`). Tasks that run an encoder or a
model carry the tag `gpu` (`prefect concurrency-limit create gpu 1` serialises them on a shared GPU); only the
I/O task (preparing the dataset) retries. Task runs are named after their stage (`task_run_name`: `extract_audio`,
`finetune`, `train`, ...), and the pictures a stage writes are embedded in its artifacts (`flows.pictures`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from flows.pictures import finetune_png, pictures_markdown, replace_images
from pipeline import ave
from pipeline.progress import reporter
from pipeline.store import ArtifactStore, Manifest

GPU = ["gpu"]


def _artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def stage_markdown(m: Manifest, folder: Path, reused: bool, seconds: float) -> str:
    lines = [f"## {m.stage} `{m.key}` — {'reused' if reused else 'computed'} in {seconds:.1f} s", "",
             f"folder: `{folder}`  ", f"status: **{m.status}**, created {m.created}", ""]
    for w in m.warnings:
        lines.append(f"> **warning:** {w}  ")
    if m.inputs:
        lines += ["", "| input | digest |", "|---|---|", *[f"| {k} | `{v[:24]}` |" for k, v in m.inputs.items()]]
    if m.outputs:
        lines += ["", "| output | file | size | shape | dtype |", "|---|---|---|---|---|"]
        lines += [f"| {k} | `{o.path}` | {o.bytes / 2**20:.1f} MiB | {'x'.join(map(str, o.shape or []))} | "
                  f"{o.dtype or ''} |" for k, o in m.outputs.items()]
    if m.timings:
        lines += ["", "| timing | seconds |", "|---|---|", *[f"| {k} | {v:.2f} |" for k, v in m.timings.items()]]
    failed = {k: v for k, v in m.items.items() if v.get("status") not in ("ok", None)}
    if failed:
        lines += ["", f"**{len(failed)} item(s) not ok:**", "", "| item | status | reason |", "|---|---|---|"]
        lines += [f"| {k} | {v.get('status')} | {v.get('reason', v.get('error', ''))} |"
                  for k, v in list(failed.items())[:50]]
    if m.metrics:
        scalar = {k: v for k, v in m.metrics.items() if isinstance(v, (int, float, str))}
        lines += ["", "| metric | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in scalar.items()]]
    return "\n".join(lines)


def manifest_pictures(m: Manifest, folder: Path) -> list[tuple[str, Path]]:
    """The PNG files a stage records among its outputs, as (title, path)."""
    return [(name.replace("_", " "), folder / o.path) for name, o in m.outputs.items()
            if o.path.lower().endswith(".png")]


def publish(stage: str, label: str, folder: Path, reused: bool, seconds: float, extra: dict | None = None,
            pictures: list[tuple[str, Path]] | None = None) -> dict:
    """Markdown summary + link artifacts for one finished stage, and the outcome dict the flow collects. The
    summary embeds `pictures` ((title, PNG) pairs; None: the PNG outputs the stage's manifest records)."""
    manifest = ArtifactStore(folder.parent.parent).manifest(folder.parent.name, folder.name)
    key = _artifact_key(label)
    text = stage_markdown(manifest, folder, reused, seconds)
    pictures = manifest_pictures(manifest, folder) if pictures is None else pictures
    if pictures:
        text += "\n\n## pictures\n\n" + pictures_markdown(pictures)
    create_markdown_artifact(text, key=key, description=f"{label}: {'reused' if reused else 'computed'}")
    create_link_artifact(folder.resolve().as_uri(), link_text=str(folder), key=f"{key}-folder",
                         description=f"{label} artifact folder")
    reporter().finish(label, reused, seconds)
    return {"stage": stage, "label": label, "key": manifest.key, "dir": str(folder), "reused": reused,
            "seconds": round(seconds, 2), "warnings": manifest.warnings, **(extra or {})}


class Progress:
    """A stage's progress, shown twice: as a Prefect progress artifact (updated at most every 2 s: each update is
    an API call) and live in the terminal (`pipeline.progress.reporter()`: n/N, time left, the stage's text)."""

    def __init__(self, label: str, total: int | None = None, text: str = ""):
        self.label = label
        self.id = create_progress_artifact(0.0, key=_artifact_key(f"{label}-progress"), description=label)
        self.last = 0.0
        reporter().start(label, total)
        if text:
            reporter().update(label, 0, total, text)

    def __call__(self, done: int, total: int, text: str = "") -> None:
        reporter().update(self.label, done, total, text)
        now = time.monotonic()
        if now - self.last > 2.0:
            update_progress_artifact(self.id, round(100.0 * min(max(done / max(total, 1), 0.0), 1.0), 1))
            self.last = now

    def complete(self) -> None:
        update_progress_artifact(self.id, 100.0)


@task(name="prepare-dataset", task_run_name="prepare_dataset", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def prepare_dataset(dataset: dict, root: str) -> str:
    """The dataset folder: the given one (checked), or a synthetic one generated under <root>/datasets/."""
    from pipeline.ave.synth import MARKER, SynthConfig, generate_dataset, made_with

    if dataset.get("path"):
        path = Path(dataset["path"])
        report = ave.load_dataset(path).check(open_files=False)
        create_markdown_artifact(f"dataset `{path}`: {report.rows} rows, {report.videos} videos, "
                                 f"{len(report.missing)} missing", key="dataset")
        return str(path)
    synth = SynthConfig(**dataset["synth"])
    out = Path(root) / "datasets" / f"synth-v{synth.videos}-c{synth.classes}-s{synth.seed}-{synth.width}x{synth.height}"
    label = "dataset (synthetic)"
    t0 = time.perf_counter()
    done = out / MARKER  # written last: a folder without it is unfinished
    reused = made_with(out, synth)
    if not reused:  # under a lock: two pipelines on one store generate the dataset once
        lock = ArtifactStore(Path(root)).lock("datasets", out.name)
        lock.acquire()
        try:
            reused = made_with(out, synth)  # generated by the run we waited for
            if not reused:
                if done.is_file():  # an older generator's (or other settings') data: its stages' keys differ
                    reporter().note(f"notice: {out} holds another generator version's data (or other settings); "
                                    f"regenerating it with version {synth.version}")
                reporter().start(label, synth.videos)
                generate_dataset(out, synth,
                                 progress=lambda n, total: reporter().update(label, n, total, "videos"))
        finally:
            lock.release()
    reporter().finish(label, reused, time.perf_counter() - t0)
    return str(out)


@task(name="extract", task_run_name="{label}", tags=GPU, cache_policy=NO_CACHE)
def extract_task(dataset: str, extract_cfg: dict, root: str, modality: str, label: str, force: bool = False) -> dict:
    from pipeline.ave.extract import ExtractConfig, extract

    cfg = ExtractConfig.model_validate({**extract_cfg, "modality": modality})
    progress = Progress(label)
    t0 = time.perf_counter()
    result = extract(Path(dataset), cfg, Path(root), force=force,
                     progress=lambda done, total, _vid: progress(done, total, "videos"))[modality]
    progress.complete()
    return publish(f"extract_{modality}", label, result.dir, result.reused, time.perf_counter() - t0,
                   {"path": str(result.path), "random_init": result.random_init,
                    "failed_rows": len(result.failed_rows)})


@task(name="finetune", task_run_name="finetune", tags=GPU, cache_policy=NO_CACHE)
def finetune_task(dataset: str, audio_h5: str, finetune_cfg: dict, root: str, resnet_weights: str | None,
                  random_init: bool, force: bool = False) -> dict:
    from pipeline.ave.finetune import FinetuneConfig, finetune_stage

    cfg = FinetuneConfig.model_validate(finetune_cfg)
    progress = Progress("finetune", cfg.epochs, "epochs (measuring retrieval before)")
    t0 = time.perf_counter()
    result = finetune_stage(Path(dataset), Path(audio_h5), cfg, Path(root),
                            resnet_weights=Path(resnet_weights) if resnet_weights else None, random_init=random_init,
                            force=force, on_epoch=lambda r: progress(r["epoch"] + 1, cfg.epochs,
                                                                     f"epochs, loss {r['loss']:.4f}"))
    progress.complete()
    return publish("finetune", "finetune", result.dir, result.reused, time.perf_counter() - t0,
                   {"weights": str(result.weights), "weights_sha256": result.sha256,
                    "retrieval_before": result.metrics.get("retrieval_before"),
                    "retrieval_after": result.metrics.get("retrieval_after")},
                   pictures=_finetune_pictures(result.dir, result.reused))


@task(name="train", task_run_name="{label}", tags=GPU, cache_policy=NO_CACHE)
def train_task(dataset: str, visual_h5: str, audio_h5: str, train_cfg: dict, root: str, label: str = "train",
               force: bool = False) -> dict:
    from pipeline.ave.features import from_dataset
    from pipeline.ave.train import TrainConfig, train_stage

    cfg = TrainConfig.model_validate(train_cfg)
    fs = from_dataset(Path(dataset), Path(visual_h5), Path(audio_h5))
    progress = Progress(label, cfg.epochs, "epochs")

    def on_epoch(r: dict) -> None:
        val = f", val {r['val_acc']:.1f} %" if r.get("val_acc") is not None else ""
        progress(r["epoch"] + 1, cfg.epochs, f"epochs, loss {r['loss']:.3f}{val}")

    t0 = time.perf_counter()
    result = train_stage(fs, cfg, Path(root), force=force, on_epoch=on_epoch)
    progress.complete()
    m = result.metrics
    return publish("train", label, result.dir, result.reused, time.perf_counter() - t0,
                   {"checkpoint": str(result.dir / "best.pt"), "model": cfg.model, "test_accuracy": m["test_accuracy"],
                    "test_accuracy_label": m["test_accuracy_label"],
                    "best_on_test_accuracy": m["best_on_test_accuracy"],
                    "all_background_accuracy": m["all_background_accuracy"], "best_epoch": m["best_epoch"]})


@task(name="evaluate", task_run_name="evaluate", tags=GPU, cache_policy=NO_CACHE)
def evaluate_task(checkpoint: str, dataset: str, visual_h5: str, audio_h5: str, root: str, split: str = "test",
                  force: bool = False) -> dict:
    from pipeline.ave.features import from_dataset
    from pipeline.ave.train import evaluate_stage

    fs = from_dataset(Path(dataset), Path(visual_h5), Path(audio_h5))
    t0 = time.perf_counter()
    result = evaluate_stage(Path(checkpoint), fs, Path(root), split, force=force)
    report = result.dir / f"report_{split}.md"
    if report.is_file():  # the Prefect UI cannot show local images: the report's pictures embedded as data URIs
        create_markdown_artifact(replace_images(report.read_text(encoding="utf-8"), report.parent),
                                 key="evaluation-report", description=f"evaluation report ({split} split)")
    m = result.metrics
    return publish("evaluate", "evaluate", result.dir, result.reused, time.perf_counter() - t0,
                   {"split": split, "accuracy": m["accuracy"], "all_background_accuracy": m["all_background_accuracy"],
                    "event_f1": m["event"]["f1"], "correct_segments": m["correct_segments"],
                    "segments": m["segments"]},
                   pictures=[])  # in the evaluation-report artifact


def _finetune_pictures(folder: Path, reused: bool) -> list[tuple[str, Path]]:
    """The fine-tuning stage's own pictures, or else the loss and retrieval curves drawn here (once per run)."""
    m = ArtifactStore(folder.parent.parent).manifest(folder.parent.name, folder.name)
    own = manifest_pictures(m, folder)
    if own:
        return own
    out = folder / "curves.png"
    if not (reused and out.is_file()):
        try:
            finetune_png(folder, out)
        except Exception as e:  # a picture never fails the stage
            get_run_logger().warning(f"fine-tuning curves not drawn: {type(e).__name__}: {e}")
    return [("fine-tuning loss and retrieval", out)]


def results_table(outcomes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"stage": o["label"], "reused": "reused" if o["reused"] else "computed", "seconds": o["seconds"],
             "key": o["key"], "folder": o["dir"]} for o in outcomes]
