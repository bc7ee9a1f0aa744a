"""Localizers compared on the same features, splits, seeds and training recipe (`avel compare`).

Each (model, seed) is an ordinary `train` stage run (so it is cached in the store, resumable, and inspectable);
this module only collects what each run reports into one table: test accuracy of the val-selected checkpoint and
event F1 (mean +- std over the seeds), parameters and training seconds per epoch. Nothing here is model-specific.

A row is a model name, optionally with config overrides for an ablation: `aveclip:multiscale=staged:fusion=
concat_product` (values parsed as YAML, nested fields with dots: `aveclip:postprocess.enabled=false`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.ave.features import FeatureSet
from pipeline.ave.train import TrainConfig, TrainResult, train_stage
from pipeline.config import apply_overrides, validate
from pipeline.errors import UserError
from pipeline.store import atomic_path, write_json_atomic


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

    def values(self, key: str) -> np.ndarray:
        return np.array([float(r.metrics[key]) for r in self.runs if key in r.metrics])

    def mean_std(self, key: str) -> tuple[float, float]:
        v = self.values(key)
        if v.size == 0:
            return float("nan"), float("nan")
        return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0

    def to_dict(self) -> dict:
        out = {"model": self.model, "seeds": [r.metrics["seed"] for r in self.runs],
               "parameters": int(self.runs[0].metrics["parameters"]),
               "runs": [str(r.dir) for r in self.runs]}
        for key in ("test_accuracy", "test_event_f1", "test_accuracy_without_postprocess",
                    "best_on_test_accuracy", "train_s_per_epoch"):
            mean, std = self.mean_std(key)
            if mean == mean:  # not NaN: the key exists for this model
                out[key] = {"mean": mean, "std": std, "values": self.values(key).tolist()}
        return out


def variant_config(base: TrainConfig, variant: Variant, seed: int) -> TrainConfig:
    """`base`'s recipe for this variant (base's model_args apply only to base's own model), validated."""
    args = apply_overrides(base.model_args if variant.model == base.model else {}, variant.overrides)
    data = {**base.model_dump(), "model": variant.model, "model_args": args, "seed": seed}
    return validate(TrainConfig, data, f"model {variant.label!r}")


def compare(fs: FeatureSet, base: TrainConfig, models: list[str], seeds: list[int], root: Path, *,
            force: bool = False, on_run: Callable[[str, int], None] | None = None,
            on_epoch: Callable[[dict], None] | None = None) -> list[ModelRow]:
    """Train every model (or variant) with every seed on `fs`, with `base`'s recipe. Every config is checked
    before the first run starts."""
    variants = [parse_variant(m) for m in models]
    configs = [[variant_config(base, v, seed) for seed in seeds] for v in variants]
    rows = []
    for variant, cfgs in zip(variants, configs):
        runs = []
        for cfg in cfgs:
            if on_run:
                on_run(variant.label, cfg.seed)
            runs.append(train_stage(fs, cfg, root, force=force, on_epoch=on_epoch))
        rows.append(ModelRow(variant.label, runs))
    return rows


def markdown_table(rows: list[ModelRow]) -> str:
    def pm(row: ModelRow, key: str, digits: int = 2) -> str:
        mean, std = row.mean_std(key)
        return "n/a" if mean != mean else f"{mean:.{digits}f} +- {std:.{digits}f}"

    lines = ["| localizer | test accuracy % (val-selected) | event F1 % | accuracy % without post-processing | "
             "parameters | train s/epoch |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {pm(r, 'test_accuracy')} | {pm(r, 'test_event_f1')} | "
                     f"{pm(r, 'test_accuracy_without_postprocess')} | {int(r.runs[0].metrics['parameters']):,} | "
                     f"{pm(r, 'train_s_per_epoch')} |")
    seeds = rows[0].to_dict()["seeds"] if rows else []
    lines.append(f"\nmean +- std over seeds {seeds}; the same features, splits and training recipe for every row.")
    return "\n".join(lines)


def write_report(rows: list[ModelRow], out_dir: Path, notes: list[str]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "comparison.md", out_dir / "comparison.json"
    text = "\n".join([*(f"**{n}**\n" for n in notes), markdown_table(rows), ""])
    with atomic_path(md) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    write_json_atomic(js, {"rows": [r.to_dict() for r in rows], "notes": notes})
    return md, js
