"""The settings every extraction stage shares (AVE's `ExtractConfig`, the dense `DenseExtractConfig`), declared once.

What enters a stage key is each task's choice (`key_fields` there): how the work runs (device, threads, cluster,
shard size, failure tolerance) never does, so a sharded or multi-threaded run writes the same artifact as a plain
one. A task changes a default where its data calls for it (AVE tolerates 1 % failed rows of its 4,143 videos by
default; the dense task none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from pipeline.config import StageConfig
from pipeline.extraction.encoders import EncoderSpec


class ExtractSettings(StageConfig):
    crop_size: int | None = Field(None, ge=32, description="visual center crop in px; None = the ImageNet weights' "
                                                          "224 (after a 232 resize). Smaller: a CPU demo's knob")
    random_init: bool = False
    resnet_weights: Path | None = None
    cnn14_weights: Path | None = None
    # the released sets' encoders (`--feature-set ave|unav`; None: each file's default location)
    vgg19_weights: Path | None = None
    vggish_weights: Path | None = None
    i3d_rgb_weights: Path | None = None
    i3d_flow_weights: Path | None = None
    raft_weights: Path | None = None
    feature_set: Literal["cace", "ave", "unav"] = Field(
        "cace", description="cace: ResNet-50 + Cnn14 (this project's); ave: AVE's released VGG-19 + VGGish; unav: "
                            "UnAV-100's released I3D RGB + flow + VGGish (pipeline.extraction.feature_sets)")
    decode_mode: Literal["faithful", "fast"] = Field(
        "faithful", description="how the ave/unav recipes decode: faithful = ffmpeg as the reference tools did; "
                                "fast = in-process decoding, no re-encode (pipeline.extraction.recipes)")
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="compute precision of the encoders: auto = bf16 autocast where the device has native "
                            "bf16 (CUDA; a CPU with AMX/AVX512-BF16), else fp32")
    max_failure_share: float = Field(0.0, ge=0.0, le=1.0,
                                     description="fail the stage if more than this share of videos (rows) failed")
    threads: int = Field(0, ge=0, description="CPU threads of the encoders' forward (0: torch's default, the "
                                              "machine's cores); recorded, and a resumed run keeps the recorded one")
    # Sharded on a Dask cluster (flows.sharded): "local:N" or "tcp://HOST:8786"; None: this process.
    cluster: str | None = None
    shard_videos: int = Field(8, ge=1, description="videos per shard (one Prefect task and part folder each)")

    def precision_on(self, device) -> str:
        """The precision that runs on `device`. `auto` is bf16 where the device has native bf16, except for a released
        set (ave, unav): its numbers were made in fp32, and bf16 moves RAFT's flow by about one quantisation step
        (measured), so `auto` is fp32 there; `bf16` still forces it."""
        from pipeline.runtime import resolve_precision

        if self.feature_set != "cace" and self.precision == "auto":
            return "fp32"
        return resolve_precision(self.precision, device)

    def resolved_precision(self) -> str:
        from pipeline.runtime import resolve_device

        return self.precision_on(resolve_device(self.device))

    def weights_file(self, encoder: str) -> Path | None:
        """The weight file the user named for `encoder` (None: its default location)."""
        return getattr(self, f"{'resnet' if encoder == 'resnet50' else encoder}_weights", None)

    def spec(self, modality: str, name: str, frames_per_step: int) -> EncoderSpec:
        """Encoder `name` for `modality`: a visual one averages `frames_per_step` frames per step, at `crop_size`."""
        options = {}
        if modality == "visual":
            options["frames_per_segment"] = frames_per_step
            if self.crop_size:
                options["crop_size"] = self.crop_size
        return EncoderSpec(name, modality, self.weights_file(name), options)

    def stream_spec(self, stream) -> EncoderSpec:
        """The encoder of a released set's stream (`feature_sets.Stream`), with its recipe's options (I3D flow also
        gets its RAFT file)."""
        options = dict(stream.options)
        if stream.encoder == "i3d_flow":
            options["raft_weights"] = self.raft_weights
        return EncoderSpec(stream.encoder, stream.modality, self.weights_file(stream.encoder), options)
