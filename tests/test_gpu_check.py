"""benchmarks/gpu_check.py at tiny size on CPU: the script a CUDA machine runs (`make gpu-check`),
end to end with vLLM, the teacher server and the DeepSpeed learner; and the FLOP count it divides by."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.flops import Arch

ROOT = Path(__file__).resolve().parents[1]


def test_flops_count_every_matrix_weight(tiny_model):
    """Arch.params is the model's matrix-product weights (the tied head once), and a forward pass
    costs 2 FLOPs per weight per token plus the attention products."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    arch = Arch.of(model.config)
    # The output head is a Linear (holding the embedding when tied); the embedding lookup is no product.
    assert arch.params == sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = 4 * arch.layers * arch.heads * arch.head_dim
    assert arch.forward(1) == 2 * arch.params + attention
    # Two tokens after three cached ones attend to 4 and 5 keys; the head applied at one position.
    assert arch.forward(2, past=3, head=1) == (2 * 2 * arch.layers * arch.layer_params + attention * (4 + 5)
                                               + 2 * arch.hidden * arch.vocab)
    # A consolidation step's stages per sample: generating a 3-token reply to a 4-token prompt is its
    # prefill (head at the last position) and 2 decode steps; scoring is one pass, head on the reply.
    assert arch.generation(4, 3) == arch.forward(4, head=1) + arch.forward(2, past=4)
    assert arch.scoring(4, 3) == arch.forward(7, head=3) and arch.training(4, 3) == 3 * arch.scoring(4, 3)


def test_gpu_check_runs_every_stage_on_cpu(tiny_model, tmp_path):
    env = dict(os.environ, OEL_RAY_CACHE=str(Path(tiny_model).parent))
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--models", "tiny", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    assert saved["device"] == "cpu" and saved["matmul_peak_tflops"] > 0
    (run,) = saved["runs"]
    shape = run["shape"]
    assert run["engine"] == "vllm" and run["loss_finite"]
    assert len(run["kl"]) == shape["learner_steps"]
    generated = run["stages"]["generation"]["tokens"]
    assert 0 < generated <= shape["batch"] * shape["reply"]
    # The teacher reads knowledge + prompt + reply, the learner prompt + reply, of the same replies.
    from benchmarks.teacher import TEACHER_AFTER, TEACHER_PREFILL

    teacher = {k: v["tokens"] for k, v in run["stages"].items() if k.startswith("teacher")}
    prompts = shape["batch"] * (shape["knowledge"] + shape["prompt"])
    assert teacher.pop(TEACHER_PREFILL) == prompts and teacher.pop(TEACHER_AFTER) == generated
    assert list(teacher.values()) == [prompts + generated] * 3
    assert run["teacher_prefix_max_abs_diff"] < 1e-4  # reused or prefilled keys/values: the scores in full
    assert run["teacher_prefix_speedup"] > 0
    assert run["stages"]["learner"]["tokens"] == shape["batch"] * shape["prompt"] + generated
    for stage in run["stages"].values():
        assert stage["seconds"] > 0 and stage["tflops_per_s"] > 0 and stage["mfu"] > 0
    assert run["weight_sync"]["seconds"] > 0
    step = ("generation", "teacher, knowledge reused (later steps)", "learner")
    assert run["step_seconds"] >= sum(run["stages"][s]["seconds"] for s in step)
    assert "| tiny | vllm | learner |" in done.stdout
