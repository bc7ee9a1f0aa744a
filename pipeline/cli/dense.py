"""`avel dense ...`: the dense (untrimmed, UnAV-100) task's commands (dataset, synth, extract, train, evaluate,
predict, run, demo). Thin, like the AVE commands in `pipeline.cli.ave`.

`pipeline.cli` adds `dense_app` to `avel` as `dense`; the options shared with the AVE commands are in
`pipeline.cli.options`, the flow runner of `avel dense run` and `avel dense demo` in `pipeline.cli.runner`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli import options as opt
from pipeline.cli.options import NoRecomputeOption, NoWaitOption, RootOption, console
from pipeline.errors import UserError

dense_app = typer.Typer(no_args_is_help=True, help="Dense AVEL in untrimmed videos (the UnAV-100 layout).")
dataset_app = typer.Typer(no_args_is_help=True, help="Look at a UnAV-100 annotation file.")
dense_app.add_typer(dataset_app, name="dataset")

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
    console.print(f"{len(ds.videos)} videos, {len(problems)} problem(s)", highlight=False, soft_wrap=True)
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
        console.print(f"wrote {path} and {cfg.train + cfg.val + cfg.test} x 3 feature files in {out / 'features'}",
                      highlight=False, soft_wrap=True)
    elif kind == "videos":
        from rich.progress import Progress

        from pipeline.dense.videos import VideoSynthConfig, generate_video_dataset

        cfg = VideoSynthConfig(seed=seed, **sizes)
        n = cfg.train + cfg.val + cfg.test
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("rendering videos", total=n)
            path = generate_video_dataset(out, cfg, progress=lambda done, total: progress.update(task, completed=done))
        console.print(f"wrote {path} and {n} videos in {out / 'videos'}", highlight=False, soft_wrap=True)
    else:
        raise UserError(f"--kind {kind!r}: features or videos")


@dense_app.command()
def extract(dataset: Path = opt.dataset("Folder with the annotation JSON and videos/<id>.mp4."),
            root: Path = RootOption,
            grid: Optional[str] = typer.Option(None, help="unav (0.96-s windows every 0.32 s) or 1s."),
            frames_per_window: Optional[int] = typer.Option(None, "--frames-per-window", help="ResNet-50 frames "
                                                            "averaged per window."),
            crop_size: Optional[int] = typer.Option(None, "--crop-size", help="Smaller crops for CPU runs (default "
                                                    "224)."),
            resnet_weights: Optional[Path] = opt.resnet_weights("ResNet-50 weights file."),
            cnn14_weights: Optional[Path] = opt.cnn14_weights("Cnn14 weights file."),
            feature_set: Optional[str] = opt.feature_set("cace (ResNet-50 + Cnn14 on the grid, default) or unav "
                                                         "(UnAV-100's released I3D RGB + flow + VGGish recipe)."),
            decode_mode: Optional[str] = opt.decode_mode(),
            i3d_rgb_weights: Optional[Path] = opt.released_weights("i3d_rgb_weights"),
            i3d_flow_weights: Optional[Path] = opt.released_weights("i3d_flow_weights"),
            raft_weights: Optional[Path] = opt.released_weights("raft_weights"),
            vggish_weights: Optional[Path] = opt.released_weights("vggish_weights"),
            random_init: bool = opt.random_init("Random encoders (testing only)."),
            max_failure_share: Optional[float] = opt.max_failure_share("Share of videos allowed to fail."),
            device: Optional[str] = opt.device(),
            precision: Optional[str] = opt.precision(help="auto, fp32, bf16."),
            threads: Optional[int] = opt.threads(),
            config: Optional[Path] = opt.config("Dense pipeline YAML (its `extract:` section)."),
            set_: list[str] = opt.set_("Override a setting, e.g. --set random_init=true --set chunk_windows=32."),
            cluster: Optional[str] = opt.cluster("Shard over a Dask cluster: local:N (N local workers, one per GPU "
                                                 "with GPUs) or tcp://HOST:8786."),
            shard_videos: Optional[int] = opt.shard_videos("Videos per shard with --cluster."),
            force: bool = opt.force("Recompute even if these features exist."),
            no_recompute: bool = NoRecomputeOption):
    """Dense features of untrimmed videos (ResNet-50 + Cnn14 per window, or UnAV-100's I3D + VGGish recipe with
    --feature-set unav), one .npy per video and stream."""
    opt.reuse_policy(no_recompute)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from pipeline.dense.extract import DenseExtractConfig, dense_extract

    # the settings: --config's `extract:` section, then --set, then the options given here (an option left out is
    # None and keeps what the file, --set or DenseExtractConfig says)
    given = {"grid": grid, "frames_per_window": frames_per_window, "crop_size": crop_size,
             "resnet_weights": resnet_weights, "cnn14_weights": cnn14_weights,
             "random_init": True if random_init else None, "max_failure_share": max_failure_share, "device": device,
             "precision": precision, "threads": threads, "cluster": cluster, "shard_videos": shard_videos,
             "feature_set": feature_set, "decode_mode": decode_mode, "i3d_rgb_weights": i3d_rgb_weights,
             "i3d_flow_weights": i3d_flow_weights, "raft_weights": raft_weights, "vggish_weights": vggish_weights}
    cfg = opt.configured(DenseExtractConfig, config, set_, "extract", given, "dense extract")
    if cfg.random_init:
        console.print("[bold red]RANDOM WEIGHTS[/bold red]: the encoders are randomly initialised; the features are "
                      "for testing the pipeline only.")
    if cfg.cluster:
        r = _sharded_dense_extract(dataset, cfg, root, force)
        console.print(f"{'reused' if r['reused'] else 'wrote'} the features of {dataset} (sharded on {cfg.cluster}, "
                      f"{r['failed']} failed) in {r['features']}", highlight=False, soft_wrap=True)
        return
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


def _sharded_dense_extract(dataset: Path, cfg, root: Path, force: bool) -> dict:
    """The sharded flow (flows.sharded), its Prefect and Dask output in <root>/logs, live progress here."""
    import datetime

    from pipeline.config import dump_config
    from pipeline.dense.extract import plan_shards

    _, shards = plan_shards(dataset, cfg)  # bad input fails before any cluster starts
    log = Path(root) / "logs" / f"sharded-dense-extract-{datetime.datetime.now():%Y%m%d-%H%M%S}.log"
    console.print(f"sharded dense extraction on {cfg.cluster}: {len(shards)} shards of {cfg.shard_videos} videos; "
                  f"Prefect's and Dask's log: {log}", highlight=False, soft_wrap=True)
    from flows.pipeline import run_quietly
    from flows.sharded import run_sharded_dense_extract

    return run_quietly(log, lambda: run_sharded_dense_extract(dataset, dump_config(cfg), root, force))


FeaturesDirOption = typer.Option(None, "--features", help="Feature folder (default: features/ beside the "
                                                          "annotations): UnAV-100's released I3D+VGGish .npy files, "
                                                          "or one written by `avel dense extract`.")


def _map_table(title: str, m: dict) -> Table:
    table = Table(title=title)
    table.add_column("tIoU")
    table.add_column("mAP %", justify="right")
    for th, v in m["mAP"].items():
        table.add_row(th, f"{100 * v:.2f}")
    return table


def _print_map(m: dict, title: str, prefix: str = "") -> None:
    console.print(_map_table(title, m))
    console.print(f"mean mAP over tIoU 0.5:0.9: {100 * m['average_mAP_0.5:0.9']:.2f} %", highlight=False,
                  soft_wrap=True)
    console.print(f"{prefix}average mAP: {100 * m['average_mAP']:.2f} % (tIoU 0.1:0.9)", highlight=False,
                  soft_wrap=True)


@dense_app.command()
def train(annotations: Path = typer.Option(..., "--annotations", help="UnAV-100 annotation JSON (or its folder)."),
          features: Optional[Path] = FeaturesDirOption, root: Path = RootOption,
          config: Optional[Path] = opt.config("Dense pipeline YAML (its `train:` section)."),
          set_: list[str] = opt.set_("Override, e.g. --set epochs=20 --set model_args.lcf=true."),
          size: Optional[str] = typer.Option(None, help="paper (UnAV widths, default) or cpu (spec §8's small size)."),
          lcf: bool = typer.Option(False, "--lcf", help="LoCo's LCF modulation (our design)."),
          lac: bool = typer.Option(False, "--lac", help="LoCo's LAC window attention (our design)."),
          epochs: Optional[int] = typer.Option(None, help="Epochs (UnAV: 45)."),
          seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds: one run each, mean and std."),
          device: Optional[str] = opt.device(),
          force: bool = opt.force("Retrain even if this config was trained on these features."),
          no_wait: bool = NoWaitOption,
          no_recompute: bool = NoRecomputeOption):
    """Train the UnAV baseline (or LoCo with --lcf/--lac), select the epoch on validation, report test mAP once."""
    opt.lock_policy(no_wait)
    opt.reuse_policy(no_recompute)
    import numpy as np
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from pipeline.config import load_config
    from pipeline.dense.data import load_dense_features
    from pipeline.dense.train import DenseTrainConfig, train_stage

    overrides = list(set_) + [f"{k}={v}" for k, v in (("size", size), ("epochs", epochs), ("device", device))
                              if v is not None]
    overrides += [f"model_args.{k}=true" for k, on in (("lcf", lcf), ("lac", lac)) if on]
    cfg = load_config(DenseTrainConfig, config, overrides, section="train")
    fs = load_dense_features(annotations, features)
    seed_list = [int(s) for s in seeds.split(",")] if seeds else [cfg.seed]
    for note in fs.notes:
        console.print(f"[bold red]{note}[/bold red]", highlight=False, soft_wrap=True)
    variant = "+".join(["baseline"] + [k.upper() for k in ("lcf", "lac") if cfg.model_args.get(k)])
    console.print(f"dense detector: {variant}, {cfg.size} size, {len(fs.dataset.split('train'))} train / "
                  f"{len(fs.dataset.split('validation'))} validation / {len(fs.dataset.split('test'))} test videos",
                  highlight=False)
    results = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("training", total=cfg.epochs * len(seed_list))
        for seed in seed_list:
            def on_epoch(r, seed=seed):
                bar.update(task, advance=1, description=f"seed {seed} epoch {r['epoch'] + 1}: loss {r['loss']:.3f}, "
                                                        f"val avg mAP {100 * r['val_avg_map']:.1f} %")
            results.append(train_stage(fs, cfg.model_copy(update={"seed": seed}), root, force=force,
                                       on_epoch=on_epoch))
    for r in results:
        m = r.metrics
        console.print(f"seed {m['seed']}: {'reused' if r.reused else 'trained'} {r.dir}\n  best epoch "
                      f"{m['best_epoch']} (validation avg mAP {100 * m['val_avg_map']:.2f} %), {m['parameters']:,} "
                      f"parameters, {m['train_s_per_epoch']:.1f} s/epoch", highlight=False)
    tested = [r.metrics for r in results if r.metrics.get("test_avg_map") is not None]
    if not tested:
        return
    console.print(_map_table(f"test ({tested[0]['test_label']})", {"mAP": tested[-1]["test_map"]}))
    avg = np.array([m["test_avg_map"] for m in tested]) * 100
    if len(avg) > 1:
        console.print(f"test average mAP over seeds {seed_list}: {avg.mean():.2f} +- {avg.std(ddof=1):.2f} %",
                      highlight=False, soft_wrap=True)
    console.print(f"test average mAP: {avg.mean():.2f} % (tIoU 0.1:0.9)"
                  + (" [bold red](RANDOM WEIGHTS)[/bold red]" if fs.notes else ""), highlight=False, soft_wrap=True)


@dense_app.command()
def evaluate(annotations: Path = typer.Option(..., "--annotations", help="UnAV-100 annotation JSON (or its folder)."),
             predictions: Optional[Path] = typer.Option(None, "--predictions", help='{"results": {video: [{"segment": '
                                                        '[s, e], "label": id or name, "score": x}]}}'),
             checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="best.pt of `avel dense train`: "
                                                       "run it on the split's features instead."),
             features: Optional[Path] = FeaturesDirOption,
             split: str = typer.Option("test", help="train, validation or test."),
             weights: Optional[str] = typer.Option(None, help="With --checkpoint: ema (as UnAV evaluates) or model "
                                                   "(default: the weights its training scored test with)."),
             out: Optional[Path] = typer.Option(None, "--out", help="Also write the metrics (and predictions) here.")):
    """mAP at tIoU 0.1:0.9 (ActivityNet-style AP per class), as UnAV-100 reports it: of a predictions file, or of a
    checkpoint run on the features."""
    from pipeline.dense.annotations import load_annotations
    from pipeline.dense.evaluate import evaluate as run_evaluation
    from pipeline.dense.evaluate import load_predictions
    from pipeline.store import write_json_atomic

    if (predictions is None) == (checkpoint is None):
        raise UserError("give one of --predictions (a results JSON) or --checkpoint (a trained detector)")
    if weights not in (None, "ema", "model"):
        raise UserError(f"--weights {weights!r}: ema or model")
    if checkpoint is not None:
        from pipeline.dense.data import load_dense_features
        from pipeline.dense.train import evaluate_checkpoint

        fs = load_dense_features(annotations, features)
        for note in fs.notes:
            console.print(f"[bold red]{note}[/bold red]", highlight=False, soft_wrap=True)
        with console.status(f"running {checkpoint} on the {split} split"):
            r = evaluate_checkpoint(checkpoint, fs, split, weights=weights, out_dir=out)
    else:
        ds = load_annotations(_annotations(annotations))
        r = run_evaluation(ds, load_predictions(predictions, ds), split)
        if out is not None:
            write_json_atomic(out if out.suffix == ".json" else out / f"metrics_{r['split']}.json", r)
    if r["predictions_outside_split"]:
        console.print(f"{r['predictions_outside_split']} predictions in videos of other splits were not scored")
    _print_map(r, f"{r['split']}: {r['videos']} videos, {r['classes_evaluated']} classes, {r['predictions']} "
                  f"predictions")


@dense_app.command()
def predict(videos: list[Path] = typer.Argument(..., help="Untrimmed video files (any length) or folders of them."),
            checkpoint: Path = typer.Option(..., "--checkpoint", help="best.pt of `avel dense train` (trained on "
                                                                       "features from `avel dense extract`)."),
            out: Path = typer.Option(Path("dense_predictions"), "--out", help="Folder for <video>.json and "
                                                                               "<video>_timeline.png."),
            annotations: Optional[Path] = typer.Option(None, "--annotations", help="An annotation JSON that knows "
                                                       "these videos: their ground truth is drawn too."),
            min_score: float = typer.Option(0.05, "--min-score", help="Events below this score are left out."),
            resnet_weights: Optional[Path] = opt.resnet_weights("Override the ResNet-50 weights recorded in the "
                                                                "checkpoint."),
            cnn14_weights: Optional[Path] = opt.cnn14_weights("Override the Cnn14 weights."),
            feature_set: Optional[str] = opt.feature_set("For a detector trained on UnAV-100's released files: unav "
                                                         "(computes their I3D + VGGish recipe for each video)."),
            decode_mode: Optional[str] = opt.decode_mode(),
            i3d_rgb_weights: Optional[Path] = opt.released_weights("i3d_rgb_weights"),
            i3d_flow_weights: Optional[Path] = opt.released_weights("i3d_flow_weights"),
            raft_weights: Optional[Path] = opt.released_weights("raft_weights"),
            vggish_weights: Optional[Path] = opt.released_weights("vggish_weights"),
            random_init: bool = opt.random_init("Random encoders (testing the pipeline only; says so in every "
                                                "output)."),
            device: str = opt.device("auto")):
    """Localize events in your own untrimmed videos: a JSON of events and a timeline picture per video."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from pipeline.dense.predict import predict_files
    from pipeline.media import expand_videos

    files = expand_videos(videos)
    gt = None
    if annotations is not None:
        from pipeline.dense.annotations import load_annotations

        ds = load_annotations(_annotations(annotations))
        gt = {vid: [{"segment": [e.start, e.end], "label_id": e.label_id} for e in v.events]
              for vid, v in ds.videos.items()}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("predicting", total=len(files))
        if random_init:
            console.print("[bold red]RANDOM WEIGHTS[/bold red]: the encoders are randomly initialised; the "
                          "predictions test the pipeline only.")
        extract = {"feature_set": feature_set, "decode_mode": decode_mode, "i3d_rgb_weights": i3d_rgb_weights,
                   "i3d_flow_weights": i3d_flow_weights, "raft_weights": raft_weights,
                   "vggish_weights": vggish_weights, "random_init": True if random_init else None}
        results = predict_files(files, checkpoint, out, ground_truth=gt, min_score=min_score, device=device,
                                resnet_weights=resnet_weights, cnn14_weights=cnn14_weights, **extract,
                                progress=lambda n, total, vid: bar.update(task, completed=n,
                                                                          description=f"predicting: {vid}"))
    for r in results:
        if "error" in r:
            console.print(f"[yellow]skipped[/yellow] {r['video']}: {r['error']}", highlight=False, soft_wrap=True)
            continue
        console.print(f"{r['video']} ({r['duration_s']:.1f} s): {len(r['events'])} events >= {min_score} -> "
                      f"{r['json']}, {r['timeline']}", highlight=False, soft_wrap=True)
        for e in r["events"][:5]:
            console.print(f"  {e['start']:7.2f}-{e['end']:7.2f} s  {e['label']}  {e['score']:.3f}", highlight=False)
    if any(r.get("random_weights") for r in results):
        console.print("[bold red]RANDOM WEIGHTS[/bold red]: the encoders are randomly initialised; these events test "
                      "the pipeline only.", highlight=False, soft_wrap=True)
    if all("error" in r for r in results):
        raise typer.Exit(1)


def _dense_pipeline_run(config_path: Path | None, overrides: list[str], force: list[str]):
    """The dense pipeline for the flow runner: inputs checked, the flow to call, what to print after its stages."""
    from pipeline.cli.runner import FlowRun
    from pipeline.config import dump_config
    from pipeline.dense.pipeline_config import forced_stages, resolve_dense_config

    cfg = resolve_dense_config(str(config_path) if config_path else None, overrides)  # bad config: fails now
    forced_stages(force)
    if cfg.dataset.path is not None:
        from pipeline.dense.annotations import load_annotations

        load_annotations(_annotations(cfg.dataset.path))
    random = cfg.extract.random_init and cfg.dataset.features is None

    def flow() -> dict:
        from flows.dense import dense_pipeline

        return dense_pipeline(config_path=str(config_path) if config_path else None, overrides=overrides,
                              force=force)

    def report(term: Console, result: dict, seconds: float) -> None:
        term.print(_map_table(f"{result['split']} mAP", result))
        term.print(f"detector: {result['checkpoint']}", highlight=False, soft_wrap=True)
        term.print(f"mean mAP over tIoU 0.5:0.9: {100 * result['average_mAP_high']:.2f} %; "
                   f"{seconds:.0f} s in all", highlight=False, soft_wrap=True)
        term.print(f"{result['split']} average mAP: {100 * result['average_mAP']:.2f} % (tIoU 0.1:0.9)"
                   + (" [bold red](RANDOM WEIGHTS)[/bold red]" if random else ""), highlight=False,
                   soft_wrap=True)  # never wrapped: scripts read this last line (`tail -1`)

    return FlowRun(
        name="dense pipeline", root=cfg.root,
        source=str(cfg.dataset.path or cfg.dataset.features
                   or f"synthetic untrimmed videos {dump_config(cfg)['dataset']['synth']}"),
        flow=flow, report=report,
        random_banner=("[bold]RANDOM WEIGHTS[/bold]: this run extracts features with randomly initialised "
                       "encoders (extract.random_init). Its features, detector and mAP test the pipeline only; "
                       "every manifest is marked so.") if random else None)


def _run_dense_pipeline(config_path: Path | None, overrides: list[str], force: list[str], verbose: bool) -> None:
    from pipeline.cli.runner import run_flow

    run_flow(lambda: _dense_pipeline_run(config_path, overrides, force), verbose)


VerboseOption = opt.verbose("Show Prefect's log lines in the terminal.")


@dense_app.command()
def run(config: Path = opt.config("Dense pipeline YAML (see pipeline/dense/demo.yaml).", required=True),
        set_: list[str] = opt.set_("Override, e.g. --set train.epochs=20."),
        force: list[str] = opt.force_stages("Recompute this stage and what follows: dense_extract, dense_train, "
                                            "dense_evaluate."),
        root: Optional[Path] = opt.root("Artifact store root (overrides the config).", default=None),
        verbose: bool = VerboseOption, no_wait: bool = NoWaitOption,
        no_recompute: bool = NoRecomputeOption):
    """The dense pipeline (Prefect flow): untrimmed videos -> dense features -> detector -> mAP."""
    opt.lock_policy(no_wait)
    opt.reuse_policy(no_recompute)
    _run_dense_pipeline(config, list(set_) + ([f"root={root}"] if root else []), list(force), verbose)


@dense_app.command()
def demo(root: Path = RootOption,
         set_: list[str] = opt.set_("Override a demo setting, e.g. --set train.epochs=10."),
         force: list[str] = opt.force_stages("Recompute this stage and what follows."),
         verbose: bool = VerboseOption, no_wait: bool = NoWaitOption,
         no_recompute: bool = NoRecomputeOption):
    """The whole dense pipeline on generated untrimmed videos with random encoders, CPU-sized (about 10 minutes
    on 2 cores; pipeline/dense/demo.yaml)."""
    opt.lock_policy(no_wait)
    opt.reuse_policy(no_recompute)
    from pipeline.dense.pipeline_config import dense_demo_config_path

    _run_dense_pipeline(dense_demo_config_path(), [f"root={root}", *set_], list(force), verbose)
