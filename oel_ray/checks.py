"""Checks of what the config points at, beyond the values themselves: non-finite numbers, the model
directory and the model's own limits (its config.json, no weights loaded), and the run directory.
Each raises ConfigError in one line naming the field; `user_named` turns a field that took its value
through an interpolation (`${rollout.temperature}`) back into the field the user set."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Optional

from oel_ray.errors import ConfigError

WEIGHTS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
HYDRA_RECORD = ".hydra"  # Hydra's record of the command, written into the run directory before the run
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, resolved from the local hub cache
INTERPOLATION = re.compile(r"^\$\{([A-Za-z_]\w*(?:\.\w+)*)\}$")  # a plain `${section.field}`


def finite(node: Any, prefix: str = "") -> None:
    """Every float field (and list of floats) must be a finite number: `nan` or `inf` typed on the
    command line parses as a float; nan fails every range check with a puzzling message, inf passes
    every `> 0` and reaches vLLM or the optimizer."""
    for f in dataclasses.fields(node):
        value, name = getattr(node, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            finite(value, name + ".")
        elif any(isinstance(v, float) and not math.isfinite(v) for v in _items(value)):
            raise ConfigError(f"{name}: {value} is not a finite number")


def _items(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why the directory at `path` is not a checkpoint vLLM and transformers can load; None when it is."""
    if problem := read_config(path)[1]:
        return problem
    if not any(next(path.glob(pattern), None) for pattern in WEIGHTS):
        return "no weights (*.safetensors)"
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"{index.name} is not a weight index"
        if missing := sorted(s for s in shards if not (path / s).is_file()):
            return f"weight shard {missing[0]} (of {len(shards)}) is missing"
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return "no tokenizer (tokenizer.json)"
    return None


def read_config(path: Path) -> tuple[Optional[dict], Optional[str]]:
    """The model's config.json as a dict, or why it cannot be one."""
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        return None, "no config.json"
    except (OSError, ValueError) as err:
        return None, f"config.json is not valid JSON ({type(err).__name__}: {err})"
    if not isinstance(config, dict) or not ({"model_type", "architectures"} & set(config)):
        return None, "config.json is not a model config (no model_type)"
    return config, None


def tiny_target_problem(path: Path, build: str = "tiny") -> Optional[str]:
    """model.build replaces what is at model.path unless it is its own earlier build: that must never
    be someone's files or another model."""
    from oel_ray.embedded import cached_version

    if not path.exists():
        return None
    if not path.is_dir():
        return "it is a file"
    if not (path / "config.json").exists():
        return None if not any(path.iterdir()) else "it holds files but no config.json"
    if problem := read_config(path)[1]:
        return problem
    try:
        cached_version(path, build)
    except ValueError:
        return f"it holds a model that is not oel_ray's {build} model"
    return None


def model_limits(cfg) -> None:
    """Sizes the model cannot serve, read from its config.json (a local directory, or a hub id's
    cached config; skipped when neither is on disk yet)."""
    found = _model_config_file(cfg.model.path)
    if found is None:
        return
    config = json.loads(found.read_text())
    text = config["text_config"] if isinstance(config.get("text_config"), dict) else config
    vocab = text.get("vocab_size")
    if isinstance(vocab, int) and cfg.learner.support_k > vocab:
        raise ConfigError(f"learner.support_k: {cfg.learner.support_k} is above the model's vocabulary "
                          f"({vocab} tokens, vocab_size in {found}); lower it")
    positions = next((text[k] for k in POSITION_KEYS if isinstance(text.get(k), int)), None)
    if positions is None:
        return
    scaling = text.get("rope_scaling") or {}  # a context-extended model serves factor x its trained positions
    factor = scaling.get("factor") if isinstance(scaling, dict) else None
    limit = int(positions * factor) if isinstance(factor, (int, float)) and factor > 1 else positions
    if cfg.model.max_model_len > limit:
        raise ConfigError(f"model.max_model_len: {cfg.model.max_model_len} is beyond the model's context "
                          f"({limit} positions, from {found}); lower it (prompt and reply share it)")


def frozen(names, patterns: list[str]) -> set[str]:
    """The parameter names `learner.freeze` keeps fixed: those matching any of its patterns."""
    return {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}


def freeze_patterns(cfg) -> None:
    """Every learner.freeze pattern names a parameter of the model, and some parameter stays
    trainable (names read from a local checkpoint's safetensors headers; skipped otherwise)."""
    patterns = cfg.learner.freeze
    files = sorted(Path(cfg.model.path).expanduser().glob("*.safetensors")) if patterns else []
    if not files:
        return
    from safetensors import safe_open

    names = set()
    for f in files:
        with safe_open(str(f), "pt") as weights:
            names.update(weights.keys())
    for pattern in patterns:
        if not frozen(names, [pattern]):
            raise ConfigError(f"learner.freeze: {pattern!r} matches no parameter of {cfg.model.path} "
                              f"(names look like {min(names)!r}); fix or drop the pattern")
    if frozen(names, patterns) == names:
        raise ConfigError(f"learner.freeze: {patterns} matches every parameter; nothing would train")


def _model_config_file(path: str) -> Optional[Path]:
    local = Path(path).expanduser() / "config.json"
    if local.is_file():
        return local if read_config(local.parent)[1] is None else None  # a bad one is model.path's error
    if not HUB_ID.match(path):
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json")
    return Path(cached) if isinstance(cached, str) and read_config(Path(cached).parent)[1] is None else None


def run_dir(path: str, name: str) -> None:
    """The run directory must be creatable and writable, and new, empty or an oel_ray run (which is
    resumed): a directory of other files is refused, never written into."""
    from oel_ray.manifest import is_run

    target = Path(path).expanduser().absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == target else f"cannot be created: {existing} is a file"
        raise ConfigError(f"{name}: {path} {where}, not a directory; choose another directory")
    if not os.access(existing, os.R_OK | os.W_OK | os.X_OK):
        raise ConfigError(f"{name}: {path} cannot be written ({existing} is not writable by this user); "
                          "choose another directory")
    if existing != target:
        return  # a new directory
    others = sorted(set(os.listdir(target)) - {HYDRA_RECORD})
    if others and not is_run(target):
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise ConfigError(f"{name}: {path} holds files that are not an oel_ray run ({shown}); choose a new or "
                          "empty directory, or an earlier run's directory to resume it")


def user_named(message: str, raw) -> str:
    """`message` ("field: ...") with a field that took its value through interpolations renamed to
    the field the user set, e.g. learner.temperature -> rollout.temperature."""
    from omegaconf import OmegaConf

    links = dict(_interpolations(OmegaConf.to_container(raw, resolve=False)))
    name, sep, rest = message.partition(": ")
    if name not in links:
        return message
    source = name
    while source in links:
        source = links[source]
    return f"{source}{sep}{rest} ({name} takes its value from {source})"


def _interpolations(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _interpolations(value, f"{prefix}{key}.")
        elif isinstance(value, str) and (m := INTERPOLATION.match(value)):
            yield prefix + str(key), m.group(1)
