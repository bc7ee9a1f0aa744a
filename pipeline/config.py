"""Typed, validated configuration: pydantic models loaded from YAML, with `section.field=value` overrides.

Every stage's config is a `StrictModel` (unknown fields are errors, so a typo never silently falls back to a
default). Stage configs live beside their stage; this module holds the shared base and the loading rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import UserError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class StageConfig(StrictModel):
    """Base of a stage's settings: which of them enter the stage key, and the precision that runs.

    The key holds every field except those in `key_exclude` (how a stage runs, not what it computes: the device,
    worker counts...), drops the knobs of `key_when_set` while they are off (so keys from before a knob existed
    stay valid), and holds the precision that runs (`auto` resolved on the device), never `auto` itself. A subclass
    declares `device` and `precision` fields; one whose key is not "all fields but some" overrides `key_fields`.
    """

    key_exclude: ClassVar[tuple[str, ...]] = ("device",)
    key_when_set: ClassVar[tuple[str, ...]] = ()

    def resolved_precision(self) -> str:
        """"fp32" or "bf16": what `precision` means on the device this config names."""
        from pipeline.runtime import resolve_device, resolve_precision

        return resolve_precision(getattr(self, "precision"), resolve_device(getattr(self, "device")))

    def key_fields(self) -> dict:
        fields = {k: v for k, v in dump_config(self).items() if k not in self.key_exclude}
        for knob in self.key_when_set:
            if not fields.get(knob):
                fields.pop(knob, None)
        return {**fields, "precision": self.resolved_precision()}


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.epochs=20` -> (["train", "epochs"], 20); the value is parsed as YAML (numbers, lists, null...)."""
    if "=" not in text:
        raise UserError(f"override {text!r} is not of the form key=value (e.g. train.epochs=20)")
    key, value = text.split("=", 1)
    if not key.strip():
        raise UserError(f"override {text!r} has an empty key")
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


def parse_choices(flag: str, text: str, allowed: tuple[str, ...], example: str) -> list[str]:
    """A comma-separated option of known names (`--inputs both,audio`): order kept, repeats dropped, an unknown name
    one UserError that lists the allowed ones and shows `example`."""
    out = []
    for part in (p.strip().lower() for p in text.split(",")):
        if part not in allowed:
            raise UserError(f"{flag} {text!r}: {part!r} is not one of {', '.join(allowed)} (e.g. {flag} {example})")
        if part not in out:
            out.append(part)
    return out


def parse_seeds(text: str) -> list[int]:
    """`--seeds 1,2,3` -> [1, 2, 3]; distinct integers or one UserError."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r}: comma-separated integers, e.g. --seeds 1,2,3") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: give distinct integers, e.g. --seeds 1,2,3")
    return seeds


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[path[-1]] = value
    return data


def validate(model: type[M], data: dict, source: str = "config") -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
                             for err in e.errors())
        raise UserError(f"{source}: {problems}") from None


def load_config(model: type[M], path: Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                section: str | None = None) -> M:
    """Read `path` (YAML) if given, apply overrides, validate. Errors name the file and the bad field.

    With `section`, the model is read from that top-level key of the file (one pipeline config file holds a
    section per stage, so `avel train --config run.yaml` reads `train:`); overrides are then relative to it.
    """
    data: dict = {}
    source = "command-line overrides"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise UserError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: the top level must be a mapping of settings")
        if section is not None:
            data = data.get(section) or {}
            source = f"{path} [{section}]"
    return validate(model, apply_overrides(data, list(overrides)), source)


def dump_config(cfg: BaseModel) -> dict:
    """JSON-ready dict of a config (paths as strings): what manifests record and stage keys digest."""
    return cfg.model_dump(mode="json")
