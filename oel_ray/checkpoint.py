"""Checkpoints a learner writes: the round's model as a Hugging Face checkpoint (what vLLM, the
teacher and a user load), and the resumable training state (DeepSpeed's weights, optimizer and
schedule). Both are whole directories made under a temporary name and renamed into place
(`artifacts.replace_dir`), so a reader sees a complete checkpoint or none."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from oel_ray.artifacts import replace_dir

STATE_TAG = "learner_state"  # the DeepSpeed checkpoint tag inside a training-state directory
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".msgpack", ".h5")


def write_hf(weights: dict, model, source: str, path: Path) -> None:
    """`weights` (full tensors by state-dict name) with `model`'s config and generation config, and
    the other files of the `source` checkpoint (tokenizer, chat template), as the checkpoint `path`."""
    from safetensors.torch import save_file

    if not os.path.isdir(source):  # a hub id: tokenizer files come from the local hub cache
        from huggingface_hub import snapshot_download

        source = snapshot_download(source, local_files_only=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        for f in Path(source).iterdir():
            if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def state_tmp(path: Path) -> Iterator[Path]:
    """A temporary sibling of the training-state directory `path`, on the same storage, for every
    rank to write its part into before rank 0 renames it to `path`; removed if a rank failed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
