"""The `avel` command line. Thin: parses arguments, calls the stage functions, prints with rich.

A `UserError` from anywhere below becomes one `error: ...` line and exit status 2 (no traceback).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from pipeline import ave
from pipeline.errors import UserError
from pipeline.store import ArtifactStore, read_manifest, MANIFEST

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Audio-visual event localization on AVE-format data (CACE-Net and beyond).")
dataset_app = typer.Typer(no_args_is_help=True, help="Look at an AVE-format dataset folder.")
app.add_typer(dataset_app, name="dataset")
console = Console()

DEFAULT_ROOT = Path("artifacts")
RootOption = typer.Option(DEFAULT_ROOT, "--root", help="Artifact store root.")
DatasetOption = typer.Option(..., "--dataset", help="AVE-format dataset folder (Annotations.txt, *_order.h5, videos/).")


# ---- datasets ---------------------------------------------------------------------------------------------------
@app.command()
def synth(out: Path = typer.Option(..., "--out", help="Folder to write the dataset into."),
          videos: int = typer.Option(24, help="Number of videos."),
          classes: int = typer.Option(4, help="Number of event classes (the first K AVE categories)."),
          seed: int = typer.Option(0, help="Random seed: same seed, same dataset.")):
    """Generate a synthetic dataset in the AVE layout (real H.264/AAC MP4 files, annotations, splits)."""
    from pipeline.synth import SynthConfig, generate_dataset

    generate_dataset(out, SynthConfig(videos=videos, classes=classes, seed=seed))
    print_dataset_summary(ave.load_dataset(out))


@app.command()
def labels(dataset: Path = DatasetOption, out: Path = typer.Option(..., "--out", help="Output labels.h5.")):
    """Write AVE's segment labels [N,10,C+1] (dataset `avadataset`) built from Annotations.txt."""
    ds = ave.load_dataset(dataset)
    ave.write_labels(ds, out)
    console.print(f"wrote {out}: {len(ds)} rows x {ave.SEGMENTS} segments x {ds.background + 1} columns "
                  f"({len(ds.classes)} classes + background)")


@dataset_app.command("check")
def dataset_check(dataset: Path = typer.Argument(..., help="Dataset folder."),
                  open_files: bool = typer.Option(True, "--open/--no-open", help="Open each video to test it.")):
    """Report missing and unreadable video files; exit 1 if any."""
    ds = ave.load_dataset(dataset)
    report = ds.check(open_files=open_files)
    console.print(f"{report.rows} rows, {report.videos} unique videos in {ds.video_dir}: {report.present} present, "
                  f"{len(report.missing)} missing, {len(report.unreadable)} unreadable")
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
    for col in ("split", "videos", "segments", "event", "background", "all-background acc"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split in ave.SPLITS:
        rows = ds.split_rows(split)
        seg = mask[rows]
        bg = int(seg.size - seg.sum())
        table.add_row(split, str(len(rows)), str(seg.size), str(int(seg.sum())), str(bg),
                      f"{100 * bg / max(seg.size, 1):.2f} %")
    console.print(table)
    console.print("classes: " + "; ".join(f"{i} {c}" for i, c in enumerate(ds.classes)) + f"; {ds.background} background")


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


# ---- the main job -----------------------------------------------------------------------------------------------
@app.command()
def demo(root: Path = RootOption, videos: int = typer.Option(24, help="Videos in the generated dataset."),
         seed: int = typer.Option(0, help="Seed of the generated dataset.")):
    """Generate a small synthetic AVE dataset under ROOT/datasets and print its summary."""
    from pipeline.synth import SynthConfig, generate_dataset

    out = Path(root) / "datasets" / f"synth-v{videos}-s{seed}"
    if not (out / ave.ANNOTATIONS).is_file():
        generate_dataset(out, SynthConfig(videos=videos, seed=seed))
    print_dataset_summary(ave.load_dataset(out))


def main() -> None:
    try:
        app()
    except UserError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
