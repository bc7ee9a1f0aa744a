"""The dense pipeline's config: one YAML file with a section per stage (what `avel dense run --config` reads).

    root: artifacts
    dataset: {path: /data/unav100}             # annotation JSON + videos/ (raw videos, extracted here)
    # or {features: /data/unav100/features, annotations: /data/unav100/unav100_annotations.json} (released
    #    I3D + VGGish features: no extraction), or {synth: {train: 48, ...}} (untrimmed videos generated under root)
    extract: {grid: unav, frames_per_window: 4, resnet_weights: ..., cnn14_weights: ...}
    #    + {cluster: local:4} (or tcp://HOST:8786) to shard the extraction over a Dask cluster (flows.sharded)
    train: {epochs: 45, model_args: {lcf: true, lac: true}}

Stages: dataset -> dense_extract -> dense_train -> dense_evaluate (`--force STAGE` recomputes it and what follows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import model_validator

from pipeline.config import StrictModel, apply_overrides, dump_config, load_config, validate
from pipeline.dense.extract import DenseExtractConfig
from pipeline.dense.train import DenseTrainConfig
from pipeline.dense.videos import VideoSynthConfig
from pipeline.errors import UserError

STAGES = ("dense_extract", "dense_train", "dense_evaluate")


class DenseDatasetSection(StrictModel):
    path: Path | None = None  # annotation JSON (or its folder) with videos/<id>.mp4 beside it
    features: Path | None = None  # a feature folder (released layout or ours): skips extraction
    annotations: Path | None = None  # with `features`: the annotation JSON
    synth: VideoSynthConfig | None = None  # generate untrimmed videos under <root>/datasets/

    @model_validator(mode="after")
    def _one_source(self):
        sources = [self.path is not None, self.features is not None, self.synth is not None]
        if sum(sources) != 1:
            raise ValueError("give exactly one of dataset.path (videos), dataset.features (+ dataset.annotations) "
                             "or dataset.synth")
        if self.features is not None and self.annotations is None:
            raise ValueError("dataset.features needs dataset.annotations (the UnAV-100 JSON)")
        return self


class DensePipelineConfig(StrictModel):
    root: Path = Path("artifacts")
    dataset: DenseDatasetSection
    extract: DenseExtractConfig = DenseExtractConfig()
    train: DenseTrainConfig = DenseTrainConfig()
    evaluate_split: Literal["validation", "test"] = "test"


def resolve_dense_config(config_path: str | None = None, overrides: list[str] | None = None
                         ) -> DensePipelineConfig:
    base = dump_config(load_config(DensePipelineConfig, Path(config_path))) if config_path else {}
    return validate(DensePipelineConfig, apply_overrides(base, list(overrides or [])), config_path or "config")


def forced_stages(force: list[str] | tuple[str, ...]) -> set[str]:
    unknown = [s for s in force if s not in STAGES]
    if unknown:
        raise UserError(f"unknown stage(s) {unknown} for --force; stages: {', '.join(STAGES)}")
    return set(STAGES[min(STAGES.index(s) for s in force):]) if force else set()


def dense_demo_config_path() -> Path:
    return Path(__file__).with_name("demo.yaml")
