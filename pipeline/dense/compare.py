"""Dense detectors compared on the same features, splits, seeds and recipe, beside their single-modality controls
(`avel dense compare`).

A benchmark of audio-visual events means something only if one modality alone does clearly worse than both: the
controls (`inputs` audio / visual: the other modality replaced by matched noise, `pipeline.controls`) measure that,
on the same footing as the variants. Each (variant, inputs, seed) is an ordinary `dense_train` stage run, so it is
cached in the store (a rerun fills in only the missing cells), resumable and inspectable; this module only plans
the runs and collects what each reports into one table: test average mAP over tIoU 0.1:0.9, mAP@0.5 and the mean
over 0.5:0.9 (mean +- std over the seeds), and for a control row its gap to the same variant's `both` row (the
mean and std of the per-seed differences: the seeds pair the runs).

Variants are the ablation of `benchmarks/dense_ablation.py`: the UnAV baseline, +LCF, +LAC and both (LoCo).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.config import parse_choices, validate
from pipeline.controls import BOTH, CONTROL_NOTE, control_label
from pipeline.dense.data import DenseFeatures
from pipeline.dense.train import DenseStageResult, DenseTrainConfig, train_stage
from pipeline.store import write_comparison

VARIANTS = {"baseline": {}, "lcf": {"lcf": True}, "lac": {"lac": True}, "loco": {"lcf": True, "lac": True}}
LABELS = {"baseline": "baseline", "lcf": "+LCF", "lac": "+LAC", "loco": "+LCF+LAC (LoCo)"}
METRICS = {"test_avg_map": "test avg mAP 0.1:0.9 %", "test_map_0.5": "mAP@0.5 %",
           "test_avg_map_0.5:0.9": "mean 0.5:0.9 %", "val_avg_map": "val avg mAP %"}
GAP_METRIC = "test_avg_map"


def parse_variants(text: str) -> list[str]:
    """`baseline,loco` -> ["baseline", "loco"] (order kept, repeats dropped); a clear error otherwise."""
    return parse_choices("--variants", text, tuple(VARIANTS), "baseline,loco: the UnAV baseline and LoCo's LCF + LAC")


def _metric(metrics: dict, key: str) -> float | None:
    value = metrics.get("test_map", {}).get("0.5") if key == "test_map_0.5" else metrics.get(key)
    return None if value is None else 100.0 * float(value)


@dataclass
class Row:
    variant: str
    inputs: str
    runs: list[DenseStageResult]

    @property
    def label(self) -> str:
        name = LABELS[self.variant]
        return control_label(name, self.inputs)

    @property
    def seeds(self) -> list[int]:
        return [int(r.metrics["seed"]) for r in self.runs]

    def values(self, key: str) -> dict[int, float]:
        """{seed: value in %} of the runs that report `key`."""
        out = {}
        for r in self.runs:
            v = _metric(r.metrics, key)
            if v is not None:
                out[int(r.metrics["seed"])] = v
        return out

    def mean_std(self, key: str) -> tuple[float, float]:
        return _mean_std(list(self.values(key).values()))

    def to_dict(self) -> dict:
        out = {"variant": self.variant, "label": self.label, "inputs": self.inputs, "seeds": self.seeds,
               "parameters": int(self.runs[0].metrics["parameters"]) if self.runs else None,
               "runs": [str(r.dir) for r in self.runs],
               "train_s_per_epoch": float(np.mean([r.metrics["train_s_per_epoch"] for r in self.runs]))
               if self.runs else None}
        for key in METRICS:
            values = self.values(key)
            mean, std = _mean_std(list(values.values()))
            out[key] = {"mean": mean, "std": std, "values": values}
        return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def gap_to_both(rows: list[Row], row: Row, key: str = GAP_METRIC) -> dict | None:
    """A control row's difference to its variant's `both` row (points, per seed both ran: mean, std, values);
    None for a joint row or without one."""
    joint = next((r for r in rows if r.variant == row.variant and r.inputs == BOTH), None)
    if row.inputs == BOTH or joint is None:
        return None
    mine, theirs = row.values(key), joint.values(key)
    diffs = {s: mine[s] - theirs[s] for s in mine if s in theirs}
    mean, std = _mean_std(list(diffs.values()))
    return {"mean": mean, "std": std, "values": diffs}


def plan(base: DenseTrainConfig, variants: list[str], inputs: list[str], seeds: list[int]
         ) -> list[tuple[str, str, list[DenseTrainConfig]]]:
    """(variant, inputs, one config per seed), each variant's controls right after its joint row; every config
    validated before the first run starts."""
    out = []
    for variant in variants:
        # the switches as `avel dense train --lcf/--lac` sets them: a baseline run is the stage a plain train runs
        args = {**{k: v for k, v in base.model_args.items() if k not in ("lcf", "lac")}, **VARIANTS[variant]}
        for seen in inputs:
            cfgs = [validate(DenseTrainConfig, {**base.model_dump(), "model_args": args, "seed": seed,
                                                "inputs": seen}, f"variant {variant!r}") for seed in seeds]
            out.append((variant, seen, cfgs))
    return out


def compare(fs: DenseFeatures, base: DenseTrainConfig, variants: list[str], inputs: list[str], seeds: list[int],
            root: Path, *, force: bool = False,
            on_run: Callable[[int, int, str, int], None] | None = None,
            on_done: Callable[[str, DenseStageResult], None] | None = None,
            on_epoch: Callable[[dict], None] | None = None) -> list[Row]:
    """Train every (variant, inputs, seed) on `fs` with `base`'s recipe (reusing the store's runs). `on_run(n, N,
    row label, seed)` before each run, `on_done(row label, result)` after it."""
    planned = plan(base, variants, inputs, seeds)
    total = sum(len(cfgs) for _, _, cfgs in planned)
    rows, n = [], 0
    for variant, seen, cfgs in planned:
        row = Row(variant, seen, [])
        for cfg in cfgs:
            n += 1
            if on_run:
                on_run(n, total, row.label, cfg.seed)
            result = train_stage(fs, cfg, root, force=force, on_epoch=on_epoch)
            row.runs.append(result)
            if on_done:
                on_done(row.label, result)
        rows.append(row)
    return rows


def markdown_table(rows: list[Row]) -> str:
    def pm(mean: float, std: float, sign: str = "") -> str:
        return "n/a" if mean != mean else f"{mean:{sign}.2f} +- {std:.2f}"

    controls = any(r.inputs != BOTH for r in rows)
    head = ["variant [inputs]", METRICS["test_avg_map"]]
    if controls:
        head.append("gap to both (points)")
    head += [METRICS["test_map_0.5"], METRICS["test_avg_map_0.5:0.9"], METRICS["val_avg_map"], "parameters", "s/epoch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.label, pm(*r.mean_std("test_avg_map"))]
        if controls:
            gap = gap_to_both(rows, r)
            cells.append("" if gap is None else pm(gap["mean"], gap["std"], "+"))
        cells += [pm(*r.mean_std("test_map_0.5")), pm(*r.mean_std("test_avg_map_0.5:0.9")),
                  pm(*r.mean_std("val_avg_map")),
                  f"{int(r.runs[0].metrics['parameters']):,}" if r.runs else "n/a",
                  f"{np.mean([x.metrics['train_s_per_epoch'] for x in r.runs]):.1f}" if r.runs else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({s for r in rows for s in r.seeds})
    lines.append(f"\nmean +- std over seeds {seeds}; the same features, splits and training recipe for every row; "
                 f"test scored once with the val-selected epoch's weights.")
    if controls:
        lines.append(CONTROL_NOTE + " Gap: the control's test avg mAP minus its variant's joint one, mean +- std "
                     "of the per-seed differences.")
    return "\n".join(lines)


def write_report(rows: list[Row], out_dir: Path, notes: list[str], meta: dict | None = None) -> tuple[Path, Path]:
    """`comparison.md` (the table, with `notes` above it) and `comparison.json` (every value, run folder and gap)."""
    return write_comparison(out_dir, notes, markdown_table(rows),
                            {"rows": [{**r.to_dict(), "gap_to_both": gap_to_both(rows, r)} for r in rows],
                             **(meta or {})})
