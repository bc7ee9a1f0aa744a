"""Named feature sets: a choice of encoders and their recipe, not a code path (`--feature-set NAME`).

- `cace` (default): this project's ResNet-50 layer4 maps + PANNs Cnn14 embeddings, on the task's own grid (AVE's
  ten 1-s segments; the dense task's 0.96-s windows every 0.32 s).
- `ave`: AVE's released features (feature-sets-spec §1): VGG-19 pool5 [10,7,7,512] on 16 frames per second picked by
  the AVE scripts' index formula, VGGish [10,128] on 0.96-s examples of the whole clip (the first ten).
- `unav`: UnAV-100's released features (spec §2): I3D RGB and I3D flow [T,1024] on 24-frame windows every 8 frames at
  25 fps (flow by RAFT), VGGish [T',128] at a 0.32-s hop; each file keeps its own row count, as released (the
  loader cuts both modalities to the shorter).
A stream is one output file: its encoder (registry name), the task modality it belongs to, the decoding recipe that
feeds it (`pipeline.extraction.recipes`), its file suffix in the dense layout, and the encoder's options.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import UserError


@dataclass(frozen=True)
class Stream:
    name: str  # the output's name: "visual", "audio", "rgb", "flow"
    modality: str  # "visual" or "audio": where the task's layout files it
    encoder: str  # extractor registry name
    recipe: str  # "ave_frames", "frames_25fps", "waveform"
    suffix: str  # dense layout: <video id><suffix>
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class FeatureSet:
    name: str
    streams: tuple[Stream, ...]
    tasks: tuple[str, ...]  # "ave" (ten 1-s rows per video), "dense" (rows on the 0.32-s grid)
    about: str

    def stream(self, name: str) -> Stream:
        return next(s for s in self.streams if s.name == name)

    def layout(self) -> dict[str, list[str]]:
        """{modality: [file suffixes]}: the dense layout file's view of the set (visual = the concatenation)."""
        out: dict[str, list[str]] = {}
        for s in self.streams:
            out.setdefault(s.modality, []).append(s.suffix)
        return out


FEATURE_SETS = {
    "ave": FeatureSet("ave", (
        Stream("visual", "visual", "vgg19", "ave_frames", "_vgg19.npy", {"frames_per_segment": 16}),
        Stream("audio", "audio", "vggish", "waveform", "_vggish.npy", {"hop_s": 0.96, "examples": 10}),
    ), ("ave",), "AVE's released VGG-19 pool5 + VGGish"),
    "unav": FeatureSet("unav", (
        Stream("rgb", "visual", "i3d_rgb", "frames_25fps", "_rgb.npy"),
        Stream("flow", "visual", "i3d_flow", "frames_25fps", "_flow.npy"),
        Stream("audio", "audio", "vggish", "waveform", "_vggish.npy", {"hop_s": 0.32}),
    ), ("dense",), "UnAV-100's released I3D RGB + flow + VGGish"),
}
NAMES = ("cace", *FEATURE_SETS)
WHY_NOT = {
    ("unav", "ave"): "UnAV's I3D rows come every 0.32 s (29 a 10-s clip), not AVE's ten 1-s rows",
    ("ave", "dense"): "AVE's recipe makes exactly ten rows per 10-s clip, not rows on an untrimmed video's grid",
}


def feature_set(name: str, task: str) -> FeatureSet:
    """The named set for `task` ("ave" or "dense"); a UserError naming the sets that fit otherwise."""
    if name not in FEATURE_SETS:
        raise UserError(f"unknown feature set {name!r}; known: {', '.join(NAMES)}")
    fs = FEATURE_SETS[name]
    if task not in fs.tasks:
        fits = [n for n in NAMES if n == "cace" or task in FEATURE_SETS[n].tasks]
        raise UserError(f"--feature-set {name} does not fit this command: {WHY_NOT.get((name, task), '')}; use "
                        f"{' or '.join(fits)} here")
    return fs
