"""Localizers compared on the same features, splits, seeds and training recipe (`avel compare`).

Each (model, seed) is an ordinary `train` stage run (so it is cached in the store, resumable, and inspectable);
this module only collects what each run reports into one table: test accuracy of the val-selected checkpoint and
event F1 (mean +- std over the seeds), parameters and training seconds per epoch. Nothing here is model-specific.

A row is a model name, optionally with config overrides for an ablation: `aveclip:multiscale=staged:fusion=
concat_product` (values parsed as YAML, nested fields with dots: `aveclip:postprocess.enabled=false`), and what it
sees (`inputs`): both modalities, or one with the other replaced by matched noise (the single-modality controls of
`pipeline.controls`); a control row shows its gap to the same model's `both` row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.ave.features import FeatureSet
from pipeline.ave.train import TrainConfig, TrainResult, train_stage
from pipeline.config import apply_overrides, validate
from pipeline.controls import CONTROL_NOTE, control_label
from pipeline.errors import UserError
from pipeline.store import write_comparison


@dataclass
class Variant:
    label: str  # as the user wrote it
    model: str
    overrides: list[str]  # key=value, relative to the model's config


def parse_variant(text: str) -> Variant:
    name, *overrides = [p.strip() for p in text.split(":")]
    if not name:
        raise UserError(f"model {text!r}: no name before the ':' (e.g. aveclip:multiscale=staged)")
    return Variant(text.strip(), name, overrides)


@dataclass
class ModelRow:
    model: str
    runs: list[TrainResult]
    inputs: str = "both"

    @property
    def label(self) -> str:
        return control_label(self.model, self.inputs)

    def values(self, key: str) -> np.ndarray:
        return np.array([float(r.metrics[key]) for r in self.runs if key in r.metrics])

    def mean_std(self, key: str) -> tuple[float, float]:
        v = self.values(key)
        if v.size == 0:
            return float("nan"), float("nan")
        return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0

    def to_dict(self) -> dict:
        out = {"model": self.model, "inputs": self.inputs, "seeds": [r.metrics["seed"] for r in self.runs],
               "parameters": int(self.runs[0].metrics["parameters"]),
               "runs": [str(r.dir) for r in self.runs]}
        for key in ("test_accuracy", "test_event_f1", "test_accuracy_without_postprocess",
                    "best_on_test_accuracy", "train_s_per_epoch"):
            mean, std = self.mean_std(key)
            if mean == mean:  # not NaN: the key exists for this model
                out[key] = {"mean": mean, "std": std, "values": self.values(key).tolist()}
        return out


def variant_config(base: TrainConfig, variant: Variant, seed: int, inputs: str = "both") -> TrainConfig:
    """`base`'s recipe for this variant (base's model_args apply only to base's own model), validated."""
    args = apply_overrides(base.model_args if variant.model == base.model else {}, variant.overrides)
    data = {**base.model_dump(), "model": variant.model, "model_args": args, "seed": seed, "inputs": inputs}
    return validate(TrainConfig, data, f"model {variant.label!r}")


def compare(fs: FeatureSet, base: TrainConfig, models: list[str], seeds: list[int], root: Path, *,
            inputs: list[str] = ("both",), force: bool = False, on_run: Callable[[str, int], None] | None = None,
            on_epoch: Callable[[dict], None] | None = None) -> list[ModelRow]:
    """Train every model (or variant) with every seed on `fs`, with `base`'s recipe, once per `inputs` (each
    model's controls right after its joint row). Every config is checked before the first run starts."""
    variants = [parse_variant(m) for m in models]
    plan = [(v, seen, [variant_config(base, v, seed, seen) for seed in seeds]) for v in variants for seen in inputs]
    rows = []
    for variant, seen, cfgs in plan:
        row = ModelRow(variant.label, [], seen)
        for cfg in cfgs:
            if on_run:
                on_run(row.label, cfg.seed)
            row.runs.append(train_stage(fs, cfg, root, force=force, on_epoch=on_epoch))
        rows.append(row)
    return rows


def gap_to_both(rows: list[ModelRow], row: ModelRow, key: str = "test_accuracy") -> float | None:
    """A control row's mean minus its model's `both` row's mean (points); None for a joint row or without one."""
    joint = next((r for r in rows if r.model == row.model and r.inputs == "both"), None)
    if row.inputs == "both" or joint is None:
        return None
    return row.mean_std(key)[0] - joint.mean_std(key)[0]


def markdown_table(rows: list[ModelRow]) -> str:
    def pm(row: ModelRow, key: str, digits: int = 2) -> str:
        mean, std = row.mean_std(key)
        return "n/a" if mean != mean else f"{mean:.{digits}f} +- {std:.{digits}f}"

    controls = any(r.inputs != "both" for r in rows)
    gap_head, gap_rule = (" gap to both (points) |", "---|") if controls else ("", "")
    lines = ["| localizer | test accuracy % (val-selected) |" + gap_head + " event F1 % | accuracy % without "
             "post-processing | parameters | train s/epoch |", "|---|---|" + gap_rule + "---|---|---|---|"]
    for r in rows:
        gap = gap_to_both(rows, r)
        gap_cell = (f" {'' if gap is None else f'{gap:+.2f}'} |") if controls else ""
        lines.append(f"| {r.label} | {pm(r, 'test_accuracy')} |{gap_cell} {pm(r, 'test_event_f1')} | "
                     f"{pm(r, 'test_accuracy_without_postprocess')} | {int(r.runs[0].metrics['parameters']):,} | "
                     f"{pm(r, 'train_s_per_epoch')} |")
    seeds = rows[0].to_dict()["seeds"] if rows else []
    lines.append(f"\nmean +- std over seeds {seeds}; the same features, splits and training recipe for every row.")
    if controls:
        lines.append(CONTROL_NOTE)
    return "\n".join(lines)


def write_report(rows: list[ModelRow], out_dir: Path, notes: list[str]) -> tuple[Path, Path]:
    return write_comparison(out_dir, notes, markdown_table(rows),
                            {"rows": [{**r.to_dict(), "gap_to_both": gap_to_both(rows, r)} for r in rows]})
