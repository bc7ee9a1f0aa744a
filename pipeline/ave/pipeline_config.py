"""The full-pipeline config: one YAML file with a section per stage (what `avel run --config` reads).

    root: artifacts
    dataset: {path: /data/AVE}              # or {synth: {videos: 24, classes: 4}} to generate one under root
    extract: {frames_per_segment: 16, resnet_weights: ..., cnn14_weights: ...}
    finetune: {epochs: 50, trainable_stages: all}
    train: {epochs: 200}

Stage order and what depends on what (used by `--force STAGE`):
    extract_audio ─┬─> finetune ─> extract_visual (fine-tuned) ─┬─> train ─> evaluate
                   └────────────────────────────────────────────┘
    extract_visual (initial encoder) ─> [train on it per baseline seed, when `baseline: true`; the
                                         fine-tuned features are trained with the same seeds]
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from pipeline.ave.extract import ExtractConfig
from pipeline.ave.finetune import FinetuneConfig
from pipeline.ave.train import TrainConfig
from pipeline.config import StrictModel, apply_overrides, dump_config, load_config, validate

STAGES = ("extract_audio", "extract_visual", "finetune", "train", "evaluate")
DOWNSTREAM = {  # forcing a stage recomputes it and everything that reads its output
    "extract_audio": {"extract_audio", "finetune", "extract_visual", "train", "evaluate"},
    "extract_visual": {"extract_visual", "train", "evaluate"},
    "finetune": {"finetune", "extract_visual", "train", "evaluate"},
    "train": {"train", "evaluate"},
    "evaluate": {"evaluate"},
}


class SynthSection(StrictModel):
    videos: int = 24
    classes: int = 4
    seed: int = 0
    fps: int = 25
    width: int = 320
    height: int = 240


class DatasetSection(StrictModel):
    path: Path | None = None  # an AVE-format dataset folder
    synth: SynthSection | None = None  # or generate one under <root>/datasets/

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.synth is None):
            raise ValueError("give exactly one of dataset.path (an AVE-format folder) or dataset.synth (generate one)")
        return self


class PipelineConfig(StrictModel):
    root: Path = Path("artifacts")
    dataset: DatasetSection
    extract: ExtractConfig = ExtractConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    skip_finetune: bool = False  # train on the initial encoder's features (paper: 81.56 % vs 82.36 % fine-tuned)
    # also train on the initial features, to measure what fine-tuning changed: the localizer on the initial and on
    # the re-extracted (fine-tuned) features, the same seeds, mean +- std of the test accuracy (a table artifact,
    # the run's last lines, <root>/reports/baseline-<keys>.md)
    baseline: bool = False
    baseline_seeds: list[int] | None = Field(None, min_length=1, description="None: train.seed and the next two "
                                                                             "(the main run is one of them)")

    def comparison_seeds(self) -> list[int]:
        return self.baseline_seeds or [self.train.seed + i for i in range(3)]

    @model_validator(mode="after")
    def _finetune_fits_the_feature_set(self):
        if self.extract.feature_set != "cace" and not self.skip_finetune:
            raise ValueError(f"the InfoNCE fine-tuning trains ResNet-50, the cace set's encoder; with "
                             f"extract.feature_set {self.extract.feature_set} set skip_finetune: true")
        return self
    train: TrainConfig = TrainConfig()
    evaluate_split: Literal["val", "test"] = "test"


def resolve_config(config_path: str | None = None, config: dict | None = None,
                   overrides: list[str] | None = None) -> PipelineConfig:
    """A YAML file, then a dict on top of it, then `section.field=value` overrides."""
    base = dump_config(load_config(PipelineConfig, Path(config_path))) if config_path else {}
    config = config or {}
    merged = _deep_merge(base, {k: v for k, v in config.items() if k != "dataset"})
    if "dataset" in config:  # a dataset replaces the file's (a path and a synth section exclude each other)
        merged["dataset"] = config["dataset"]
    return validate(PipelineConfig, apply_overrides(merged, list(overrides or [])), config_path or "config")


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def forced_stages(force: list[str] | tuple[str, ...]) -> set[str]:
    unknown = [s for s in force if s not in DOWNSTREAM]
    if unknown:
        from pipeline.errors import UserError

        raise UserError(f"unknown stage(s) {unknown} for --force; stages: {', '.join(STAGES)}")
    return set().union(*(DOWNSTREAM[s] for s in force)) if force else set()


def demo_config_path() -> Path:
    return Path(__file__).with_name("demo.yaml")
