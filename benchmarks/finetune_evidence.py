"""Does contrastive fine-tuning move the features the right way? Held-out audio<->visual retrieval before and after
the `finetune` stage, per setting, on a synthetic AVE set where each class pairs an object with a sound.

What runs: one generated dataset (`--videos`, 4 classes), its audio features (random Cnn14), then the fine-tuning
stage (`finetune_stage`, the real one: the same loader, loss, schedule and retrieval) once per variant, from the
same randomly initialised ResNet-50 (no pretrained weights can be downloaded here). Retrieval is measured on the
held-out share (`holdout_fraction`) of the train+val videos, never test, on deterministic frames (the middle of each
second); chance R@1 is 1/N. Recall is measured every `--every` epochs: the recall curve next to the loss curve.

Variants (`--variants`, comma-separated), all layer4 trainable at `--crop` px, `--frames` frames per video, SGD:
- `plain`: the stage as the paper's recipe has it (no knob), at the demo's learning rate;
- `std`: + standardized audio embeddings (`standardize_audio`);
- `norm`: + a BatchNorm1d without affine on each head's input (`head_norm`);
- `std+norm`: both.
Writes the table and the curves to `--out` (JSON) and a picture of the curves next to it (PNG).

    python benchmarks/finetune_evidence.py                       # ~15 minutes on 2 CPU cores
    python benchmarks/finetune_evidence.py --variants std+norm --epochs 20
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {"plain": {}, "std": {"standardize_audio": True}, "norm": {"head_norm": True},
            "std+norm": {"standardize_audio": True, "head_norm": True}}


def run_variant(name: str, dataset: Path, audio: Path, root: Path, args) -> dict:
    import torch

    from pipeline.ave.finetune import FinetuneConfig, finetune_stage

    cfg = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, milestones=[10 * args.epochs],
                         trainable_stages=["layer4"], frames_per_video=args.frames, crop_size=args.crop,
                         holdout_fraction=args.holdout, retrieval_every=args.every, workers=1, seed=args.seed,
                         **VARIANTS[name])
    t0 = time.perf_counter()
    r = finetune_stage(dataset, audio, cfg, root, random_init=True,
                       on_epoch=lambda rec: print(f"  {name}: epoch {rec['epoch'] + 1}/{rec['epochs']} loss "
                                                  f"{rec['loss']:.3f}", flush=True))
    history = torch.load(r.dir / "last.pt", weights_only=True)["history"]
    before, after = r.retrieval["before"], r.retrieval["after"]

    def r1(x: dict) -> list[float]:
        return [round(x["audio_to_visual"]["R@1"], 1), round(x["visual_to_audio"]["R@1"], 1)]

    return {"variant": name, "config": {k: v for k, v in cfg.model_dump(mode="json").items()
                                        if k in ("lr", "batch_size", "epochs", "standardize_audio", "head_norm")},
            "heldout": after["n"], "chance_R@1": round(after["chance"]["R@1"], 1),
            "before_R@1": r1(before), "after_R@1": r1(after),
            "after_R@5": [round(after["audio_to_visual"]["R@5"], 1), round(after["visual_to_audio"]["R@5"], 1)],
            "loss": [round(h["loss"], 4) for h in history],
            "recall_curve": [[c["epoch"], *r1(c)] for c in r.retrieval.get("curve", [])],
            "seconds": round(time.perf_counter() - t0, 1), "stage_dir": str(r.dir)}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(10, 3.8))
    for row in rows:
        ax_l.plot(range(1, len(row["loss"]) + 1), row["loss"], label=row["variant"])
        epochs = [c[0] for c in row["recall_curve"]]
        ax_r.plot(epochs, [c[1] for c in row["recall_curve"]], marker="o", label=f"{row['variant']} a->v")
    if rows:
        ax_r.axhline(rows[0]["chance_R@1"], color="grey", ls="--", label="chance")
        ax_l.axhline(__import__("math").log(rows[0]["config"]["batch_size"]), color="grey", ls="--",
                     label="ln(batch)")
    ax_l.set(xlabel="epoch", ylabel="training InfoNCE loss", title="loss")
    ax_r.set(xlabel="epoch", ylabel="held-out R@1 (%)", title=f"retrieval, {rows[0]['heldout']} held-out videos"
             if rows else "retrieval")
    ax_l.legend(fontsize=7)
    ax_r.legend(fontsize=7)
    fig.suptitle("fine-tuning from RANDOM WEIGHTS (synthetic AVE set)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=128)
    ap.add_argument("--variants", default="plain,std,norm,std+norm")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--crop", type=int, default=112)
    ap.add_argument("--holdout", type=float, default=0.25)
    ap.add_argument("--every", type=int, default=3, help="measure retrieval every k epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="keep the dataset and the store here (default: temporary)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "finetune-evidence.json")
    args = ap.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")

    from pipeline.ave.extract import ExtractConfig, extract
    from pipeline.ave.synth import SynthConfig, generate_dataset

    with tempfile.TemporaryDirectory(prefix="avel-ft-evidence-") as tmp:
        work = args.work or Path(tmp)
        dataset = work / "dataset"
        if not (dataset / "synth.json").is_file():
            print(f"generating {args.videos} videos...", flush=True)
            generate_dataset(dataset, SynthConfig(videos=args.videos, classes=4, seed=args.seed))
        print("audio features (random Cnn14)...", flush=True)
        audio = extract(dataset, ExtractConfig(modality="audio", random_init=True, frames_per_segment=1),
                        work / "store")["audio"].path
        rows = []
        for name in names:
            rows.append(run_variant(name, dataset, audio, work / "store", args))
            print(json.dumps({k: rows[-1][k] for k in ("variant", "before_R@1", "after_R@1", "chance_R@1",
                                                       "heldout", "seconds")}), flush=True)
    print("RANDOM WEIGHTS: every variant starts from a randomly initialised ResNet-50 and Cnn14")
    print("| variant | a->v R@1 before -> after | v->a R@1 before -> after | chance | held-out | final loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['before_R@1'][0]} -> {r['after_R@1'][0]} | {r['before_R@1'][1]} -> "
              f"{r['after_R@1'][1]} | {r['chance_R@1']} | {r['heldout']} | {r['loss'][-1]} |")
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "random_weights": True,
                                    "rows": rows}, indent=1))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
