"""Scaling on one machine: 1 against 2 workers for sharded extraction (Dask through Prefect) and 1 against 2
processes for DDP fine-tuning and localizer training (torch's elastic launcher).

What runs (randomly initialised encoders: speed does not depend on the weights):
- AVE extraction of `--videos` generated videos (both encoders, `--frames-per-segment`, `--crop-size`) by
  `avel extract`: in one process (torch's default threads, decoding workers), then `--cluster local:1` and
  `--cluster local:2` (worker processes of cores / N torch threads each, `flows.sharded.local_cluster_spec`).
  Wall time of the whole command, so the cluster's start, the per-shard model
  construction and the merge count: it is what a user waits for.
- Dense extraction of `--dense-videos` generated untrimmed videos by `avel dense extract`, one process against
  `--cluster local:2`.
  The same `local:2` command once more (all reused) measures that fixed cost alone.
- Fine-tuning (`finetune_stage`, `--finetune-epochs` epochs on the AVE videos above, global batch 8) with
  nproc 1 and 2: the stage's seconds per epoch.
- Localizer training (`train_stage`) on a random feature folder of the paper run's dimensions (7x7x512 visual,
  128 audio; `--train-videos` training videos, batch 64) with nproc 1 and 2: the stage's seconds per epoch.
On a CPU, N workers share the same cores: the figures say what the orchestration costs and what splitting the
cores between processes gains or loses, not what N GPUs would give.

    python benchmarks/scaling.py                     # CPU-sized defaults (~10 minutes on 2 cores)
    python benchmarks/scaling.py --skip dense,train  # extraction and fine-tuning only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _timed(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "a") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if rc:
        raise SystemExit(f"{' '.join(cmd)} failed (rc {rc}); see {log}")
    return time.perf_counter() - t0


def ave_extraction(work: Path, args, log: Path) -> list[dict]:
    base = [sys.executable, "-m", "pipeline.cli", "extract", "--dataset", str(work / "ave"), "--random-init",
            "--frames-per-segment", str(args.frames_per_segment), "--set", f"crop_size={args.crop_size}"]
    rows = []
    for name, extra in (("one process", []), ("local:1", ["--cluster", "local:1"]),
                        ("local:2", ["--cluster", "local:2"])):
        extra = extra + (["--shard-videos", str(args.shard_videos)] if extra else [])
        s = _timed(base + ["--root", str(work / f"ave-{name.replace(':', '')}")] + extra, log)
        rows.append({"what": "AVE extraction", "variant": name, "seconds": round(s, 1),
                     "rate": f"{args.videos / s:.2f} videos/s"})
        print(rows[-1], flush=True)
    # the same command again, every stage reused: what starting Prefect's server and the cluster costs
    s = _timed(base + ["--root", str(work / "ave-local2"), "--cluster", "local:2"], log)
    rows.append({"what": "AVE extraction", "variant": "local:2 again (all reused)", "seconds": round(s, 1),
                 "rate": "the fixed cost"})
    print(rows[-1], flush=True)
    return rows


def dense_extraction(work: Path, args, log: Path) -> list[dict]:
    base = [sys.executable, "-m", "pipeline.cli", "dense", "extract", "--dataset", str(work / "dense"),
            "--random-init", "--frames-per-window", "1", "--crop-size", str(args.crop_size)]
    rows = []
    for name, extra in (("one process", []), ("local:2", ["--cluster", "local:2", "--shard-videos", "2"])):
        s = _timed(base + ["--root", str(work / f"dense-{name.replace(':', '')}")] + extra, log)
        rows.append({"what": "dense extraction", "variant": name, "seconds": round(s, 1),
                     "rate": f"{args.dense_videos / s:.2f} videos/s"})
        print(rows[-1], flush=True)
    return rows


def finetuning(work: Path, args) -> list[dict]:
    from pipeline.ave.extract import ExtractConfig, extract
    from pipeline.ave.finetune import FinetuneConfig, finetune_stage

    audio = extract(work / "ave", ExtractConfig(modality="audio", random_init=True, frames_per_segment=1),
                    work / "ft-audio")["audio"].path
    cfg = FinetuneConfig(epochs=args.finetune_epochs, batch_size=8, crop_size=args.crop_size, frames_per_video=2,
                         workers=0, device="cpu")
    rows = []
    for nproc in (1, 2):
        r = finetune_stage(work / "ave", audio, cfg, work / f"ft-{nproc}", random_init=True, nproc=nproc)
        m = json.loads((r.dir / "manifest.json").read_text())
        rows.append({"what": "fine-tuning epoch", "variant": f"nproc {nproc}",
                     "seconds": round(m["timings"]["seconds_per_epoch"], 2), "rate": f"global batch {cfg.batch_size}"})
        print(rows[-1], flush=True)
    return rows


def training(work: Path, args) -> list[dict]:
    from pipeline.ave.features import from_public_folder
    from pipeline.ave.train import TrainConfig, train_stage
    from tests.features_fixture import write_feature_folder

    folder = write_feature_folder(work / "feats", n_train=args.train_videos, n_val=16, n_test=16, video_dim=512,
                                  audio_dim=128, hw=7, visual_dtype="float32")
    fs = from_public_folder(folder)
    cfg = TrainConfig(epochs=args.train_epochs, batch_size=64, device="cpu", precision="fp32")
    rows = []
    for nproc in (1, 2):
        r = train_stage(fs, cfg, work / f"train-{nproc}", nproc=nproc)
        m = json.loads((r.dir / "manifest.json").read_text())
        rows.append({"what": "localizer epoch", "variant": f"nproc {nproc}",
                     "seconds": round(m["timings"]["train_s_per_epoch"], 2),
                     "rate": f"{args.train_videos} videos, batch 64"})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=24, help="AVE videos (extraction and fine-tuning)")
    ap.add_argument("--frames-per-segment", type=int, default=2)
    ap.add_argument("--crop-size", type=int, default=112)
    ap.add_argument("--shard-videos", type=int, default=4)
    ap.add_argument("--dense-videos", type=int, default=8)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--train-videos", type=int, default=256)
    ap.add_argument("--train-epochs", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma-separated: ave, dense, finetune, train")
    ap.add_argument("--out", type=Path, default=None, help="JSON results file")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    from pipeline.ave.synth import SynthConfig, generate_dataset

    with tempfile.TemporaryDirectory(prefix="avel-scaling-") as tmp:
        work = Path(tmp)
        log = work / "commands.log"
        generate_dataset(work / "ave", SynthConfig(videos=args.videos, classes=4, seed=0))
        rows = []
        if "ave" not in skip:
            rows += ave_extraction(work, args, log)
        if "dense" not in skip:
            from pipeline.dense.videos import VideoSynthConfig, generate_video_dataset

            generate_video_dataset(work / "dense", VideoSynthConfig(train=args.dense_videos - 2, val=1, test=1,
                                                                    classes=4, min_length_s=20, max_length_s=40))
            rows += dense_extraction(work, args, log)
        if "finetune" not in skip:
            rows += finetuning(work, args)
        if "train" not in skip:
            rows += training(work, args)
    import torch

    env = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    print(json.dumps(env))
    print("| what | variant | seconds | |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['variant']} | {r['seconds']} | {r['rate']} |")
    if args.out:
        args.out.write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
