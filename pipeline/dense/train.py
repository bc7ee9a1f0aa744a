"""Training and evaluation of the dense detector (the `dense_train` and `dense_evaluate` stages).

The UnAV recipe by default (`shared/reference/dense-avel-spec.md` §5): AdamW (lr 1e-4, weight decay 1e-4 on conv and
linear weights only), linear warm-up over 5 epochs then cosine to 1e-8 per iteration (45 epochs), batch 16 with
drop_last, gradient-norm clip 1.0, EMA of the whole model (0.999) after every step; every epoch the non-EMA model
is scored on validation (average mAP over tIoU 0.1:0.9) and the best epoch saved with both weights; the test split
is scored once, at the end, with the best epoch's EMA weights. LoCo adds lambda * L_LCF (lambda 0.1) when `lcf` is on.

Short CPU runs change two numbers, said where they are set (the demo's config): a higher lr and an EMA decay that
fits a few hundred steps (0.999 over 225 steps would leave 80 % of the initial weights in the EMA).

`inputs` "audio" or "visual" trains and scores a single-modality control (`pipeline.controls`): the other modality
replaced by noise of its train-split statistics in every split; "both" (the default) leaves the stage key as it was.

A run writes best.pt / last.pt (atomic; last.pt carries optimizer, schedule, EMA, normaliser and RNG states, so a
killed run resumes where it stopped), metrics.csv per epoch, metrics.json, predictions_test.json, curves.png.
"""

from __future__ import annotations

import copy
import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from models.dense.targets import LossNormalizer, detector_loss, make_points
from models.dense.unav import DenseDetector, DenseModelConfig, cpu_config
from pipeline.config import StageConfig, dump_config
from pipeline.dense.data import DenseFeatures, FeatureStats, ModalityControl, training_batch
from pipeline.dense.evaluate import evaluate
from pipeline.dense.infer import predict_videos, results_json
from pipeline.errors import UserError
from pipeline.runtime import autocast, load_torch_file, resolve_device, resolve_precision, seed_everything
from pipeline.store import ArtifactStore, atomic_path, file_sha256, write_json_atomic

STAGE, VERSION = "dense_train", "1"
CHECKPOINT_FORMAT = "avel-dense/1"
EpochCallback = Callable[[dict], None]


class DenseTrainConfig(StageConfig):
    size: Literal["paper", "cpu"] = "paper"  # the model's widths: UnAV's (512) or spec §8's small CPU size (64)
    model_args: dict[str, Any] = {}  # DenseModelConfig overrides: lcf, lac, embd_dim, arch, ...
    epochs: int = Field(45, ge=1)
    warmup_epochs: int = Field(5, ge=0)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    clip_grad: float | None = 1.0
    ema_decay: float = Field(0.999, ge=0, lt=1)
    lcf_weight: float = Field(0.1, ge=0)
    crop_ratio: tuple[float, float] = (0.9, 1.0)
    trunc_thresh: float = Field(0.5, ge=0, le=1)
    standardize_features: bool = False
    # what the detector sees: both modalities, or one with the other replaced by matched noise (a control)
    inputs: Literal["both", "audio", "visual"] = "both"
    # which weights of the best epoch score the test split: its EMA (UnAV's eval.py), the trained ones, or
    # whichever of the two scores higher on validation
    test_weights: Literal["ema", "model", "val"] = "ema"
    seed: int = 1234567891
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    def key_fields(self) -> dict:
        """`inputs` enters the key only for a control: keys of joint runs are those of before it existed."""
        fields = super().key_fields()
        if fields.get("inputs") == "both":
            fields.pop("inputs")
        return fields

    @field_validator("model_args")
    @classmethod
    def _known_fields(cls, value: dict) -> dict:
        known = set(DenseModelConfig.__dataclass_fields__) - {"visual_dim", "audio_dim", "num_classes"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown dense model field(s) {unknown}; known: {', '.join(sorted(known))}")
        return value

    def detector_config(self, fs: DenseFeatures, absent: list[int]) -> DenseModelConfig:
        dv, da = fs.dims()
        dims = {"visual_dim": dv, "audio_dim": da, "num_classes": fs.num_classes, "absent_classes": absent}
        try:
            return cpu_config(**self.model_args, **dims) if self.size == "cpu" else \
                DenseModelConfig(**self.model_args, **dims)
        except (ValueError, TypeError) as e:
            raise UserError(f"dense model config: {e}") from None


class EMA:
    """An exponential moving average of the whole state dict (float entries averaged, the rest copied)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model, self.decay = copy.deepcopy(model).eval(), decay
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for (_, e), (_, m) in zip(self.model.state_dict().items(), model.state_dict().items()):
            if e.dtype.is_floating_point:
                e.mul_(self.decay).add_(m.detach(), alpha=1 - self.decay)
            else:
                e.copy_(m)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay conv and linear weights only (not biases, norms, per-level scales, LayerScale, LCF's kappa/mu)."""
    decay, rest = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            (decay if name == "weight" and isinstance(module, (torch.nn.Conv1d, torch.nn.Linear)) else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def lr_factor(step: int, warmup: int, total: int, lr: float, eta_min: float = 1e-8) -> float:
    """Linear warm-up from 0 over `warmup` steps, then cosine to eta_min at `total` (a factor of lr)."""
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return (eta_min + (lr - eta_min) * 0.5 * (1 + math.cos(math.pi * progress))) / lr


def save_checkpoint(path: Path, model: DenseDetector, ema: EMA | None, **info: Any) -> None:
    state = {"format": CHECKPOINT_FORMAT, "model_config": model.cfg.to_dict(), "state_dict": model.state_dict(),
             "ema_state_dict": ema.model.state_dict() if ema is not None else None, **info}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_detector(path: Path, weights: str | None = None) -> tuple[DenseDetector, dict]:
    """A detector from our checkpoint with its EMA weights ("ema", as the reference evaluates) or the trained ones
    ("model"); None: the ones its training scored the test split with (`test_weights`, recorded in best.pt)."""
    obj = load_torch_file(path, "checkpoint")
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a dense detector checkpoint (format {CHECKPOINT_FORMAT}); `avel dense train` "
                        f"writes them")
    weights = weights or obj.get("chosen_weights") or "ema"
    if weights not in ("ema", "model"):
        raise UserError(f"weights {weights!r}: ema or model")
    model = DenseDetector(DenseModelConfig.from_dict(obj["model_config"]))
    state = obj["ema_state_dict"] if weights == "ema" and obj.get("ema_state_dict") is not None else obj["state_dict"]
    model.load_state_dict(state)
    return model.eval(), obj


def check_compatible(model: DenseDetector, fs: DenseFeatures, path: Path) -> None:
    dv, da = fs.dims()
    have = {"visual_dim": dv, "audio_dim": da, "num_classes": fs.num_classes}
    for name, value in have.items():
        if getattr(model.cfg, name) != value:
            raise UserError(f"{path}: the model has {name}={getattr(model.cfg, name)} but {fs.folder} and "
                            f"{fs.dataset.path.name} give {value}; use the features it was trained on")


def _history_csv(path: Path, history: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        for r in history:
            w.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()})


def train_detector(fs: DenseFeatures, cfg: DenseTrainConfig, out_dir: Path,
                   on_epoch: EpochCallback | None = None) -> dict:
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    train_raw = fs.split("train")
    if not train_raw:
        raise UserError(f"{fs.dataset.path}: the train split is empty")
    control = ModalityControl.of(cfg.inputs, train_raw, cfg.seed)
    if control is not None:
        train_raw = [control.apply(v) for v in train_raw]
    stats = FeatureStats.of(train_raw) if cfg.standardize_features else None
    train = [stats.apply(v) for v in train_raw] if stats else train_raw
    val, test = fs.split("validation", stats, control), fs.split("test", stats, control)
    if not val:
        raise UserError(f"{fs.dataset.path}: the validation split is empty: the best epoch is chosen on it")
    seen = {int(c) for v in train for c in v.labels}
    absent = [c for c in range(fs.num_classes) if c not in seen]

    seed_everything(cfg.seed)
    model = DenseDetector(cfg.detector_config(fs, absent)).to(device)
    ema = EMA(model, cfg.ema_decay)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr)
    iters = len(train) // cfg.batch_size if len(train) >= cfg.batch_size else 1  # drop_last, but never 0 steps
    total, warmup = cfg.epochs * iters, cfg.warmup_epochs * iters
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total, cfg.lr))
    points = make_points(model.cfg.max_seq_len, model.cfg.regression_ranges)
    normalizer = LossNormalizer()
    rng = np.random.default_rng(cfg.seed)
    history: list[dict] = []
    best = {"epoch": -1, "val_avg_map": -1.0}
    start_epoch = 0
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if last_path.is_file():  # resume: nothing already computed is lost
        state = load_torch_file(last_path, "checkpoint")
        model.load_state_dict(state["state_dict"])
        ema.model.load_state_dict(state["ema_state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        normalizer.value = state["normalizer"]
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        history, best, start_epoch = state["history"], state["best"], state["epoch"] + 1
    info = {"train_config": dump_config(cfg), "classes": fs.class_names, "grid": {"window_s": fs.grid.window_s,
            "stride_s": fs.grid.stride_s}, "feature_layout": fs.layout, "feature_stats": stats.to_dict() if stats
            else None, "input_control": control.to_dict() if control else None,
            "parameters": sum(p.numel() for p in model.parameters())}

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "cls_loss": 0.0, "reg_loss": 0.0, **({"lcf_loss": 0.0} if model.cfg.lcf else {})}
        order = rng.permutation(len(train))
        for it in range(iters):
            batch = training_batch([train[i] for i in order[it * cfg.batch_size:(it + 1) * cfg.batch_size]],
                                   model.cfg.max_seq_len, points, model.cfg.num_classes, rng, cfg.crop_ratio,
                                   cfg.trunc_thresh)
            with autocast(device, precision):
                out = model(batch.visual.to(device), batch.audio.to(device), batch.mask.to(device))
            valid = torch.cat(out.masks, dim=1)
            cls_t, reg_t = batch.cls_targets.to(device), batch.reg_targets.to(device)
            n = normalizer.update(int((valid & (cls_t.sum(-1) > 0)).sum()))
            cls_loss, reg_loss = detector_loss(torch.cat(out.logits, 1).float(), torch.cat(out.offsets, 1).float(),
                                               valid, cls_t, reg_t, n)
            loss = cls_loss + reg_loss
            if out.lcf_loss is not None:
                loss = loss + cfg.lcf_weight * out.lcf_loss.float()
                sums["lcf_loss"] += float(out.lcf_loss.detach()) / iters
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            schedule.step()
            ema.update(model)
            for k, v in (("loss", loss), ("cls_loss", cls_loss), ("reg_loss", reg_loss)):
                sums[k] += float(v.detach()) / iters
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        val_map = evaluate(fs.dataset, predict_videos(model, val, fs.grid, precision=precision), "validation")
        record = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], **sums,
                  "val_avg_map": val_map["average_mAP"], "val_map_0.5": val_map["mAP"]["0.5"],
                  "train_s": train_s, "eval_s": time.perf_counter() - t1}
        history.append(record)
        if record["val_avg_map"] > best["val_avg_map"]:
            best = {"epoch": epoch, "val_avg_map": record["val_avg_map"]}
            save_checkpoint(best_path, model, ema, epoch=epoch, metrics=record, **info)
        save_checkpoint(last_path, model, ema, epoch=epoch, metrics=record, optimizer=optimizer.state_dict(),
                        schedule=schedule.state_dict(), normalizer=normalizer.value,
                        numpy_rng=rng.bit_generator.state, torch_rng=torch.get_rng_state(), history=history,
                        best=best, **info)
        _history_csv(out_dir / "metrics.csv", history)
        if on_epoch:
            on_epoch(record)

    chosen, val_by_weights = cfg.test_weights, {}
    if chosen == "val":  # a choice made on validation, never on test
        for w in ("ema", "model"):
            m, _ = load_detector(best_path, w)
            val_by_weights[w] = evaluate(fs.dataset, predict_videos(m.to(device), val, fs.grid, precision=precision),
                                         "validation")["average_mAP"]
        chosen = max(val_by_weights, key=lambda w: (val_by_weights[w], w == "ema"))  # ties: the EMA
    best_model, best_info = load_detector(best_path, chosen)
    best_model.to(device)
    if best_info.get("chosen_weights") != chosen:  # evaluate and predict then use the weights test was scored with
        best_info["chosen_weights"] = chosen
        with atomic_path(best_path) as tmp:
            torch.save(best_info, tmp)
    preds = predict_videos(best_model, test, fs.grid, precision=precision) if test else []
    write_json_atomic(out_dir / "predictions_test.json", results_json(preds, fs.class_names))
    test_metrics = evaluate(fs.dataset, preds, "test") if test else None
    summary = {
        "parameters": info["parameters"],
        "lcf": model.cfg.lcf, "lac": model.cfg.lac, "inputs": cfg.inputs,
        "best_epoch": best["epoch"],
        "val_avg_map": best["val_avg_map"],
        "test_weights": chosen,
        "val_avg_map_by_weights": val_by_weights or None,
        "test_avg_map": test_metrics["average_mAP"] if test_metrics else None,
        "test_avg_map_0.5:0.9": test_metrics["average_mAP_0.5:0.9"] if test_metrics else None,
        "test_map": test_metrics["mAP"] if test_metrics else None,
        "test_label": "test average mAP of the val-selected epoch's "
                      f"{'EMA' if chosen == 'ema' else 'trained'} weights"
                      + (" (chosen on validation)" if cfg.test_weights == "val" else ""),
        "seed": cfg.seed, "epochs": cfg.epochs, "device": str(device), "precision": precision,
        "train_s_per_epoch": float(np.mean([r["train_s"] for r in history])),
        "eval_s_per_pass": float(np.mean([r["eval_s"] for r in history])),
        "test": test_metrics,
    }
    write_json_atomic(out_dir / "metrics.json", summary)
    try:  # a picture is a by-product: a plotting problem never fails a finished training
        from pipeline.dense.plots import curves_png

        curves_png(history, out_dir / "curves.png")
    except Exception as e:  # noqa: BLE001
        import warnings

        warnings.warn(f"could not draw the training curves: {type(e).__name__}: {e}", stacklevel=2)
    return summary


@dataclass
class DenseStageResult:
    dir: Path
    key: str
    reused: bool
    metrics: dict


def train_stage(fs: DenseFeatures, cfg: DenseTrainConfig, root: Path, *, force: bool = False,
                on_epoch: EpochCallback | None = None, warnings: list[str] | None = None) -> DenseStageResult:
    """The `dense_train` stage: reused when this config was trained on these features before."""
    with ArtifactStore(root).stage(STAGE, VERSION, cfg.key_fields(), {"features": fs.digest()}, force=force) as run:
        if run.reused:
            return DenseStageResult(run.dir, run.manifest.key, True, run.manifest.metrics)
        run.manifest.warnings = sorted(set(warnings or []) | set(fs.notes))
        run.save()
        summary = train_detector(fs, cfg, run.dir, on_epoch)
        for name, rel in (("best", "best.pt"), ("last", "last.pt"), ("metrics_csv", "metrics.csv"),
                          ("metrics", "metrics.json"), ("predictions_test", "predictions_test.json")):
            run.add_output(name, rel, sha256=rel.endswith(".pt"))
        if (run.dir / "curves.png").is_file():
            run.add_output("curves", "curves.png")
        run.manifest.metrics = {k: v for k, v in summary.items() if k != "test"}
        run.manifest.timings.update(train_s_per_epoch=summary["train_s_per_epoch"])
    return DenseStageResult(run.dir, run.manifest.key, False, run.manifest.metrics)


def evaluate_checkpoint(checkpoint: Path, fs: DenseFeatures, split: str = "test", *, weights: str | None = None,
                        device: str = "auto", precision: str = "auto", out_dir: Path | None = None,
                        progress: Callable[[int, int], None] | None = None) -> dict:
    """mAP of a checkpoint on one split; writes predictions and metrics when out_dir is given."""
    dev = resolve_device(device)
    model, info = load_detector(checkpoint, weights)
    check_compatible(model, fs, checkpoint)
    model.to(dev)
    videos = fs.split(split, FeatureStats.from_dict(info.get("feature_stats")),
                      ModalityControl.from_dict(info.get("input_control")))
    t0 = time.perf_counter()
    preds = predict_videos(model, videos, fs.grid, precision=resolve_precision(precision, dev), progress=progress)
    metrics = evaluate(fs.dataset, preds, split)
    metrics.update(checkpoint=str(checkpoint), checkpoint_epoch=info.get("epoch"),
                   weights=weights or info.get("chosen_weights") or "ema",
                   eval_s=round(time.perf_counter() - t0, 3))
    if out_dir is not None:
        write_json_atomic(Path(out_dir) / f"predictions_{metrics['split']}.json", results_json(preds, fs.class_names))
        write_json_atomic(Path(out_dir) / f"metrics_{metrics['split']}.json", metrics)
    return metrics


def evaluate_stage(checkpoint: Path, fs: DenseFeatures, root: Path, split: str = "test", *, force: bool = False,
                   **kw) -> DenseStageResult:
    config = {"split": split, **{k: v for k, v in kw.items() if k != "device"}}
    inputs = {"checkpoint": file_sha256(checkpoint), "features": fs.digest()}
    with ArtifactStore(root).stage("dense_evaluate", VERSION, config, inputs, force=force) as run:
        if run.reused:
            return DenseStageResult(run.dir, run.manifest.key, True, run.manifest.metrics)
        metrics = evaluate_checkpoint(checkpoint, fs, split, out_dir=run.dir, **kw)
        run.add_output("metrics", f"metrics_{metrics['split']}.json")
        run.add_output("predictions", f"predictions_{metrics['split']}.json")
        run.manifest.metrics = {k: metrics[k] for k in ("split", "mAP", "average_mAP", "average_mAP_0.5:0.9",
                                                        "videos", "predictions")}
    return DenseStageResult(run.dir, run.manifest.key, False, run.manifest.metrics)
