"""The UnAV-100 annotation layout: one JSON, `database` -> video id -> {subset, duration, annotations}.

Schema as the UnAV loader and evaluator read it (`shared/reference/dense-avel-spec.md` §2.2): `subset` is train,
validation or test (compared in lower case); `duration` in seconds; each annotation has `segment` [start_s, end_s],
`label` (the class name) and `label_id` (the class index, used by the model and the evaluator). Class indices come
from `label_id`; the class list is the label of each id.

`load_annotations` reads and checks the file. Problems that make it unusable (not JSON, no `database`, a record or
event without its fields, a segment that is not two numbers) are one `UserError` naming the video. Problems a user
should fix but that do not stop evaluation (an event outside its video's duration, an end before its start, one id
for two names or two ids for one name, overlapping duplicates of one class) are collected in `problems`;
`avel dense dataset check` lists them and fails when there are any.

Our generators also write a top-level `generator` record (name, version, config, the unlabelled distractors): it
tells a dataset of one generator version from another's (their content differs for the same seed). Anything else at
the top level, or a file without it (UnAV-100's own, or one from an older generator), loads as before.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UserError

SUBSETS = ("train", "validation", "test")
DUPLICATE_TOL_S = 1e-3  # the evaluator's rule: same label_id and both boundaries within this are one event
DURATION_TOL_S = 0.05  # an event may end this much after the stated duration (rounding of durations)


@dataclass(frozen=True)
class Event:
    start: float
    end: float
    label: str
    label_id: int

    @property
    def length(self) -> float:
        return self.end - self.start


@dataclass
class DenseVideo:
    id: str
    subset: str
    duration: float | None
    events: list[Event]


@dataclass
class DenseDataset:
    path: Path
    videos: dict[str, DenseVideo]
    classes: dict[int, str]  # label_id -> label
    problems: list[str] = field(default_factory=list)
    generator: dict | None = None  # the top-level `generator` record of a generated dataset (None: real data)

    @property
    def generator_version(self) -> int | None:
        """The version of the generator that wrote this file; None for real data (and generated data from before
        versions were recorded: dense generator version 1)."""
        v = (self.generator or {}).get("version")
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    def split(self, subset: str) -> list[DenseVideo]:
        subset = normalise_subset(subset)
        return [v for v in self.videos.values() if v.subset == subset]

    def label_id(self, label: int | str) -> int:
        """A prediction's label (an id, or a class name) -> label_id; ValueError if unknown."""
        if isinstance(label, bool):
            raise ValueError(f"label {label!r} is neither a class id nor a class name")
        if isinstance(label, int):
            if label not in self.classes:
                raise ValueError(f"label id {label} is not a class of the annotations (ids "
                                 f"{min(self.classes)}..{max(self.classes)})")
            return label
        if isinstance(label, str):
            for i, name in self.classes.items():
                if name == label:
                    return i
            if label.isdigit() and int(label) in self.classes:
                return int(label)
            raise ValueError(f"label {label!r} is not a class name of the annotations")
        raise ValueError(f"label {label!r} is neither a class id nor a class name")

    def summary(self) -> dict:
        out = {"file": str(self.path), "videos": len(self.videos), "classes": len(self.classes), "splits": {}}
        if self.generator is not None:
            out["generator"] = {k: self.generator.get(k) for k in ("name", "version", "distractor_counts")}
        for s in SUBSETS:
            vids = self.split(s)
            events = [e for v in vids for e in v.events]
            durations = [v.duration for v in vids if v.duration is not None]
            out["splits"][s] = {
                "videos": len(vids), "events": len(events),
                "events_per_video": round(len(events) / len(vids), 2) if vids else 0.0,
                "classes": len({e.label_id for e in events}),
                "mean_duration_s": round(sum(durations) / len(durations), 2) if durations else None,
                "max_duration_s": round(max(durations), 2) if durations else None,
                "mean_event_s": round(sum(e.length for e in events) / len(events), 2) if events else None,
                "videos_with_overlapping_classes": sum(1 for v in vids if has_overlap_of_classes(v.events)),
            }
        return out


def normalise_subset(subset: str) -> str:
    s = subset.lower()
    if s == "val":
        s = "validation"
    if s not in SUBSETS:
        raise UserError(f"unknown split {subset!r}; UnAV-100's are {', '.join(SUBSETS)}")
    return s


def has_overlap_of_classes(events: list[Event]) -> bool:
    return any(a.label_id != b.label_id and min(a.end, b.end) > max(a.start, b.start)
               for i, a in enumerate(events) for b in events[i + 1:])


def _number(x, what: str, vid: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise UserError(f"video {vid!r}: {what} must be a finite number, got {x!r}")
    return float(x)


def read_json_mapping(path: Path, what: str, key: str, layout: str, top: dict | None = None) -> dict:
    """The mapping under `key` at the top of a JSON file; one clear error when the file, the JSON or the key is not
    there. `top`, if given, receives the file's other top-level entries."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable JSON file ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), dict):
        raise UserError(f"{path}: the top level must hold `{key}`: {layout}")
    if top is not None:
        top.update((k, v) for k, v in data.items() if k != key)
    return data[key]


def load_annotations(path: Path) -> DenseDataset:
    path = Path(path)
    top: dict = {}
    database = read_json_mapping(path, "annotation file", "database",
                                 "a mapping of video id -> record (UnAV-100 layout)", top)
    videos, problems = {}, []
    names_of: dict[int, Counter] = {}
    for vid, rec in database.items():
        if not isinstance(rec, dict):
            raise UserError(f"{path}: video {vid!r}: its record must be a mapping, got {type(rec).__name__}")
        if "subset" not in rec or not isinstance(rec["subset"], str):
            raise UserError(f"{path}: video {vid!r}: no `subset` (train, validation or test)")
        subset = rec["subset"].lower()
        if subset not in SUBSETS:
            raise UserError(f"{path}: video {vid!r}: subset {rec['subset']!r} is not one of {', '.join(SUBSETS)}")
        duration = _number(rec["duration"], "duration", vid) if rec.get("duration") is not None else None
        if duration is not None and duration <= 0:
            raise UserError(f"{path}: video {vid!r}: duration {duration} must be positive")
        anns = rec.get("annotations", [])
        if not isinstance(anns, list):
            raise UserError(f"{path}: video {vid!r}: `annotations` must be a list")
        events = []
        for k, a in enumerate(anns):
            if not isinstance(a, dict) or not all(f in a for f in ("segment", "label", "label_id")):
                raise UserError(f"{path}: video {vid!r}, annotation {k}: needs `segment`, `label` and `label_id`")
            seg = a["segment"]
            if not isinstance(seg, (list, tuple)) or len(seg) != 2:
                raise UserError(f"{path}: video {vid!r}, annotation {k}: segment must be [start_s, end_s], got {seg!r}")
            start, end = _number(seg[0], "segment start", vid), _number(seg[1], "segment end", vid)
            lid = a["label_id"]
            if isinstance(lid, bool) or not isinstance(lid, int) or lid < 0:
                raise UserError(f"{path}: video {vid!r}, annotation {k}: label_id must be an int >= 0, got {lid!r}")
            label = str(a["label"])
            names_of.setdefault(lid, Counter())[label] += 1
            if end <= start:
                problems.append(f"video {vid!r}: event {k} ({label}) ends at {end} s, not after its start {start} s")
            if start < 0 or (duration is not None and end > duration + DURATION_TOL_S):
                problems.append(f"video {vid!r}: event {k} ({label}) [{start}, {end}] s lies outside the video "
                                f"(0 .. {duration} s)")
            events.append(Event(start, end, label, lid))
        for i, e in enumerate(events):
            for f in events[i + 1:]:
                if e.label_id == f.label_id and abs(e.start - f.start) <= DUPLICATE_TOL_S and \
                        abs(e.end - f.end) <= DUPLICATE_TOL_S:
                    problems.append(f"video {vid!r}: duplicate event {e.label} [{e.start}, {e.end}] s (the evaluator "
                                    f"counts it once)")
        videos[vid] = DenseVideo(str(vid), subset, duration, events)
    classes = {}
    for lid, names in sorted(names_of.items()):
        classes[lid] = names.most_common(1)[0][0]
        if len(names) > 1:
            problems.append(f"label_id {lid} has several names: {', '.join(sorted(names))}")
    by_name = Counter(classes.values())
    for name, n in by_name.items():
        if n > 1:
            ids = [i for i, c in classes.items() if c == name]
            problems.append(f"class {name!r} has several label_ids: {ids}")
    generator = top.get("generator")
    return DenseDataset(path, videos, classes, problems, generator if isinstance(generator, dict) else None)


def write_annotations(path: Path, videos: list[DenseVideo], extra: dict | None = None) -> None:
    """The UnAV-100 JSON of `videos` (what the synthetic generators write); `extra`: more top-level entries after
    `database` (a generator's record)."""
    from pipeline.store import write_json_atomic

    db = {v.id: {"subset": v.subset, "duration": v.duration,
                 "annotations": [{"segment": [round(e.start, 3), round(e.end, 3)], "label": e.label,
                                  "label_id": e.label_id} for e in v.events]} for v in videos}
    write_json_atomic(Path(path), {"database": db, **(extra or {})})
