"""The dense detector's ablation: UnAV baseline, +LCF, +LAC, +both (LoCo, our design), x seeds, on one feature set.

Every cell is a normal `dense_train` stage run (cached in the store: a rerun only fills in missing cells), trained
with the `train:` section of a dense pipeline config (the demo's by default) and scored once on test with the
val-chosen weights. Writes `dense_ablation.md` / `.json` into --out and prints the table.

    python benchmarks/dense_ablation.py --annotations A.json --features DIR [--config pipeline/dense/demo.yaml]
        [--seeds 1,2,3] [--root artifacts] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pipeline.config import load_config
from pipeline.dense.data import load_dense_features
from pipeline.dense.train import DenseTrainConfig, train_stage
from pipeline.runtime import configure_process

VARIANTS = {"baseline": {}, "+LCF": {"lcf": True}, "+LAC": {"lac": True}, "+LCF+LAC (LoCo)": {"lcf": True, "lac": True}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--annotations", type=Path, required=True)
    ap.add_argument("--features", type=Path, default=None)
    ap.add_argument("--config", type=Path, default=Path(__file__).parents[1] / "pipeline" / "dense" / "demo.yaml")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--root", type=Path, default=Path("artifacts"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--set", action="append", default=[], help="train-section override, e.g. epochs=10")
    args = ap.parse_args()
    configure_process()
    base = load_config(DenseTrainConfig, args.config, args.set, section="train")
    fs = load_dense_features(args.annotations, args.features)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    t0 = time.perf_counter()
    for name, switches in VARIANTS.items():
        cells = []
        for seed in seeds:
            cfg = base.model_copy(update={"seed": seed, "model_args": {**base.model_args, **switches}})
            r = train_stage(fs, cfg, args.root)
            m = r.metrics
            cells.append(m)
            print(f"{name} seed {seed}: test avg mAP {100 * m['test_avg_map']:.2f} % (val {100 * m['val_avg_map']:.2f}"
                  f" %, {m['test_weights']} weights, {m['train_s_per_epoch']:.1f} s/epoch, "
                  f"{'reused' if r.reused else 'trained'})", flush=True)
        avg = np.array([c["test_avg_map"] for c in cells]) * 100
        high = np.array([c["test_avg_map_0.5:0.9"] for c in cells]) * 100
        at5 = np.array([c["test_map"]["0.5"] for c in cells]) * 100
        rows.append({"variant": name, "seeds": seeds, "avg_map_mean": avg.mean(), "avg_map_std": avg.std(ddof=1),
                     "map_0.5_mean": at5.mean(), "map_0.5_std": at5.std(ddof=1), "map_high_mean": high.mean(),
                     "map_high_std": high.std(ddof=1), "parameters": cells[0]["parameters"],
                     "s_per_epoch": float(np.mean([c["train_s_per_epoch"] for c in cells]))})
    lines = ["| variant | test avg mAP 0.1:0.9 % | mAP@0.5 % | mean 0.5:0.9 % | parameters | s/epoch |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['avg_map_mean']:.2f} +- {r['avg_map_std']:.2f} | {r['map_0.5_mean']:.2f} +- "
              f"{r['map_0.5_std']:.2f} | {r['map_high_mean']:.2f} +- {r['map_high_std']:.2f} | {r['parameters']:,} | "
              f"{r['s_per_epoch']:.1f} |" for r in rows]
    table = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dense_ablation.md").write_text(f"{table}\n\nseeds {seeds}, config {args.config}, "
                                                f"{time.perf_counter() - t0:.0f} s\n")
    (args.out / "dense_ablation.json").write_text(json.dumps(rows, indent=1))
    print(table)


if __name__ == "__main__":
    main()
