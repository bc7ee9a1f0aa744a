"""The AVE task's commands of `avel` (synth, labels, dataset, inspect, train, compare, evaluate, extract, finetune,
predict, run, demo, schedule). Thin: parses arguments, calls the stage functions, prints with rich.

`pipeline.cli` merges `app` into `avel`; the options shared with the dense commands are in `pipeline.cli.options`,
the flow runner of `avel run` and `avel demo` in `pipeline.cli.runner`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from pipeline import ave
from pipeline.cli import options as opt
from pipeline.cli.options import NoRecomputeOption, NoWaitOption, RootOption, console
from pipeline.errors import UserError
from pipeline.store import MANIFEST, ArtifactStore, read_manifest

app = typer.Typer()  # no name: its commands are `avel`'s own
dataset_app = typer.Typer(no_args_is_help=True, help="Look at an AVE-format dataset folder.")
app.add_typer(dataset_app, name="dataset")

DatasetOption = opt.dataset("AVE-format dataset folder (Annotations.txt, *_order.h5, videos/).")


# ---- datasets ---------------------------------------------------------------------------------------------------
@app.command()
def synth(out: Path = typer.Option(..., "--out", help="Folder to write the dataset into."),
          videos: int = typer.Option(24, help="Number of videos."),
          classes: int = typer.Option(4, help="Number of event classes (the first K AVE categories)."),
          seed: int = typer.Option(0, help="Random seed: same seed, same dataset."),
          generator_version: int = typer.Option(3, "--generator-version", help="The content's design: 3 (events "
                                                "need both modalities), 2 (the data of earlier releases).")):
    """Generate a synthetic dataset in the AVE layout (real H.264/AAC MP4 files, annotations, splits)."""
    from pipeline.ave.synth import SynthConfig, generate_dataset

    generate_dataset(out, SynthConfig(videos=videos, classes=classes, seed=seed, version=generator_version))
    print_dataset_summary(ave.load_dataset(out))


@app.command()
def labels(dataset: Path = DatasetOption, out: Path = typer.Option(..., "--out", help="Output labels.h5.")):
    """Write AVE's segment labels [N,10,C+1] (dataset `avadataset`) built from Annotations.txt."""
    ds = ave.load_dataset(dataset)
    ave.write_labels(ds, out)
    console.print(f"wrote {out}: {len(ds)} rows x {ave.SEGMENTS} segments x {ds.background + 1} columns "
                  f"({len(ds.classes)} classes + background)", highlight=False, soft_wrap=True)


@dataset_app.command("check")
def dataset_check(dataset: Path = typer.Argument(..., help="Dataset folder."),
                  open_files: bool = typer.Option(True, "--open/--no-open", help="Open each video to test it.")):
    """Report missing and unreadable video files; exit 1 if any."""
    ds = ave.load_dataset(dataset)
    report = ds.check(open_files=open_files)
    console.print(f"{report.rows} rows, {report.videos} unique videos in {ds.video_dir}: {report.present} present, "
                  f"{len(report.missing)} missing, {len(report.unreadable)} unreadable", soft_wrap=True)
    for vid in report.missing[:20]:
        console.print(f"  missing    {ds.video_path(vid)}")
    for vid, why in list(report.unreadable.items())[:20]:
        console.print(f"  unreadable {ds.video_path(vid)}: {why}")
    if len(report.missing) + len(report.unreadable) > 40:
        console.print("  ...")
    raise typer.Exit(0 if report.ok else 1)


@dataset_app.command("summary")
def dataset_summary(dataset: Path = typer.Argument(..., help="Dataset folder.")):
    """Classes, split sizes and event/background segment counts."""
    print_dataset_summary(ave.load_dataset(dataset))


def print_dataset_summary(ds: ave.AVEDataset) -> None:
    mask = ds.event_mask()
    table = Table(title=f"{ds.root}: {len(ds)} rows, {len(ds.video_ids())} videos, {len(ds.classes)} classes")
    for col in ("split", "rows", "segments", "event", "background", "all-background acc"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split in ave.SPLITS:
        rows = ds.split_rows(split)
        seg = mask[rows]
        bg = int(seg.size - seg.sum())
        table.add_row(split, str(len(rows)), str(seg.size), str(int(seg.sum())), str(bg),
                      f"{100 * bg / max(seg.size, 1):.2f} %")
    console.print(table)
    console.print("classes: " + "; ".join(f"{i} {c}" for i, c in enumerate(ds.classes))
                  + f"; {ds.background} background", highlight=False, soft_wrap=True)


# ---- artifacts --------------------------------------------------------------------------------------------------
@app.command()
def inspect(ref: Optional[str] = typer.Argument(None, help="A stage folder, manifest, stage name or key (prefix)."),
            root: Path = RootOption):
    """List the store's artifacts, or show one manifest in full."""
    store = ArtifactStore(root)
    if ref is None:
        manifests = store.list()
        if not manifests:
            console.print(f"no artifacts under {root}")
            return
        table = Table(title=f"artifacts under {root}")
        for col in ("stage", "key", "status", "created", "time", "outputs"):
            table.add_column(col)
        for m in manifests:
            total = m.timings.get("total_s")
            table.add_row(m.stage, m.key, m.status, m.created, f"{total:.1f} s" if total is not None else "",
                          ", ".join(m.outputs))
        console.print(table)
        return
    print_manifest(read_manifest(store.find(ref) / MANIFEST), store.find(ref))


def print_manifest(m, folder: Path) -> None:
    console.rule(f"{m.stage} / {m.key}  [{m.status}]")
    console.print(f"folder: {folder}\ncreated {m.created}, finished {m.finished or '-'}, code version {m.version}")
    if m.error:
        console.print(f"[red]error:[/red] {m.error}")
    for title, data in (("config", m.config), ("inputs", m.inputs), ("timings", m.timings), ("metrics", m.metrics)):
        if data:
            console.print(f"[bold]{title}[/bold]")
            console.print(yaml.safe_dump(data, sort_keys=False, width=110).rstrip())
    if m.outputs:
        table = Table(title="outputs")
        for col in ("name", "path", "size", "shape", "dtype"):
            table.add_column(col)
        for name, o in m.outputs.items():
            table.add_row(name, o.path, _size(o.bytes), "x".join(map(str, o.shape)) if o.shape else "", o.dtype or "")
        console.print(table)
    if m.items:
        statuses: dict[str, int] = {}
        for item in m.items.values():
            statuses[item.get("status", "?")] = statuses.get(item.get("status", "?"), 0) + 1
        console.print("[bold]items[/bold]: " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())))
        for name, item in m.items.items():
            if item.get("status") not in ("ok", None):
                console.print(f"  {name}: {item}")
    for w in m.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ---- the localizer ----------------------------------------------------------------------------------------------
def _feature_set(features: Optional[Path], dataset: Optional[Path], visual: Optional[Path], audio: Optional[Path],
                 root: Path):
    from pipeline.ave import features as feats

    if features is not None:
        return feats.from_public_folder(features)
    if dataset is None:
        raise UserError("say where the features are: --features DIR (public AVE layout) or --dataset DIR "
                        "(features from this project's store, or --visual/--audio files)")
    if visual is not None and audio is not None:
        return feats.from_dataset(dataset, visual, audio)
    return feats.newest_store_features(root, dataset)


FeaturesOption = typer.Option(None, "--features", help="Folder in the public AVE layout (visual_feature.h5, "
                                                       "audio_feature.h5, labels.h5, *_order.h5).")
DatasetOpt = opt.dataset("AVE-format dataset whose features this project extracted.", required=False)
VisualOption = typer.Option(None, "--visual", help="Visual feature h5 (with --dataset).")
AudioOption = typer.Option(None, "--audio", help="Audio feature h5 (with --dataset).")
ConfigOption = opt.config("Pipeline config YAML (its `train:` section is used).")
SetOption = opt.set_("Override a setting, e.g. --set epochs=20 --set model_args.psi=0.3.")
PrecisionOption = opt.precision()


@app.command()
def train(features: Optional[Path] = FeaturesOption, dataset: Optional[Path] = DatasetOpt,
          visual: Optional[Path] = VisualOption, audio: Optional[Path] = AudioOption, root: Path = RootOption,
          config: Optional[Path] = ConfigOption, set_: list[str] = SetOption,
          epochs: Optional[int] = typer.Option(None, help="Epochs (reference: 200)."),
          model: Optional[str] = typer.Option(None, "--model", help="Localizer: cace (default) or aveclip."),
          seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds, e.g. 1,2,3: mean and std."),
          select_on: Optional[str] = typer.Option(None, "--select-on", help="val (default) or test (reference)."),
          device: Optional[str] = opt.device(),
          precision: Optional[str] = PrecisionOption,
          force: bool = opt.force("Retrain even if this config was trained before."),
          no_wait: bool = NoWaitOption,
          no_recompute: bool = NoRecomputeOption,
          nproc: int = typer.Option(1, "--nproc", min=1, help="Training processes (DDP; one GPU each on CUDA): "
                                                               "each takes its share of every batch.")):
    """Train a localizer (CACE with its reference recipe by default) and report val-selected test accuracy."""
    opt.lock_policy(no_wait)
    opt.reuse_policy(no_recompute)
    from rich.progress import Progress

    from pipeline.ave.train import TrainConfig, print_epoch, train_seeds
    from pipeline.config import load_config

    overrides = list(set_) + [f"{k}={v}" for k, v in (("model", model), ("epochs", epochs), ("select_on", select_on),
                                                      ("device", device), ("precision", precision)) if v is not None]
    cfg = load_config(TrainConfig, config, overrides, section="train")
    fs = _feature_set(features, dataset, visual, audio, root)
    _print_precision(cfg.precision, cfg.device)
    for note in fs.notes:
        console.print(f"[bold red]{note}[/bold red]")
    seed_list = [int(s) for s in seeds.split(",")] if seeds else [cfg.seed]
    console.print(f"localizer: {cfg.model}", highlight=False)
    with Progress(console=console, transient=True, disable=nproc > 1) as progress:  # ranks print their lines
        task = progress.add_task(f"training {cfg.model}", total=cfg.epochs * len(seed_list))

        def on_epoch(r):
            progress.update(task, advance=1, description=f"epoch {r['epoch']}: loss {r['loss']:.3f} "
                            f"val {r.get('val_acc', float('nan')):.2f} % test {r['test_acc']:.2f} %")

        results, summary = train_seeds(fs, cfg, seed_list, root, force=force, nproc=nproc,
                                       on_epoch=on_epoch if nproc == 1 else print_epoch)
    for r in results:
        m = r.metrics
        console.print(f"seed {m['seed']}: {'reused' if r.reused else 'trained'} {r.dir}\n"
                      f"  {m['test_accuracy_label']}: {m['test_accuracy']:.2f} % (epoch {m['best_epoch']}, "
                      f"{m['selected_on']} {m['selection_accuracy']:.2f} %)\n"
                      f"  best-on-test (reference protocol, optimistic): {m['best_on_test_accuracy']:.2f} % "
                      f"(epoch {m['best_on_test_epoch']}); last epoch: {m['last_epoch_test_accuracy']:.2f} %; "
                      f"all-background baseline {m['all_background_accuracy']:.2f} %")
        if "test_accuracy_without_postprocess" in m:
            console.print(f"  without post-processing: {m['test_accuracy_without_postprocess']:.2f} % "
                          f"(post-processing {'on' if m['postprocess'] else 'off'} in the number above)")
    if len(results) > 1:
        console.print(f"{summary['label']}: {summary['test_accuracy_mean']:.2f} +- "
                      f"{summary['test_accuracy_std']:.2f} % "
                      f"over seeds {summary['seeds']}", highlight=False, soft_wrap=True)
    console.print(f"test accuracy: {summary['test_accuracy_mean']:.2f} %", highlight=False, soft_wrap=True)


@app.command()
def compare(features: Optional[Path] = FeaturesOption, dataset: Optional[Path] = DatasetOpt,
            visual: Optional[Path] = VisualOption, audio: Optional[Path] = AudioOption, root: Path = RootOption,
            config: Optional[Path] = ConfigOption, set_: list[str] = SetOption,
            models: str = typer.Option("cace,aveclip", "--models", help="Comma-separated localizer names, each "
                                       "optionally with overrides: "
                                       "aveclip:multiscale=staged:postprocess.enabled=false."),
            seeds: str = typer.Option("1,2,3", help="Comma-separated seeds."),
            inputs: str = opt.InputsOption,
            epochs: Optional[int] = typer.Option(None, help="Epochs for every model."),
            out: Optional[Path] = typer.Option(None, "--out", help="Folder for comparison.md/json (default: "
                                                                   "ROOT/compare/<models>-<features>)."),
            device: Optional[str] = opt.device(),
            precision: Optional[str] = PrecisionOption,
            force: bool = opt.force("Retrain runs that exist."),
            no_wait: bool = NoWaitOption,
            no_recompute: bool = NoRecomputeOption):
    """Localizers side by side on the same features, splits, seeds and recipe: accuracy, event F1, size, speed;
    with `--inputs both,audio,visual`, each beside its single-modality controls."""
    opt.lock_policy(no_wait)
    opt.reuse_policy(no_recompute)
    import hashlib
    import json

    from rich.progress import Progress

    from models import list_localizers
    from pipeline.ave import compare as cmp
    from pipeline.ave.train import TrainConfig
    from pipeline.config import load_config, parse_seeds
    from pipeline.controls import parse_inputs

    seen = parse_inputs(inputs)
    names = [m.strip() for m in models.split(",") if m.strip()]
    unknown = [m for m in names if cmp.parse_variant(m).model not in list_localizers()]
    if unknown or not names:
        raise UserError(f"--models {models!r}: unknown {unknown}; known: {', '.join(list_localizers())}")
    seed_list = parse_seeds(seeds)
    overrides = list(set_) + [f"{k}={v}" for k, v in (("epochs", epochs), ("device", device),
                                                      ("precision", precision)) if v is not None]
    base = load_config(TrainConfig, config, overrides, section="train")
    fs = _feature_set(features, dataset, visual, audio, root)
    _print_precision(base.precision, base.device)
    for note in fs.notes:
        console.print(f"[bold red]{note}[/bold red]")
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("comparing", total=base.epochs * len(seed_list) * len(names) * len(seen))
        current = {}

        def on_run(name, seed):  # one persistent line per run: n/N also in a log, where the bar does not draw
            current.update(name=name, seed=seed, n=current.get("n", 0) + 1)
            progress.console.print(f"run {current['n']}/{len(names) * len(seen) * len(seed_list)}: {name} seed "
                                   f"{seed}", highlight=False, markup=False)

        def on_epoch(r):
            progress.update(task, advance=1, description=f"{current['name']} seed {current['seed']} epoch "
                            f"{r['epoch']}: loss {r['loss']:.3f} val {r.get('val_acc', float('nan')):.2f} %")

        rows = cmp.compare(fs, base, names, seed_list, root, inputs=seen, force=force, on_run=on_run,
                           on_epoch=on_epoch)
    digest = hashlib.sha256(json.dumps(fs.digests, sort_keys=True).encode()).hexdigest()[:12]
    label = hashlib.sha256(",".join(names + ([] if seen == ["both"] else ["inputs", *seen])).encode()).hexdigest()[:8]
    md, _ = cmp.write_report(rows, out or root / "compare" / f"{label}-{digest}", list(fs.notes))
    console.print(cmp.markdown_table(rows), highlight=False, soft_wrap=True, markup=False)
    console.print(f"wrote {md}", highlight=False, soft_wrap=True)


@app.command()
def evaluate(checkpoint: Path = typer.Option(..., "--checkpoint", help="best.pt of a run, or the released "
                                                                         "CACE-Net model.pth.tar."),
             features: Optional[Path] = FeaturesOption, dataset: Optional[Path] = DatasetOpt,
             visual: Optional[Path] = VisualOption, audio: Optional[Path] = AudioOption, root: Path = RootOption,
             split: str = typer.Option("test", help="Split to evaluate."),
             dtype: str = typer.Option("float32", help="float32 or float64 (the reference's precision)."),
             device: str = opt.device("auto"),
             precision: str = opt.precision("auto", "auto, fp32 or bf16 (autocast)."),
             no_wait: bool = NoWaitOption,
             no_recompute: bool = NoRecomputeOption):
    """Evaluate a checkpoint: segment accuracy (papers' metric), per class, event/background P/R/F1."""
    opt.lock_policy(no_wait)
    opt.reuse_policy(no_recompute)
    from pipeline.ave.train import evaluate_stage

    fs = _feature_set(features, dataset, visual, audio, root)
    for note in fs.notes:
        console.print(f"[bold red]{note}[/bold red]")
    _print_precision(precision, device)
    result = evaluate_stage(checkpoint, fs, root, split, dtype=dtype, device=device, precision=precision)
    m = result.metrics
    console.print(f"{'reused' if result.reused else 'wrote'} {result.dir}")
    if "accuracy_without_postprocess" in m:
        console.print(f"{m['model']}: without post-processing {m['accuracy_without_postprocess']:.2f} %")
    console.print(f"event segments: precision {m['event']['precision']:.2f} %, recall {m['event']['recall']:.2f} %, "
                  f"F1 {m['event']['f1']:.2f} %; all-background baseline {m['all_background_accuracy']:.2f} %",
                  highlight=False, soft_wrap=True)
    console.print(f"{split} accuracy: {m['accuracy']:.2f} %", highlight=False, soft_wrap=True)


def _print_precision(precision: str, device: str) -> None:
    """One line: which precision runs and why (the detection is the CPU's flags or the CUDA device)."""
    from pipeline.runtime import precision_note, resolve_device

    console.print(precision_note(precision, resolve_device(device)), highlight=False, soft_wrap=True)


# ---- features ---------------------------------------------------------------------------------------------------
@app.command()
def extract(dataset: Path = DatasetOption, root: Path = RootOption,
            modality: Optional[str] = typer.Option(None, help="visual, audio or both (default both)."),
            resnet_weights: Optional[Path] = opt.resnet_weights("ResNet-50 weights: torchvision ImageNet file, "
                                                                "CACE-Net I_state_dict or an `avel finetune` output "
                                                                "(default: the torch hub cache)."),
            cnn14_weights: Optional[Path] = opt.cnn14_weights("Cnn14 checkpoint (default: "
                                                              "~/panns_data/Cnn14_mAP=0.431.pth)."),
            random_init: bool = opt.random_init("Random encoder weights (testing only)."),
            frames_per_segment: Optional[int] = typer.Option(None, "--frames-per-segment",
                                                             help="Frames averaged per second (AVE: 16)."),
            feature_set: Optional[str] = opt.feature_set("cace (ResNet-50 + Cnn14, default) or ave (AVE's released "
                                                         "VGG-19 pool5 + VGGish recipe)."),
            decode_mode: Optional[str] = opt.decode_mode(),
            vgg19_weights: Optional[Path] = opt.released_weights("vgg19_weights"),
            vggish_weights: Optional[Path] = opt.released_weights("vggish_weights"),
            dtype: Optional[str] = typer.Option(None, help="float32 (default) or float16."),
            device: Optional[str] = opt.device(),
            precision: Optional[str] = PrecisionOption,
            workers: Optional[int] = typer.Option(None, help="Decoding processes."),
            max_failure_share: Optional[float] = opt.max_failure_share("Exit non-zero if more rows than this fail."),
            config: Optional[Path] = opt.config("Pipeline config YAML (its `extract:` section)."),
            set_: list[str] = opt.set_("Override a setting, e.g. --set threads=2."),
            cluster: Optional[str] = opt.cluster("Shard over a Dask cluster through Prefect: local:N (N local "
                                                 "workers; one per GPU) or tcp://HOST:8786 (an existing scheduler)."),
            shard_videos: Optional[int] = opt.shard_videos("Videos per shard (32)."),
            force: bool = opt.force("Recompute even if these features exist."),
            no_wait: bool = NoWaitOption,
            no_recompute: bool = NoRecomputeOption):
    """Extract ResNet-50 and Cnn14 features, or AVE's released VGG-19 + VGGish ones (--feature-set ave), as visual.h5
    and audio.h5 in the AVE layout; resumes an interrupted run."""
    opt.lock_policy(no_wait)
    opt.reuse_policy(no_recompute)
    from rich.panel import Panel
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from pipeline.ave.extract import ExtractConfig, TooManyFailures
    from pipeline.ave.extract import extract as run_extract

    given = {"modality": modality, "resnet_weights": resnet_weights, "cnn14_weights": cnn14_weights,
             "frames_per_segment": frames_per_segment, "dtype": dtype, "device": device, "workers": workers,
             "precision": precision,
             "max_failure_share": max_failure_share, "random_init": True if random_init else None,
             "cluster": cluster, "shard_videos": shard_videos, "feature_set": feature_set, "decode_mode": decode_mode,
             "vgg19_weights": vgg19_weights, "vggish_weights": vggish_weights}
    cfg = opt.configured(ExtractConfig, config, set_, "extract", given)
    _print_precision(cfg.precision, cfg.device)
    if cfg.random_init:
        console.print(Panel("[bold]RANDOM WEIGHTS[/bold]: --random-init builds the encoders with random weights. "
                            "The features are for testing the pipeline only; every output is marked so.",
                            style="bold red"))
    if cfg.cluster:
        _sharded_extract(dataset, cfg, root, force)
        force = False  # done: the single-process call below only reads the finished stages
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("extracting", total=None)

        def on_progress(done: int, total: int, video_id: str) -> None:
            bar.update(task, completed=done, total=total, description=f"extracting {video_id}".rstrip())

        try:
            results = run_extract(dataset, cfg, root, force=force, progress=on_progress)
            failed = None
        except TooManyFailures as e:
            results, failed = e.results, e
    for r in results.values():
        tag = " [bold red](RANDOM WEIGHTS)[/bold red]" if r.random_init else ""
        status = "reused" if r.reused else ("wrote" if r.manifest.status == "complete" else "FAILED")
        if cfg.cluster and r.manifest.status == "complete":
            status = f"sharded on {cfg.cluster}, or reused"
        if r.failed_rows:
            console.print(f"{r.modality}: {len(r.failed_rows)} of {r.rows} rows failed (zeros, valid=False): rows "
                          f"{', '.join(map(str, r.failed_rows[:20]))}{' ...' if len(r.failed_rows) > 20 else ''}")
        for w in r.manifest.warnings:
            if not w.startswith("RANDOM WEIGHTS"):
                console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
        shown = r.path if r.manifest.status == "complete" else r.dir / "manifest.json"
        console.print(f"{r.modality} features ({status}){tag}: {shown}", highlight=False, soft_wrap=True)
    if failed is not None:
        Console(stderr=True).print(f"[red]error:[/red] {failed}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _sharded_extract(dataset: Path, cfg, root: Path, force: bool) -> None:
    """The sharded flow (flows.sharded), its Prefect and Dask output in <root>/logs, live progress here."""
    import datetime

    from pipeline.ave.extract import load_video_dataset, planned_weights
    from pipeline.config import dump_config

    load_video_dataset(dataset)
    planned_weights(cfg)  # bad input fails before any cluster starts
    log = Path(root) / "logs" / f"sharded-extract-{datetime.datetime.now():%Y%m%d-%H%M%S}.log"
    console.print(f"sharded extraction on {cfg.cluster}, {cfg.shard_videos} videos per shard; Prefect's and Dask's "
                  f"log: {log}", highlight=False, soft_wrap=True)
    from flows.pipeline import run_quietly
    from flows.sharded import run_sharded_extract

    run_quietly(log, lambda: run_sharded_extract(dataset, dump_config(cfg), root, cfg.cluster, cfg.shard_videos,
                                                 force))


# ---- fine-tuning ------------------------------------------------------------------------------------------------
@app.command()
def finetune(dataset: Path = DatasetOption, root: Path = RootOption,
             config: Optional[Path] = opt.config("Pipeline config YAML (its `finetune:` section)."),
             set_: list[str] = opt.set_("Override a setting, e.g. --set epochs=5 --set crop_size=112 --set "
                                        "frames_per_video=3."),
             audio: Optional[Path] = typer.Option(None, "--audio", help="Audio feature h5 [N,10,D] (default: the "
                                                                        "newest complete audio extraction of this "
                                                                        "dataset in the store)."),
             resnet_weights: Optional[Path] = opt.resnet_weights("Initial ResNet-50 weights (default: the ImageNet "
                                                                 "file in the torch hub cache)."),
             random_init: bool = opt.random_init("Start from random weights (testing only)."),
             precision: Optional[str] = PrecisionOption,
             force: bool = opt.force("Fine-tune again even if this run exists (drops its resume point)."),
             no_wait: bool = NoWaitOption,
             no_recompute: bool = NoRecomputeOption,
             nproc: int = typer.Option(1, "--nproc", min=1, help="Fine-tuning processes (DDP; one GPU each on "
                                                                  "CUDA): each takes its share of every batch.")):
    """Fine-tune ResNet-50 with InfoNCE on video-level audio/visual pairs (train+val, never test); report
    audio<->visual retrieval recall before/after on held-out videos; save weights for `avel extract`."""
    opt.lock_policy(no_wait)
    opt.reuse_policy(no_recompute)
    from rich.panel import Panel
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pipeline.ave.features import newest_extraction
    from pipeline.ave.finetune import FinetuneConfig, finetune_stage, print_epoch, retrieval_line
    from pipeline.config import load_config

    cfg = load_config(FinetuneConfig, config, list(set_) + ([f"precision={precision}"] if precision else []),
                      section="finetune")
    _print_precision(cfg.precision, cfg.device)
    audio_h5 = audio if audio is not None else newest_extraction(root, dataset, "audio")
    if random_init:
        console.print(Panel("[bold]RANDOM WEIGHTS[/bold]: --random-init starts from a randomly initialised "
                            "ResNet-50. The weights are for testing the pipeline only; the outputs are marked so.",
                            style="bold red"))
    console.print(f"audio features: {audio_h5}", highlight=False, soft_wrap=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=nproc > 1) as bar:  # ranks print their lines
        task = bar.add_task("fine-tuning (measuring retrieval before)", total=cfg.epochs)

        def on_epoch(r: dict) -> None:
            bar.update(task, completed=r["epoch"] + 1, description=f"epoch {r['epoch']}: loss {r['loss']:.4f} "
                       f"lr {r['lr']:.2g} T {r['temperature']:.3g} ({r['seconds']:.1f} s)")

        result = finetune_stage(dataset, audio_h5, cfg, root, resnet_weights=resnet_weights,
                                random_init=random_init, force=force, nproc=nproc,
                                on_epoch=on_epoch if nproc == 1 else print_epoch)
    m = result.metrics
    console.print(f"{'reused' if result.reused else 'fine-tuned'} {result.dir}: {m.get('train_videos')} training "
                  f"videos "
                  f"(train+val), {m.get('heldout_videos')} held out, {len(m.get('excluded_test_overlap', []))} "
                  f"excluded (their ID serves the test split); loss {m['first_epoch_loss']:.4f} -> "
                  f"{m['final_loss']:.4f} over {m['epochs']} epochs", highlight=False, soft_wrap=True)
    table = Table(title="retrieval on held-out videos (recall %)")
    for col in ("", "a->v R@1", "a->v R@5", "v->a R@1", "v->a R@5", "videos"):
        table.add_column(col, justify="right" if col else "left")
    for when in ("before", "after"):
        r = result.retrieval.get(when, {})
        if "audio_to_visual" not in r:
            table.add_row(when, *[""] * 4, f"{r.get('n', 0)} ({r.get('skipped', 'not measured')})")
            continue
        table.add_row(when, *(f"{r[d][k]:.1f}" for d in ("audio_to_visual", "visual_to_audio") for k in ("R@1", "R@5")),
                      str(r["n"]))
    chance = result.retrieval.get("after", {}).get("chance")
    if chance:
        table.add_row("chance", f"{chance['R@1']:.1f}", f"{chance['R@5']:.1f}", f"{chance['R@1']:.1f}",
                      f"{chance['R@5']:.1f}", "")
    console.print(table)
    console.print(f"weights: {result.weights}\nsha256:  {result.sha256}\nreference format (I_state_dict): "
                  f"{result.reference_weights}", highlight=False, soft_wrap=True)
    console.print(f"next: avel extract --dataset {dataset} --root {root} --modality visual --resnet-weights "
                  f"{result.weights}   (the audio features are reused)", highlight=False, soft_wrap=True)
    line = retrieval_line(result.retrieval.get("before"), result.retrieval.get("after"))
    skipped = result.retrieval.get("after", {}).get("skipped", "no held-out videos")
    console.print(line or f"retrieval not measured: {skipped}", highlight=False, soft_wrap=True)


# ---- predicting on your own videos ------------------------------------------------------------------------------
@app.command()
def predict(videos: list[Path] = typer.Argument(..., help="Video files (any length and frame rate) or folders."),
            model: str = typer.Option(..., "--model", help="A train run folder (<root>/train/<key>, its best.pt is "
                                                             "used), train/<key> in --root, or a checkpoint file."),
            out: Path = typer.Option(Path("predictions"), "--out", help="Folder for the JSON, CSV and PNG files."),
            dataset: Optional[Path] = opt.dataset("AVE-format dataset: ground truth for videos whose ID (file name) "
                                                  "is in it.", required=False),
            root: Path = RootOption,
            device: str = opt.device("auto"),
            resnet_weights: Optional[Path] = opt.resnet_weights("ResNet-50 weight file, if the store and the default "
                                                                "location lack it (its sha256 must match the "
                                                                "checkpoint's)."),
            cnn14_weights: Optional[Path] = opt.cnn14_weights("Cnn14 weight file (sha256 checked likewise)."),
            precision: Optional[str] = opt.precision(help="The encoders' compute: auto, fp32, bf16 (default: as the "
                                                          "checkpoint's features were extracted)."),
            feature_set: Optional[str] = opt.feature_set("ave: the checkpoint was trained on AVE's released VGG-19 + "
                                                         "VGGish features (e.g. the released CACE-Net model.pth.tar)"),
            vgg19_weights: Optional[Path] = opt.released_weights("vgg19_weights"),
            vggish_weights: Optional[Path] = opt.released_weights("vggish_weights"),
            random_init: bool = opt.random_init("With --feature-set: random encoder weights (testing only).")):
    """Localize events in your own videos: per second, event or background, class and probability (+ a picture)."""
    import numpy as np

    from pipeline.ave.predict import predict_videos

    def show_model(loc) -> None:
        enc = ", ".join(f"{m} {p.encoder} ({'random init, seed %d' % p.seed if p.random_init else p.source})"
                        for m, p in loc.plans.items())
        prec = ", ".join(f"{m} {e.precision}" for m, e in loc.extractors.items())
        console.print(f"model {loc.checkpoint} ({len(loc.class_names)} classes; encoders: {enc}; {loc.device}; "
                      f"precision {prec})",
                      highlight=False, soft_wrap=True)
        for note in loc.notes:
            console.print(f"[bold red]{note}[/bold red]" if note.startswith("RANDOM") else f"[yellow]{note}[/yellow]",
                          highlight=False, soft_wrap=True)

    def show(vp) -> None:
        if not vp.ok:
            console.print(f"[red]failed[/red] {vp.video}: {vp.error}", highlight=False, soft_wrap=True)
            return
        flags = f" [yellow]({', '.join(vp.flags)})[/yellow]" if vp.flags else ""
        console.print(f"[bold]{vp.video}[/bold]: {vp.duration_s:.2f} s -> {vp.seconds} one-second rows in "
                      f"{vp.windows} window(s) of 10 s{flags}", highlight=False, soft_wrap=True)
        table = Table(box=None, padding=(0, 1), show_edge=False)
        for col in ("s", "label", "event p", "class p", *(["truth"] if vp.ground_truth is not None else [])):
            table.add_column(col, justify="right" if col in ("s", "event p", "class p") else "left")
        rows = vp.rows
        if len(rows) > 60:  # a long video: runs of equal label, every second is in the CSV
            runs = []
            for r in rows:
                if runs and runs[-1][-1]["label"] == r["label"] and runs[-1][-1]["window"] == r["window"]:
                    runs[-1].append(r)
                else:
                    runs.append([r])
            for run_ in runs:
                a, b = run_[0], run_[-1]
                table.add_row(f"{a['second']}-{b['second']}", a["label"],
                              f"{np.mean([r['event_prob'] for r in run_]):.2f}", f"{a['class_prob']:.2f}")
        else:
            for r in rows:
                style = None if r["is_event"] else "dim"
                table.add_row(str(r["second"]), r["label"], f"{r['event_prob']:.2f}", f"{r['class_prob']:.2f}",
                              *([str(r.get("ground_truth") or "-")] if vp.ground_truth is not None else []),
                              style=style)
        console.print(table)
        for note in vp.notes:
            style = "yellow" if ("no audio" in note or "could not" in note) else "dim"
            console.print(f"  [{style}]{note}[/{style}]", highlight=False, soft_wrap=True)
        console.print(f"  files: {', '.join(vp.files.values())}", highlight=False, soft_wrap=True)

    with console.status("localizing"):
        results = predict_videos(videos, model, out, device=device, dataset=dataset, root=root,
                                 resnet_weights=resnet_weights, cnn14_weights=cnn14_weights, precision=precision,
                                 feature_set=feature_set, random_init=random_init, vgg19_weights=vgg19_weights,
                                 vggish_weights=vggish_weights, on_model=show_model, on_video=show)
    ok = sum(vp.ok for vp in results)
    console.print(f"{ok} of {len(results)} video(s) localized; summary: {out / 'summary.json'}, "
                  f"{out / 'summary.csv'}", highlight=False, soft_wrap=True)
    if ok == 0:
        raise typer.Exit(1)


# ---- the main job -----------------------------------------------------------------------------------------------
def _check_pipeline_inputs(config_path: Path | None, overrides: list[str], force: list[str]):
    """Everything that can be checked before the flow starts: the config, --force names, the dataset folder and
    the weight files. A problem is a UserError (one `error:` line), never a flow traceback."""
    from pipeline.ave.extract import load_video_dataset, planned_weights
    from pipeline.ave.pipeline_config import forced_stages, resolve_config

    cfg = resolve_config(str(config_path) if config_path else None, None, overrides)
    forced_stages(force)
    if cfg.dataset.path is not None:
        load_video_dataset(cfg.dataset.path)
    planned_weights(cfg.extract)  # a missing or wrong weight file fails now
    return cfg


def _pipeline_run(config_path: Path | None, overrides: list[str], force: list[str]):
    """The AVE pipeline for the flow runner: inputs checked, the flow to call, what to print after its stages."""
    from pipeline.cli.runner import FlowRun

    cfg = _check_pipeline_inputs(config_path, overrides, force)
    random = cfg.extract.random_init
    precisions = _stage_precisions(cfg)

    def flow() -> dict:
        from flows.pipeline import full_pipeline

        return full_pipeline(config_path=str(config_path) if config_path else None, overrides=overrides, force=force)

    def report(term: Console, result: dict, seconds: float) -> None:
        for w in result["warnings"]:
            if not w.startswith("RANDOM WEIGHTS"):  # said once, above and in the last line
                term.print(f"[yellow]warning:[/yellow] {w}", highlight=False, soft_wrap=True)
        if result.get("retrieval"):
            term.print(f"fine-tuning, held-out {result['retrieval']}", highlight=False, soft_wrap=True)
        if result.get("baseline"):
            for row in result["baseline"]["rows"]:
                term.print(f"localizer on the {row['visual features']}'s features: test accuracy "
                           f"{row['test accuracy mean']:.2f} +- {row['std']:.2f} % (seeds {row['seeds']}: "
                           f"{row['per seed']})", highlight=False, soft_wrap=True)
            term.print(f"comparison: {result['baseline']['report']}", highlight=False, soft_wrap=True)
        term.print(f"{result['split']} accuracy: {result['accuracy']:.2f} % (all-background baseline "
                   f"{result['all_background_accuracy']:.2f} %) in {seconds:.0f} s, "
                   f"precision {'/'.join(sorted({note.split()[1] for note in precisions.values()}))}"
                   + (" [bold red](RANDOM WEIGHTS)[/bold red]" if random else ""), highlight=False,
                   soft_wrap=True)  # never wrapped: scripts read this last line (`tail -1`)

    return FlowRun(
        name="pipeline", root=cfg.root,
        source=f"dataset {cfg.dataset.path or 'synthetic ' + str(dict(cfg.dataset.synth))}",
        flow=flow, report=report, table_title=lambda result: f"pipeline on {result['dataset']}",
        random_banner=("[bold]RANDOM WEIGHTS[/bold]: this run uses randomly initialised encoders "
                       "(extract.random_init). Its features, weights and accuracies test the pipeline only; "
                       "every manifest and report is marked so.") if random else None,
        notes=["; ".join(note if stage == "all" else f"{stage}: {note}" for stage, note in precisions.items())])


def _stage_precisions(cfg) -> dict[str, str]:
    """What each stage runs, as runtime.precision_note says it ("precision fp32 (auto: ...)"); one entry for all
    of them when they agree."""
    from pipeline.runtime import precision_note, resolve_device

    notes = {stage: precision_note(getattr(cfg, stage).precision, resolve_device(getattr(cfg, stage).device))
             for stage in ("extract", "finetune", "train")}
    if len(set(notes.values())) == 1:
        return {"all": next(iter(notes.values())) + " for extraction, fine-tuning and training"}
    return notes


def _run_pipeline(config_path: Path | None, overrides: list[str], force: list[str], verbose: bool) -> None:
    from pipeline.cli.runner import run_flow

    run_flow(lambda: _pipeline_run(config_path, overrides, force), verbose)


VerboseOption = opt.verbose("Show Prefect's own log lines in the terminal (default: into "
                            "<root>/logs/pipeline-*.log).")
ForceStagesOption = opt.force_stages("Recompute this stage and what depends on it.")


@app.command()
def run(config: Path = opt.config("Pipeline config YAML (see pipeline/ave/demo.yaml).", required=True),
        set_: list[str] = opt.set_("Override, e.g. --set train.epochs=20."),
        force: list[str] = ForceStagesOption,
        root: Optional[Path] = opt.root("Artifact store root (overrides the config).", default=None),
        verbose: bool = VerboseOption,
        no_wait: bool = NoWaitOption,
        no_recompute: bool = NoRecomputeOption):
    """Run the full pipeline (Prefect flow): extract -> fine-tune -> re-extract -> train -> evaluate."""
    opt.lock_policy(no_wait)
    opt.reuse_policy(no_recompute)
    _run_pipeline(config, list(set_) + ([f"root={root}"] if root else []), list(force), verbose)


@app.command()
def demo(root: Path = RootOption,
         set_: list[str] = opt.set_("Override a demo setting, e.g. --set train.epochs=10."),
         force: list[str] = ForceStagesOption,
         verbose: bool = VerboseOption,
         no_wait: bool = NoWaitOption,
         no_recompute: bool = NoRecomputeOption):
    """The full pipeline on a generated dataset with random-initialised encoders, CPU-sized (pipeline/ave/demo.yaml)."""
    opt.lock_policy(no_wait)
    opt.reuse_policy(no_recompute)
    from pipeline.ave.pipeline_config import demo_config_path

    _run_pipeline(demo_config_path(), [f"root={root}", *set_], list(force), verbose)


@app.command()
def schedule(cron: str = typer.Option(..., "--cron", help='Cron schedule, e.g. "0 3 * * *".'),
             config: Path = opt.config("Pipeline config YAML.", required=True),
             name: str = typer.Option("avel-scheduled", help="Deployment name."),
             set_: list[str] = opt.set_("Override a setting.")):
    """Serve the full-pipeline flow on a cron schedule (needs a Prefect server: see the README). Blocks."""
    _check_pipeline_inputs(config, list(set_), [])  # fail now on a bad config, not at 3 am
    from flows.pipeline import full_pipeline
    full_pipeline.serve(name=name, cron=cron, parameters={"config_path": str(config.resolve()),
                                                          "overrides": list(set_)})
