"""VGGish (AudioSet) embeddings as AVE and UnAV-100 released them: 128-d rows, one per 0.96-s example.

The recipe (feature-sets-spec §1.4, §2.5, §4), written here from that spec:
- waveform: mono float64 in [-1, 1) (the caller has applied int16 / 32768 and the channel mean), resampled to
  16 kHz with `resampy.resample(x, rate, 16000)` and its default `kaiser_best` filter. The project pins
  resampy 0.2.2, the version behind the released numbers (0.3 regenerated the filter: spec §2.6);
- frontend (pure numpy, float64): 400-sample periodic-Hann frames every 160 samples, no padding or centring; the
  magnitude of a 512-point rfft (257 bins); a 257x64 HTK-mel matrix (125-7500 Hz, triangles linear in mel, no area
  normalisation, DC row zero); log(mel + 0.01);
- examples: 96 frames (0.96 s) every round(hop_s / 0.01) frames, incomplete ones dropped. AVE: hop 0.96 s and
  exactly 10 examples; UnAV-100: hop 0.32 s, all examples;
- network: torchvggish's layout, so that its `vggish-10086976.pth` (what video_features loads) loads strictly:
  six 3x3 convs with ReLU and four 2x2 max-pools, the [N,512,6,4] map flattened in TF's (6,4,512) order, then
  Linear 12288->4096->4096->128, each followed by ReLU, **the last one included** (the 2017 TF code, torchvggish
  and video_features all have it; TF dropped it in Aug 2020). So rows are >= 0;
- no PCA, no quantisation (neither released set has them). They are available as an option (`pca_params`).

resampy 0.2.2 does `import pkg_resources` to find its filter file, and setuptools >= 81 no longer ships
pkg_resources: when it is missing, `_resampy()` lends resampy a one-function stand-in during its import only
(the filter file is the same bytes; nothing else in the process sees the stand-in).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
import types
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np
import torch
from torch import nn

from extractors.base import ClipExtractor
from extractors.weights import (
    WeightRules,
    check_state_dict,
    hub_checkpoint,
    locate_weights,
    read_checkpoint,
    register_weight_rules,
    seeded,
    weights_sha256,
)
from pipeline.errors import UserError
from pipeline.runtime import autocast as autocast_ctx

# ---- constants (spec §4; TF's vggish_params) -------------------------------------------------------------------
SAMPLE_RATE = 16000
STFT_WINDOW_SECONDS = 0.025
STFT_HOP_SECONDS = 0.010
WINDOW_LENGTH = int(round(SAMPLE_RATE * STFT_WINDOW_SECONDS))  # 400
HOP_LENGTH = int(round(SAMPLE_RATE * STFT_HOP_SECONDS))  # 160
FFT_LENGTH = 2 ** int(math.ceil(math.log2(WINDOW_LENGTH)))  # 512
NUM_BINS = FFT_LENGTH // 2 + 1  # 257
NUM_BANDS = 64
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.01
EXAMPLE_WINDOW_SECONDS = 0.96
EXAMPLE_FRAMES = 96
EMBEDDING_SIZE = 128
QUANTIZE_MIN = -2.0
QUANTIZE_MAX = 2.0
FEATURES_RATE = 1.0 / STFT_HOP_SECONDS  # log-mel frames per second (100)

VGGISH_FILE = "vggish-10086976.pth"  # torchvggish's GitHub release v0.1; the file video_features loads
PCA_FILE = "vggish_pca_params.npz"
PCA_SHA256 = "4d878af3e306defbfb37095365aa7e5a6cecb86bad13e859e626151c4e6a8b9d"  # spec §3.2 (video_features' copy)

# Strict-load keys of torchvggish's VGG (spec §3.2): weight shapes; each has a bias of its output size.
WEIGHT_SHAPES: dict[str, tuple[int, ...]] = {
    "features.0.weight": (64, 1, 3, 3), "features.3.weight": (128, 64, 3, 3),
    "features.6.weight": (256, 128, 3, 3), "features.8.weight": (256, 256, 3, 3),
    "features.11.weight": (512, 256, 3, 3), "features.13.weight": (512, 512, 3, 3),
    "embeddings.0.weight": (4096, 12288), "embeddings.2.weight": (4096, 4096), "embeddings.4.weight": (128, 4096)}
STATE_DICT_SHAPES: dict[str, tuple[int, ...]] = {}
for _k, _s in WEIGHT_SHAPES.items():
    STATE_DICT_SHAPES[_k] = _s
    STATE_DICT_SHAPES[_k[:-len("weight")] + "bias"] = (_s[0],)
del _k, _s

# TF checkpoint variable -> torchvggish key (spec §3.2): conv HWIO -> OIHW is transpose(3, 2, 0, 1), a Linear's
# [in, out] matrix is transposed; fc1_1's rows are already in the (6,4,512) order this network flattens in.
TF_TO_TORCH = {"vggish/conv1": "features.0", "vggish/conv2": "features.3", "vggish/conv3/conv3_1": "features.6",
               "vggish/conv3/conv3_2": "features.8", "vggish/conv4/conv4_1": "features.11",
               "vggish/conv4/conv4_2": "features.13", "vggish/fc1/fc1_1": "embeddings.0",
               "vggish/fc1/fc1_2": "embeddings.2", "vggish/fc2": "embeddings.4"}


def default_vggish_path() -> Path:
    return hub_checkpoint(VGGISH_FILE)


register_weight_rules("vggish", WeightRules(
    default_vggish_path, "--vggish-weights",
    lambda p: (f"VGGish weights not found: put {VGGISH_FILE} (torchvggish's release v0.1 file, the one "
               f"video_features loads: https://github.com/harritaylor/torchvggish/releases/download/v0.1/"
               f"{VGGISH_FILE}) in {p.parent}/ (torch.hub.get_dir()/checkpoints), or pass --vggish-weights FILE "
               f"(a state dict in torchvggish's layout), or --random-init to test with random weights"),
    published={"10086976": "torchvggish's vggish-10086976.pth (the file video_features loads)"}))


# ---- frontend (numpy, float64) ---------------------------------------------------------------------------------
@functools.cache
def _resampy():
    """Import resampy (numba: slow to import, so only when resampling is needed), lending it a `pkg_resources`
    stand-in for its import when the installed setuptools has none (see the module docstring)."""
    if importlib.util.find_spec("pkg_resources") is not None:
        import resampy

        return resampy

    def resource_filename(module: str, name: str) -> str:  # what resampy.filters.load_filter calls
        mod = sys.modules[module]
        base = Path(mod.__file__).parent
        return str(base / name)

    shim = types.ModuleType("pkg_resources")
    shim.resource_filename = resource_filename
    sys.modules["pkg_resources"] = shim
    try:
        import resampy
    finally:
        if sys.modules.get("pkg_resources") is shim:
            del sys.modules["pkg_resources"]  # resampy.filters keeps its own reference
    return resampy


def resampler_version() -> str:
    try:
        return metadata.version("resampy")
    except metadata.PackageNotFoundError:
        return "missing"


def resample_to_16k(samples: np.ndarray, rate: float) -> np.ndarray:
    """Mono samples at `rate` -> float64 samples at 16 kHz: `resampy.resample(x, rate, 16000)` with its default
    kaiser_best filter on the whole clip; a copy as float64 when the rate is already 16000."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected mono samples [n], got shape {x.shape} (average the channels first)")
    if rate <= 0:
        raise ValueError(f"sample rate must be positive, got {rate}")
    if float(rate).is_integer():
        rate = int(rate)
    if rate == SAMPLE_RATE:
        return x.copy()
    if x.size == 0:
        return x.copy()
    return np.asarray(_resampy().resample(x, rate, SAMPLE_RATE), dtype=np.float64)


def frame_count(num_samples: int) -> int:
    """STFT frames of `num_samples` at 16 kHz: 1 + floor((n - 400) / 160), no padding; 0 below one window."""
    if num_samples < WINDOW_LENGTH:
        return 0
    return 1 + (num_samples - WINDOW_LENGTH) // HOP_LENGTH


def example_hop_frames(hop_s: float) -> int:
    """Frames between examples: round(hop_s * 100) (0.96 -> 96, 0.32 -> 32)."""
    hop = int(round(hop_s * FEATURES_RATE))
    if hop < 1:
        raise ValueError(f"hop_s {hop_s} is under one 10-ms frame")
    return hop


def example_count(num_frames: int, hop_frames: int = EXAMPLE_FRAMES) -> int:
    """Complete 96-frame examples every `hop_frames` frames: 1 + floor((F - 96) / hop); 0 below one example."""
    if num_frames < EXAMPLE_FRAMES:
        return 0
    return 1 + (num_frames - EXAMPLE_FRAMES) // hop_frames


def hann_window(length: int = WINDOW_LENGTH) -> np.ndarray:
    """Periodic Hann: w[n] = 0.5 - 0.5 cos(2 pi n / length), n = 0..length-1 (w[0] = 0, w[length/2] = 1)."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi / length * np.arange(length))


def stft_magnitude(samples: np.ndarray) -> np.ndarray:
    """16-kHz samples -> |rfft(frame * hann, 512)| [F, 257] float64; 400-sample frames every 160, trailing partial
    frame dropped."""
    x = np.asarray(samples, dtype=np.float64)
    n = frame_count(x.shape[0])
    if n == 0:
        return np.zeros((0, NUM_BINS))
    frames = np.lib.stride_tricks.sliding_window_view(x, WINDOW_LENGTH)[::HOP_LENGTH][:n]
    return np.abs(np.fft.rfft(frames * hann_window(), n=FFT_LENGTH, axis=1))


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel: 1127 ln(1 + f / 700)."""
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


@functools.cache
def _mel_matrix(num_bands: int, num_bins: int, sample_rate: int, lower_hz: float, upper_hz: float) -> np.ndarray:
    nyquist = sample_rate / 2.0
    if not 0.0 <= lower_hz < upper_hz <= nyquist:
        raise ValueError(f"need 0 <= lower ({lower_hz}) < upper ({upper_hz}) <= nyquist ({nyquist})")
    bin_mel = hz_to_mel(np.linspace(0.0, nyquist, num_bins))[:, None]  # [bins, 1]
    edges = np.linspace(hz_to_mel(lower_hz), hz_to_mel(upper_hz), num_bands + 2)
    left, centre, right = edges[:-2], edges[1:-1], edges[2:]  # [bands] each
    rising = (bin_mel - left) / (centre - left)
    falling = (right - bin_mel) / (right - centre)
    w = np.maximum(0.0, np.minimum(rising, falling))
    w[0, :] = 0.0  # the DC bin feeds no band
    w.setflags(write=False)
    return w


def mel_matrix(num_bands: int = NUM_BANDS, num_bins: int = NUM_BINS, sample_rate: int = SAMPLE_RATE,
               lower_hz: float = MEL_MIN_HZ, upper_hz: float = MEL_MAX_HZ) -> np.ndarray:
    """[num_bins, num_bands] float64 (257 x 64 by default): spectrum rows post-multiply it. Bin k sits at
    linspace(0, nyquist, num_bins)[k]; band i is the triangle over mel edges (e_i, e_i+1, e_i+2) of
    num_bands + 2 edges linear in HTK mel between lower_hz and upper_hz; peak <= 1 (no area normalisation);
    row 0 (DC) is zero. A read-only cached array: copy it to change it."""
    return _mel_matrix(int(num_bands), int(num_bins), int(sample_rate), float(lower_hz), float(upper_hz))


def log_mel(samples16k: np.ndarray) -> np.ndarray:
    """16-kHz samples -> log(|STFT| . W + 0.01) [F, 64] float64."""
    return np.log(stft_magnitude(samples16k) @ mel_matrix() + LOG_OFFSET)


def frame_examples(log_mel_frames: np.ndarray, hop_frames: int) -> np.ndarray:
    """[F, 64] -> [N, 96, 64] (a copy): windows of 96 frames every `hop_frames`, incomplete ones dropped."""
    n = example_count(log_mel_frames.shape[0], hop_frames)
    if n == 0:
        return np.zeros((0, EXAMPLE_FRAMES, log_mel_frames.shape[1]), dtype=log_mel_frames.dtype)
    windows = np.lib.stride_tricks.sliding_window_view(log_mel_frames, EXAMPLE_FRAMES, axis=0)  # [F-95, 64, 96]
    return np.ascontiguousarray(windows[::hop_frames][:n].transpose(0, 2, 1))


def log_mel_examples(samples: np.ndarray, rate: float, hop_s: float = EXAMPLE_WINDOW_SECONDS) -> np.ndarray:
    """Mono samples in [-1, 1) at `rate` -> float32 examples [N, 96, 64] (time, mel): resample to 16 kHz, log-mel
    of the whole clip, 96-frame windows every round(hop_s / 0.01) frames."""
    return frame_examples(log_mel(resample_to_16k(samples, rate)), example_hop_frames(hop_s)).astype(np.float32)


# ---- network ---------------------------------------------------------------------------------------------------
class VGGish(nn.Module):
    """torchvggish's VGG: `features` (convs at indices 0, 3, 6, 8, 11, 13) and `embeddings` (Linears at 0, 2, 4,
    each followed by ReLU). Input [N, 1, 96, 64] (time, mel) -> [N, 128], >= 0."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for block in ((64,), (128,), (256, 256), (512, 512)):
            for out in block:
                layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = out
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 6 * 4, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, EMBEDDING_SIZE), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # [N, 512, 6, 4]
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # TF's NHWC flatten: (6, 4, 512) order
        return self.embeddings(x)


def _tf_conversion_help() -> str:
    pairs = "; ".join(f"{tf}/{{weights,biases}} -> {pt}.{{weight,bias}}" for tf, pt in TF_TO_TORCH.items())
    return (f"convert it to torchvggish's layout first: {pairs}. Conv weights go HWIO -> OIHW with "
            f"transpose(3, 2, 0, 1) (not a full transpose, which swaps the kernel's height and width); Linear "
            f"weights are transposed ([in, out] -> [out, in]); fc1_1's rows already follow the (6, 4, 512) flatten "
            f"order; biases are unchanged. Save the 18 tensors with torch.save(state_dict), or use torchvggish's "
            f"{VGGISH_FILE}")


def read_vggish_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a VGGish weight file in torchvggish's layout (read with weights_only); a TF checkpoint or a
    file with TF variable names is a UserError saying how to convert it."""
    path = Path(path)
    if ".ckpt" in path.name:
        raise UserError(f"{path}: a TensorFlow checkpoint cannot be loaded directly; {_tf_conversion_help()}")
    obj: Any = read_checkpoint(path, "VGGish")
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = list(obj.keys())[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise UserError(f"{path}: not a VGGish state dict (found {found}); expected torchvggish's {VGGISH_FILE} "
                        f"layout (features.*, embeddings.*)")
    if any("/" in str(k) for k in obj):
        tf_keys = [str(k) for k in obj if "/" in str(k)][:3]
        raise UserError(f"{path}: holds TensorFlow variable names (e.g. {', '.join(tf_keys)}); "
                        f"{_tf_conversion_help()}")
    sd = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        sd[k] = v
    return sd


def load_vggish_weights(model: VGGish, path: Path) -> None:
    """Strict load: every key of torchvggish's layout, with its shape, and nothing else (else a UserError naming the
    missing, unexpected or mis-shaped tensors)."""
    sd = read_vggish_state_dict(path)
    check_state_dict(model, sd, Path(path), f"VGGish (torchvggish's {VGGISH_FILE} layout)", ignore_missing=())
    model.load_state_dict(sd, strict=True)


# ---- optional PCA + quantisation -------------------------------------------------------------------------------
def load_pca_params(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvectors [128, 128], means [128]) float64 from `vggish_pca_params.npz` (np.load, allow_pickle=False)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: VGGish PCA parameters not found (expected {PCA_FILE}, keys pca_eigen_vectors "
                        f"and pca_means)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k], dtype=np.float64) for k in data.files}
    except Exception as e:  # zip, pickle and format errors all mean "not the npz we need"
        raise UserError(f"{path}: not a readable .npz of arrays ({type(e).__name__}: {e}); expected {PCA_FILE} "
                        f"(torchvggish's .pth copy is a pickle: use the .npz)") from None
    missing = [k for k in ("pca_eigen_vectors", "pca_means") if k not in arrays]
    if missing:
        raise UserError(f"{path}: missing {', '.join(missing)} (found {sorted(arrays)}); expected {PCA_FILE}")
    vectors, means = arrays["pca_eigen_vectors"], arrays["pca_means"].reshape(-1)
    if vectors.shape != (EMBEDDING_SIZE, EMBEDDING_SIZE) or means.shape != (EMBEDDING_SIZE,):
        raise UserError(f"{path}: pca_eigen_vectors {list(vectors.shape)} / pca_means "
                        f"{list(arrays['pca_means'].shape)}; expected [128, 128] / [128]")
    if not (np.isfinite(vectors).all() and np.isfinite(means).all()):
        raise UserError(f"{path}: PCA parameters hold non-finite values")
    return vectors, means


def pca_quantize(embeddings: np.ndarray, eigen_vectors: np.ndarray, means: np.ndarray) -> np.ndarray:
    """AudioSet's postprocessing, as TF's vggish_postprocess does it: y = E (x - mu) per row (E's rows are the
    output dimensions), clipped to [-2, 2], mapped by (y + 2) * 255 / 4 and truncated to uint8 (values 0..255,
    returned as float32). torchvggish's Postprocessor rounds (torch.round) instead of truncating: its values are up
    to 1 higher."""
    x = np.asarray(embeddings, dtype=np.float64)
    y = (x - np.asarray(means, dtype=np.float64).reshape(1, -1)) @ np.asarray(eigen_vectors, dtype=np.float64).T
    y = np.clip(y, QUANTIZE_MIN, QUANTIZE_MAX)
    q = (y - QUANTIZE_MIN) * (255.0 / (QUANTIZE_MAX - QUANTIZE_MIN))
    return q.astype(np.uint8).astype(np.float32)


# ---- the extractor ---------------------------------------------------------------------------------------------
class VGGishExtractor(ClipExtractor):
    """A whole clip's audio -> float32 [N, 128] VGGish rows, one per 0.96-s example every `hop_s`.

    `source` for `encode_clip`: (samples, rate): mono float samples in [-1, 1) at `rate` Hz.
    `hop_s`: 0.96 (AVE) or 0.32 (UnAV-100). `examples`: None keeps every example; an int k (AVE: 10) gives exactly
    k rows: the first k, or, for a clip with fewer (but at least one), the last example's row repeated; how many rows
    were repeated is `self.last_padding` after each call (and `encode_clip_info` returns it with the rows).
    `pca_params`: a `vggish_pca_params.npz` to apply AudioSet's PCA + 8-bit quantisation (off: neither released set
    has it). `batch`: examples per forward pass (a memory bound; on a CPU the batch size can change the last bits)."""

    name: ClassVar[str] = "vggish"
    modality: ClassVar[str] = "audio"
    segment_shape = (EMBEDDING_SIZE,)

    def __init__(self, weights: Path | None = None, *, random_init: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", precision: str = "auto", hop_s: float = EXAMPLE_WINDOW_SECONDS,
                 examples: int | None = None, pca_params: Path | None = None, batch: int = 64):
        super().__init__(weights, random_init=random_init, seed=seed, device=device, precision=precision)
        self.hop_frames = example_hop_frames(hop_s)  # validates hop_s
        self.hop_s = float(hop_s)
        if examples is not None and (isinstance(examples, bool) or int(examples) != examples or examples < 1):
            raise ValueError(f"examples must be a positive int or None, got {examples!r}")
        self.examples = None if examples is None else int(examples)
        if int(batch) != batch or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        self.batch = int(batch)
        self.weights = locate_weights("vggish", weights, random_init=random_init, seed=seed)
        with seeded(seed):
            model = VGGish()
        if not random_init:
            load_vggish_weights(model, self.weights.path)
        # channels_last: 1.1-1.35 vs 1.5-1.8 s for 62 examples in fp32 on this project's 2-core CPU (measured); the
        # NHWC flatten is then a view
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.model.requires_grad_(False)
        self.pca = None
        self.pca_info = None
        if pca_params is not None:
            pca_path = Path(pca_params).expanduser()
            self.pca = load_pca_params(pca_path)
            sha = weights_sha256(pca_path)
            identity = (f"the published {PCA_FILE}" if sha == PCA_SHA256
                        else "unknown: not the published file (sha256 differs)")
            self.pca_info = {"path": str(pca_path), "sha256": sha, "identity": identity}
        self.last_padding = 0
        self.last_examples = 0

    @torch.inference_mode()
    def embed(self, examples: np.ndarray | torch.Tensor) -> np.ndarray:
        """Log-mel examples [N, 96, 64] -> raw network rows float32 [N, 128] (no PCA), `batch` examples at a time."""
        x = torch.as_tensor(examples, dtype=torch.float32)
        if x.ndim != 3 or tuple(x.shape[1:]) != (EXAMPLE_FRAMES, NUM_BANDS):
            raise ValueError(f"expected examples [N, {EXAMPLE_FRAMES}, {NUM_BANDS}], got {tuple(x.shape)}")
        out = []
        for i in range(0, x.shape[0], self.batch):
            chunk = x[i:i + self.batch, None].to(self.device, non_blocking=True)
            chunk = chunk.contiguous(memory_format=torch.channels_last)
            with autocast_ctx(self.device, self.precision):
                y = self.model(chunk)
            out.append(y.float().cpu())
        if not out:
            return np.zeros((0, EMBEDDING_SIZE), np.float32)
        return torch.cat(out).numpy()

    def encode_clip_info(self, source) -> tuple[np.ndarray, dict]:
        """Like `encode_clip`, without state: (rows, {"examples": examples the clip gave, "padded": rows repeated})."""
        samples, rate = source
        examples = log_mel_examples(samples, rate, self.hop_s)
        available = examples.shape[0]
        if self.examples is not None:
            if available == 0:
                raise UserError(f"audio too short for one VGGish example: {len(samples)} samples at {rate} Hz; one "
                                f"example needs {WINDOW_LENGTH + (EXAMPLE_FRAMES - 1) * HOP_LENGTH} samples "
                                f"({(WINDOW_LENGTH + (EXAMPLE_FRAMES - 1) * HOP_LENGTH) / SAMPLE_RATE} s) at 16 kHz")
            examples = examples[:self.examples]
        rows = self.embed(examples)
        padded = 0
        if self.examples is not None and rows.shape[0] < self.examples:
            padded = self.examples - rows.shape[0]
            rows = np.concatenate([rows, np.repeat(rows[-1:], padded, axis=0)])
        if self.pca is not None:
            rows = pca_quantize(rows, *self.pca)
        return np.ascontiguousarray(rows, dtype=np.float32), {"examples": int(available), "padded": int(padded)}

    def encode_clip(self, source) -> np.ndarray:
        """(samples, rate) -> float32 [N, 128] (N = `examples` when set). Sets `last_padding` / `last_examples`."""
        rows, info = self.encode_clip_info(source)
        self.last_padding, self.last_examples = info["padded"], info["examples"]
        return rows

    def describe(self) -> dict:
        return {**super().describe(), "examples": self.examples, "example_hop_frames": self.hop_frames,
                "pca": self.pca_info, "resampler": f"resampy {resampler_version()} kaiser_best",
                "frontend": {"sample_rate": SAMPLE_RATE, "window": WINDOW_LENGTH, "hop": HOP_LENGTH,
                             "fft": FFT_LENGTH, "mel_bands": NUM_BANDS, "mel_hz": [MEL_MIN_HZ, MEL_MAX_HZ],
                             "log_offset": LOG_OFFSET, "example_frames": EXAMPLE_FRAMES},
                "final_relu": True}
