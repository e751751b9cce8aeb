"""The command line, checked before Hydra composes anything: a key that is no field (`learner.lrr`),
a value that cannot have the field's type, a group option that is no file in conf/<group>/. One line
each, before Hydra's multi-line errors and before anything expensive starts."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

from oel_ray.config import OELConfig
from oel_ray.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = {"model", "env", "rollout", "extractor", "teacher", "learner", "cluster", "experiment"}

def _parse_as(kind: Any, text: str) -> None:
    """Raise ValueError where `text` cannot be a value of the scalar type `kind`."""
    if typing.get_origin(kind) is typing.Union:  # Optional[X]
        if text == "null":
            return
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is bool and text.lower() not in ("true", "false"):
        raise ValueError("true or false")
    if kind is int:
        int(text)
    if kind is float:
        float(text)


def check_override_keys(overrides: list[str]) -> None:
    """Refuse `section.typo=value` and ill-typed values with one line, before Hydra's multi-line
    errors and before anything expensive starts. Group choices (`env=frozenlake`) are left to Hydra."""
    for item in overrides:
        if "=" not in item or item.startswith(("~", "hydra.", "hydra/")):
            continue
        key, value = item.split("=", 1)
        key = key.lstrip("+")
        parts = key.split(".")
        if len(parts) == 1 and key in GROUPS:
            _check_group_choice(key, item, value)
            continue
        node: Any = OELConfig
        for depth, part in enumerate(parts):
            if not dataclasses.is_dataclass(node):
                break  # inside a free dict such as env.kwargs
            hints = typing.get_type_hints(node)
            if part not in hints:
                where = ".".join(parts[:depth])
                hint = difflib.get_close_matches(part, hints, n=1)
                guess = f"did you mean {'.'.join(parts[:depth] + hint)}? " if hint else ""
                raise ConfigError(f"{key}: no such field; {guess}fields in {where or 'the top level'}: "
                                  f"{', '.join(sorted(hints))}")
            node = hints[part]
        else:
            for one in _swept_values(item, value):
                if one.startswith("${") or dataclasses.is_dataclass(node):
                    continue
                try:
                    _parse_as(node, one)
                except ValueError:
                    name = getattr(node, "__name__", str(node).replace("typing.", ""))
                    raise ConfigError(f"{key}: {one!r} is not a valid {name}") from None


def _check_group_choice(group: str, item: str, value: str) -> None:
    """`env=frozenlake`, `+experiment=sokoban_4b`: each chosen option must be a file in conf/<group>/."""
    options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    for one in _swept_values(item, value):
        if one not in options and not one.startswith("${"):
            raise ConfigError(f"{group}: {one!r} is not one of {', '.join(options)} (files in conf/{group}/)")


def _swept_values(item: str, value: str) -> list[str]:
    """Each value an override sets: one, or every value of a multirun sweep (`extractor.k=2,4`,
    `range(1,5)`, `choice(...)`), so each is type-checked on its own."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        override = OverridesParser.create().parse_override(item)
    except Exception:  # not Hydra syntax: check the text as it is
        return [value]
    if not override.is_sweep_override():
        return [value]
    try:
        return [str(v) for v in override.sweep_string_iterator()]
    except Exception:  # interval(): a continuous range, no list of values to check
        return []
