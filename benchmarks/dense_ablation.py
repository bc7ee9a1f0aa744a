"""The dense detector's ablation: UnAV baseline, +LCF, +LAC, +both (LoCo, our design), x seeds, on one feature set.

A thin wrapper of `pipeline.dense.compare` (what `avel dense compare` runs), kept for its file names and defaults:
all four variants, the `train:` section of a dense pipeline config (the demo's by default). Every cell is a normal
`dense_train` stage run (cached in the store: a rerun only fills in missing cells), scored once on test with the
val-chosen weights. `--inputs both,audio,visual` adds each variant's single-modality controls. Writes
`dense_ablation.md` / `.json` into --out and prints the table.

    python benchmarks/dense_ablation.py --annotations A.json --features DIR [--config pipeline/dense/demo.yaml]
        [--seeds 1,2,3] [--inputs both] [--root artifacts] [--out benchmarks/results]

Prefer `avel dense compare` (any subset of the variants, live progress, the table under ROOT/compare/).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from pipeline.config import load_config, parse_seeds
from pipeline.controls import parse_inputs
from pipeline.dense import compare as cmp
from pipeline.dense.data import load_dense_features
from pipeline.dense.train import DenseTrainConfig
from pipeline.runtime import configure_process


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--annotations", type=Path, required=True)
    ap.add_argument("--features", type=Path, default=None)
    ap.add_argument("--config", type=Path, default=Path(__file__).parents[1] / "pipeline" / "dense" / "demo.yaml")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--inputs", default="both", help="both, or both,audio,visual for the single-modality controls")
    ap.add_argument("--root", type=Path, default=Path("artifacts"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--set", action="append", default=[], help="train-section override, e.g. epochs=10")
    args = ap.parse_args()
    configure_process()
    base = load_config(DenseTrainConfig, args.config, args.set, section="train")
    fs = load_dense_features(args.annotations, args.features)
    seeds, inputs = parse_seeds(args.seeds), parse_inputs(args.inputs)
    t0 = time.perf_counter()

    def on_done(label, r):
        m = r.metrics
        print(f"{label} seed {m['seed']}: test avg mAP {100 * m['test_avg_map']:.2f} % (val "
              f"{100 * m['val_avg_map']:.2f} %, {m['test_weights']} weights, {m['train_s_per_epoch']:.1f} s/epoch, "
              f"{'reused' if r.reused else 'trained'})", flush=True)

    rows = cmp.compare(fs, base, list(cmp.VARIANTS), inputs, seeds, args.root, on_done=on_done)
    seconds = time.perf_counter() - t0
    md, js = cmp.write_report(rows, args.out / "dense_ablation", list(fs.notes),
                              {"config": str(args.config), "seconds": round(seconds, 1)})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dense_ablation.md").write_text(f"{md.read_text()}\nconfig {args.config}, {seconds:.0f} s\n")
    shutil.copyfile(js, args.out / "dense_ablation.json")
    print(cmp.markdown_table(rows))


if __name__ == "__main__":
    main()
