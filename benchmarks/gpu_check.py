"""GPU check: a short consolidation at Qwen3-0.6B and Qwen3-1.7B sizes on the GPU at hand, with
tokens/s, step time, weight-sync time and MFU per stage.

    python -m benchmarks.gpu_check                   # CUDA: qwen3-0.6b and qwen3-1.7b, bf16
    python -m benchmarks.gpu_check --models tiny     # CPU: the embedded tiny model (make test)

The models are random-initialised Qwen3 configurations with Qwen3's real vocabulary size (151,936
rows: the output head and its log-softmax cost what they cost there); the tokenizer is oel_ray's
own BPE, built offline, so prompt ids use only its first ids. One step is the paper's shape: 64
student prompts, 10 distinct knowledge texts in front of them in the teacher's prompts, replies
sampled with the student's top-k support, the teacher's scores (each prompt in full, then with each
knowledge text encoded once and reused, then with the prompts encoded before the replies and the
replies run on top: teacher.prefill_prompts), one optimizer step on the top-k reverse KL.

The roles share one GPU as they do on a one-GPU node, and run in this process as the classes the
Ray actors wrap (`TeacherServer`, `Learner`, `VLLMEngine`): what is measured is their work, not
Ray's scheduling. Weight sync is the one-GPU route (the full weights gathered to the host, loaded
into the engine); the collective route needs a second GPU and is not measured here. Where vLLM is
not installed (the lent GPU machine has no package registry and vLLM's CUDA wheel is far larger
than what can be carried to it), replies are sampled with transformers' `generate`, and the
results say so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import markdown_table, quiet_libraries, save, tiny_model_path
from benchmarks.flops import Arch, datasheet_peak, measured_peak, timed
from benchmarks.paper_shape import build_random
from benchmarks.teacher import TEACHER_AFTER, TEACHER_FULL, TEACHER_PREFILL, TEACHER_REUSED, measure
from oel_ray.config import BFLOAT16, FLOAT32, LearnerConfig, TeacherConfig
from oel_ray.types import DistillSample, Generation, Sampling

QWEN3_VOCAB = 151_936
# Qwen3-0.6B and -1.7B as published (tied embeddings, GQA with 8 key/value heads of 128).
ARCHS = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28),
}
QWEN3_COMMON = dict(num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                    rope_theta=1_000_000.0, max_position_embeddings=8192)


@dataclass(frozen=True)
class Shape:
    batch: int  # student prompts per step
    prompt: int  # student prompt tokens
    knowledge: int  # knowledge tokens in front of the teacher's prompt
    distinct: int  # distinct knowledge texts per step
    reply: int  # reply tokens sampled
    support_k: int
    grad_accum: int
    learner_steps: int  # the first is a warm-up, not timed


PAPER = Shape(batch=64, prompt=384, knowledge=2048, distinct=10, reply=128, support_k=256, grad_accum=4,
              learner_steps=3)
TINY = Shape(batch=8, prompt=32, knowledge=64, distinct=2, reply=16, support_k=8, grad_accum=1, learner_steps=2)


class HFGenerator:
    """Sampling with transformers' `generate`, for machines without vLLM: the same Generation
    objects, the student's top-k support read from each step's logits."""

    def __init__(self, path: str, dtype: torch.dtype, device: torch.device):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.device, self.pad = device, self.model.config.pad_token_id

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Generation]:
        width = max(map(len, prompts))
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        topk: list[torch.Tensor] = []

        def record(_, scores):  # a logits processor that keeps each step's top-k ids
            topk.append(scores.topk(sampling.support_k, -1).indices)
            return scores

        out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=sampling.temperature,
                                  top_k=0, max_new_tokens=sampling.max_tokens, logits_processor=[record],
                                  min_new_tokens=sampling.max_tokens,  # fixed-length replies: the step's shape
                                  pad_token_id=self.pad)
        replies, support = out[:, width:].cpu().numpy(), torch.stack(topk, 1).cpu().numpy().astype(np.int32)
        return [Generation(token_ids=r.tolist(), text="", finished=False, topk_ids=s) for r, s in zip(replies, support)]

    def load_weights(self, weights: dict) -> float:
        start = time.perf_counter()
        self.model.load_state_dict(weights, strict=False)  # a tied head is re-tied below
        self.model.tie_weights()
        return time.perf_counter() - start


def generator(path: str, dtype: str, device: torch.device, shape: Shape, engine: str):
    """The rollout engine (vLLM, a quarter of the GPU), or transformers where vLLM is missing."""
    if engine == "transformers" or importlib.util.find_spec("vllm") is None:
        why = "asked" if engine == "transformers" else "vLLM not installed"
        return HFGenerator(path, getattr(torch, dtype), device), f"transformers generate ({why})"
    from oel_ray.engine import VLLMEngine

    engine = VLLMEngine(path, dtype=dtype, max_model_len=shape.prompt + shape.reply + 16, seed=0,
                        max_logprobs=shape.support_k, gpu_memory_utilization=0.25)
    return engine, "vllm"


def check_model(name: str, path: str, dtype: str, device: torch.device, shape: Shape, peak: float,
                engine: str = "auto") -> dict:
    from transformers import AutoConfig

    from oel_ray.learner import Learner
    from oel_ray.netif import free_port
    from oel_ray.teacher import TeacherServer

    arch = Arch.of(AutoConfig.from_pretrained(path))
    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(8, 400, n).tolist()  # noqa: E731  (ordinary BPE ids, no special tokens)
    prompts = [ids(shape.prompt) for _ in range(shape.batch)]
    knowledge = [ids(shape.knowledge) for _ in range(shape.distinct)]
    rows: dict[str, dict] = {}

    def stage(label: str, seconds: float, tokens: int, flops: float) -> None:
        rows[label] = dict(seconds=seconds, tokens=tokens, tokens_per_s=tokens / seconds,
                           tflops_per_s=flops / seconds / 1e12, mfu=flops / seconds / peak)

    engine, engine_name = generator(path, dtype, device, shape, engine)
    sampling = Sampling(max_tokens=shape.reply, temperature=1.0, seed=0, support_k=shape.support_k)
    engine.generate(prompts, replace(sampling, max_tokens=4))  # warm-up at the batch's width
    gens, seconds = timed(device, engine.generate, prompts, sampling)
    replies = [g.token_ids for g in gens]
    stage("generation", seconds, sum(map(len, replies)), sum(arch.generation(shape.prompt, len(r)) for r in replies))

    samples = [DistillSample(p, knowledge[i % shape.distinct] + p, r, g.topk_ids)
               for i, (p, r, g) in enumerate(zip(prompts, replies, gens))]
    teacher = TeacherServer(path, dtype=dtype, temperature=1.0, chunk_tokens=TeacherConfig.chunk_tokens,
                            batch_tokens=8 * (shape.knowledge + shape.prompt + shape.reply))
    teacher.score(samples[:2])  # warm-up (two knowledge texts: nothing shared)
    figures, scores, reuse_error = measure(teacher, samples, arch, device)
    prompt_tokens = sum(len(s.teacher_prompt_ids) for s in samples)
    reply_tokens = sum(len(s.response_ids) for s in samples)
    read = {TEACHER_PREFILL: prompt_tokens, TEACHER_AFTER: reply_tokens}  # the prefilled step's two parts
    for label, (seconds, flops) in figures.items():
        stage(label, seconds, read.get(label, prompt_tokens + reply_tokens), flops)
    samples = [replace(s, teacher_logprobs=lp) for s, lp in zip(samples, scores)]
    del teacher

    cfg = LearnerConfig(batch_size=shape.batch, grad_accum=shape.grad_accum, support_k=shape.support_k,
                        temperature=1.0, dtype=dtype, zero_stage=2)
    learner = Learner(cfg, path, 0, 1, "127.0.0.1", free_port())
    steps = [timed(device, learner.train_step, samples, step) for step in range(shape.learner_steps)]
    seconds = float(np.mean([s for _, s in steps[1:]]))
    learner_tokens = sum(len(s.student_prompt_ids) + len(s.response_ids) for s in samples)
    stage("learner", seconds, learner_tokens,
          sum(arch.training(len(s.student_prompt_ids), len(s.response_ids)) for s in samples))

    weights, gather_s = timed(device, learner.state_dict)
    load_s = timed(device, engine.load_weights, weights)[1]
    step = [rows[k] for k in ("generation", TEACHER_REUSED, "learner")]  # the teacher as in most of a round
    end_to_end = sum(r["seconds"] for r in step) + gather_s + load_s
    flops = sum(r["tflops_per_s"] * r["seconds"] for r in step) * 1e12
    return dict(model=name, params=arch.params, engine=engine_name, stages=rows,
                weight_sync=dict(seconds=gather_s + load_s, gather_to_host_s=gather_s, load_s=load_s),
                step_seconds=end_to_end, step_mfu=flops / end_to_end / peak,
                teacher_prefix_speedup=rows[TEACHER_FULL]["seconds"] / rows[TEACHER_REUSED]["seconds"],
                teacher_prefix_max_abs_diff=reuse_error,
                kl=[m.kl for m, _ in steps], loss_finite=all(np.isfinite(m.loss) for m, _ in steps))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="comma-separated: tiny, " + ", ".join(ARCHS))
    parser.add_argument("--engine", choices=("auto", "transformers"), default="auto",
                        help="auto: vLLM where installed, else transformers' generate")
    parser.add_argument("--out", default=None, help="directory for gpu_check_<device>.json (default benchmarks/results)")
    args = parser.parse_args(argv)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    cuda = device.type == "cuda"
    names = (args.models or (",".join(ARCHS) if cuda else "tiny")).split(",")
    unknown = [n for n in names if n != "tiny" and n not in ARCHS]
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(unknown)}; choose from tiny, {', '.join(ARCHS)}")
    dtype = BFLOAT16 if cuda else FLOAT32
    peak = measured_peak(device, getattr(torch, dtype))
    runs = []
    with tempfile.TemporaryDirectory(prefix="oel_ray_gpu_check.") as tmp:
        for name in names:
            shape = TINY if name == "tiny" else PAPER
            path = tiny_model_path() if name == "tiny" else str(build_random(
                {**QWEN3_COMMON, **ARCHS[name]}, Path(tmp) / name, QWEN3_VOCAB, getattr(torch, dtype), device))
            runs.append(dict(check_model(name, path, dtype, device, shape, peak, args.engine), shape=asdict(shape)))
            print(json.dumps(runs[-1], indent=1), flush=True)
            if cuda:
                torch.cuda.empty_cache()
    result = dict(device=torch.cuda.get_device_name(device) if cuda else "cpu", gpus=torch.cuda.device_count(),
                  dtype=dtype, matmul_peak_tflops=peak / 1e12,
                  datasheet_peak_tflops=(datasheet_peak(device) or 0) / 1e12 or None, runs=runs)
    headers = ["model", "engine", "stage", "tokens/s", "seconds", "TFLOP/s", "MFU (measured peak)"]
    table = [[r["model"], r["engine"], stage, v["tokens_per_s"], v["seconds"], v["tflops_per_s"], v["mfu"]]
             for r in runs for stage, v in r["stages"].items()]
    table += [[r["model"], r["engine"], "weight sync", "", r["weight_sync"]["seconds"], "", ""] for r in runs]
    table += [[r["model"], r["engine"], "step, end to end", "", r["step_seconds"], "", r["step_mfu"]] for r in runs]
    md = markdown_table(headers, table)
    print(md)
    label = "cuda" if cuda else "cpu"
    save(f"gpu_check_{label}", result, tables={f"GPU check ({result['device']})": md}, out=args.out)
    return result


if __name__ == "__main__":
    quiet_libraries()
    main()
