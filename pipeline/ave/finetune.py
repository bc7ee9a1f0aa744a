"""Targeted fine-tuning of the visual encoder (the `finetune` stage, spec §5 adapted to ResNet-50 + Cnn14).

What it does: InfoNCE between video-level pairs. The visual side is ResNet-50's pooled layer4 output averaged over
one frame per second (a random frame of each second's 16-frame AVE grid, drawn afresh each epoch from an RNG seeded
by (seed, epoch, video)); the audio side is the mean of the video's Cnn14 embeddings read from the audio feature
file (the audio encoder stays frozen and is not re-run). Bias-free projection heads to 128-d, L2-normalised,
temperature 0.2, symmetric cross-entropy over the batch; SGD 1e-3, momentum 0.9, weight decay 1e-4, x0.1 at epochs
15 and 30, 50 epochs, batch 128, drop_last: the reference's recipe (AVELCLIP), whose released code trains VGG19-BN
against VGGish; the paper's ResNet-50/Cnn14 version is inferred (spec §5).

What differs, on purpose:
- the test split never enters: videos of the train and val splits only, minus any whose YouTube ID also serves a
  test row (`eligible_videos`; AVE has such duplicates, and its *Set.txt files disagree slightly with *_order.h5,
  so the test IDs are the union of both);
- a seeded share of the eligible videos is held out of training to measure the effect: audio->visual and
  visual->audio retrieval recall@1/@5 before (initial weights) and after (final weights), on deterministic frames
  (the middle grid frame of each second);
- which ResNet-50 stages train is configurable (all by default, as the reference); frozen stages run without
  autograd and keep BatchNorm in eval mode; `frames_per_video` < 10 samples that many random seconds (cheaper on
  CPU); `crop_size` < 224 scales the resize proportionally (232/224) for CPU demos.

Several processes (`finetune_stage(..., nproc=N)`, `avel finetune --nproc N`; `pipeline.distributed`): every global
batch of `batch_size` videos (the same batches as one process draws, from the permutation seeded by (seed, epoch):
what DistributedSampler.set_epoch gives, without its padding) is split into contiguous per-rank shares;
each rank scores its own queries against the embeddings of all ranks, gathered with autograd
(`models.losses.info_nce_share`), so the loss and its gradient are the full batch's; DDP averages the gradients.
BatchNorm of the trained stages: SyncBatchNorm on CUDA (statistics over the global batch, as one process); on the
CPU torch has no SyncBatchNorm, so each rank normalises with its own share's statistics and the result differs
from one process (it is equal when no trained stage has a BatchNorm in train mode, e.g. trainable_stages=[conv1];
the same holds for `head_norm`'s BatchNorm1d on the heads, synchronised on CUDA too);
running statistics are rank 0's (DDP broadcasts its buffers). Rank 0 alone measures retrieval and writes every
file; the other ranks wait at a barrier. The number of processes (when > 1) enters the stage key.

Outputs (in the stage folder): `resnet50_finetuned.pt` (the `avel-resnet50-trunk` format that the extraction stage
loads with `--resnet-weights`; its sha256 is in the manifest and becomes the visual extraction's weights id),
`resnet50_I_state_dict.pth` (`{"I_state_dict": Sequential(children[:-2]) state dict}`, what the reference's own
`visual_feature_extractor.py --ckpt` reads), `loss.csv`, `retrieval.json`, and `last.pt` (resume point, written
atomically every epoch). Re-extraction with the new weights (the visual extraction with `resnet_weights` = the
`weights` file, `random_init` off) changes only the visual extraction's key; the audio features are reused.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import h5py
import numpy as np
import torch
from pydantic import Field, field_validator

from models.finetune import AudioVisualContrastive, reference_trunk, resolve_stages
from models.losses import info_nce_loss, info_nce_share
from pipeline import ave, distributed, media
from pipeline.ave.dataset import FEATURE_KEY
from pipeline.config import StageConfig, dump_config
from pipeline.errors import UserError
from pipeline.runtime import (
    autocast,
    heap_allocations,
    load_torch_file,
    resolve_device,
    resolve_precision,
    seed_everything,
    worker_options,
)
from pipeline.store import ArtifactStore, atomic_path, file_sha256, write_json_atomic

STAGE, VERSION = "finetune", "2"  # 2: the trunk in channels_last on every device
CHECKPOINT_FORMAT = "avel-finetune/1"
WEIGHTS_FILE = "resnet50_finetuned.pt"
REFERENCE_FILE = "resnet50_I_state_dict.pth"
EVAL_SUBFRAME = 0.5  # retrieval frames: the middle of each second (grid frame 8 of 16)
RECALL_AT = (1, 5)
RANDOM_WARNING = ("RANDOM WEIGHTS: fine-tuning started from a randomly initialised ResNet-50 (--random-init); "
                  "the weights are for testing the pipeline only, not for results")


class FinetuneConfig(StageConfig):
    # the key: fields that change the result (device, workers and the recall curve's spacing do not; the precision
    # that runs does); the random-start knobs only when on, so keys of before they existed stay
    key_exclude = ("device", "workers", "retrieval_every")
    key_when_set = ("standardize_audio", "head_norm")

    epochs: int = Field(50, ge=1)
    batch_size: int = Field(128, ge=2, description="videos per batch (negatives = the other videos of the batch)")
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    milestones: list[int] = [15, 30]
    lr_gamma: float = Field(0.1, gt=0)
    temperature: float = Field(0.2, gt=0)
    learnable_temperature: bool = False
    embed_dim: int = Field(128, ge=1)
    trainable_stages: Literal["all"] | list[str] = Field(
        "all", description="'all' (the reference) or names among conv1, bn1, layer1..layer4")
    frames_per_video: int = Field(media.SEGMENTS, ge=1, le=media.SEGMENTS,
                                  description="seconds sampled per video per epoch (10 = one frame per second)")
    crop_size: int = Field(224, ge=32, description="center crop; the short side is resized to crop * 232/224")
    holdout_fraction: float = Field(0.1, ge=0, lt=1, description="eligible videos held out for retrieval")
    drop_last: bool = True
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # the trunk's compute (auto: bf16 autocast where the device
    # has native bf16); the loss in fp32
    workers: int = Field(4, ge=0, description="DataLoader processes decoding frames (0: in the main process)")
    # Knobs for starting from random encoders (our design, off in the paper's recipe;
    # `benchmarks/finetune_evidence.py` measured what each does): random ResNet-50 and Cnn14 give nearly constant
    # embeddings (cosine ~0.998 between videos), so a bias-free projection of them is nearly the same vector for
    # every video and InfoNCE sits at ln(batch).
    standardize_audio: bool = Field(False, description="z-score the video-level audio embeddings with the training "
                                                       "videos' mean and std (per dimension)")
    head_norm: bool = Field(False, description="BatchNorm1d without affine on each projection head's input: centres "
                                               "and scales the embeddings before the projection")
    retrieval_every: int = Field(0, ge=0, description="also measure held-out retrieval after every k-th epoch "
                                                      "(0: only before and after); the recall curve")

    @field_validator("trainable_stages", mode="before")
    @classmethod
    def _stages(cls, value):
        if isinstance(value, str) and value != "all":  # --set trainable_stages=layer3,layer4
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            value = list(value)
        resolve_stages(value)
        return value

    @field_validator("milestones")
    @classmethod
    def _milestones(cls, value: list[int]) -> list[int]:
        if any(m < 1 for m in value) or value != sorted(value):
            raise ValueError(f"milestones must be increasing epochs >= 1, got {value}")
        return value

    @property
    def resize_size(self) -> int:
        from extractors.resnet50 import preprocessing_spec

        spec = preprocessing_spec()
        return int(round(self.crop_size * spec["resize_size"][0] / spec["crop_size"][0]))


# ---- which videos -----------------------------------------------------------------------------------------------
def ids_in_test_split(ds: ave.AVEDataset) -> set[str]:
    """YouTube IDs of the test split: test_order.h5, and testSet.txt where present (AVE's two disagree a little)."""
    ids = {ds.annotations[r].video_id for r in ds.split_rows("test")}
    set_rows = ds.set_file_rows("test")
    if set_rows is not None:
        ids |= {ds.annotations[r].video_id for r in set_rows}
    return ids


def eligible_videos(ds: ave.AVEDataset) -> tuple[list[str], list[str]]:
    """(IDs that may be fine-tuned on, IDs dropped because they also serve the test split).

    Rows of the train and val splits, unique video IDs in row order, minus every ID that appears in the test split:
    one video file serving a train row and a test row would otherwise put test frames into fine-tuning."""
    rows = sorted(int(r) for s in ("train", "val") for r in ds.split_rows(s))
    candidates = list(dict.fromkeys(ds.annotations[r].video_id for r in rows))
    test_ids = ids_in_test_split(ds)
    train_ids = [v for v in candidates if v not in test_ids]
    excluded = sorted(v for v in candidates if v in test_ids)
    leaked = set(train_ids) & test_ids
    if leaked:  # an invariant, checked rather than assumed: nothing below may see a test video
        raise RuntimeError(f"test videos in the fine-tuning set: {sorted(leaked)[:5]}")
    return train_ids, excluded


def audio_identity(path: Path) -> str:
    """What identifies the audio features in the stage key: the extraction stage's key when the file is one of ours
    (its attributes say so), else the file's sha256."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            stage, key = f.attrs.get("stage"), f.attrs.get("stage_key")
    except OSError as e:
        raise UserError(f"{path}: not a readable HDF5 file ({e})") from None
    if stage and key:
        return f"{stage}:{key}"
    return f"sha256:{file_sha256(path)}"


@dataclass
class FinetuneData:
    """The videos of one fine-tuning run and their video-level audio embeddings."""

    train_ids: list[str]
    heldout_ids: list[str]
    train_paths: list[Path]
    heldout_paths: list[Path]
    train_audio: np.ndarray  # [n_train, audio_dim] float32: mean Cnn14 embedding of each video
    heldout_audio: np.ndarray
    excluded: dict[str, str]  # video ID -> why it is not used (test overlap, no audio, missing file)
    test_overlap: list[str]
    audio_random_init: bool = False

    @property
    def audio_dim(self) -> int:
        return int(self.train_audio.shape[1])


def prepare_data(ds: ave.AVEDataset, audio_h5: Path, cfg: FinetuneConfig) -> FinetuneData:
    """Eligible videos (no test split), their mean audio embeddings (rows with valid=False skipped), the holdout."""
    audio_h5 = Path(audio_h5)
    if not audio_h5.is_file():
        raise UserError(f"{audio_h5}: audio feature file not found; run `avel extract --modality audio` first or "
                        f"pass --audio FILE")
    ids, overlap = eligible_videos(ds)
    excluded = {v: "its YouTube ID also serves a test row" for v in overlap}
    by_video = ds.rows_by_video()
    with h5py.File(audio_h5, "r") as f:
        if FEATURE_KEY not in f:
            raise UserError(f"{audio_h5}: no dataset {FEATURE_KEY!r} (found {list(f.keys())}); expected an AVE audio "
                            f"feature file [N,10,D]")
        d = f[FEATURE_KEY]
        if d.ndim != 3 or d.shape[0] != len(ds):
            raise UserError(f"{audio_h5}: {FEATURE_KEY} has shape {list(d.shape)}, expected [{len(ds)},10,D] (one "
                            f"row per line of {ds.root / ave.ANNOTATIONS}); is it from another dataset?")
        digest = f.attrs.get("dataset_digest")
        if digest is not None and str(digest) != ds.digest():
            raise UserError(f"{audio_h5}: extracted from another dataset (its dataset digest differs from "
                            f"{ds.root}'s); extract the audio of this dataset first")
        valid = np.asarray(f["valid"][()], bool) if "valid" in f else np.ones(len(ds), bool)
        random_init = bool(f.attrs.get("random_init", False))
        means: dict[str, np.ndarray] = {}
        for vid in ids:
            rows = [r for r in by_video[vid] if valid[r]]
            if not rows:
                excluded[vid] = "no valid audio features (its audio failed to extract)"
            elif not ds.video_path(vid).is_file():
                excluded[vid] = f"video file missing: {ds.video_path(vid)}"
            else:
                x = np.asarray(d[sorted(rows)], np.float64)  # [rows,10,D]
                means[vid] = x.mean(axis=(0, 1)).astype(np.float32)
    usable = [v for v in ids if v in means]
    n_hold = heldout_count(len(usable), cfg.holdout_fraction)
    order = np.random.default_rng([cfg.seed, 0x401D]).permutation(len(usable))
    held = set(usable[i] for i in order[:n_hold])
    train_ids = [v for v in usable if v not in held]
    heldout_ids = [v for v in usable if v in held]
    if len(train_ids) < 2:
        raise UserError(f"only {len(train_ids)} video(s) left to fine-tune on ({len(ids)} in train+val, "
                        f"{len(excluded)} excluded, {len(heldout_ids)} held out); contrastive training needs at "
                        f"least 2 (lower holdout_fraction or use a bigger dataset)")

    def stack(vs: list[str]) -> np.ndarray:
        dim = next(iter(means.values())).shape[0]
        return np.stack([means[v] for v in vs]) if vs else np.zeros((0, dim), np.float32)

    train_audio, heldout_audio = stack(train_ids), stack(heldout_ids)
    if cfg.standardize_audio:  # statistics of the training videos only; the held-out ones are scaled alike
        mu = train_audio.astype(np.float64).mean(0)
        sd = train_audio.astype(np.float64).std(0)
        sd = np.where(sd > 0, sd, 1.0)
        train_audio, heldout_audio = (((x - mu) / sd).astype(np.float32) for x in (train_audio, heldout_audio))
    return FinetuneData(train_ids, heldout_ids, [ds.video_path(v) for v in train_ids],
                        [ds.video_path(v) for v in heldout_ids], train_audio, heldout_audio, excluded,
                        overlap, random_init)


def heldout_count(n: int, fraction: float) -> int:
    """round(fraction * n), at least 2 when there are >= 6 videos (retrieval needs 2); none when fraction is 0."""
    if fraction <= 0:
        return 0
    k = int(round(fraction * n))
    return max(2, k) if n >= 6 else min(k, max(n - 2, 0))


# ---- frames -----------------------------------------------------------------------------------------------------
class VideoPairs(torch.utils.data.Dataset):
    """Item i = (frames uint8 [F,3,crop,crop], mean audio embedding [D]) of video i.

    Train mode: F random seconds (all 10 when frames_per_video = 10), one random frame of each second's 16-frame
    grid, from an RNG seeded by (seed, epoch, i): set `epoch` before iterating. Eval mode: every second's middle
    frame. A video no decoder can read gives {"index", "error"} and is left out of its batch."""

    def __init__(self, paths: list[Path], audio: np.ndarray, *, frames_per_video: int, crop_size: int,
                 resize_size: int, seed: int, train: bool = True, decode_threads: int = 0):
        from extractors.resnet50 import preprocessing_spec

        spec = preprocessing_spec()
        self.paths, self.audio = [Path(p) for p in paths], np.asarray(audio, np.float32)
        self.frames_per_video, self.crop, self.resize = frames_per_video, crop_size, resize_size
        self.interpolation, self.antialias = spec["interpolation"], spec["antialias"]
        self.seed, self.train, self.decode_threads = seed, train, decode_threads
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def choice(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(seconds, grid frame within each second, grid frames per second) of item `index` this epoch."""
        if not self.train:  # the grid of 2 per second puts frame 1 at s + 0.5 s, exactly grid frame 8 of 16
            return np.arange(media.SEGMENTS), np.ones(media.SEGMENTS, np.int64), int(1 / EVAL_SUBFRAME)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        seconds = np.arange(media.SEGMENTS)
        if self.frames_per_video < media.SEGMENTS:
            seconds = np.sort(rng.choice(media.SEGMENTS, self.frames_per_video, replace=False))
        sub = rng.integers(0, media.FRAMES_PER_SEGMENT, size=len(seconds))
        return seconds, sub, media.FRAMES_PER_SEGMENT

    def __getitem__(self, index: int) -> dict:
        from torchvision.transforms.v2 import functional as TF

        seconds, sub, grid = self.choice(index)
        try:
            dec = media.decode(self.paths[index], video=True, audio=False, frames_per_segment=grid,
                               threads=self.decode_threads)
        except media.MediaError as e:
            return {"index": index, "error": str(e)}
        x = torch.from_numpy(np.ascontiguousarray(dec.frames[seconds * grid + sub])).permute(0, 3, 1, 2)
        x = TF.resize(x, [self.resize], interpolation=self.interpolation, antialias=self.antialias)
        x = TF.center_crop(x, [self.crop, self.crop])
        return {"index": index, "frames": x.contiguous(), "audio": torch.from_numpy(self.audio[index])}


def collate(items: list[dict]) -> dict:
    ok = [x for x in items if "error" not in x]
    return {"index": torch.tensor([x["index"] for x in ok], dtype=torch.long),
            "frames": torch.stack([x["frames"] for x in ok]) if ok else None,
            "audio": torch.stack([x["audio"] for x in ok]) if ok else None,
            "failed": [(x["index"], x["error"]) for x in items if "error" in x]}


def epoch_batches(n: int, cfg: FinetuneConfig, epoch: int) -> list[list[int]]:
    """This epoch's batches: a permutation seeded by (seed, epoch), so a resumed run draws what an uninterrupted one
    would; full batches only with drop_last (one batch of all when there are fewer videos than a batch)."""
    perm = np.random.default_rng([cfg.seed, epoch, 0xBA7C]).permutation(n).tolist()
    size = min(cfg.batch_size, n)
    batches = [perm[i:i + size] for i in range(0, n, size)]
    if cfg.drop_last and len(batches[-1]) < size:
        batches.pop()
    return [b for b in batches if len(b) >= 2]  # one video alone has no negative


def _loader(dataset: VideoPairs, batches: list[list[int]], workers: int,
            device: torch.device) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                                       pin_memory=device.type == "cuda", **worker_options(workers))


class Normalizer:
    """uint8 [..,3,h,w] -> float, scaled to [0,1] and normalised with the ImageNet V2 weights' mean/std."""

    def __init__(self, device: torch.device):
        from extractors.resnet50 import preprocessing_spec

        spec = preprocessing_spec()
        self.mean = torch.tensor(spec["mean"], device=device).view(3, 1, 1)
        self.std = torch.tensor(spec["std"], device=device).view(3, 1, 1)
        self.device = device

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.to(self.device, non_blocking=True).float().div_(255)
        return (x - self.mean) / self.std


# ---- retrieval --------------------------------------------------------------------------------------------------
def recall_at(v: torch.Tensor, a: torch.Tensor, ks: tuple[int, ...] = RECALL_AT) -> dict:
    """Recall@k (%) of paired, L2-normalised embeddings, both directions: audio->visual ranks the visual embeddings
    for each audio query, visual->audio the reverse. Rank = how many candidates score strictly above the pair."""
    sim = v.float() @ a.float().T  # [n,n]: visual i . audio j
    diag = sim.diagonal()
    rank_v2a = (sim > diag[:, None]).sum(1)
    rank_a2v = (sim.T > diag[:, None]).sum(1)
    n = sim.shape[0]
    return {"n": n,
            "audio_to_visual": {f"R@{k}": float((rank_a2v < k).float().mean() * 100) for k in ks},
            "visual_to_audio": {f"R@{k}": float((rank_v2a < k).float().mean() * 100) for k in ks},
            "chance": {f"R@{k}": 100 * min(k, n) / n for k in ks}}


@torch.no_grad()
def evaluate_retrieval(model: AudioVisualContrastive, dataset: VideoPairs, device: torch.device, workers: int,
                       precision: str = "fp32") -> dict:
    was_training = model.training
    model.eval()
    norm = Normalizer(device)
    per_batch = max(1, (256 if device.type == "cuda" else 64) // media.SEGMENTS)
    batches = [list(range(i, min(i + per_batch, len(dataset)))) for i in range(0, len(dataset), per_batch)]
    vs, as_, failed = [], [], []
    for batch in _loader(dataset, batches, workers, device):
        failed += batch["failed"]
        if batch["frames"] is None:
            continue
        with autocast(device, precision):
            v, a, _ = model(norm(batch["frames"]), batch["audio"].to(device))
        vs.append(v.float().cpu())
        as_.append(a.float().cpu())
    model.train(was_training)
    if sum(len(v) for v in vs) < 2:
        return {"n": sum(len(v) for v in vs), "skipped": "fewer than 2 held-out videos decoded",
                "failed": [str(dataset.paths[i].stem) for i, _ in failed]}
    out = recall_at(torch.cat(vs), torch.cat(as_))
    out["failed"] = [dataset.paths[i].stem for i, _ in failed]
    return out


# ---- training ---------------------------------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    dir: Path
    key: str
    reused: bool
    metrics: dict
    weights: Path  # resnet50_finetuned.pt: pass it to the visual extraction (--resnet-weights)
    sha256: str
    reference_weights: Path  # resnet50_I_state_dict.pth (the reference extractor's format)
    retrieval: dict = field(default_factory=dict)


EpochCallback = Callable[[dict], None]


def build_model(weights, cfg: FinetuneConfig, audio_dim: int) -> AudioVisualContrastive:
    """ResNet-50 with the initial weights (or random, seeded as the extractor seeds it) + fresh heads."""
    import torchvision

    from extractors.weights import load_resnet50_weights, seeded

    with seeded(cfg.seed):  # the same random trunk as ResNet50Extractor(random_init=True, seed=cfg.seed)
        resnet = torchvision.models.resnet50(weights=None)
    if not weights.random_init:
        load_resnet50_weights(resnet, weights.path)
    seed_everything(cfg.seed)  # the heads
    return AudioVisualContrastive(resnet, visual_dim=resnet.fc.in_features, audio_dim=audio_dim,
                                  embed_dim=cfg.embed_dim, temperature=cfg.temperature,
                                  learnable_temperature=cfg.learnable_temperature,
                                  trainable_stages=cfg.trainable_stages, head_norm=cfg.head_norm)


def _optimizer(model: AudioVisualContrastive, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    groups = [{"params": model.trainable_parameters(), "weight_decay": cfg.weight_decay}]
    if cfg.learnable_temperature:  # no weight decay on the temperature (it would pull T towards 1)
        groups.append({"params": [model.log_temperature], "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def pair_loss(v: torch.Tensor, a: torch.Tensor, logit_scale: torch.Tensor, cfg: FinetuneConfig) -> torch.Tensor:
    """Symmetric InfoNCE over the batch; a learnable temperature (1 / logit_scale) keeps its gradient."""
    return info_nce_loss(v, a, temperature=1.0 / logit_scale if cfg.learnable_temperature else cfg.temperature)


def pair_loss_share(v: torch.Tensor, a: torch.Tensor, logit_scale: torch.Tensor,
                    cfg: FinetuneConfig) -> torch.Tensor:
    """This rank's share of the symmetric InfoNCE over the global batch: its queries against every rank's keys,
    gathered with autograd (the shares of all ranks add up to `pair_loss` of the whole batch)."""
    v_all, offset = distributed.gather_rows(v)
    a_all, _ = distributed.gather_rows(a)
    temperature = 1.0 / logit_scale if cfg.learnable_temperature else cfg.temperature
    return info_nce_share(v, a, v_all, a_all, offset, temperature=temperature)


def save_checkpoint(path: Path, **state: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)


def finetune_model(data: FinetuneData, weights, cfg: FinetuneConfig, out_dir: Path, *,
                   on_epoch: EpochCallback | None = None, meta: dict | None = None) -> dict:
    """Fine-tune into `out_dir`, resuming from `out_dir/last.pt` if a previous run was cut off. Returns a summary."""
    with heap_allocations():  # large activations reused from the heap, not mapped afresh each step (runtime.py)
        return _finetune_model(data, weights, cfg, out_dir, on_epoch=on_epoch, meta=meta)


def _finetune_model(data: FinetuneData, weights, cfg: FinetuneConfig, out_dir: Path, *,
                    on_epoch: EpochCallback | None, meta: dict | None) -> dict:
    from extractors.weights import save_resnet50_trunk

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = distributed.local_device(resolve_device(cfg.device))
    world, main = distributed.world_size(), distributed.is_main()
    precision = resolve_precision(cfg.precision, device)
    model = build_model(weights, cfg, data.audio_dim).to(device)
    # NHWC convolutions on every device (oneDNN's and the tensor cores' layout; the saved tensors load either way)
    model.channels_last = True
    model.trunk.to(memory_format=torch.channels_last)
    if world > 1 and device.type == "cuda":  # BatchNorm over the global batch (torch has it for GPUs only)
        for name in model.trainable_stages:
            setattr(model.trunk, name, distributed.sync_batchnorm(getattr(model.trunk, name)))
        if cfg.head_norm:
            model.visual_head = distributed.sync_batchnorm(model.visual_head)
            model.audio_head = distributed.sync_batchnorm(model.audio_head)
    optimizer = _optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.milestones, gamma=cfg.lr_gamma)
    norm = Normalizer(device)
    decode_threads = 1 if cfg.workers > 0 else 0
    common = dict(frames_per_video=cfg.frames_per_video, crop_size=cfg.crop_size, resize_size=cfg.resize_size,
                  seed=cfg.seed, decode_threads=decode_threads)
    train_set = VideoPairs(data.train_paths, data.train_audio, train=True, **common)
    heldout_set = VideoPairs(data.heldout_paths, data.heldout_audio, train=False, **common)

    history: list[dict] = []
    failures: dict[str, str] = {}
    start_epoch, before = 0, None
    last_path = out_dir / "last.pt"
    if last_path.is_file():
        state = load_torch_file(last_path, "fine-tuning checkpoint")
        if state.get("train_ids") != data.train_ids or state.get("heldout_ids") != data.heldout_ids:
            raise UserError(f"{last_path}: made for other videos than this run's; delete it (or use --force)")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, failures, before = state["history"], state["failures"], state["retrieval_before"]
        start_epoch = state["epoch"] + 1
    if before is None and main:
        t0 = time.perf_counter()
        before = _retrieval(model, heldout_set, device, cfg)
        before["seconds"] = round(time.perf_counter() - t0, 3)
    distributed.barrier()  # the other ranks wait for rank 0's retrieval

    net = distributed.wrap(model, device) if world > 1 else model  # the training forward; `model` is saved
    net.train()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        train_set.epoch = epoch
        lr = optimizer.param_groups[0]["lr"]
        total, videos, batches, wait = 0.0, 0, 0, 0.0
        batch_list = epoch_batches(len(train_set), cfg, epoch)
        if world > 1:  # this rank's share of each global batch
            batch_list = [distributed.shard(b) for b in batch_list]
        t_wait = time.perf_counter()
        for batch in _loader(train_set, batch_list, cfg.workers, device):
            wait += time.perf_counter() - t_wait
            for i, err in batch["failed"]:
                failures[data.train_ids[i]] = err
            n = 0 if batch["frames"] is None else len(batch["index"])
            if world > 1:  # every rank takes the same decision: a rank with no video cannot join the step
                counts = distributed.all_counts(n)
                skip, n_step = min(counts) == 0 or sum(counts) < 2, sum(counts)
            else:
                skip, n_step = batch["frames"] is None or len(batch["index"]) < 2, n
            if skip:
                t_wait = time.perf_counter()
                continue
            with autocast(device, precision):
                v, a, scale = net(norm(batch["frames"]), batch["audio"].to(device))
            if world > 1:  # DDP averages the gradients over the ranks, so the shares count world times
                share = pair_loss_share(v.float(), a.float(), scale.float(), cfg)
                loss, value = share * world, distributed.sum_all([float(share.detach())])[0]
            else:
                loss = pair_loss(v.float(), a.float(), scale.float(), cfg)
                value = float(loss.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += value * n_step
            videos += n_step
            batches += 1
            t_wait = time.perf_counter()
        scheduler.step()
        if world > 1:
            failures = {vid: why for part in distributed.gather_objects(failures) for vid, why in part.items()}
        if videos == 0:
            raise UserError(f"epoch {epoch}: no batch could be formed ({len(failures)} of {len(train_set)} videos "
                            f"failed to decode); check the videos with `avel dataset check`")
        record = {"epoch": epoch, "epochs": cfg.epochs, "lr": lr, "loss": total / videos,
                  "temperature": float(model.temperature), "seconds": time.perf_counter() - t0,
                  "data_wait_s": wait, "videos": videos, "batches": batches}
        if cfg.retrieval_every and (epoch + 1) % cfg.retrieval_every == 0 and epoch + 1 < cfg.epochs:
            if main:  # the recall curve (the last epoch's is `after`, measured below)
                record["retrieval"] = _recalls(_retrieval(model, heldout_set, device, cfg))
            distributed.barrier()
        history.append(record)
        with distributed.main_writes() as writes:
            if writes:
                save_checkpoint(last_path, epoch=epoch, model=model.state_dict(), optimizer=optimizer.state_dict(),
                                scheduler=scheduler.state_dict(), history=history, failures=failures,
                                retrieval_before=before, train_ids=data.train_ids, heldout_ids=data.heldout_ids,
                                config=dump_config(cfg))
                write_loss_csv(out_dir / "loss.csv", history)
                if on_epoch:
                    on_epoch(record)

    if not main:  # rank 0 measures retrieval and writes the weights
        distributed.barrier()
        return {}
    t0 = time.perf_counter()
    after = _retrieval(model, heldout_set, device, cfg)
    after["seconds"] = round(time.perf_counter() - t0, 3)
    curve = []
    if cfg.retrieval_every and history:  # the recall curve: epoch 0 is `before`, the last epoch `after`
        history[-1]["retrieval"] = _recalls(after)
        curve = [{"epoch": 0, **_recalls(before)}] + [{"epoch": h["epoch"] + 1, **h["retrieval"]} for h in history
                                                     if "retrieval" in h]
    retrieval = {"before": before, "after": after, "heldout_ids": data.heldout_ids,
                 "directions": "audio_to_visual: each held-out video's audio embedding ranks the held-out visual "
                               "embeddings; visual_to_audio: the reverse. Recall in %.",
                 "frames": "the middle grid frame of each of the 10 seconds", "before_means": "initial weights and "
                 "freshly initialised projection heads", "after_means": "final weights (last epoch)",
                 **({"curve": curve} if curve else {})}
    write_json_atomic(out_dir / "retrieval.json", retrieval)
    info = {**(meta or {}), "epochs": cfg.epochs, "final_loss": history[-1]["loss"] if history else None,
            "trainable_stages": list(model.trainable_stages)}
    save_resnet50_trunk(model.trunk, out_dir / WEIGHTS_FILE, info)
    with atomic_path(out_dir / REFERENCE_FILE) as tmp:
        torch.save({"I_state_dict": {k: v.detach().cpu() for k, v in reference_trunk(model.trunk).state_dict().items()},
                    "meta": info}, tmp)
    distributed.barrier()
    return {"history": history, "retrieval": retrieval, "failures": failures, "device": str(device),
            "precision": precision, **({"processes": world} if world > 1 else {})}


def _retrieval(model: AudioVisualContrastive, dataset: VideoPairs, device: torch.device, cfg: FinetuneConfig) -> dict:
    if len(dataset) < 2:
        return {"n": len(dataset), "skipped": f"{len(dataset)} held-out video(s); retrieval needs at least 2 "
                                              f"(holdout_fraction={cfg.holdout_fraction})"}
    return evaluate_retrieval(model, dataset, device, cfg.workers, cfg.resolved_precision())


def write_loss_csv(path: Path, history: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "lr", "loss", "temperature", "seconds"])
        for r in history:
            w.writerow([r["epoch"], f"{r['lr']:.6g}", f"{r['loss']:.6f}", f"{r['temperature']:.6g}",
                        f"{r['seconds']:.3f}"])


# ---- the stage --------------------------------------------------------------------------------------------------
def _result(run, reused: bool) -> FinetuneResult:
    m = run.manifest
    retrieval_path = run.dir / "retrieval.json"
    retrieval = json.loads(retrieval_path.read_text(encoding="utf-8")) if retrieval_path.is_file() else {}
    return FinetuneResult(run.dir, m.key, reused, m.metrics, run.output_path("weights"),
                          str(m.outputs["weights"].sha256), run.output_path("reference_weights"), retrieval)


def stage_key_fields(cfg: FinetuneConfig, nproc: int = 1) -> dict:
    """The config part of the stage key: the config's fields, plus the number of processes when there are several
    (one process's keys are those of before multi-process runs existed)."""
    return {**cfg.key_fields(), **({"processes": nproc} if nproc > 1 else {})}


def _finetune_worker(data: FinetuneData, weights, cfg: FinetuneConfig, out_dir: Path,
                     on_epoch: EpochCallback | None, meta: dict) -> dict:
    """One rank of a multi-process fine-tuning (started by `distributed.launch`); rank 0 reports the epochs."""
    return finetune_model(data, weights, cfg, out_dir, on_epoch=on_epoch if distributed.is_main() else None,
                          meta=meta)


def print_epoch(record: dict) -> None:
    """The per-epoch line of a multi-process run (a callback that can travel to the rank-0 process)."""
    print(f"finetune epoch {record['epoch'] + 1}/{record['epochs']}: loss {record['loss']:.4f} lr "
          f"{record['lr']:.2g} ({record['seconds']:.1f} s)", flush=True)


def finetune_stage(dataset_dir: Path, audio_h5: Path, cfg: FinetuneConfig, root: Path, *,
                   resnet_weights: Path | None = None, random_init: bool = False, force: bool = False,
                   on_epoch: EpochCallback | None = None, nproc: int = 1) -> FinetuneResult:
    """The `finetune` stage in the artifact store: reused when the same config, dataset, initial weights and audio
    features were fine-tuned before; resumed from its last epoch when a previous run was cut off.

    `nproc` > 1: that many processes (DDP, `pipeline.distributed`); this process keeps the store and the lock and
    waits for them. `on_epoch` then runs in rank 0's process: a callback that cannot be pickled there (a closure)
    is replaced by `print_epoch`."""
    from extractors.weights import locate_weights

    ds = ave.load_dataset(dataset_dir)
    weights = locate_weights("resnet50", resnet_weights, random_init=random_init, seed=cfg.seed)
    inputs = {"dataset": ds.digest(), "resnet50": weights.id, "audio": audio_identity(Path(audio_h5))}
    with ArtifactStore(root).stage(STAGE, VERSION, stage_key_fields(cfg, nproc), inputs, force=force) as run:
        if run.reused:
            return _result(run, True)
        t0 = time.perf_counter()
        data = prepare_data(ds, Path(audio_h5), cfg)
        m = run.manifest
        m.warnings = []
        if weights.random_init:
            m.warnings.append(RANDOM_WARNING)
        if data.audio_random_init:
            m.warnings.append("RANDOM WEIGHTS: the audio features come from a randomly initialised Cnn14; "
                              "for testing the pipeline only")
        if len(data.heldout_ids) < 2:
            m.warnings.append(f"retrieval not measured: {len(data.heldout_ids)} held-out video(s)")
        m.items = {v: {"status": "excluded", "reason": why} for v, why in data.excluded.items()}
        m.metrics = {"train_videos": len(data.train_ids), "heldout_videos": len(data.heldout_ids),
                     "excluded_test_overlap": data.test_overlap, "weights": weights.to_dict()}
        run.save()
        meta = {"stage": STAGE, "key": m.key, "initial_weights": weights.id, "dataset": inputs["dataset"],
                "audio": inputs["audio"], "config": dump_config(cfg)}
        if nproc > 1:
            if resolve_device(cfg.device).type != "cuda" and set(resolve_stages(cfg.trainable_stages)) - {"conv1"}:
                m.warnings.append(f"{nproc} CPU processes: the trained stages' BatchNorm layers use each process's "
                                  f"share of the batch for their statistics (no SyncBatchNorm on the CPU), so the "
                                  f"result differs from one process's")
            if min(cfg.batch_size, len(data.train_ids)) < nproc:
                raise UserError(f"--nproc {nproc}: a batch of {min(cfg.batch_size, len(data.train_ids))} videos "
                                f"cannot give every process one; use at most that many processes")
            summary = distributed.launch(_finetune_worker, (data, weights, cfg, run.dir,
                                                            distributed.picklable(on_epoch, print_epoch), meta),
                                         nproc, resolve_device(cfg.device))
        else:
            summary = finetune_model(data, weights, cfg, run.dir, on_epoch=on_epoch, meta=meta)
        for vid, err in summary["failures"].items():
            m.items[vid] = {"status": "failed", "reason": err}
        if summary["failures"]:
            m.warnings.append(f"{len(summary['failures'])} training video(s) failed to decode and were left out of "
                              f"their batches")
        run.add_output("weights", WEIGHTS_FILE, sha256=True)
        run.add_output("reference_weights", REFERENCE_FILE, sha256=True)
        run.add_output("loss", "loss.csv")
        run.add_output("retrieval", "retrieval.json")
        run.add_output("last", "last.pt")
        history, retrieval = summary["history"], summary["retrieval"]
        seconds = [r["seconds"] for r in history]
        m.metrics.update({
            "epochs": len(history), "first_epoch_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
            "final_temperature": history[-1]["temperature"],
            "retrieval_before": _recalls(retrieval["before"]), "retrieval_after": _recalls(retrieval["after"]),
            "weights_sha256": m.outputs["weights"].sha256, "device": summary["device"],
            "precision": summary["precision"],
            "decode_failures": len(summary["failures"]),
            **({"processes": summary["processes"]} if "processes" in summary else {})})
        m.timings.update(seconds_per_epoch=round(float(np.mean(seconds)), 3) if seconds else 0.0,
                         data_wait_s_per_epoch=round(float(np.mean([r["data_wait_s"] for r in history])), 3),
                         retrieval_s=float(retrieval["after"].get("seconds", 0.0)),
                         total_s=round(time.perf_counter() - t0, 3))
    return _result(run, False)


def _recalls(r: dict) -> dict:
    return {k: r[k] for k in ("n", "audio_to_visual", "visual_to_audio", "chance", "skipped") if k in r}


def retrieval_line(before: dict | None, after: dict | None) -> str | None:
    """`retrieval a->v R@1: before X.X % after Y.Y % (chance Z.Z %, N held-out videos)`, then v->a; None when
    retrieval was not measured (fewer than 2 held-out videos)."""
    before, after = before or {}, after or {}
    if "audio_to_visual" not in before or "audio_to_visual" not in after:
        return None
    return (f"retrieval a->v R@1: before {before['audio_to_visual']['R@1']:.1f} % after "
            f"{after['audio_to_visual']['R@1']:.1f} % (chance {after['chance']['R@1']:.1f} %, {after['n']} held-out "
            f"videos); v->a R@1: before {before['visual_to_audio']['R@1']:.1f} % after "
            f"{after['visual_to_audio']['R@1']:.1f} %")

