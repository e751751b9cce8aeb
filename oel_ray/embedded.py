"""The embedded models (model.build): which recipe a name means, what a cache holds, and the build.

A build is written to a temporary sibling directory and renamed, so an interrupted build never
leaves a half-written checkpoint that a later run would trust; a cache holding another version of
the same embedded model is rebuilt, and anything else at the path is never replaced. The recipes:
oel_ray/tiny_model.py (the fast fixture) and oel_ray/organism.py (the model organism).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from filelock import FileLock

from oel_ray import organism
from oel_ray.artifacts import replace_dir
from oel_ray.config import EMBEDDED_MODELS, FLOAT32
from oel_ray.seeds import BUILD_SEED
from oel_ray.tiny_model import NAME_KEY, TINY, TINY_ARCH, VERSION_KEY, Recipe, build_tokenizer


def recipe(name: str) -> Recipe:
    """The recipe model.build names (config.EMBEDDED_MODELS)."""
    if name == TINY.name:
        return TINY
    if name == organism.RECIPE.name:
        return organism.RECIPE
    raise ValueError(f"no embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")


def cached_version(path: Path, name: Optional[str] = None) -> Optional[int]:
    """The version of the embedded model saved at `path` (None when nothing is there). Raises when
    `path` holds anything else: another model, or (with `name`) another embedded model."""
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        return None
    # Models built before NAME_KEY existed are the tiny one (hidden size 128, 2 layers).
    legacy = config.get("hidden_size") == TINY_ARCH["hidden_size"] and config.get("num_hidden_layers") == 2
    built = config.get(NAME_KEY, TINY.name if legacy else None)
    if built is None or (name is not None and built != name):
        # Never delete what this module did not build (model.path pointed at a real checkpoint).
        raise ValueError(f"{path} holds a model that is not oel_ray's {name or 'embedded'} model; not replacing it")
    return config.get(VERSION_KEY, 1)


def needs_build(path: str | os.PathLike, name: str) -> bool:
    """Whether `build_model(path, name)` would build (nothing, or an older version, is at `path`)."""
    r = recipe(name)
    return cached_version(Path(path).expanduser(), r.name) != r.version


def fingerprint(path: str | os.PathLike) -> str:
    """The first 16 hex digits of the sha256 of a model's weight files: which build a result came from.
    A recipe builds the same bytes on every run of one machine, but not across CPUs (another vendor's
    BLAS and vector kernels sum in another order, and thousands of warm-start steps carry the
    difference into the weights), so a version number alone does not name the model measured."""
    digest = hashlib.sha256()
    for weights in sorted(Path(path).expanduser().glob("*.safetensors")):
        digest.update(weights.read_bytes())
    return digest.hexdigest()[:16]


def build_tiny_model(path: str | os.PathLike) -> Path:
    return build_model(path, TINY.name)


def build_model(path: str | os.PathLike, name: str, seed: int = BUILD_SEED) -> Path:
    """Build the embedded model `name` at `path` unless its current version is already there.

    Written to a temporary sibling directory and renamed, so an interrupted build never leaves a
    half-written checkpoint that a later run would trust; an older version is replaced. `seed` (the
    weights' start and the order of the warm start's batches) is the recipe's own everywhere but in
    benchmarks/organism_draws.py, which builds other draws of a recipe at paths of their own.
    """
    r = recipe(name)
    path = Path(path).expanduser()
    if not needs_build(path, name):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Processes that start together (a multirun's jobs, parallel tests) build it once: the others
    # wait for the lock and then find it built.
    with FileLock(str(path) + ".lock"):
        if not needs_build(path, name):
            return path
        _build(path, r, seed)
    return path


def _build(path: Path, r: Recipe, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM
    from transformers.utils import logging as hf_logging

    from oel_ray.deepspeed_setup import name_the_accelerator
    from oel_ray.warm_start import train

    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        tok = build_tokenizer(tmp, r.corpus(), r.vocab_size, r.whole)
        eos, pad = tok.eos_token_id, tok.pad_token_id
        config = Qwen3Config(
            vocab_size=len(tok), bos_token_id=pad, eos_token_id=eos, pad_token_id=pad,
            dtype=FLOAT32, **r.arch, **{VERSION_KEY: r.version, NAME_KEY: r.name},
        )
        groups = r.groups(tok, tmp)
        threads = torch.get_num_threads()
        torch.set_num_threads(r.threads)
        try:
            torch.manual_seed(seed)
            model = Qwen3ForCausalLM(config)
            if r.prepare is not None:
                r.prepare(model, tok)
            train(model, groups, pad, lr=r.lr, batch_tokens=r.batch_tokens, seed=seed, epochs=r.epochs)
        finally:
            torch.set_num_threads(threads)
        model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad)
        name_the_accelerator()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a bar for one shard of a few MB tells the user nothing
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        try:
            replace_dir(tmp, path)  # an older version (or an empty directory) makes way
        except OSError:  # another process built it first: keep theirs
            if cached_version(path, r.name) != r.version:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    import sys

    print(build_model(sys.argv[2] if len(sys.argv) > 2 else f"~/.cache/oel_ray/{sys.argv[1]}-qwen3", sys.argv[1]))
