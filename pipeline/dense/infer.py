"""Inference of a dense detector on whole videos: pad each video to the model's inference length (so videos of any
length run, the position embedding interpolated past `max_seq_len`), run it, and post-process each video's pyramid
into events in seconds (`postprocess.py`: decoding, per-class Soft-NMS, top-k, clamping to the duration).

One video at a time: the results then do not depend on which videos share a batch, and memory is bounded by the
longest video, not the split.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from models.dense.unav import DenseDetector
from pipeline.dense.data import DenseVideoData
from pipeline.dense.evaluate import Prediction
from pipeline.dense.postprocess import Level, PostprocessConfig, postprocess_video
from pipeline.extraction.grids import TimeGrid
from pipeline.runtime import autocast


@torch.no_grad()
def video_levels(model: DenseDetector, visual: np.ndarray, audio: np.ndarray, precision: str = "fp32"
                 ) -> list[Level]:
    """One video's [T, D] features -> per-level class probabilities and offsets (real points only)."""
    t = visual.shape[0]
    length = model.padded_length(t)
    device = model.pe.device
    v = torch.zeros(1, visual.shape[1], length, device=device)
    a = torch.zeros(1, audio.shape[1], length, device=device)
    v[0, :, :t] = torch.from_numpy(visual.T).to(device)
    a[0, :, :t] = torch.from_numpy(audio.T).to(device)
    mask = torch.zeros(1, 1, length, dtype=torch.bool, device=device)
    mask[..., :t] = True
    with autocast(device, precision):
        out = model(v, a, mask)
    levels = []
    for level, (logits, offsets, m) in enumerate(zip(out.logits, out.offsets, out.masks)):
        probs = torch.sigmoid(logits[0].float()) * m[0, :, None]
        levels.append(Level(probs.cpu(), offsets[0].float().cpu(), 2 ** level, int(m[0].sum())))
    return levels


def predict_videos(model: DenseDetector, videos: list[DenseVideoData], grid: TimeGrid,
                   cfg: PostprocessConfig = PostprocessConfig(), precision: str = "fp32",
                   progress: Callable[[int, int], None] | None = None) -> list[Prediction]:
    """Every video's events, as evaluator predictions (seconds, label id, score)."""
    was_training = model.training
    model.eval()
    preds: list[Prediction] = []
    try:
        for n, video in enumerate(videos, 1):
            for e in postprocess_video(video_levels(model, video.visual, video.audio, precision), grid,
                                       video.duration, cfg):
                preds.append(Prediction(video.id, e["segment"][0], e["segment"][1], e["label_id"], e["score"]))
            if progress:
                progress(n, len(videos))
    finally:
        model.train(was_training)
    return preds


def results_json(preds: list[Prediction], class_names: list[str]) -> dict:
    """Predictions in the results layout the evaluator reads (`avel dense evaluate --predictions`)."""
    out: dict[str, list] = {}
    for p in preds:
        out.setdefault(p.video, []).append({"segment": [p.start, p.end], "label": class_names[p.label_id],
                                            "label_id": p.label_id, "score": p.score})
    return {"results": out}
