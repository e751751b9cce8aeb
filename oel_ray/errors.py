"""The errors a user's input raises, and the one-line checks that raise them (config fields, files).

Each is reported by oel_ray.main as one line naming the field or file and the fix, exit code 2."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A user's configuration mistake: reported as one line naming the field and the fix."""


class InputError(ConfigError):
    """A file the run reads is missing or corrupt: reported as one line naming the file and the fix."""


def require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


def choice(name: str, value: Any, allowed: tuple) -> None:
    require(value in allowed, name, f"{value!r} is not one of {', '.join(map(str, allowed))}")


def positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    require(ok, name, f"{value} must be {'>= 0' if allow_zero else '> 0'}")
