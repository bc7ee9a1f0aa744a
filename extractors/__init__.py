"""Feature extractors behind one interface (`extractors.base.Extractor`), found by name in a small registry.

    >>> from extractors import create_extractor, list_extractors
    >>> list_extractors()
    ['cnn14', 'i3d_flow', 'i3d_rgb', 'resnet50', 'vgg19', 'vggish']
    >>> enc = create_extractor("resnet50", random_init=True, frames_per_segment=2)  # doctest: +SKIP

Built-in modules are imported only when their extractor is created (importing panns-inference has side effects,
see extractors/cnn14.py). Other extractors (e.g. tiny ones in tests) join with `register_extractor`.
"""

from __future__ import annotations

import functools
import importlib

from extractors.base import Extractor

_BUILTIN = {"resnet50": "extractors.resnet50:ResNet50Extractor", "cnn14": "extractors.cnn14:Cnn14Extractor",
            # the field's released feature sets (feature-sets-spec): AVE's VGG-19 + VGGish, UnAV-100's I3D + VGGish
            "vgg19": "extractors.vgg19:VGG19Extractor", "vggish": "extractors.vggish:VGGishExtractor",
            "i3d_rgb": "extractors.i3d:I3DRGBExtractor", "i3d_flow": "extractors.i3d:I3DFlowExtractor"}
_REGISTERED: dict[str, type[Extractor]] = {}


def register_extractor(cls: type[Extractor]) -> type[Extractor]:
    """Class decorator: make `cls` available as `create_extractor(cls.name)`."""
    if not getattr(cls, "name", None):
        raise ValueError(f"{cls.__name__} needs a class attribute `name` to be registered")
    _REGISTERED[cls.name] = cls
    return cls


def list_extractors(modality: str | None = None) -> list[str]:
    names = sorted(set(_BUILTIN) | set(_REGISTERED))
    if modality is None:
        return names
    return [n for n in names if get_extractor_class(n).modality == modality]


def get_extractor_class(name: str) -> type[Extractor]:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTIN:
        module, attr = _BUILTIN[name].split(":")
        return getattr(importlib.import_module(module), attr)
    raise ValueError(f"unknown extractor {name!r}; known: {', '.join(list_extractors())}")


def create_extractor(name: str, **kwargs) -> Extractor:
    """Build extractor `name`; kwargs go to its constructor (weights, random_init, seed, device, precision, and
    for visual ones frames_per_segment)."""
    return get_extractor_class(name)(**kwargs)


@functools.lru_cache(maxsize=4)
def kept_extractor(name: str, weights_id: str, **kwargs) -> Extractor:
    """`create_extractor`, kept for the life of the process (the last 4 distinct ones): a Dask worker runs many
    shards with the same encoders, and building Cnn14 or ResNet-50 (and reading their weights) for each shard cost
    more than the shard's videos on a CPU (measured, `benchmarks/scaling.py`). `weights_id` (the weight file's
    digest, `extractors.weights`) is part of the key, so a changed file at the same path builds a new one.
    Extractors hold no per-video state, so sharing one between shards of the same worker is safe."""
    return create_extractor(name, **kwargs)


__all__ = ["Extractor", "create_extractor", "get_extractor_class", "kept_extractor", "list_extractors",
           "register_extractor"]
