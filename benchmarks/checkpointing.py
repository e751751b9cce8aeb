"""The learner with and without gradient checkpointing (`learner.gradient_checkpointing`): host
memory a step needs beyond the loaded model, and seconds per step, at the paper's sequence shape.

    python -m benchmarks.checkpointing

One learner rank (DeepSpeed ZeRO-2, fp32, CPU) of a random-initialised ~35M-parameter Qwen3 with a
32k vocabulary (benchmarks/teacher.py's `mid`), one micro-batch of 8 samples: student prompts of
1024 tokens whose first 256 every prompt shares (the chat header and game intro: run once,
`learner.reuse_prefix`), replies of 256 tokens, top-64 supports. Each setting runs in a process of
its own, so its peak is its own: the peak resident memory during the first step (gradients and
AdamW's moments are allocated there too, the same in both settings) minus the resident memory
after start-up, and the mean of two more steps' seconds. Prints a table and saves
benchmarks/results/checkpointing.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import ROOT, markdown_table, quiet_libraries, save
from benchmarks.teacher import MID_ARCH

SETTINGS = {"activations kept": False, "gradient checkpointing": True}
SAMPLES, PROMPT, SHARED, REPLY, SUPPORT_K = 8, 1024, 256, 256, 64
MIB = 2**20

# Runs in a child process: python -c CHILD <model path> <checkpointing 0|1>; prints one JSON line.
CHILD = """
import json, sys, time
import numpy as np, torch
from benchmarks.common import process_memory
from oel_ray.config import LearnerConfig
from oel_ray.learner import Learner
from oel_ray.types import DistillSample

path, checkpointing = sys.argv[1], sys.argv[2] == "1"
samples_n, prompt, shared, reply, k = map(int, sys.argv[3:8])

cfg = LearnerConfig(batch_size=samples_n, lr=1e-6, zero_stage=2, dtype="float32", temperature=1.0, support_k=k,
                    gradient_checkpointing=checkpointing)
learner = Learner(cfg, path, 0, 1, "127.0.0.1", 29533)
rng = np.random.default_rng(0)
vocab = learner.model.config.vocab_size
start = rng.integers(8, vocab, shared).tolist()
def step_samples():
    out = []
    for _ in range(samples_n):
        p = start + rng.integers(8, vocab, prompt - shared).tolist()
        r = rng.integers(8, vocab, reply).tolist()
        support = np.stack([rng.choice(vocab, k, replace=False) for _ in r]).astype(np.int32)
        lp = np.log(np.full((reply, k), 0.9 / k, np.float32))
        out.append(DistillSample(p, p, r, support, lp))
    return out
batches = [step_samples() for _ in range(3)]
after_init = process_memory()["VmRSS"]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) from here on
t0 = time.perf_counter()
learner.train_step(batches[0], 1)
first = time.perf_counter() - t0
peak = process_memory()["VmHWM"]
seconds = []
for b in batches[1:]:
    t0 = time.perf_counter()
    learner.train_step(b, 2)
    seconds.append(time.perf_counter() - t0)
print(json.dumps({"after_init": after_init, "first_step_peak": peak, "first_step_s": first, "step_s": seconds}))
"""


def build_model(root: Path) -> tuple[str, int]:
    """The random-initialised `mid` model at root/mid (reused when there); returns (path, parameters)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = root / "mid"
    config = Qwen3Config(max_position_embeddings=4096, pad_token_id=0, **MID_ARCH)
    if not (path / "model.safetensors").exists():
        torch.manual_seed(0)
        Qwen3ForCausalLM(config).save_pretrained(path)
    model = Qwen3ForCausalLM.from_pretrained(path)
    return str(path), sum(p.numel() for p in model.parameters())


def measure(path: str, checkpointing: bool) -> dict:
    shape = [SAMPLES, PROMPT, SHARED, REPLY, SUPPORT_K]
    proc = subprocess.run([sys.executable, "-c", CHILD, path, str(int(checkpointing)), *map(str, shape)],
                          capture_output=True, text=True, timeout=1200, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"learner step failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    path, params = build_model(Path("/tmp/oel_ray_bench/checkpointing"))
    runs = {name: measure(path, on) for name, on in SETTINGS.items()}
    rows = []
    for name, r in runs.items():
        r["step_extra_bytes"] = r["first_step_peak"] - r["after_init"]
        r["mean_step_s"] = sum(r["step_s"]) / len(r["step_s"])
        rows.append([name, r["after_init"] / MIB, r["step_extra_bytes"] / MIB, r["mean_step_s"]])
    kept, checkpointed = runs["activations kept"], runs["gradient checkpointing"]
    memory_ratio = kept["step_extra_bytes"] / checkpointed["step_extra_bytes"]
    time_ratio = checkpointed["mean_step_s"] / kept["mean_step_s"]
    title = (f"Learner step with and without gradient checkpointing ({params / 1e6:.0f}M-parameter Qwen3, "
             f"{SAMPLES} samples of {PROMPT} prompt + {REPLY} reply tokens, fp32, 1 rank, CPU)")
    table = markdown_table(["setting", "resident after start-up MiB", "a step's peak beyond that MiB", "s/step"], rows)
    line = (f"gradient checkpointing: a step needs {memory_ratio:.2f}x less memory beyond the model "
            f"(gradients and AdamW's moments included), and takes {time_ratio:.2f}x the time")
    print(f"{title}\n\n{table}\n\n{line}")
    save("checkpointing", {"parameters": params, "architecture": MID_ARCH,
                           "shape": {"samples": SAMPLES, "prompt": PROMPT, "shared_start": SHARED, "reply": REPLY,
                                     "support_k": SUPPORT_K},
                           "runs": runs, "memory_ratio": round(memory_ratio, 3), "time_ratio": round(time_ratio, 3)},
         tables={title: f"{table}\n\n{line}"}, readme=[title])


if __name__ == "__main__":
    quiet_libraries()
    main()
