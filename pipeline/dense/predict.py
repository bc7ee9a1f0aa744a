"""`avel dense predict`: events in a person's own untrimmed videos, of any length, with a trained dense detector.

For each video: the features the detector was trained on are computed again (the extraction config travels in the
checkpoint: grid, frames per window, crop, the encoders' weights), the detector runs on the whole video, and
post-processing gives events in seconds. Written per video: `<name>.json` (start, end, class, score of every event)
and `<name>_timeline.png` (overlapping events in lanes, the ground truth above them when an annotation file knows
the video). A video that cannot be read is reported and skipped; the others go on.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from pipeline.dense.data import DenseVideoData, FeatureStats
from pipeline.dense.extract import SUFFIXES, DenseExtractConfig, make_encoders
from pipeline.dense.features import LAYOUT_FILE, load_video_features
from pipeline.dense.infer import video_levels
from pipeline.dense.postprocess import postprocess_video
from pipeline.dense.train import load_detector
from pipeline.errors import UserError
from pipeline.extraction.engine import FolderWriter, run_videos
from pipeline.extraction.grids import TimeGrid, WindowGrid
from pipeline.runtime import default_threads, resolve_device, resolve_precision
from pipeline.store import write_json_atomic


def extraction_config(info: dict, checkpoint: Path, overrides: dict) -> DenseExtractConfig:
    """How the detector's training features were made, from its checkpoint (weights paths may be overridden)."""
    layout = info.get("feature_layout") or {}
    recorded = layout.get("extract_config")
    if not recorded:
        raise UserError(f"{checkpoint}: this detector was trained on features this project did not extract (e.g. "
                        f"UnAV-100's released I3D + VGGish files), so it cannot compute them for a new video; "
                        f"train on features from `avel dense extract` to predict on raw videos")
    return DenseExtractConfig.model_validate({**recorded, **{k: v for k, v in overrides.items() if v is not None}})


def predict_files(videos: list[Path], checkpoint: Path, out_dir: Path, *, ground_truth: dict | None = None,
                  min_score: float = 0.05, device: str = "auto", resnet_weights: Path | None = None,
                  cnn14_weights: Path | None = None, keep_features: bool = False,
                  progress: Callable[[int, int, str], None] | None = None) -> list[dict]:
    """One result dict per video (also written as JSON + timeline PNG into out_dir). `ground_truth`: video id ->
    list of {"segment", "label_id"} to draw above the predictions. `keep_features`: also keep each video's feature
    files in out_dir/features/."""
    from pipeline.dense.plots import timeline_png

    model, info = load_detector(checkpoint)
    cfg = extraction_config(info, checkpoint, {"resnet_weights": resnet_weights, "cnn14_weights": cnn14_weights,
                                               "device": device})
    dev = resolve_device(device)
    model.to(dev)
    precision = resolve_precision(cfg.precision, dev)
    grid = TimeGrid(**info["grid"])
    stats = FeatureStats.from_dict(info.get("feature_stats"))
    classes = info["classes"]
    built = make_encoders(cfg)
    window_grid = WindowGrid(grid, cfg.frames_per_window, cfg.chunk_windows)
    threads = {m: cfg.threads or default_threads() for m in built}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="avel-dense-predict-") as tmp:
        if keep_features:
            tmp = out_dir / "features"
            tmp.mkdir(exist_ok=True)
        write_json_atomic(Path(tmp) / LAYOUT_FILE, {"visual": [SUFFIXES["visual"]], "audio": [SUFFIXES["audio"]]})
        for n, path in enumerate(videos, 1):
            vid = path.stem
            writer = FolderWriter(Path(tmp), [vid], SUFFIXES)
            run_videos([(vid, path)], window_grid, built, [writer], threads=threads)
            record = writer.items[vid]
            error = next((e for e in record["errors"].values() if e is not None), None)
            if error is not None:
                results.append({"video": str(path), "error": error})
                if progress:
                    progress(n, len(videos), vid)
                continue
            steps = record["info"]["steps"]
            v, a = load_video_features(Path(tmp), vid)
            item = DenseVideoData(vid, v, a, None, None, float(record["info"]["duration_s"]))
            if stats is not None:
                item = stats.apply(item)
            events = postprocess_video(video_levels(model, item.visual, item.audio, precision), grid,
                                       item.duration)
            named = [{"start": e["segment"][0], "end": e["segment"][1], "label": classes[e["label_id"]],
                      "label_id": e["label_id"], "score": e["score"]} for e in events]
            shown = [e for e in named if e["score"] >= min_score]
            gt = (ground_truth or {}).get(vid)
            result = {"video": str(path), "duration_s": item.duration, "steps": steps, "checkpoint": str(checkpoint),
                      "random_weights": bool(cfg.random_init), "min_score": min_score, "events": shown,
                      "events_below_min_score": len(named) - len(shown)}
            if gt is not None:
                result["ground_truth"] = [{"start": g["segment"][0], "end": g["segment"][1],
                                           "label": classes[g["label_id"]], "label_id": g["label_id"]} for g in gt]
            write_json_atomic(out_dir / f"{vid}.json", result)
            timeline_png(out_dir / f"{vid}_timeline.png", item.duration,
                         [{"segment": [e["start"], e["end"]], "label_id": e["label_id"], "score": e["score"]}
                          for e in shown], classes, ground_truth=gt,
                         title=f"{vid} ({item.duration:.1f} s)" + ("  RANDOM WEIGHTS" if cfg.random_init else ""))
            result["json"], result["timeline"] = str(out_dir / f"{vid}.json"), str(out_dir / f"{vid}_timeline.png")
            results.append(result)
            if progress:
                progress(n, len(videos), vid)
    return results
