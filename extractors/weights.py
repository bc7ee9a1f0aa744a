"""Locating, verifying and loading encoder weight files (nothing is ever downloaded).

ResNet-50 (ImageNet, torchvision IMAGENET1K_V2) is looked for in the torch hub cache
(`torch.hub.get_dir()/checkpoints/resnet50-11ad3fa6.pth`, where torchvision itself would put it) unless a file
is given. Three formats load:
- a torchvision state dict (`conv1.weight`, ..., `fc.*` is ignored): the ImageNet file;
- the CACE-Net reference's fine-tuning checkpoint, `{"I_state_dict": ...}` with the keys of
  `nn.Sequential(*resnet50.children()[:-2])` (`0.weight` = conv1, `1.*` = bn1, `4.*`..`7.*` = layer1..layer4);
- this project's fine-tuning output, `{"format": "avel-resnet50-trunk", "state_dict": <torchvision keys without
  fc.*>, "meta": {...}}`, written by `save_resnet50_trunk`.

Cnn14 (PANNs AudioSet, `Cnn14_mAP=0.431.pth`) is looked for in `~/panns_data/` (where panns-inference keeps it)
unless a file is given; its `"model"` entry is the state dict.

Every file is read with `torch.load(weights_only=True)` (no code runs from a weight file). The official Cnn14
file is the one exception allowed a full unpickle, and only when its sha256 is the published one.
The file's sha256 identifies the weights in stage keys and manifests. A missing or wrong file is a `UserError`
that names the file and says where it should go.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from pipeline.errors import UserError
from pipeline.store import atomic_path, file_sha256

RESNET50_FILE = "resnet50-11ad3fa6.pth"  # torchvision's IMAGENET1K_V2 file name
CNN14_FILE = "Cnn14_mAP=0.431.pth"
CNN14_SHA256 = "0dc499e40e9761ef5ea061ffc77697697f277f6a960894903df3ada000e34b31"  # the published file (zenodo)
TRUNK_FORMAT = "avel-resnet50-trunk"
RANDOM_INIT = "RANDOM-INIT"

# nn.Sequential(*resnet50.children()[:-2]) index -> torchvision module name
_SEQUENTIAL_NAMES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights an encoder uses. `id` goes into stage keys: the file's sha256, or `random-init:<seed>`."""

    encoder: str
    path: Path | None
    sha256: str | None
    random_init: bool
    seed: int | None = None
    source: str = ""  # "explicit", "default location" or "random init"
    identity: str = ""  # the published file its digest matches, or "unknown: ..." (encoders with published digests)

    @property
    def id(self) -> str:
        return f"random-init:{self.seed}" if self.random_init else str(self.sha256)

    @property
    def label(self) -> str:
        """What an h5 attribute says: the sha256, or RANDOM-INIT."""
        return RANDOM_INIT if self.random_init else str(self.sha256)

    def to_dict(self) -> dict:
        out = {"encoder": self.encoder, "path": str(self.path) if self.path else None, "sha256": self.sha256,
               "random_init": self.random_init, "seed": self.seed, "source": self.source}
        if self.identity:  # only encoders with published digests say it (older manifests stay as they were)
            out["identity"] = self.identity
        return out


def hub_checkpoint(name: str) -> Path:
    """Where torch hub keeps a downloaded checkpoint (`torch.hub.get_dir()/checkpoints/<name>`): the default place of
    every torch-format weight file here."""
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def default_resnet50_path() -> Path:
    return hub_checkpoint(RESNET50_FILE)


def default_cnn14_path() -> Path:
    return Path.home() / "panns_data" / CNN14_FILE


@dataclass(frozen=True)
class WeightRules:
    """Where an encoder's weight file lives by default, the CLI flag that names another, what to tell a user whose
    file is missing, and the published digests that identify the genuine files ({hex digest: what it is}; md5 or
    sha256, whichever the publisher gives). A file whose digest is not among them still loads (a fine-tuned or
    converted file can be right) but its manifest and a warning say it is unknown."""

    default_path: Callable[[], Path]
    flag: str
    how: Callable[[Path], str]
    published: dict[str, str] = field(default_factory=dict)  # full sha256, md5, or an 8-digit sha256 prefix


_RULES: dict[str, WeightRules] = {}


def register_weight_rules(encoder: str, rules: WeightRules) -> None:
    """Make `locate_weights(encoder, ...)` work: each encoder module registers its rules at import."""
    _RULES[encoder] = rules


register_weight_rules("resnet50", WeightRules(
    default_resnet50_path, "--resnet-weights",
    lambda p: (f"ResNet-50 weights not found: put {RESNET50_FILE} (torchvision's ImageNet IMAGENET1K_V2 file) in "
               f"{p.parent}/ (torch.hub.get_dir()/checkpoints), or pass --resnet-weights FILE (ImageNet or a "
               f"fine-tuned checkpoint), or --random-init to test with random weights")))
register_weight_rules("cnn14", WeightRules(
    default_cnn14_path, "--cnn14-weights",
    lambda p: (f"Cnn14 weights not found: put {CNN14_FILE} (PANNs AudioSet checkpoint, "
               f"https://zenodo.org/record/3987831) in {p.parent}/, or pass --cnn14-weights FILE, or "
               f"--random-init to test with random weights")))
# ResNet-50 and Cnn14 list no published digests here: an identity field would enter their extractors' descriptions,
# which dense feature folders record and the dense detector's key digests (their keys must not move).


def default_weights_path(encoder: str) -> Path | None:
    """Where `encoder`'s weight file is looked for when none is given (None: no rules for it)."""
    return _RULES[encoder].default_path() if encoder in _RULES else None


def has_weight_rules(encoder: str) -> bool:
    """Whether `locate_weights` knows where `encoder`'s weight file lives and how to check it."""
    return encoder in _RULES


def file_identity(path: Path, rules: WeightRules, sha256: str) -> str:
    """What the file is, by its digest: the published file it matches, or "unknown" (recorded, warned)."""
    if not rules.published:
        return ""
    if sha256 in rules.published:
        return rules.published[sha256]
    for digest, what in rules.published.items():  # torch hub names carry the sha256's first 8 hex digits
        if len(digest) == 8 and sha256.startswith(digest):
            return what
    md5s = {d for d in rules.published if len(d) == 32}
    if md5s and _file_md5(path) in md5s:
        return rules.published[_file_md5(path)]
    return "unknown: not a published file (a converted or fine-tuned file can still be right)"


def locate_weights(encoder: str, path: Path | None = None, *, random_init: bool = False, seed: int = 0,
                   hash_file: bool = True) -> WeightsInfo:
    """Find the weight file of `encoder` (one with registered rules) and hash it; random init only when asked."""
    if encoder not in _RULES:
        raise ValueError(f"no weight rules for encoder {encoder!r}; known: {', '.join(_RULES)}")
    rules = _RULES[encoder]
    if random_init:
        if path is not None:
            raise UserError(f"both {rules.flag} {path} and --random-init were given; choose one")
        return WeightsInfo(encoder, None, None, True, seed, "random init")
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"{path}: {encoder} weight file not found ({rules.flag}); check the path")
        source = "explicit"
    else:
        path = rules.default_path()
        if not path.is_file():
            raise UserError(rules.how(path))
        source = "default location"
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file (an interrupted download?); replace it with the real {encoder} "
                        f"weights")
    sha = weights_sha256(path) if hash_file else None
    identity = file_identity(path, rules, sha) if sha else ""
    return WeightsInfo(encoder, path, sha, False, None, source, identity)


_SHA256_SEEN: dict[tuple, str] = {}
_MD5_SEEN: dict[tuple, str] = {}


def _stamp(path: Path) -> tuple:
    st = Path(path).stat()
    return str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns


def _file_md5(path: Path) -> str:
    """The file's md5 (Keras publishes md5s), once per process while the file is unchanged, as `weights_sha256`."""
    import hashlib

    stamp = _stamp(path)
    if stamp not in _MD5_SEEN:
        h = hashlib.md5()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        _MD5_SEEN[stamp] = h.hexdigest()
    return _MD5_SEEN[stamp]


def weights_sha256(path: Path) -> str:
    """The file's sha256, computed once per process while the file is unchanged (same inode, size and mtime): a
    Dask worker locates the weights for every shard it runs, and hashing ~100 MB per shard and encoder would cost
    more than a small shard's videos."""
    stamp = _stamp(path)
    if stamp not in _SHA256_SEEN:
        _SHA256_SEEN[stamp] = file_sha256(path)
    return _SHA256_SEEN[stamp]


def read_checkpoint(path: Path, what: str, trusted_sha256: str | None = None) -> Any:
    """torch.load(weights_only=True); a full unpickle only for a file whose sha256 is `trusted_sha256`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and torch errors all mean "not a checkpoint we can read safely"
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if trusted_sha256 is not None and "weights_only" in str(e) and file_sha256(path) == trusted_sha256:
            return torch.load(path, map_location="cpu", weights_only=False)
        raise UserError(f"{path}: not a readable PyTorch checkpoint for {what} ({reason}). Expected a file made "
                        f"with torch.save holding tensors only") from None


def is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def strip_prefix(sd: Mapping[str, torch.Tensor], prefixes=("module.", "_orig_mod.")) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def resnet50_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """torchvision-named trunk state dict (no fc.*) from any supported format, and the format's name."""
    if isinstance(obj, Mapping) and obj.get("format") == TRUNK_FORMAT:
        sd, fmt = obj.get("state_dict"), TRUNK_FORMAT
    elif isinstance(obj, Mapping) and "I_state_dict" in obj:
        sd, fmt = obj["I_state_dict"], "cace-net I_state_dict"
    elif isinstance(obj, Mapping) and not is_tensor_dict(obj) and is_tensor_dict(obj.get("state_dict")):
        sd, fmt = obj["state_dict"], "state_dict"
    else:
        sd, fmt = obj, "torchvision"
    if not is_tensor_dict(sd):
        keys = list(obj.keys())[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise UserError(f"{path}: not a ResNet-50 checkpoint (found {keys}); expected a torchvision state dict, "
                        f"a CACE-Net {{'I_state_dict': ...}} file or an `avel finetune` output")
    sd = strip_prefix(sd)
    if any(re.match(r"^[0-9]+\.", k) for k in sd):  # Sequential(children[:-2]) numbering
        renamed = {}
        for k, v in sd.items():
            head, _, rest = k.partition(".")
            if head not in _SEQUENTIAL_NAMES:
                raise UserError(f"{path}: key {k!r} is not part of a ResNet-50 trunk "
                                f"(Sequential(children[:-2]) has conv1=0, bn1=1, layer1..4=4..7)")
            renamed[f"{_SEQUENTIAL_NAMES[head]}.{rest}"] = v
        sd = renamed
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}, fmt


def check_state_dict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], path: Path, what: str,
                     ignore_missing: tuple[str, ...] = ("num_batches_tracked",),
                     ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Raise a UserError naming the first mismatches if `sd` does not fit `model` key for key, shape for shape.
    Keys starting with `ignore_prefixes` (e.g. a classifier the trunk never uses) are not compared."""
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(ignore_prefixes)}
    missing = [k for k in expected if k not in sd and not k.endswith(ignore_missing)]
    unexpected = [k for k in sd if k not in expected and not k.startswith(ignore_prefixes)]
    wrong = [f"{k} {list(sd[k].shape)} (expected {list(expected[k].shape)})" for k in expected
             if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for name, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                parts.append(f"{len(items)} {name} (e.g. {', '.join(items[:3])})")
        raise UserError(f"{path}: does not fit {what}: {'; '.join(parts)}. Is this the right file?")


def load_resnet50_weights(model: torch.nn.Module, path: Path) -> str:
    """Load a weight file (any supported format) into a torchvision resnet50; returns the format's name."""
    sd, fmt = resnet50_state_dict(read_checkpoint(path, "ResNet-50"), path)
    check_state_dict(model, sd, path, "ResNet-50", ignore_prefixes=("fc.",))
    model.load_state_dict(sd, strict=False)  # fc stays as constructed: the trunk never uses it
    return fmt


def read_cnn14_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The "model" entry of a PANNs checkpoint (checked before any model is built: a wrong file fails fast)."""
    obj = read_checkpoint(path, "Cnn14", trusted_sha256=CNN14_SHA256)
    if not isinstance(obj, Mapping) or "model" not in obj:
        found = list(obj.keys())[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise UserError(f"{path}: not a PANNs Cnn14 checkpoint: no 'model' entry (found {found}); the AudioSet file "
                        f"{CNN14_FILE} is a dict whose 'model' entry is the state dict")
    sd = obj["model"]
    if not is_tensor_dict(sd):
        raise UserError(f"{path}: the 'model' entry is not a state dict of tensors")
    return strip_prefix(sd)


def load_cnn14_weights(model: torch.nn.Module, path: Path,
                       state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
    sd = state_dict if state_dict is not None else read_cnn14_state_dict(path)
    check_state_dict(model, sd, path, "Cnn14 (32 kHz, 64 mel bins, 527 classes)")
    model.load_state_dict(sd, strict=False)


def save_resnet50_trunk(model: torch.nn.Module, path: Path, meta: dict | None = None) -> Path:
    """Save a ResNet-50 trunk in the `avel-resnet50-trunk` format, atomically.

    `model`: a torchvision ResNet (fc.* is dropped), a `ResNet50Extractor`, or a module whose state dict has
    torchvision trunk keys (or `Sequential(children[:-2])` keys, which are renamed). `meta`: anything JSON-like the
    caller wants kept (epoch, loss, data digest...)."""
    module = getattr(model, "model", model)
    sd, _ = resnet50_state_dict({k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()},
                                Path(path))
    obj = {"format": TRUNK_FORMAT, "version": 1, "arch": "resnet50", "state_dict": sd, "meta": dict(meta or {})}
    with atomic_path(Path(path)) as tmp:
        torch.save(obj, tmp)
    return Path(path)


@contextlib.contextmanager
def seeded(seed: int):
    """Construct models with a fixed seed without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def trained_from_random(info: WeightsInfo) -> bool:
    """True for random weights and for a fine-tuned trunk whose fine-tuning started from random weights.

    The fine-tuning stage records its starting point in the trunk file's meta (`initial_weights`); features from
    such a trunk must carry the RANDOM WEIGHTS warning too, although the file itself has a sha256.
    """
    if info.random_init:
        return True
    if info.encoder != "resnet50" or info.path is None:
        return False
    with contextlib.suppress(UserError):
        obj = read_checkpoint(info.path, "ResNet-50")
        if isinstance(obj, dict) and obj.get("format") == TRUNK_FORMAT:
            return str(obj.get("meta", {}).get("initial_weights", "")).startswith("random-init")
    return False
