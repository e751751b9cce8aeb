"""What every benchmark shares: the project's config, the tiny model, a local Ray, tables, results.

Each benchmark composes the project's Hydra config (conf/, the `tiny` defaults), so the
sampling, lengths and batch sizes it measures are the project's, not numbers copied into a script.
"""

from __future__ import annotations

import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from oel_ray.artifacts import write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RAY_CPUS = 4  # logical CPUs on a 2-core machine: actors ask for fractions and mostly wait on each other

# Before anything imports tokenizers or Ray: a tokenizer thread pool slows later torch work (see
# ../shared/notes/platform.md), and a private loopback Ray needs no auth token.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def quiet_libraries() -> None:
    """What the libraries the scripts drive print and a reader of `make bench` can do nothing about:
    DeepSpeed's "could not find a GPU" (a CPU machine is named as such before it loads), a progress
    bar per random-initialised model saved, vLLM's start-up chatter in the scripts' own engines,
    TRL's notes that GKDTrainer lives in trl.experimental and that this CPU build's vLLM (0.32) is
    newer than TRL 1.16 lists (its baselines generate with Hugging Face, README says why), and
    transformers' deprecation note on how GKDTrainer calls `generate`. Each script calls it first
    when run as a program, never on import: a test session that imports this module must still see
    what the product itself prints."""
    import warnings

    from transformers.utils import logging as hf_logging

    from oel_ray.deepspeed_setup import name_the_accelerator
    from oel_ray.rollout import quiet_vllm_start

    name_the_accelerator()
    hf_logging.disable_progress_bar()
    quiet_vllm_start()
    warnings.filterwarnings("ignore", message=r"You are importing from 'trl\.experimental'")
    warnings.filterwarnings("ignore", message=r"TRL currently supports vLLM versions", category=UserWarning)
    # GKDTrainer passes return_dict_in_generate beside its generation_config, which transformers calls deprecated.
    hf_logging.get_logger("transformers.generation.utils").addFilter(
        lambda record: "together with generation-related arguments" not in record.getMessage())


def load_config(*overrides: str):
    """The validated OELConfig of `conf/config.yaml` (+ overrides), as `python -m oel_ray.main` builds it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from oel_ray import config
    from oel_ray.validate import validate

    config.register()
    # output_dir is only resolvable inside a Hydra run; benchmarks write nothing there.
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        raw = compose("config", overrides=["output_dir=/tmp/oel_ray_bench", *overrides])
    return validate(OmegaConf.to_object(raw))


def tiny_model_path(cfg=None) -> str:
    """The embedded tiny model at the configured cache path (built offline on first use)."""
    from oel_ray.embedded import build_tiny_model

    cfg = cfg or load_config()
    return str(build_tiny_model(cfg.model.path))


def start_ray(num_cpus: int = RAY_CPUS) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


@contextmanager
def stopwatch() -> Iterator[dict]:
    """`with stopwatch() as t: ...` then t["s"] holds the elapsed wall seconds."""
    out: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["s"] = time.perf_counter() - start


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            if v and abs(v) < 0.001:
                return f"{v:.3g}"  # a tiny error or ratio must not print as 0.000
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def process_memory() -> dict[str, int]:
    """This process's VmRSS (resident), RssAnon (its private part) and VmHWM (peak) in bytes, from
    /proc/self/status (writing 5 to /proc/self/clear_refs starts a new peak)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def cpu_model() -> str:
    """The processor's name (/proc/cpuinfo's "model name"): builds and float sums differ between CPUs."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """Where the figures were measured: they only compare within one run on one machine."""
    import torch

    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def save(name: str, result: dict, tables: dict[str, str] | None = None, readme: Sequence[str] = (),
         out: str | Path | None = None) -> Path:
    """<out>/<name>.json (default benchmarks/results), written to a temporary file and renamed (never
    half-written).
    `tables`: the markdown tables the script printed, by title; run_all copies them into summary.md,
    and those titled in `readme` into README.md too."""
    path = Path(out or RESULTS) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"tables_md": tables, "readme_tables": list(readme)} if tables else {}
    write_json(path, {"benchmark": name, "machine": machine(),
                      "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **result, **extra})
    return path
