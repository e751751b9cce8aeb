"""The full IF-Eval through lm-evaluation-harness, as the paper measures it: lm-eval's `ifeval` task
on its vLLM backend, chat template on, thinking off, temperature 0.7, top_p 0.8, top_k 20, seed 42.

Optional: it runs only when `lm_eval` is installed and its IF-Eval data is already on this machine
(no hub is reached: the run is forced offline). `lm_eval_problem()` says why not otherwise, in one
line, and the project's own checker on a local IF-Eval JSONL or the team's fixture
(`oel_ray.ifeval`) remains the measure.

lm-eval runs in a child process (`python -m oel_ray.ifeval_lmeval`): its vLLM engine and the memory
it holds go away with it, and the offline switches are set before `datasets` or `huggingface_hub`
is first imported (both read them once, at import).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Optional

GEN_KWARGS = "do_sample=True,temperature=0.7,top_p=0.8,top_k=20"  # the paper's IF-Eval sampling
METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
_MARK = "OEL_IFEVAL "  # prefix of the child's answer line (lm-eval and vLLM print a lot)


class LmEvalUnavailable(RuntimeError):
    """lm-eval cannot run IF-Eval here; the message says why in one line."""


def _child(args: list[str], timeout_s: Optional[float]) -> tuple[Optional[dict], str]:
    """Run this module in a child process, offline; (answer, last stderr/stdout line)."""
    env = {**os.environ, **OFFLINE}
    try:
        done = subprocess.run([sys.executable, "-m", "oel_ray.ifeval_lmeval", *args], env=env, text=True,
                              capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"lm-eval did not finish within {timeout_s:.0f} s"
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):]), ""
    tail = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}").splitlines()[-1]
    return None, tail


def lm_eval_problem(timeout_s: float = 300) -> Optional[str]:
    """None when lm-eval can run IF-Eval here, offline; otherwise why not, in one line."""
    for module, hint in (("lm_eval", "pip install 'lm-eval[vllm,ifeval]'"), ("vllm", "pip install vllm")):
        if find_spec(module) is None:
            return f"{module} is not installed ({hint}); IF-Eval is measured with oel_ray.ifeval on a local JSONL or the fixture"
    answer, error = _child(["check"], timeout_s)
    if answer is None:
        return f"lm-eval's ifeval task cannot run offline here: {error}"
    return answer.get("problem")


def run_lm_eval_ifeval(checkpoint: str, *, seed: int = 42, max_gen_toks: int = 1280,
                       max_model_len: int = 4096, gpu_memory_utilization: float = 0.85, dtype: str = "auto",
                       limit: Optional[int] = None, timeout_s: Optional[float] = None) -> dict[str, float]:
    """lm-eval's ifeval on the saved HF checkpoint `checkpoint` through its vLLM backend with the
    paper's settings. Returns lm-eval's four metrics by name (the paper's number:
    "prompt_level_strict_acc"). Raises LmEvalUnavailable, with the reason, when it cannot run.
    The engine needs its own accelerator memory: call it while the rollout engines are idle, or
    give it a small `gpu_memory_utilization`."""
    if not (Path(checkpoint) / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a saved Hugging Face checkpoint (no config.json)")
    problem = lm_eval_problem()
    if problem:
        raise LmEvalUnavailable(problem)
    job = dict(checkpoint=str(checkpoint), seed=seed, max_gen_toks=max_gen_toks, max_model_len=max_model_len,
               gpu_memory_utilization=gpu_memory_utilization, dtype=dtype, limit=limit)
    answer, error = _child(["run", json.dumps(job)], timeout_s)
    if answer is None:
        raise RuntimeError(f"lm-eval ifeval on {checkpoint} failed: {error}")
    return answer


# ----------------------------------------------------------------------------- child side

def _dataset_path() -> str:
    """Where the installed lm-eval's ifeval task reads its data (it moved between releases)."""
    import lm_eval

    yaml_path = Path(lm_eval.__file__).parent / "tasks" / "ifeval" / "ifeval.yaml"
    for line in yaml_path.read_text().splitlines():
        if line.startswith("dataset_path:"):
            return line.split(":", 1)[1].strip()
    raise ValueError(f"{yaml_path} names no dataset_path")


def _check() -> Optional[str]:
    import inspect

    from lm_eval.models.vllm_causallms import VLLM

    if "enable_thinking" not in inspect.signature(VLLM.__init__).parameters:
        return "this lm-eval's vLLM backend cannot turn thinking off (needs lm-eval >= 0.4.9); upgrade lm-eval"
    path = _dataset_path()
    try:
        import datasets
    except ImportError:
        return "lm-eval's IF-Eval task needs the datasets package: pip install datasets"
    try:
        datasets.load_dataset(path, split="train")
    except Exception as err:  # any failure means: not usable offline
        return (f"lm-eval's IF-Eval data {path!r} is not available offline ({type(err).__name__}); "
                "download it once with network access (datasets.load_dataset) or use oel_ray.ifeval with a local JSONL")
    try:  # the checkers fetch NLTK's sentence model when it is missing: fails offline
        import lm_eval.tasks.ifeval.instructions_util  # noqa: F401
    except Exception as err:
        return f"lm-eval's IF-Eval checkers cannot load offline ({type(err).__name__}: {err})".splitlines()[0]
    return None


def _run(job: dict) -> dict:
    import lm_eval

    seed = job["seed"]
    results = lm_eval.simple_evaluate(
        model="vllm",
        model_args={"pretrained": job["checkpoint"], "enable_thinking": False, "seed": seed,
                    "max_model_len": job["max_model_len"], "dtype": job["dtype"],
                    "gpu_memory_utilization": job["gpu_memory_utilization"]},
        tasks=["ifeval"],
        apply_chat_template=True,
        gen_kwargs=f"{GEN_KWARGS},max_gen_toks={job['max_gen_toks']}",
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        limit=job["limit"],
        log_samples=False,
    )
    metrics = results["results"]["ifeval"]  # keys are "<metric>,<filter>", e.g. "prompt_level_strict_acc,none"
    found = {key.split(",")[0]: float(value) for key, value in metrics.items() if key.split(",")[0] in METRICS}
    if "prompt_level_strict_acc" not in found:
        raise KeyError(f"lm-eval returned no prompt_level_strict_acc (got {sorted(metrics)})")
    return found


def main(argv: list[str]) -> None:
    if argv[:1] == ["check"]:
        print(_MARK + json.dumps({"problem": _check()}), flush=True)
    elif argv[:1] == ["run"] and len(argv) == 2:
        print(_MARK + json.dumps(_run(json.loads(argv[1]))), flush=True)
    else:
        raise SystemExit("usage: python -m oel_ray.ifeval_lmeval check | run '<job json>'")


if __name__ == "__main__":
    main(sys.argv[1:])
