"""The options the AVE and the dense commands share, written once, and the console every command prints to.

Each option's flag, type and default live here; a command passes its own help text where the option means something
particular there (which `--config` section it reads, what `--force` recomputes). Also here: what `--no-wait` does
(`lock_policy`), what `--no-recompute` does (`reuse_policy`) and how a stage command layers its settings
(`configured`: the config file, then `--set`, then the options given).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, TypeVar

import typer
from rich.console import Console

console = Console()

DEFAULT_ROOT = Path("artifacts")
PRECISION_HELP = ("auto (bf16 autocast where the device has native bf16: CUDA, or a CPU with AMX/AVX512-BF16; else "
                  "fp32), fp32, bf16.")


# ---- the store and the run --------------------------------------------------------------------------------------
def root(help: str = "Artifact store root.", default: Optional[Path] = DEFAULT_ROOT) -> Any:
    """`--root DIR`; a pipeline run's (default None) overrides its config's `root:`."""
    return typer.Option(default, "--root", help=help)


RootOption = root()
NoWaitOption = typer.Option(False, "--no-wait", help="If another run is computing an artifact this one needs, end "
                                                       "at once with an error instead of waiting to reuse it.")


def lock_policy(no_wait: bool) -> None:
    """What --no-wait means: an artifact another run is computing is an error instead of a wait."""
    from pipeline.locks import set_wait

    set_wait(not no_wait)


NoRecomputeOption = typer.Option(False, "--no-recompute", help="If an artifact to reuse has an output that changed "
                                                                 "since it was written (a truncated or edited file), "
                                                                 "end with an error naming it instead of recomputing.")


def reuse_policy(no_recompute: bool) -> None:
    """What --no-recompute means: a reused artifact whose output changed is an error instead of a recompute."""
    from pipeline.store import set_recompute

    set_recompute(not no_recompute)


def force(help: str) -> Any:
    """`--force/--no-force`: recompute a stage's artifact even if it exists."""
    return typer.Option(False, help=help)


def force_stages(help: str) -> Any:
    """`--force STAGE` (repeatable) of a pipeline run: recompute that stage and what depends on it."""
    return typer.Option([], "--force", help=help)


def verbose(help: str) -> Any:
    return typer.Option(False, "--verbose", help=help)


# ---- settings ---------------------------------------------------------------------------------------------------
def config(help: str, required: bool = False) -> Any:
    """`--config FILE`: a pipeline config YAML (a stage command reads its own section of it)."""
    return typer.Option(... if required else None, "--config", help=help)


def set_(help: str) -> Any:
    """`--set field=value` (repeatable): a setting over the config file's."""
    return typer.Option([], "--set", help=help)


def dataset(help: str, required: bool = True) -> Any:
    return typer.Option(... if required else None, "--dataset", help=help)


def device(default: Optional[str] = None) -> Any:
    return typer.Option(default, "--device", help="auto, cpu, cuda.")


def precision(default: Optional[str] = None, help: str = PRECISION_HELP) -> Any:
    return typer.Option(default, "--precision", help=help)


# ---- the encoders and their extraction --------------------------------------------------------------------------
def random_init(help: str) -> Any:
    """`--random-init`: random encoder weights (testing only); off is "unset", so a config's `random_init` holds."""
    return typer.Option(False, "--random-init", help=help)


def resnet_weights(help: str) -> Any:
    return typer.Option(None, "--resnet-weights", help=help)


def cnn14_weights(help: str) -> Any:
    return typer.Option(None, "--cnn14-weights", help=help)


def feature_set(help: str = "cace (ResNet-50 + Cnn14, default), ave (AVE's released VGG-19 + VGGish recipe) or unav "
                             "(UnAV-100's I3D RGB + flow + VGGish recipe).") -> Any:
    return typer.Option(None, "--feature-set", help=help)


def decode_mode() -> Any:
    return typer.Option(None, "--decode-mode", help="faithful (default: ffmpeg as the reference tools ran it) or fast "
                                                    "(in-process decoding) for the ave/unav recipes.")


RELEASED_WEIGHTS = {  # the released sets' encoders: option name -> (flag, help)
    "vgg19_weights": ("--vgg19-weights", "Keras VGG-19 file (vgg19_weights_tf_dim_ordering_tf_kernels[_notop].h5)."),
    "vggish_weights": ("--vggish-weights", "torchvggish's vggish-10086976.pth."),
    "i3d_rgb_weights": ("--i3d-rgb-weights", "I3D RGB file (video_features' i3d_rgb.pt or piergiaj's "
                                             "rgb_imagenet.pt)."),
    "i3d_flow_weights": ("--i3d-flow-weights", "I3D flow file (i3d_flow.pt or flow_imagenet.pt)."),
    "raft_weights": ("--raft-weights", "RAFT-large file (torchvision's raft_large_C_T_SKHT_V1-0b8c9e55.pth or "
                                       "princeton-vl's raft-sintel.pth)."),
}


def released_weights(name: str) -> Any:
    flag, help = RELEASED_WEIGHTS[name]
    return typer.Option(None, flag, help=help)


def max_failure_share(help: str) -> Any:
    return typer.Option(None, "--max-failure-share", help=help)


def threads(help: str = "CPU threads of the encoders (0: torch's default).") -> Any:
    return typer.Option(None, "--threads", help=help)


def cluster(help: str) -> Any:
    """`--cluster local:N | tcp://HOST:8786`: shard the extraction over a Dask cluster (flows.sharded)."""
    return typer.Option(None, "--cluster", help=help)


def shard_videos(help: str) -> Any:
    return typer.Option(None, "--shard-videos", help=help)


M = TypeVar("M")


def configured(model: type[M], config_path: Path | None, sets: list[str], section: str, given: dict[str, Any],
               source: str = "command-line options") -> M:
    """A stage's settings: `config_path`'s `section`, then the `--set` overrides, then the options the user gave
    (those in `given` that are not None). A bad file, field or value is one UserError naming where it came from."""
    from pipeline.config import load_config, validate

    cfg = load_config(model, config_path, list(sets), section=section)
    return validate(model, {**cfg.model_dump(), **{k: v for k, v in given.items() if v is not None}}, source)


# ---- single-modality controls -----------------------------------------------------------------------------------
InputsOption = typer.Option("both", "--inputs", help="What the localizer sees, comma-separated rows: both, audio "
                                                     "(visual replaced by noise), visual (audio replaced by noise). "
                                                     "`both,audio,visual` adds the single-modality controls, with "
                                                     "each row's gap to both (pipeline/controls.py says how).")
