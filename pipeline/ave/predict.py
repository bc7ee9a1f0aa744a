"""`avel predict`: localize events in any video with a trained checkpoint, per second, with a picture.

The checkpoint knows what it was trained on: `info["encoders"]` holds the attributes of the visual and audio
feature files (encoder name, weights sha256 or RANDOM-INIT, frames per segment, dtype, precision, the extraction
stage and key), `info["feature_norm"]` the per-channel standardisation, `info["classes"]` the class names. So a
prediction rebuilds exactly those encoders:
- weight files are found from their sha256: an explicit `--resnet-weights/--cnn14-weights` (checked), the artifact
  store (fine-tuning outputs record the sha256 of `resnet50_finetuned.pt`; extraction manifests record the path of
  the weights they used), then the default locations (extractors/weights.py); a file whose sha256 differs is a
  UserError, never a silent mismatch;
- random-init encoders are rebuilt with the seed the extraction used (its manifest says `random-init:<seed>`; if
  the store is not at hand the extraction default, 0, is assumed and said so), and the output says RANDOM WEIGHTS.

Any length, any frame rate: the video's duration (`media.probe`) is rounded up to whole seconds (a remainder under
`media.EXACT_TOLERANCE_S` does not count), and the timeline is cut into 10-s windows starting at 0, 10, 20 ...,
each decoded with `media.decode` (16 -- or the checkpoint's number of -- frames per second, 32 kHz audio) and
localized on its own, as AVE clips are. The last window is padded by media.decode's rule (last frame repeated,
silent audio); its seconds past the video's end are dropped from the timeline and the output says so (those padded
seconds can still sway the window's video-level class).

Per video (in `out_dir`): `<name>.json` (everything), `<name>.csv` (one row per second: second, start_s, end_s,
label = class name or "background", is_event, event_prob = the model's probability that the second is an event,
class / class_prob = the window's video-level class -- the class its event seconds get -- and its softmax
probability, window, padded_window, and ground_truth when a dataset holds the video), `<name>.png` (the timeline);
`summary.json` and `summary.csv` over all videos. A video that cannot be read is reported and the others
go on; a video without audio is predicted with silence for audio and flagged; a checkpoint that does not fit its
encoders is one UserError before any video is touched.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline import ave, media
from pipeline.errors import UserError
from pipeline.runtime import resolve_device
from pipeline.store import MANIFEST, ArtifactStore, atomic_path, file_sha256, read_manifest, write_json_atomic

WINDOW_S = ave.SEGMENTS  # AVE models see 10 one-second segments
BACKGROUND = "background"
THUMB_HEIGHT = 96  # pixels of the timeline's frame thumbnails
DISPLAY_SAMPLES = 4_800_000  # at most this many audio samples are kept for the picture (decimated)
FEATURE_CHUNK_FRAMES = 64  # frames per ResNet-50 forward (rounded to whole segments)
WEIGHT_FLAGS = {"resnet50": "--resnet-weights", "cnn14": "--cnn14-weights", "vgg19": "--vgg19-weights",
                "vggish": "--vggish-weights"}
DEFAULT_EXTRACT_SEED = 0  # ExtractConfig.seed's default


# ---- results ------------------------------------------------------------------------------------------------------
@dataclass
class VideoPrediction:
    video: str  # the path as given
    name: str  # file stem used for the output files
    status: str = "failed"  # "ok", "warning" (predicted, with a flag: no audio, ...), "failed"
    error: str | None = None
    duration_s: float | None = None
    seconds: int = 0  # rows in the timeline = duration rounded up to whole seconds
    windows: int = 0
    padded_s: float = 0.0  # seconds of the last window past the video's end (padded, not in the timeline)
    audio_status: str | None = None  # media's: "ok", "missing" (no audio track), "failed"
    fps: float | None = None
    flags: list[str] = field(default_factory=list)  # short codes: no-audio, audio-failed, padded, random-weights
    notes: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)  # one per second
    events: list[dict] = field(default_factory=list)  # consecutive event seconds of one class, merged
    window_classes: list[dict] = field(default_factory=list)  # per window: class, probability
    ground_truth: list[str | None] | None = None
    ground_truth_accuracy: float | None = None
    files: dict[str, str] = field(default_factory=dict)
    seconds_taken: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    @property
    def padded(self) -> bool:
        return self.padded_s > media.EXACT_TOLERANCE_S

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EncoderPlan:
    """Which encoder, which weights, built how: recovered from the checkpoint's feature-file attributes."""

    modality: str
    encoder: str
    random_init: bool
    weights: Path | None
    sha256: str | None
    seed: int
    frames_per_segment: int | None
    crop_size: int | None  # the visual center crop the features were made with (None: the weights' 224)
    dtype: str
    precision: str
    source: str  # how the weights were found (explicit file, store, default location, random init + seed origin)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weights"] = str(self.weights) if self.weights else None
        return d


# ---- resolving --model --------------------------------------------------------------------------------------------
def resolve_checkpoint(model_ref: str | Path, root: Path | None = None) -> Path:
    """A checkpoint file, a train run folder (its best.pt), or a run in the store (`train/<key>`, a key prefix,
    `train` for the newest run) -> the checkpoint file."""
    p = Path(model_ref).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        if (p / "best.pt").is_file():
            return p / "best.pt"
        raise UserError(f"--model {model_ref}: this folder has no best.pt; pass a train run folder "
                        f"(<root>/train/<key>) or a checkpoint file")
    looks_like_file = p.is_absolute() or p.suffix.lower() in (".pt", ".pth", ".tar", ".ckpt")
    if root is not None and Path(root).is_dir() and not looks_like_file:
        folder = ArtifactStore(root).find(str(model_ref))  # a clear UserError when nothing or several match
        if (folder / "best.pt").is_file():
            return folder / "best.pt"
        raise UserError(f"--model {model_ref} is {folder}, which holds no best.pt (not a train run)")
    raise UserError(f"--model {model_ref}: no such checkpoint file or run folder"
                    + (f", and no artifact store at {root}" if root is not None else "")
                    + "; pass best.pt of a run, its folder (<root>/train/<key>), or train/<key> with --root")


def _store_roots(checkpoint: Path, root: Path | None) -> list[Path]:
    """Artifact stores to search for weight files and extraction seeds: the given root and the checkpoint's own
    (a run folder is <root>/train/<key>/)."""
    roots = []
    if root is not None and Path(root).is_dir():
        roots.append(Path(root))
    folder = Path(checkpoint).resolve().parent
    if (folder / MANIFEST).is_file():
        try:
            if read_manifest(folder / MANIFEST).stage == "train":
                roots.append(folder.parent.parent)
        except UserError:
            pass
    out: list[Path] = []
    for r in roots:
        if all(r.resolve() != o.resolve() for o in out):
            out.append(r)
    return out


def _weights_in_store(sha: str, roots: Sequence[Path]) -> list[Path]:
    """Files the store says have this sha256: fine-tuning outputs, and weights extraction manifests used."""
    found = []
    for root in roots:
        store = ArtifactStore(root)
        for m in store.list("finetune"):
            for o in m.outputs.values():
                if o.sha256 == sha:
                    found.append(store.path(m.stage, m.key) / o.path)
        for stage in ("extract_visual", "extract_audio"):
            for m in store.list(stage):
                w = (m.metrics.get("encoder") or {}).get("weights") or {}
                if w.get("sha256") == sha and w.get("path"):
                    found.append(Path(w["path"]))
    return found


def _default_weights(encoder: str) -> Path | None:
    from extractors import get_extractor_class
    from extractors.weights import default_weights_path

    get_extractor_class(encoder)  # its module registers its weight rules
    return default_weights_path(encoder)


def _extraction_seed(attrs: dict, roots: Sequence[Path]) -> tuple[int, str]:
    if attrs.get("seed") is not None:
        return int(attrs["seed"]), "seed recorded in the feature file"
    stage, key = attrs.get("stage"), attrs.get("stage_key")
    if stage and key:
        for root in roots:
            m = ArtifactStore(root).manifest(str(stage), str(key))
            w = m.inputs.get("weights", "") if m else ""
            if w.startswith("random-init:"):
                return int(w.split(":", 1)[1]), f"seed from the extraction manifest {stage}/{key}"
    return DEFAULT_EXTRACT_SEED, (f"seed not found (extraction {stage}/{key} is not in the store searched); "
                                  f"assumed the extraction default {DEFAULT_EXTRACT_SEED}: pass --root to the store "
                                  f"the features came from if predictions look wrong")


def plan_encoder(modality: str, attrs: dict, explicit: Path | None, roots: Sequence[Path]) -> EncoderPlan:
    """The encoder a checkpoint's `modality` features came from, with its weight file found and verified."""
    from extractors.weights import RANDOM_INIT

    encoder = attrs.get("encoder")
    if not encoder:
        raise UserError(f"the checkpoint does not record which {modality} encoder its features came from "
                        f"(encoders.{modality}.encoder); predict needs a checkpoint trained by `avel train` on "
                        f"features from `avel extract`")
    sha = attrs.get("weights_sha256")
    random_init = bool(attrs.get("random_init")) or sha == RANDOM_INIT
    fps = attrs.get("frames_per_segment")
    crop = attrs.get("crop_size")
    common = dict(modality=modality, encoder=str(encoder), frames_per_segment=int(fps) if fps else None,
                  crop_size=int(crop) if crop and modality == "visual" else None,
                  dtype=str(attrs.get("dtype", "float32")), precision=str(attrs.get("precision", "fp32")))
    flag = WEIGHT_FLAGS.get(str(encoder), f"--{modality} weights")
    if modality == "audio" and attrs.get("sample_rate") not in (None, media.SAMPLE_RATE):
        raise UserError(f"the checkpoint's audio features were extracted at {attrs['sample_rate']} Hz; this "
                        f"pipeline decodes at {media.SAMPLE_RATE} Hz")
    if random_init:
        if explicit is not None:
            raise UserError(f"the checkpoint was trained on {modality} features from a RANDOMLY INITIALISED "
                            f"{encoder}; {flag} {explicit} would give different features. Leave {flag} out")
        seed, how = _extraction_seed(attrs, roots)
        return EncoderPlan(random_init=True, weights=None, sha256=None, seed=seed, source=f"random init ({how})",
                           **common)
    if not sha:
        raise UserError(f"the checkpoint does not record the sha256 of its {modality} encoder's weights")
    sha = str(sha)
    if explicit is not None:
        explicit = Path(explicit).expanduser()
        if not explicit.is_file():
            raise UserError(f"{flag} {explicit}: file not found")
        got = file_sha256(explicit)
        if got != sha:
            raise UserError(f"checkpoint was trained on features from weights {sha}, this file is {got} "
                            f"({flag} {explicit}); pass the {encoder} weight file the features were extracted with")
        return EncoderPlan(random_init=False, weights=explicit, sha256=sha, seed=0, source="explicit", **common)
    candidates = [(p, "artifact store") for p in _weights_in_store(sha, roots)]
    default = _default_weights(str(encoder))
    if default is not None:
        candidates.append((default, "default location"))
    seen = set()
    for path, source in candidates:
        key = str(Path(path).resolve())
        if key in seen or not Path(path).is_file():
            continue
        seen.add(key)
        if file_sha256(path) == sha:
            return EncoderPlan(random_init=False, weights=Path(path), sha256=sha, seed=0, source=source, **common)
    where = ", ".join(str(r) for r in roots) or "none given (--root)"
    raise UserError(f"the checkpoint was trained on {modality} features from {encoder} weights with sha256 {sha}; "
                    f"no file with that sha256 was found (artifact stores searched: {where}; default location: "
                    f"{default}). Pass the weight file with {flag} FILE")


def plan_released(modality: str, set_name: str, explicit: Path | None, random_init: bool, seed: int) -> EncoderPlan:
    """The encoder of a released feature set's `modality` (a checkpoint trained on AVE's released files records none):
    its weight file given or at its default location, identity-checked against the published digests, or random."""
    from pipeline.extraction.encoders import EncoderSpec, locate
    from pipeline.extraction.feature_sets import feature_set

    stream = feature_set(set_name, "ave").stream(modality)
    w = locate(EncoderSpec(stream.encoder, modality, explicit), random_init=random_init, seed=seed)
    source = w.source + (f" ({w.identity})" if w.identity else "")
    return EncoderPlan(modality=modality, encoder=stream.encoder, random_init=w.random_init, weights=w.path,
                       sha256=w.sha256, seed=seed, frames_per_segment=stream.options.get("frames_per_segment"),
                       crop_size=None, dtype="float32", precision="fp32", source=source)


# ---- the localizer with its encoders ------------------------------------------------------------------------------
def build_encoder(plan: EncoderPlan, device: torch.device, precision: str | None):
    """The encoder `plan` names, built by the extraction engine's rules (`pipeline.extraction.encoders`); `precision`
    None: the one the checkpoint's features were extracted with."""
    from extractors.weights import WeightsInfo
    from pipeline.extraction.encoders import EncoderSpec, build
    from pipeline.extraction.feature_sets import FEATURE_SETS

    options = {}
    released = [s for s in FEATURE_SETS["ave"].streams if s.encoder == plan.encoder]
    if released:  # AVE's released recipe: VGG-19 on 16 frames a second, VGGish's first ten 0.96-s examples
        options.update(released[0].options)
    elif plan.modality == "visual":
        options["frames_per_segment"] = plan.frames_per_segment or media.FRAMES_PER_SEGMENT
        if plan.crop_size:
            options["crop_size"] = plan.crop_size
    weights = WeightsInfo(plan.encoder, plan.weights, plan.sha256, plan.random_init, plan.seed, plan.source)
    return build(EncoderSpec(plan.encoder, plan.modality, plan.weights, options), weights, seed=plan.seed,
                 device=device, precision=precision or recorded_precision(plan.precision))


def recorded_precision(attr: str) -> str:
    """A feature file's `precision` attribute -> "fp32" or "bf16" (files before 2026-12 wrote "bf16-autocast")."""
    return "bf16" if attr.startswith("bf16") else "fp32"


class Localizer:
    """A checkpoint, the encoders its features came from, and how to run one 10-s window through them."""

    def __init__(self, checkpoint: Path, *, device: str = "auto", root: Path | None = None,
                 resnet_weights: Path | None = None, cnn14_weights: Path | None = None,
                 precision: str | None = None, feature_set: str | None = None, random_init: bool = False,
                 vgg19_weights: Path | None = None, vggish_weights: Path | None = None):
        """`precision`: the encoders' compute ("auto", "fp32", "bf16"); None = the one the checkpoint's training
        features were extracted with, so that predictions see features computed as the model saw them.
        `feature_set="ave"`: the checkpoint was trained on AVE's released VGG-19 + VGGish features (the released
        CACE-Net model is): those encoders are built from `vgg19_weights` / `vggish_weights` or their default
        locations (`random_init`: random, for tests)."""
        from pipeline.ave.features import FeatureNorm
        from pipeline.ave.train import load_model

        self.checkpoint = Path(checkpoint)
        self.device = resolve_device(device)
        self.model, info = load_model(self.checkpoint)
        self.model_name = info["model"]
        self.model.to(self.device).eval()
        cfg = self.model.cfg
        self.notes: list[str] = []
        self.roots = _store_roots(self.checkpoint, root)
        encoders = info.get("encoders") or {}
        explicit = {"visual": vgg19_weights or resnet_weights, "audio": vggish_weights or cnn14_weights}
        if feature_set not in (None, "cace"):
            if encoders:
                raise UserError(f"{self.checkpoint} records the encoders its features came from "
                                f"({encoders['visual'].get('encoder')}, {encoders['audio'].get('encoder')}); "
                                f"--feature-set is for checkpoints trained on released features, which record none")
            given = {"visual": vgg19_weights, "audio": vggish_weights}
            self.plans = {m: plan_released(m, feature_set, given[m], random_init, DEFAULT_EXTRACT_SEED)
                          for m in ("visual", "audio")}
            self.notes.append(f"the checkpoint records no encoders: `{feature_set}` feature set's encoders "
                              f"({', '.join(p.encoder for p in self.plans.values())}) as --feature-set says; frames "
                              f"sampled by time in 10-s windows, audio decoded at {media.SAMPLE_RATE} Hz and resampled "
                              f"(not the released recipe's decoding)")
        else:
            if not encoders:
                encoders = self._assume_encoders(cfg)
            self.plans = {m: plan_encoder(m, dict(encoders.get(m) or {}), explicit[m], self.roots)
                          for m in ("visual", "audio")}
        classes = info.get("classes")
        if classes is None:
            classes = self._assume_classes(cfg.num_classes)
        if len(classes) != cfg.num_classes:
            raise UserError(f"{self.checkpoint}: records {len(classes)} class names for a model of "
                            f"{cfg.num_classes} classes")
        self.class_names = [str(c) for c in classes]
        if info.get("inputs", "both") != "both":
            raise UserError(f"{self.checkpoint}: a single-modality control (trained on {info['inputs']} only, the "
                            f"other modality replaced by noise); localize with a model trained on both modalities")
        self.norm = FeatureNorm.from_dict(info.get("feature_norm"))
        self.epoch = info.get("epoch")

        self.extractors = {m: build_encoder(plan, self.device, precision) for m, plan in self.plans.items()}
        for m, plan in self.plans.items():
            if plan.random_init:
                self.notes.append(f"RANDOM WEIGHTS: the {m} encoder ({plan.encoder}) is randomly initialised "
                                  f"(seed {plan.seed}), as for the features this checkpoint was trained on: for "
                                  f"testing the pipeline only, not for real predictions")
        # a checkpoint that does not fit its encoders: one clear error, before any video
        for m, want in (("visual", cfg.video_dim), ("audio", cfg.audio_dim)):
            got = self.extractors[m].segment_shape[-1]
            if got != want:
                raise UserError(f"{self.checkpoint} does not match its encoders: the model takes {m} features of "
                                f"{want} channels but {self.plans[m].encoder} (the {m} encoder it records) gives "
                                f"{got}. Use a checkpoint trained on features of these encoders")
        self.frames_per_segment = self.extractors["visual"].units_per_segment

    def _assume_encoders(self, cfg) -> dict:
        """A checkpoint without encoder records (e.g. the released CACE-Net model): usable only when its input
        sizes are those of ResNet-50 + Cnn14, and then the weights cannot be verified."""
        if (cfg.video_dim, cfg.audio_dim) == (512, 128):
            raise UserError(f"{self.checkpoint} does not record the encoders its features came from; it takes "
                            f"512-channel visual and 128-channel audio features, as AVE's released VGG-19 + VGGish "
                            f"files: pass --feature-set ave (with --vgg19-weights and --vggish-weights, or the files "
                            f"at their default locations)")
        if (cfg.video_dim, cfg.audio_dim) != (2048, 2048):
            raise UserError(f"{self.checkpoint} does not record the encoders its features came from, and its input "
                            f"sizes (visual {cfg.video_dim}, audio {cfg.audio_dim}) are not those of this project's "
                            f"encoders (ResNet-50 2048, Cnn14 2048); predict needs a checkpoint trained with "
                            f"`avel train` on features from `avel extract`")
        self.notes.append("the checkpoint does not record its encoders: assumed ResNet-50 (16 frames per second) "
                          "and Cnn14 with the weights given or found at the default locations, unverified")
        return {"visual": {"encoder": "resnet50", "frames_per_segment": media.FRAMES_PER_SEGMENT},
                "audio": {"encoder": "cnn14"}}

    def _assume_classes(self, n: int) -> list[str]:
        from pipeline.synth_engine import AVE_CATEGORIES

        if n == len(AVE_CATEGORIES):
            self.notes.append("the checkpoint does not record class names: assumed AVE's 28 categories in AVE's "
                              "order")
            return list(AVE_CATEGORIES)
        self.notes.append(f"the checkpoint does not record class names: classes are numbered 0..{n - 1}")
        return [f"class {i}" for i in range(n)]

    def describe(self) -> dict:
        from models import family_of

        return {"checkpoint": str(self.checkpoint), "epoch": self.epoch, "device": str(self.device),
                "classes": self.class_names, "model": self.model_name,
                **family_of(self.model).runtime_state(self.model),
                "feature_norm": self.norm is not None,
                "encoders": {m: p.to_dict() for m, p in self.plans.items()},
                "precision": {m: e.precision for m, e in self.extractors.items()}, "notes": list(self.notes)}

    # -- one window -----------------------------------------------------------------------------------------------
    def features(self, frames: np.ndarray, audio: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """One window's decoded frames [10*F,H,W,3] and audio [10*32000] -> features [10,...] as extracted."""
        vis, aud = self.extractors["visual"], self.extractors["audio"]
        units = vis.prepare(frames)
        per = max(1, FEATURE_CHUNK_FRAMES // vis.units_per_segment) * vis.units_per_segment
        v = torch.cat([vis.encode(units[i:i + per]) for i in range(0, units.shape[0], per)])
        if hasattr(aud, "encode_clip"):  # VGGish: its own 0.96-s examples of the window's samples
            a = torch.from_numpy(aud.encode_clip((np.asarray(audio, np.float64), media.SAMPLE_RATE)))
        else:
            a = aud.encode(aud.prepare(audio))
        out = []
        for m, x in (("visual", v), ("audio", a)):
            if self.plans[m].dtype == "float16":  # the model was trained on float16-rounded features
                x = x.half()
            out.append(x.float())
        return out[0], out[1]

    @torch.no_grad()
    def localize(self, v: torch.Tensor, a: torch.Tensor) -> dict:
        """Features of one window [T,...] -> labels [T], event probability [T], video class and its probability."""
        from models import family_of

        v, a = v[None].to(self.device), a[None].to(self.device)
        if self.norm is not None:
            v, a = self.norm.apply(v, a)
        with torch.random.fork_rng(devices=[]):  # CACE's forward draws noise for its contrastive key: keep it seeded
            torch.manual_seed(0)
            out = self.model(v, a)
        p = family_of(self.model).predict(self.model, out)
        return {"labels": p.labels[0].cpu().numpy(), "event_prob": p.event_prob[0].float().cpu().numpy(),
                "video_class": int(p.video_class[0]), "class_prob": float(p.class_prob[0])}


# ---- helpers ------------------------------------------------------------------------------------------------------
def timeline_seconds(duration_s: float) -> int:
    """Rows of the timeline: whole seconds, a remainder below media's tolerance not counted, at least one."""
    return max(1, math.ceil(duration_s - media.EXACT_TOLERANCE_S))


def _thumbs(frames: np.ndarray, per_second: int, count: int) -> np.ndarray:
    """The first frame of each of the first `count` seconds, scaled to THUMB_HEIGHT pixels high."""
    import torch.nn.functional as F

    picked = torch.from_numpy(np.ascontiguousarray(frames[::per_second][:count])).permute(0, 3, 1, 2).float()
    h, w = picked.shape[2:]
    if h > THUMB_HEIGHT:
        size = (THUMB_HEIGHT, max(1, round(w * THUMB_HEIGHT / h)))
        picked = F.interpolate(picked, size=size, mode="bilinear", antialias=True, align_corners=False)
    return picked.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _display_audio(audio: np.ndarray, rate: int) -> tuple[np.ndarray, int]:
    """Block-averaged copy for the picture: at most DISPLAY_SAMPLES samples, at least 2x decimated."""
    factor = 2
    while audio.size / factor > DISPLAY_SAMPLES:
        factor *= 2
    n = audio.size // factor * factor
    return audio[:n].reshape(-1, factor).mean(1).astype(np.float32), rate // factor


def _events(rows: list[dict]) -> list[dict]:
    out: list[dict] = []
    for r in rows:
        if not r["is_event"]:
            continue
        last = out[-1] if out else None
        if last and last["label"] == r["label"] and last["end_s"] == r["start_s"]:
            last["end_s"] = r["end_s"]
            last["seconds"] += 1
            last["_p"].append(r["event_prob"])
        else:
            out.append({"label": r["label"], "start_s": r["start_s"], "end_s": r["end_s"], "seconds": 1,
                        "_p": [r["event_prob"]]})
    for e in out:
        e["mean_event_prob"] = round(float(np.mean(e.pop("_p"))), 4)
    return out


def _ground_truth(ds: ave.AVEDataset | None, video_id: str, seconds: int) -> tuple[list[str | None] | None, str | None]:
    if ds is None:
        return None, None
    rows = ds.rows_by_video().get(video_id)
    if not rows:
        return None, None
    a = ds.annotations[rows[0]]
    gt: list[str | None] = [a.category if a.start <= t < a.end else BACKGROUND
                            for t in range(min(seconds, ave.SEGMENTS))]
    gt += [None] * (seconds - len(gt))
    note = f"ground truth: {ds.root / ave.ANNOTATIONS} row {a.row} ({a.category}, {a.start}-{a.end} s)"
    if len(rows) > 1:
        note += f"; the video serves {len(rows)} rows, the first is shown"
    return gt, note


def _unique_name(path: Path, taken: set[str]) -> str:
    base = path.stem or "video"
    name, i = base, 2
    while name.lower() in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name.lower())
    return name


CSV_FIELDS = ["second", "start_s", "end_s", "label", "is_event", "event_prob", "class", "class_prob", "window",
              "padded_window"]


def _write_video_files(vp: VideoPrediction, out_dir: Path, model: dict) -> None:
    fields = CSV_FIELDS + (["ground_truth"] if vp.ground_truth is not None else [])
    csv_path = out_dir / f"{vp.name}.csv"
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in vp.rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    vp.files["csv"] = str(csv_path)
    vp.files["json"] = str(out_dir / f"{vp.name}.json")
    write_json_atomic(out_dir / f"{vp.name}.json", {**vp.to_dict(), "model": model})


# ---- one video ----------------------------------------------------------------------------------------------------
def predict_video(loc: Localizer, path: Path, out_dir: Path, name: str, *, ds: ave.AVEDataset | None = None,
                  plot: bool = True) -> VideoPrediction:
    """Localize one video into `out_dir`; problems with this video are recorded in the result, not raised."""
    t0 = time.perf_counter()
    vp = VideoPrediction(video=str(path), name=name)
    display = None
    try:
        display = _predict(loc, Path(path), vp, ds)
    except media.MediaError as e:
        vp.status, vp.error = "failed", f"unreadable video: {e}"
    except (UserError, ValueError, RuntimeError, OSError) as e:  # e.g. a frame size the encoder cannot take
        vp.status, vp.error = "failed", f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}"
    vp.seconds_taken = round(time.perf_counter() - t0, 3)
    if vp.ok:
        model = loc.describe()
        if plot:
            png = out_dir / f"{vp.name}.png"
            try:
                _plot(loc, vp, png, *display)
                vp.files["png"] = str(png)
            except Exception as e:  # a picture problem must not cost the prediction
                vp.notes.append(f"timeline picture failed: {type(e).__name__}: {e}")
        _write_video_files(vp, out_dir, model)
    return vp


def _predict(loc: Localizer, path: Path, vp: VideoPrediction,
             ds: ave.AVEDataset | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Fill `vp`; returns what the picture needs: thumbnails [S,h,w,3], display audio and its rate."""
    info = media.probe(path)
    if not info.duration_s or info.duration_s <= 0:
        raise media.MediaError("the video has no duration (no decodable frames?)")
    vp.duration_s, vp.fps = round(float(info.duration_s), 3), info.fps
    seconds = timeline_seconds(info.duration_s)
    windows = math.ceil(seconds / WINDOW_S)
    vp.seconds, vp.windows = seconds, windows
    vp.padded_s = round(windows * WINDOW_S - info.duration_s, 3)
    sr = media.SAMPLE_RATE

    # audio: decoded once for the whole timeline (media decodes the full stream per call anyway)
    try:
        decoded = media.decode(path, video=False, audio=True, start=0, segments=windows * WINDOW_S)
        audio, audio_status = decoded.audio, decoded.info.audio_status  # "ok", or "missing" (silence)
    except media.MediaError as e:
        audio, audio_status = np.zeros(windows * WINDOW_S * sr, np.float32), "failed"
        vp.notes.append(f"the audio track could not be decoded ({e}): predicted with silence for audio")
    vp.audio_status = audio_status
    if audio_status == "missing":
        vp.flags.append("no-audio")
        vp.notes.append("the video has no audio track: predicted with silence for audio. The localizer expects "
                        "both modalities, so read these predictions with care")
    elif audio_status == "failed":
        vp.flags.append("audio-failed")

    fps = loc.frames_per_segment
    names = [*loc.class_names, BACKGROUND]
    thumbs = []
    rows: list[dict] = []
    for w in range(windows):
        start = w * WINDOW_S
        d = media.decode(path, video=True, audio=False, start=start, segments=WINDOW_S, frames_per_segment=fps)
        real = min(WINDOW_S, seconds - start)  # seconds of this window inside the video
        thumbs.append(_thumbs(d.frames, fps, real))
        v, a = loc.features(d.frames, audio[start * sr:(start + WINDOW_S) * sr])
        out = loc.localize(v, a)
        padded_window = start + WINDOW_S > info.duration_s + media.EXACT_TOLERANCE_S
        vp.window_classes.append({"window": w, "start_s": start, "end_s": start + WINDOW_S,
                                  "class": loc.class_names[out["video_class"]],
                                  "class_prob": round(out["class_prob"], 4), "padded": padded_window})
        for t in range(real):
            s = start + t
            label = int(out["labels"][t])
            rows.append({"second": s, "start_s": s, "end_s": round(min(s + 1.0, float(info.duration_s)), 3),
                         "label": names[label], "label_index": label, "is_event": label != len(loc.class_names),
                         "event_prob": round(float(out["event_prob"][t]), 4),
                         "class": loc.class_names[out["video_class"]], "class_prob": round(out["class_prob"], 4),
                         "window": w, "padded_window": padded_window})
    vp.rows = rows
    vp.events = _events(rows)

    if windows > 1:
        vp.notes.append(f"{vp.duration_s:.2f} s video: {windows} windows of {WINDOW_S} s (starting at 0, 10, ...), "
                        f"each localized on its own and stitched into one timeline of {seconds} seconds")
    if vp.padded:
        vp.flags.append("padded")
        last = (windows - 1) * WINDOW_S
        vp.notes.append(f"padded: the video is {vp.duration_s:.2f} s, so its last window ({last}-{last + WINDOW_S} s) "
                        f"was padded with {vp.padded_s:.2f} s (last frame repeated, silent audio); the padded "
                        f"seconds are not in the timeline, but they still weigh on that window's predictions")
    if seconds - info.duration_s > media.EXACT_TOLERANCE_S:
        vp.notes.append(f"the last second ({seconds - 1} s) is partial: {info.duration_s - (seconds - 1):.2f} s")
    if any(p.random_init for p in loc.plans.values()):
        vp.flags.append("random-weights")

    vp.ground_truth, gt_note = _ground_truth(ds, path.stem, seconds)
    if vp.ground_truth is not None:
        vp.notes.append(gt_note)
        for r, g in zip(rows, vp.ground_truth):
            r["ground_truth"] = g
        known = [(r["label"], g) for r, g in zip(rows, vp.ground_truth) if g is not None]
        if known:
            vp.ground_truth_accuracy = round(100.0 * sum(p == g for p, g in known) / len(known), 2)
    vp.status = "warning" if {"no-audio", "audio-failed"} & set(vp.flags) else "ok"
    display, rate = _display_audio(audio[:seconds * sr], sr)
    return np.concatenate(thumbs), display, rate


def _plot(loc: Localizer, vp: VideoPrediction, png: Path, frames: np.ndarray, audio: np.ndarray, rate: int) -> None:
    from pipeline.ave.plots import timeline_png

    audio_note = {"missing": "no audio track: silence used", "failed": "audio not decodable: silence used"}.get(
        vp.audio_status or "")
    if vp.windows > 1:
        windows = f"{vp.windows} windows of {WINDOW_S} s" + (f", the last padded {vp.padded_s:.1f} s" if vp.padded
                                                             else "")
    else:
        windows = f"one {WINDOW_S}-s window" + (f" (padded {vp.padded_s:.1f} s)" if vp.padded else "")
    title = (f"{Path(vp.video).name}: {vp.duration_s:.2f} s, {windows}"
             + (f"; ground-truth agreement {vp.ground_truth_accuracy:.0f} %" if vp.ground_truth_accuracy is not None
                else ""))
    notes = [n for n in loc.notes if n.startswith("RANDOM")][:1]
    if notes:
        notes = ["RANDOM WEIGHTS: randomly initialised encoders, for testing the pipeline only"]
    timeline_png(png, frames, audio, rate, vp.rows, loc.class_names, vp.ground_truth, title=title, notes=notes,
                 window_s=WINDOW_S, duration_s=vp.duration_s, audio_note=audio_note)


# ---- many videos --------------------------------------------------------------------------------------------------
def predict_videos(videos: Sequence[str | Path], model_ref: str | Path, out_dir: Path, *, device: str = "auto",
                   dataset: Path | None = None, root: Path | None = None, resnet_weights: Path | None = None,
                   cnn14_weights: Path | None = None, precision: str | None = None, plot: bool = True,
                   feature_set: str | None = None, random_init: bool = False, vgg19_weights: Path | None = None,
                   vggish_weights: Path | None = None, on_model: Callable[[Localizer], None] | None = None,
                   on_video: Callable[[VideoPrediction], None] | None = None) -> list[VideoPrediction]:
    """Localize events in each video with the checkpoint `model_ref` (file, train run folder, or store reference).

    Raises UserError for what concerns every video (model, encoders, weights, dataset) before any video is read;
    per-video problems are in the results (`status`, `error`, `notes`). Writes per-video JSON/CSV/PNG and
    summary.json/summary.csv into `out_dir`.
    """
    paths = media.expand_videos(videos)
    ds = ave.load_dataset(Path(dataset)) if dataset is not None else None
    checkpoint = resolve_checkpoint(model_ref, root)
    loc = Localizer(checkpoint, device=device, root=root, resnet_weights=resnet_weights, cnn14_weights=cnn14_weights,
                    precision=precision, feature_set=feature_set, random_init=random_init,
                    vgg19_weights=vgg19_weights, vggish_weights=vggish_weights)
    if on_model:
        on_model(loc)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = {"summary"}
    results = []
    for path in paths:
        vp = predict_video(loc, path, out_dir, _unique_name(path, taken), ds=ds, plot=plot)
        results.append(vp)
        if on_video:
            on_video(vp)
    write_summary(results, loc, out_dir, model_ref)
    return results


def write_summary(results: list[VideoPrediction], loc: Localizer, out_dir: Path, model_ref) -> None:
    keep = ("video", "name", "status", "error", "duration_s", "seconds", "windows", "padded_s", "audio_status",
            "flags", "notes", "events", "window_classes", "ground_truth_accuracy", "files", "seconds_taken")
    summary = {"model": {"ref": str(model_ref), **loc.describe()},
               "videos": [{k: getattr(v, k) for k in keep} for v in results],
               "ok": sum(v.ok for v in results), "failed": sum(not v.ok for v in results)}
    write_json_atomic(out_dir / "summary.json", summary)
    fields = ["video", "status", "duration_s", "seconds", "windows", "padded_s", "audio_status", "events",
              "ground_truth_accuracy", "flags", "error", "json", "csv", "png"]
    with atomic_path(out_dir / "summary.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for v in results:
            w.writerow({"video": v.video, "status": v.status, "duration_s": v.duration_s, "seconds": v.seconds,
                        "windows": v.windows, "padded_s": v.padded_s, "audio_status": v.audio_status,
                        "events": "; ".join(f"{e['label']} {e['start_s']:g}-{e['end_s']:g} s" for e in v.events),
                        "ground_truth_accuracy": v.ground_truth_accuracy, "flags": " ".join(v.flags),
                        "error": v.error or "", **{k: v.files.get(k, "") for k in ("json", "csv", "png")}})
