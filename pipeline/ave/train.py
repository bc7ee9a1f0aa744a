"""Training and evaluation of the AVE localizers (the `train` and `evaluate` stages).

The harness talks to a localizer only through its family (`models.registry`: build, loss, per-epoch switches,
decisions, weights), chosen by `model` (`cace` by default, `aveclip`). The CACE recipe by default = the reference
paper run (spec §3): Adam 7e-4, MultiStepLR [10,20,30] x0.5, 200 epochs, batch 64, gradient clipping 0.5, the five
loss terms, BECE from epoch ceil(epochs/8) with lambda 0.6 and
coefficient 1.0. What differs, on purpose:
- the checkpoint is selected on the validation split and its test accuracy reported; `select_on: test`
  reproduces the reference's best-on-test protocol, and both numbers are always labelled as what they are;
- float32 by default (the contrastive loss is computed with logsumexp, finite at tau = 0.01); float64 on request;
- features are converted to float32 tensors once (in memory when they fit), batches indexed directly: no
  DataLoader workers, no per-epoch dtype conversion.
A run writes best.pt / last.pt (atomic; last.pt carries optimizer state so a killed run resumes), a per-epoch
metrics.csv, metrics.json and per-segment predictions of the test split.

Several processes (`train_stage(..., nproc=N)`, `avel train --nproc N`; `pipeline.distributed`): each global batch
(the rows one process would take from the same shuffle) is split into contiguous per-rank shares; each rank's
batch-mean loss is weighted by n_rank * N / B so that DDP's gradient average is the global batch's mean-loss
gradient (a rank whose share is empty steps on a stand-in row with weight 0). Every loss term is a mean of
per-sample terms (CACE: BCE, CE, and the BECE contrast, whose positives and negatives lie within one video; AVE-CLIP:
CE, BCE, branch CEs) and no layer mixes samples of a batch (no BatchNorm), so nothing needs gathering: without
randomness one epoch equals one process's up to float rounding (tests/test_distributed.py). What differs: dropout
masks and CACE's key noise are drawn per rank (seeded by seed, epoch and rank), not as one process draws them.
Rank 0 alone evaluates (over the full splits), selects and writes; the others wait at a barrier. The number of
processes (when > 1) enters the stage key.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from models import derive_targets, family_of, get_family, list_localizers
from models.registry import LocalizerFamily
from pipeline import distributed
from pipeline.ave.features import (
    FeatureNorm,
    FeatureSet,
    InputNoise,
    SplitData,
    available_memory,
    channel_stats,
    input_noise,
)
from pipeline.ave.metrics import localization_metrics, segment_accuracy
from pipeline.config import StageConfig, dump_config
from pipeline.errors import UserError
from pipeline.runtime import (
    autocast,
    flush_denormals,
    heap_allocations,
    load_torch_file,
    resolve_device,
    resolve_precision,
    seed_everything,
)
from pipeline.store import ArtifactStore, atomic_path, file_sha256, write_json_atomic

STAGE, VERSION = "train", "3"  # 2: dropout masks drawn from integer bits (models.cace.Dropout); 3: `model` by name
CHECKPOINT_FORMAT = "avel-localizer/1"  # records the model's name, its config and its runtime state
CACE_CHECKPOINT_FORMAT = "avel-cace/1"  # checkpoints written before the registry: always CACE


class TrainConfig(StageConfig):
    # the key: fields that change the result (the device does not, by intent; the precision that runs does), and
    # the localizer family's code version
    key_exclude = ("device", "memory_budget_gb")

    epochs: int = Field(200, ge=1)
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    lr: float = Field(7e-4, gt=0)
    milestones: list[int] = [10, 20, 30]
    lr_gamma: float = 0.5
    clip_grad: float | None = 0.5
    contrastive: bool = True  # BECE (loss + lambda-mixing in the event head)
    bece_start: int | None = Field(None, ge=0, description="first BECE epoch; None = ceil(epochs / 8) as the reference")
    contrastive_coeff: float = 1.0
    temperature: float = Field(0.01, gt=0)
    seed: int = 3917
    select_on: Literal["val", "test"] = "val"
    dtype: Literal["float32", "float64"] = "float32"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # the model's compute under bf16 autocast or not (auto: bf16
    # where the device has native bf16); losses always in `dtype`
    device: str = "auto"
    memory_budget_gb: float | None = None  # None: half the free RAM
    # Per-channel z-scores of the inputs, statistics from the train split (saved in the checkpoint). Off in the
    # reference; needed for randomly initialised encoders, whose raw outputs are nearly constant in scale.
    standardize_features: bool = False
    # What the localizer sees: both modalities, or one with the other replaced by matched noise (the single-modality
    # control, pipeline/controls.py); "both" stays out of the key, so keys from before this knob stay valid
    inputs: Literal["both", "audio", "visual"] = "both"
    model: str = "cace"  # the localizer, by name (models.registry): cace, aveclip
    # The model's config overrides (CACE: guide, psi, lam, ...; AVE-CLIP: window_sizes, postprocess, ...); the dims
    # come from the features. The fields contrastive, bece_start, contrastive_coeff and temperature are CACE's.
    model_args: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _model_overrides_as_before(cls, data: Any) -> Any:
        """Configs written before the registry gave `model` as the CACE overrides mapping: still accepted."""
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            data = {**data, "model_args": {**data["model"], **data.get("model_args", {})}, "model": "cace"}
        return data

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in list_localizers():
            raise ValueError(f"unknown localizer {value!r}; known: {', '.join(list_localizers())}")
        return value

    @model_validator(mode="after")
    def _known_model_fields(self) -> "TrainConfig":
        known = set(get_family(self.model).config_cls.__dataclass_fields__)
        unknown = sorted(set(self.model_args) - known)
        if unknown:
            raise ValueError(f"unknown {self.model} model field(s) {unknown}; known: {', '.join(sorted(known))}")
        return self

    def key_fields(self) -> dict:
        fields = {**super().key_fields(), "model_version": get_family(self.model).version}
        if fields.get("inputs") == "both":
            del fields["inputs"]
        return fields


def model_config(fs: FeatureSet, overrides: dict, family: LocalizerFamily | None = None):
    """Dims come from the features; a conflicting explicit dim is a user error, not a silent mismatch."""
    family = family or get_family("cace")
    dims = {"video_dim": fs.video_dim, "audio_dim": fs.audio_dim, "num_classes": fs.num_classes}
    for name, actual in dims.items():
        if name in overrides and overrides[name] != actual:
            raise UserError(f"model.{name}={overrides[name]} but the features give {actual} "
                            f"({fs.visual.path.name}: {list(fs.visual.shape)}, {fs.audio.path.name}: "
                            f"{list(fs.audio.shape)}); remove model.{name} to take it from the features")
    try:
        return family.make_config({**overrides, **dims})
    except (ValueError, TypeError) as e:
        raise UserError(f"{family.name} model config: {e}") from None


# ---- inference ----------------------------------------------------------------------------------------------------
@dataclass
class Predictions:
    labels: np.ndarray  # [n,T] predicted label (background = C)
    event_prob: np.ndarray  # [n,T]
    class_prob: np.ndarray  # [n] softmax probability of the video's predicted class
    targets: np.ndarray  # [n,T]


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _forward(model: torch.nn.Module, data: SplitData, batch_size: int, precision: str):
    """Yield (the model's output, targets [B, T]) batch by batch over a split, in eval mode, without gradients."""
    model.eval()
    dtype = model_dtype(model)
    for start in range(0, len(data), batch_size):
        v, a, y = data.batch(np.arange(start, min(start + batch_size, len(data))))
        with torch.no_grad(), autocast(data.device, precision):
            o = model(v.to(dtype), a.to(dtype))
        yield o, derive_targets(y).y_eval


@torch.no_grad()
def infer(model: torch.nn.Module, data: SplitData, batch_size: int, precision: str = "fp32",
          postprocessed: bool = True) -> Predictions:
    """Per-second decisions on a split; `postprocessed=False`: the raw decisions of families that post-process."""
    family = family_of(model)
    out = {"labels": [], "event_prob": [], "class_prob": [], "targets": []}
    for o, targets in _forward(model, data, batch_size, precision):
        p = family.predict(model, o, postprocessed)
        out["labels"].append(p.labels.cpu())
        out["event_prob"].append(p.event_prob.float().cpu())
        out["class_prob"].append(p.class_prob.float().cpu())
        out["targets"].append(targets.cpu())
    cat = {k: torch.cat(v).numpy() if v else np.zeros((0,)) for k, v in out.items()}
    return Predictions(**cat)


def write_predictions(path: Path, fs: FeatureSet, rows: np.ndarray, p: Predictions) -> None:
    names = [*fs.class_names, "background"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "video_id", "segment", "predicted", "predicted_name", "event_prob", "class_prob",
                    "target", "target_name", "correct"])
        for i, row in enumerate(rows):
            vid = fs.video_ids[row] if fs.video_ids else ""
            for t in range(p.labels.shape[1]):
                pred, tgt = int(p.labels[i, t]), int(p.targets[i, t])
                w.writerow([int(row), vid, t, pred, names[pred], f"{p.event_prob[i, t]:.4f}",
                            f"{p.class_prob[i]:.4f}", tgt, names[tgt], int(pred == tgt)])


# ---- checkpoints --------------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, model: torch.nn.Module, **info: Any) -> None:
    family = family_of(model)
    state = {"format": CHECKPOINT_FORMAT, "model": family.name, "state_dict": model.state_dict(),
             "model_config": model.cfg.to_dict(), "runtime_state": family.runtime_state(model), **info}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_model(path: Path, bece: bool | None = None) -> tuple[torch.nn.Module, dict]:
    """A localizer from our checkpoint (its model name and config are recorded), or a CACE-Net from the reference's
    (raw / wrapped state dict, 'module.' prefix).

    The reference evaluates with its contrastive switch on (spec §3.2), so a reference checkpoint gets
    bece_enabled=True unless `bece` (CACE only) says otherwise.
    """
    obj = load_torch_file(path, "checkpoint")
    fmt = obj.get("format") if isinstance(obj, dict) else None
    info = obj if fmt in (CHECKPOINT_FORMAT, CACE_CHECKPOINT_FORMAT) else {}
    name = info.get("model", "cace")
    if name not in list_localizers():
        raise UserError(f"{path}: a checkpoint of localizer {name!r}, which this version does not know (known: "
                        f"{', '.join(list_localizers())})")
    family = get_family(name)
    try:
        cfg = family.make_config(info["model_config"]) if info else family.foreign_config(obj)
        model = family.load_weights(family.build(cfg), obj)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: {e}") from None
    runtime = dict(info.get("runtime_state") or {})
    if fmt == CACE_CHECKPOINT_FORMAT:
        runtime["bece_enabled"] = info.get("bece_enabled", True)
    if bece is not None:
        runtime["bece_enabled"] = bece
    family.restore_runtime_state(model, runtime)
    return model, {**info, "model": name}


def check_compatible(model: torch.nn.Module, fs: FeatureSet, path: Path) -> None:
    cfg = model.cfg
    for name, have in (("video_dim", fs.video_dim), ("audio_dim", fs.audio_dim), ("num_classes", fs.num_classes)):
        if getattr(cfg, name) != have:
            raise UserError(f"{path}: the model has {name}={getattr(cfg, name)} but the features give {have}; "
                            f"evaluate it on features from the encoders it was trained on")


# ---- training -----------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    dir: Path
    key: str
    reused: bool
    metrics: dict


EpochCallback = Callable[[dict], None]


def train_model(fs: FeatureSet, cfg: TrainConfig, out_dir: Path, on_epoch: EpochCallback | None = None) -> dict:
    """Train one seed into `out_dir`, resuming from `out_dir/last.pt` if a previous run was cut off."""
    with flush_denormals(), heap_allocations():
        return _train_model(fs, cfg, out_dir, on_epoch)


class _TrainStep(torch.nn.Module):
    """forward(v, a, y) -> (loss, terms, the model's output detached): the training forward of a multi-process run,
    the module DDP wraps. DDP looks for parameters without a gradient from what forward returns; returning the
    loss (not the raw outputs, some of which a phase's loss leaves unused, e.g. CACE's q, k before BECE) lets it
    find them."""

    def __init__(self, model: torch.nn.Module, family: LocalizerFamily, options: dict, dtype: torch.dtype,
                 precision: str, device: torch.device):
        super().__init__()
        self.model, self.family, self.options = model, family, options
        self.dtype, self.precision, self.device = dtype, precision, device

    def forward(self, v: torch.Tensor, a: torch.Tensor, y: torch.Tensor):
        with autocast(self.device, self.precision):
            out = self.model(v.to(self.dtype), a.to(self.dtype))
        out = type(out)(*(t.to(self.dtype) for t in out))
        loss, terms = self.family.loss(self.model, out, y.to(self.dtype), self.options)
        return loss, terms, type(out)(*(t.detach() for t in out))


def _train_model(fs: FeatureSet, cfg: TrainConfig, out_dir: Path, on_epoch: EpochCallback | None) -> dict:
    device = distributed.local_device(resolve_device(cfg.device))
    world, main = distributed.world_size(), distributed.is_main()
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    precision = resolve_precision(cfg.precision, device)
    budget = int(cfg.memory_budget_gb * 2**30) if cfg.memory_budget_gb else None
    if world > 1:  # the ranks share the machine's memory
        budget = (budget if budget is not None else available_memory() // 2) // world
    stats = channel_stats(fs, fs.rows("train")) if cfg.standardize_features or cfg.inputs != "both" else None
    norm = stats if cfg.standardize_features else None
    noise = input_noise(fs, cfg.inputs, cfg.seed, stats)
    splits = {"train": fs.split("train", device, budget, norm, noise)}
    if main:  # evaluation runs on rank 0 only
        splits["test"] = fs.split("test", device, budget, norm, noise)
    if main and (cfg.select_on == "val" or "val" in fs.splits):
        splits["val"] = fs.split("val", device, budget, norm, noise)
    if len(splits["train"]) == 0:
        raise UserError("the train split is empty")
    if cfg.select_on == "val" and len(fs.rows("val")) == 0:
        raise UserError("the val split is empty: cannot select a checkpoint on it; use select_on=test (the "
                        "reference's protocol) and read its number as optimistic")

    seed_everything(cfg.seed)
    family = get_family(cfg.model)
    model = family.build(model_config(fs, cfg.model_args, family)).to(device=device, dtype=dtype)
    options = dump_config(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.milestones, gamma=cfg.lr_gamma)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    best = {"epoch": -1, "score": -1.0}
    start_epoch = 0
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if last_path.is_file():  # resume: a long run loses nothing already computed
        state = load_torch_file(last_path, "checkpoint")
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        shuffle.set_state(state["shuffle_rng"])
        torch.set_rng_state(state["torch_rng"])
        history, best, start_epoch = state["history"], state["best"], state["epoch"] + 1

    info = {"seed": cfg.seed, "parameters": family.parameter_count(model), "train_config": dump_config(cfg),
            "features": fs.digests,
            "feature_norm": norm.to_dict() if norm is not None else None,
            "inputs": cfg.inputs, "input_noise": noise.to_dict() if noise is not None else None,
            "classes": fs.class_names, "encoders": {"visual": _public_attrs(fs.visual.attrs),
                                                    "audio": _public_attrs(fs.audio.attrs)}}
    if world > 1:
        info["processes"] = world
        step = distributed.wrap(_TrainStep(model, family, options, dtype, precision, device), device,
                                find_unused_parameters=True)  # a phase may leave parameters out (BECE, staged)
    train = splits["train"]
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        family.begin_epoch(model, epoch, options)
        if world > 1:  # each rank its own dropout masks, the same whether resumed or not
            distributed.seed_rank(cfg.seed, epoch)
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        correct = total = 0
        perm = torch.randperm(len(train), generator=shuffle)
        for start in range(0, len(train), cfg.batch_size):
            if world > 1:  # this rank's share of the global batch
                rows = perm[start:start + cfg.batch_size]
                mine = distributed.shard(rows)
                weight = distributed.loss_weight(len(mine), len(rows))
                v, a, y = train.batch(mine if len(mine) else rows[:1])  # a stand-in row (weight 0): all ranks step
                loss, terms, out = step(v, a, y)
                n = len(mine)
            else:
                v, a, y = train.batch(perm[start:start + cfg.batch_size])
                with autocast(device, precision):
                    out = model(v.to(dtype), a.to(dtype))
                out = type(out)(*(t.to(dtype) for t in out))  # losses in full precision (tau = 0.01 needs it)
                loss, terms = family.loss(model, out, y.to(dtype), options)
                weight, n = None, len(y)
            optimizer.zero_grad(set_to_none=True)
            (loss if weight is None else loss * weight).backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            for k, val in {"loss": loss, **terms}.items():
                sums[k] = sums.get(k, 0.0) + float(val.detach()) * n
            if n:
                pred = family.predict(model, out, postprocessed=False).labels
                correct += int((pred == derive_targets(y).y_eval).sum())
                total += pred.numel()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        train_s = time.perf_counter() - t0
        if world > 1:  # the epoch's sums over all ranks; then rank 0 evaluates and writes, the others wait
            names = list(sums)
            reduced = distributed.sum_all([sums[k] for k in names] + [correct, total])
            sums, correct, total = dict(zip(names, reduced)), int(round(reduced[-2])), int(round(reduced[-1]))
            if not main:
                distributed.barrier()
                continue
        t1 = time.perf_counter()
        accs = {name: segment_accuracy(p.labels, p.targets)
                for name, p in ((s, infer(model, splits[s], cfg.eval_batch_size, precision)) for s in splits
                                if s != "train")}
        record = {"epoch": epoch, "lr": lr, **family.epoch_flags(model),
                  **{k: v / len(train) for k, v in sums.items()}, "train_acc": 100 * correct / max(total, 1),
                  **{f"{s}_acc": acc for s, acc in accs.items()}, "train_s": train_s,
                  "eval_s": time.perf_counter() - t1}
        history.append(record)
        score = accs[cfg.select_on]
        # Ties: on val (small, often saturated at 100 %) the later, more converged epoch wins; on test the
        # earlier one, as the reference's strict `>` did (its protocol is reproduced exactly).
        if score > best["score"] or (score == best["score"] and cfg.select_on == "val"):
            best = {"epoch": epoch, "score": score}
            save_checkpoint(best_path, model, epoch=epoch, metrics=record, **info)
        save_checkpoint(last_path, model, epoch=epoch, metrics=record, optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), shuffle_rng=shuffle.get_state(),
                        torch_rng=torch.get_rng_state(), history=history, best=best, **info)
        _write_history(out_dir / "metrics.csv", history)
        if on_epoch:
            on_epoch(record)
        distributed.barrier()

    if not main:
        return {}
    best_model, best_info = load_model(best_path)
    best_model.to(device=device, dtype=dtype)
    tuned = None
    if "val" in splits and len(splits["val"]):  # choices a family makes on validation (never on test)
        outputs = [(type(o)(*(t.float() for t in o)), y)
                   for o, y in _forward(best_model, splits["val"], cfg.eval_batch_size, precision)]
        tuned = family.tune_on_val(best_model, outputs)
        if tuned is not None:  # the checkpoint carries the chosen setting, so evaluate and predict use it
            save_checkpoint(best_path, best_model, **{k: v for k, v in best_info.items()
                                                      if k not in ("format", "model", "state_dict", "model_config",
                                                                   "runtime_state")}, tuned_on_val=tuned)
    test_pred = infer(best_model, splits["test"], cfg.eval_batch_size, precision)
    write_predictions(out_dir / "predictions_test.csv", fs, splits["test"].rows, test_pred)
    test_metrics = localization_metrics(test_pred.labels, test_pred.targets, fs.num_classes, fs.class_names)
    by_test = max(history, key=lambda r: r["test_acc"])
    extra = {}
    if family.has_postprocess:  # post-processing reported on and off, for the same checkpoint
        raw = infer(best_model, splits["test"], cfg.eval_batch_size, precision, postprocessed=False)
        raw_metrics = localization_metrics(raw.labels, raw.targets, fs.num_classes, fs.class_names)
        extra = {"postprocess": best_model.cfg.postprocess.enabled,
                 "test_accuracy_without_postprocess": raw_metrics["accuracy"],
                 "test_event_f1_without_postprocess": raw_metrics["event"]["f1"]}
    if tuned is not None:
        extra["tuned_on_val"] = tuned
    summary = {
        "model": family.name,
        "parameters": info["parameters"],
        "selected_on": cfg.select_on,
        "best_epoch": best["epoch"],
        "selection_accuracy": best["score"],
        "test_accuracy": test_metrics["accuracy"],
        "test_event_f1": test_metrics["event"]["f1"],
        **extra,
        "test_accuracy_label": ("test accuracy of the val-selected checkpoint" if cfg.select_on == "val" else
                                "best-on-test accuracy (reference protocol: selected on test, optimistic)"),
        "best_on_test_accuracy": by_test["test_acc"],
        "best_on_test_epoch": by_test["epoch"],
        "last_epoch_test_accuracy": history[-1]["test_acc"],
        "all_background_accuracy": test_metrics["all_background_accuracy"],
        "seed": cfg.seed,
        "inputs": cfg.inputs,
        "epochs": cfg.epochs,
        "train_s_per_epoch": float(np.mean([r["train_s"] for r in history])),
        "eval_s_per_pass": float(np.mean([r["eval_s"] for r in history])) / max(len(splits) - 1, 1),
        "device": str(device),
        "precision": precision,
        **({"processes": world} if world > 1 else {}),
        "test": test_metrics,
        "notes": fs.notes,
    }
    write_json_atomic(out_dir / "metrics.json", summary)
    _pictures("training_curves_png", out_dir / "metrics.csv", out_dir / "curves.png")
    return summary


def _pictures(name: str, *args: Any) -> None:
    """Call pipeline.ave.plots.<name>(*args). Pictures are a by-product: a plotting problem is a warning, never a failed
    (finished) training or evaluation. Imported here: matplotlib costs nothing to those who never plot."""
    try:
        from pipeline.ave import plots

        getattr(plots, name)(*args)
    except Exception as e:  # noqa: BLE001  (matplotlib can raise many types)
        import warnings

        warnings.warn(f"could not draw a picture: {type(e).__name__}: {e}", stacklevel=2)


def _public_attrs(attrs: dict) -> dict:
    return {k: v for k, v in attrs.items() if not k.startswith("_")}


def _write_history(path: Path, history: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        for r in history:
            w.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()})


def stage_key_fields(cfg: TrainConfig, nproc: int = 1) -> dict:
    """The config part of the stage key: the config's fields, plus the number of processes when there are several
    (one process's keys are those of before multi-process runs existed)."""
    return {**cfg.key_fields(), **({"processes": nproc} if nproc > 1 else {})}


def _train_worker(fs: FeatureSet, cfg: TrainConfig, out_dir: Path, on_epoch: EpochCallback | None) -> dict:
    """One rank of a multi-process training (started by `distributed.launch`); rank 0 reports the epochs."""
    return train_model(fs, cfg, out_dir, on_epoch if distributed.is_main() else None)


def print_epoch(record: dict) -> None:
    """The per-epoch line of a multi-process run (a callback that can travel to the rank-0 process)."""
    accs = " ".join(f"{s} {record[f'{s}_acc']:.2f} %" for s in ("val", "test") if f"{s}_acc" in record)
    print(f"train epoch {record['epoch'] + 1}: loss {record['loss']:.4f} {accs} ({record['train_s']:.1f} s)",
          flush=True)


def train_stage(fs: FeatureSet, cfg: TrainConfig, root: Path, *, force: bool = False,
                on_epoch: EpochCallback | None = None, nproc: int = 1) -> TrainResult:
    """The `train` stage in the artifact store: reused when the same config and features were trained before.

    `nproc` > 1: that many processes (DDP, `pipeline.distributed`); this process keeps the store and the lock and
    waits for them. `on_epoch` then runs in rank 0's process: a callback that cannot be pickled there (a closure)
    is replaced by `print_epoch`."""
    with ArtifactStore(root).stage(STAGE, VERSION, stage_key_fields(cfg, nproc), fs.digests, force=force) as run:
        if run.reused:
            return TrainResult(run.dir, run.manifest.key, True, run.manifest.metrics)
        run.manifest.warnings = list(fs.notes)
        if nproc > 1:
            callback = distributed.picklable(on_epoch, print_epoch)
            summary = distributed.launch(_train_worker, (fs, cfg, run.dir, callback), nproc,
                                         resolve_device(cfg.device))
        else:
            summary = train_model(fs, cfg, run.dir, on_epoch)
        for name, rel in (("best", "best.pt"), ("last", "last.pt"), ("metrics_csv", "metrics.csv"),
                          ("metrics", "metrics.json"), ("predictions_test", "predictions_test.csv")):
            run.add_output(name, rel, sha256=rel.endswith(".pt"))
        if (run.dir / "curves.png").is_file():
            run.add_output("curves", "curves.png")
        run.manifest.metrics = {k: v for k, v in summary.items() if k not in ("test", "notes")}
        run.manifest.timings.update(train_s_per_epoch=summary["train_s_per_epoch"],
                                    eval_s_per_pass=summary["eval_s_per_pass"])
    return TrainResult(run.dir, run.manifest.key, False, run.manifest.metrics)


def train_seeds(fs: FeatureSet, cfg: TrainConfig, seeds: list[int], root: Path, **kw) -> tuple[list[TrainResult], dict]:
    """One run per seed (each its own stage key), and the mean/std of what each reports."""
    results = [train_stage(fs, cfg.model_copy(update={"seed": s}), root, **kw) for s in seeds]
    accs = np.array([r.metrics["test_accuracy"] for r in results])
    return results, {"seeds": seeds, "test_accuracy_mean": float(accs.mean()),
                     "test_accuracy_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
                     "label": results[0].metrics["test_accuracy_label"]}


# ---- evaluation ---------------------------------------------------------------------------------------------------
def evaluate(checkpoint: Path, fs: FeatureSet, split: str = "test", *, device: str = "auto",
             dtype: str = "float32", precision: str = "auto", batch_size: int = 64, bece: bool | None = None,
             out_dir: Path | None = None) -> dict:
    """Metrics of a checkpoint (ours or the reference's) on one split; writes predictions when out_dir is given."""
    dev = resolve_device(device)
    model, info = load_model(checkpoint, bece)
    check_compatible(model, fs, checkpoint)
    model.to(device=dev, dtype=torch.float64 if dtype == "float64" else torch.float32)
    data = fs.split(split, dev, norm=FeatureNorm.from_dict(info.get("feature_norm")),
                    noise=InputNoise.from_dict(info.get("input_noise")))  # a control sees what it trained on
    t0 = time.perf_counter()
    used = resolve_precision(precision, dev)
    p = infer(model, data, batch_size, used)
    metrics = localization_metrics(p.labels, p.targets, fs.num_classes, fs.class_names)
    metrics["model"] = info["model"]
    if family_of(model).has_postprocess:
        raw = infer(model, data, batch_size, used, postprocessed=False)
        metrics["postprocess"] = model.cfg.postprocess.enabled
        metrics["accuracy_without_postprocess"] = segment_accuracy(raw.labels, raw.targets)
    metrics.update(split=split, precision=used, eval_s=time.perf_counter() - t0, checkpoint=str(checkpoint),
                   checkpoint_epoch=info.get("epoch"), notes=fs.notes)
    if out_dir is not None:
        write_predictions(Path(out_dir) / f"predictions_{split}.csv", fs, data.rows, p)
        write_json_atomic(Path(out_dir) / f"metrics_{split}.json", metrics)
        _pictures("evaluation_pictures", metrics, Path(out_dir), split)
    return metrics


def evaluate_stage(checkpoint: Path, fs: FeatureSet, root: Path, split: str = "test", *, force: bool = False,
                   **kw) -> TrainResult:
    # the precision that runs enters the key (auto resolved on this device), the device itself does not
    kw["precision"] = resolve_precision(kw.get("precision", "auto"), resolve_device(kw.get("device", "auto")))
    config = {"split": split, **{k: v for k, v in kw.items() if k != "device"}}
    inputs = {"checkpoint": file_sha256(checkpoint), **fs.digests}
    with ArtifactStore(root).stage("evaluate", VERSION, config, inputs, force=force) as run:
        if run.reused:
            return TrainResult(run.dir, run.manifest.key, True, run.manifest.metrics)
        metrics = evaluate(checkpoint, fs, split, out_dir=run.dir, **kw)
        run.add_output("metrics", f"metrics_{split}.json")
        run.add_output("predictions", f"predictions_{split}.csv")
        for name, rel in (("confusion", f"confusion_{split}.png"), ("per_class", f"per_class_{split}.png"),
                          ("report", f"report_{split}.md")):
            if (run.dir / rel).is_file():
                run.add_output(name, rel)
        run.manifest.metrics = {k: metrics[k] for k in ("model", "accuracy", "correct_segments", "segments",
                                                        "all_background_accuracy", "event", "background",
                                                        "postprocess", "accuracy_without_postprocess")
                                if k in metrics}
        run.manifest.warnings = list(fs.notes)
    return TrainResult(run.dir, run.manifest.key, False, run.manifest.metrics)
