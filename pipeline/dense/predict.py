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

from pipeline import media
from pipeline.dense.data import DenseVideoData, FeatureStats, ModalityControl
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
    """How the detector's training features were made: from its checkpoint when `avel dense extract` made them (the
    weights paths may be overridden), or from `overrides["feature_set"]` for a detector trained on a released set's
    files (UnAV-100's I3D + VGGish: `--feature-set unav`), which the checkpoint cannot know."""
    layout = info.get("feature_layout") or {}
    recorded = layout.get("extract_config")
    given = {k: v for k, v in overrides.items() if v is not None}
    if not recorded:
        if given.get("feature_set") in (None, "cace"):
            raise UserError(f"{checkpoint}: this detector was trained on features this project did not extract (e.g. "
                            f"UnAV-100's released I3D + VGGish files), so predict must be told how they were made: "
                            f"--feature-set unav for UnAV-100's files")
        recorded = {}
    elif given.get("feature_set") not in (None, recorded.get("feature_set", "cace")):
        raise UserError(f"{checkpoint} was trained on `{recorded.get('feature_set', 'cace')}` features (its feature "
                        f"folder says so), not --feature-set {given['feature_set']}")
    return DenseExtractConfig.model_validate({**recorded, **given})


def _check_dims(model, built: dict, cfg: DenseExtractConfig, checkpoint: Path) -> None:
    """The detector's input widths must be what the encoders give (visual = the visual streams concatenated)."""
    dims = {"visual": 0, "audio": 0}
    modality = {s.name: s.modality for s in cfg.released().streams} if cfg.released() else {}
    for m, e in built.items():
        dims[modality.get(m, m)] += e.segment_shape[-1]
    want = {"visual": model.cfg.visual_dim, "audio": model.cfg.audio_dim}
    if dims != want:
        raise UserError(f"{checkpoint} takes visual {want['visual']} / audio {want['audio']} channels but the "
                        f"`{cfg.feature_set}` encoders give {dims['visual']} / {dims['audio']}: use the feature set "
                        f"the detector was trained on")


def predict_files(videos: list[Path], checkpoint: Path, out_dir: Path, *, ground_truth: dict | None = None,
                  min_score: float = 0.05, device: str = "auto", resnet_weights: Path | None = None,
                  cnn14_weights: Path | None = None, keep_features: bool = False,
                  progress: Callable[[int, int, str], None] | None = None, **extract: object) -> list[dict]:
    """One result dict per video (also written as JSON + timeline PNG into out_dir). `ground_truth`: video id ->
    list of {"segment", "label_id"} to draw above the predictions. `keep_features`: also keep each video's feature
    files in out_dir/features/. `extract`: extraction settings over the checkpoint's (feature_set, decode_mode,
    random_init, the released sets' weight files)."""
    from pipeline.dense.plots import timeline_png

    model, info = load_detector(checkpoint)
    cfg = extraction_config(info, checkpoint, {"resnet_weights": resnet_weights, "cnn14_weights": cnn14_weights,
                                               "device": device, **extract})
    dev = resolve_device(device)
    model.to(dev)
    precision = resolve_precision(cfg.precision, dev)
    grid = TimeGrid(**info["grid"])
    stats = FeatureStats.from_dict(info.get("feature_stats"))
    control = ModalityControl.from_dict(info.get("input_control"))  # a single-modality control sees what it trained on
    classes = info["classes"]
    built = make_encoders(cfg)
    _check_dims(model, built, cfg, checkpoint)
    window_grid = cfg.window_grid() if cfg.released() else WindowGrid(grid, cfg.frames_per_window, cfg.chunk_windows)
    suffixes = cfg.streams()
    files = cfg.released().layout() if cfg.released() else {m: [s] for m, s in SUFFIXES.items()}
    threads = {m: cfg.threads or default_threads() for m in built}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="avel-dense-predict-") as tmp:
        if keep_features:
            tmp = out_dir / "features"
            tmp.mkdir(exist_ok=True)
        write_json_atomic(Path(tmp) / LAYOUT_FILE, files)
        for n, path in enumerate(videos, 1):
            vid = path.stem
            writer = FolderWriter(Path(tmp), [vid], suffixes)
            run_videos([(vid, path)], window_grid, built, [writer], threads=threads)
            record = writer.items[vid]
            error = next((e for e in record["errors"].values() if e is not None), None)
            if error is not None:
                results.append({"video": str(path), "error": error})
                if progress:
                    progress(n, len(videos), vid)
                continue
            v, a = load_video_features(Path(tmp), vid)
            steps = len(v)
            duration = record["info"].get("duration_s") or media.probe(path).duration_s
            item = DenseVideoData(vid, v, a, None, None, float(duration))
            if control is not None:
                item = control.apply(item)
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
