"""`avel dense ...`: the dense (untrimmed, UnAV-100) task's commands. Thin, like `pipeline.cli`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline.errors import UserError


dense_app = typer.Typer(no_args_is_help=True, help="Dense AVEL in untrimmed videos (the UnAV-100 layout).")
dataset_app = typer.Typer(no_args_is_help=True, help="Look at a UnAV-100 annotation file.")
dense_app.add_typer(dataset_app, name="dataset")
console = Console()

AnnotationsArg = typer.Argument(..., help="The annotation JSON (UnAV-100 layout), or a folder holding one.")


def _annotations(path: Path) -> Path:
    from pipeline.dense.synthetic import ANNOTATIONS

    path = Path(path)
    return path / ANNOTATIONS if path.is_dir() else path


@dataset_app.command("summary")
def dataset_summary(annotations: Path = AnnotationsArg):
    """Videos, events, classes and durations per split."""
    from pipeline.dense.annotations import load_annotations

    ds = load_annotations(_annotations(annotations))
    s = ds.summary()
    console.print(f"{s['file']}: {s['videos']} videos, {s['classes']} classes", highlight=False, soft_wrap=True)
    for name, r in s["splits"].items():
        console.print(f"  {name}: {r['videos']} videos, {r['events']} events ({r['events_per_video']:.2f} per video), "
                      f"{r['classes']} classes, duration mean {r['mean_duration_s']} s max {r['max_duration_s']} s, "
                      f"event mean {r['mean_event_s']} s, {r['videos_with_overlapping_classes']} videos with "
                      f"overlapping classes", highlight=False, soft_wrap=True)
    if ds.problems:
        console.print(f"[yellow]{len(ds.problems)} problem(s)[/yellow]: `avel dense dataset check` lists them")


@dataset_app.command("check")
def dataset_check(annotations: Path = AnnotationsArg,
                  features: Optional[Path] = typer.Option(None, "--features", help="Also check a feature folder "
                                                          "(<vid>_rgb.npy, <vid>_flow.npy, <vid>_vggish.npy).")):
    """Every problem of the annotations (and features): exit status 1 if there is any."""
    from pipeline.dense.annotations import load_annotations

    ds = load_annotations(_annotations(annotations))
    problems = list(ds.problems)
    if features is not None:
        from pipeline.dense.features import check_folder

        problems += check_folder(Path(features), list(ds.videos))
    for p in problems:
        console.print(f"[red]problem:[/red] {p}", highlight=False, soft_wrap=True)
    console.print(f"{len(ds.videos)} videos, {len(problems)} problem(s)")
    raise typer.Exit(1 if problems else 0)


@dense_app.command()
def synth(out: Path = typer.Option(..., "--out", help="Folder for the annotation JSON and the videos or features."),
          kind: str = typer.Option("features", help="features (.npy files, seconds) or videos (real MP4 files)."),
          train: Optional[int] = typer.Option(None, help="Training videos (features 120, videos 24)."),
          val: Optional[int] = typer.Option(None, help="Validation videos (30 / 6)."),
          test: Optional[int] = typer.Option(None, help="Test videos (30 / 6)."),
          classes: Optional[int] = typer.Option(None, help="Classes (6 / 4)."),
          seed: int = typer.Option(0, help="Same seed, same files."),
          shape_mode: bool = typer.Option(False, "--shape-mode", help="features: UnAV's widths (1024+1024, 128).")):
    """A synthetic untrimmed dataset in the UnAV-100 layout: feature files directly (fast tests) or real videos."""
    sizes = {k: v for k, v in (("train", train), ("val", val), ("test", test), ("classes", classes)) if v is not None}
    if kind == "features":
        from pipeline.dense.synthetic import FeatureSynthConfig, generate_feature_dataset

        cfg = FeatureSynthConfig(seed=seed, **sizes, **({"rgb_dim": 1024, "flow_dim": 1024, "audio_dim": 128}
                                                          if shape_mode else {}))
        with console.status("writing features"):
            path = generate_feature_dataset(out, cfg)
        console.print(f"wrote {path} and {cfg.train + cfg.val + cfg.test} x 3 feature files in {out / 'features'}")
    elif kind == "videos":
        from rich.progress import Progress

        from pipeline.dense.videos import VideoSynthConfig, generate_video_dataset

        cfg = VideoSynthConfig(seed=seed, **sizes)
        n = cfg.train + cfg.val + cfg.test
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("rendering videos", total=n)
            path = generate_video_dataset(out, cfg, progress=lambda done, total: progress.update(task, completed=done))
        console.print(f"wrote {path} and {n} videos in {out / 'videos'}")
    else:
        raise UserError(f"--kind {kind!r}: features or videos")


@dense_app.command()
def extract(dataset: Path = typer.Option(..., "--dataset", help="Folder with the annotation JSON and videos/<id>.mp4."),
            root: Path = typer.Option(Path("artifacts"), "--root", help="Artifact store root."),
            grid: str = typer.Option("unav", help="unav (0.96-s windows every 0.32 s) or 1s."),
            frames_per_window: int = typer.Option(4, "--frames-per-window", help="ResNet-50 frames averaged per window."),
            crop_size: Optional[int] = typer.Option(None, "--crop-size", help="Smaller crops for CPU runs (default 224)."),
            resnet_weights: Optional[Path] = typer.Option(None, "--resnet-weights", help="ResNet-50 weights file."),
            cnn14_weights: Optional[Path] = typer.Option(None, "--cnn14-weights", help="Cnn14 weights file."),
            random_init: bool = typer.Option(False, "--random-init", help="Random encoders (testing only)."),
            max_failure_share: float = typer.Option(0.0, "--max-failure-share", help="Share of videos allowed to fail."),
            device: str = typer.Option("auto", help="auto, cpu, cuda."),
            precision: str = typer.Option("auto", help="auto, fp32, bf16."),
            force: bool = typer.Option(False, help="Recompute even if these features exist.")):
    """Dense features of untrimmed videos (ResNet-50 + Cnn14 per window), one .npy per video and modality."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from pipeline.config import validate
    from pipeline.dense.extract import DenseExtractConfig, dense_extract

    cfg = validate(DenseExtractConfig, {"grid": grid, "frames_per_window": frames_per_window, "crop_size": crop_size,
                                        "resnet_weights": resnet_weights, "cnn14_weights": cnn14_weights,
                                        "random_init": random_init, "max_failure_share": max_failure_share,
                                        "device": device, "precision": precision}, "dense extract")
    if random_init:
        console.print("[bold red]RANDOM WEIGHTS[/bold red]: the encoders are randomly initialised; the features are "
                      "for testing the pipeline only.")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("dense extraction", total=None)
        r = dense_extract(dataset, cfg, root, force=force,
                          progress=lambda done, total, vid: bar.update(task, completed=done, total=total,
                                                                       description=f"dense extraction: {vid}"))
    for vid, why in r.failed.items():
        console.print(f"[yellow]failed:[/yellow] {vid}: {why}", highlight=False, soft_wrap=True)
    console.print(f"{'reused' if r.reused else 'wrote'} {r.videos - len(r.failed)} of {r.videos} videos' features in "
                  f"{r.features}", highlight=False, soft_wrap=True)


@dense_app.command()
def evaluate(annotations: Path = typer.Option(..., "--annotations", help="UnAV-100 annotation JSON (or its folder)."),
             predictions: Path = typer.Option(..., "--predictions", help='{"results": {video: [{"segment": [s, e], '
                                                                          '"label": id or name, "score": x}]}}'),
             split: str = typer.Option("test", help="train, validation or test."),
             out: Optional[Path] = typer.Option(None, "--out", help="Also write the metrics as JSON here.")):
    """mAP at tIoU 0.1:0.9 (ActivityNet-style AP per class), as UnAV-100 reports it."""
    from pipeline.dense.annotations import load_annotations
    from pipeline.dense.evaluate import evaluate as run_evaluation, load_predictions

    ds = load_annotations(_annotations(annotations))
    preds = load_predictions(predictions, ds)
    r = run_evaluation(ds, preds, split)
    table = Table(title=f"{r['split']}: {r['videos']} videos, {r['classes_evaluated']} classes, "
                        f"{r['predictions']} predictions")
    table.add_column("tIoU")
    table.add_column("mAP %", justify="right")
    for th, m in r["mAP"].items():
        table.add_row(th, f"{100 * m:.2f}")
    console.print(table)
    if r["predictions_outside_split"]:
        console.print(f"{r['predictions_outside_split']} predictions in videos of other splits were not scored")
    if out is not None:
        from pipeline.store import write_json_atomic

        write_json_atomic(out, r)
    console.print(f"mean mAP over tIoU 0.5:0.9: {100 * r['average_mAP_0.5:0.9']:.2f} %")
    console.print(f"average mAP: {100 * r['average_mAP']:.2f} % (tIoU 0.1:0.9)")
