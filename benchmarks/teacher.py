"""The teacher at the paper's shape: seconds per step with each prompt scored in full, and with each
knowledge text encoded once and its keys/values reused (`teacher.reuse_prefix`); what is left
once the replies are in when the prompts were encoded while the workers generated
(`teacher.prefill_prompts`); then one teacher actor against two (`teacher.num_actors`).

    python -m benchmarks.teacher

The paper's step: 64 samples whose teacher prompts carry one of 10 distinct knowledge texts in
front of a per-sample situation and reply. Here the knowledge is 2048 tokens, situations 256,
replies 128, on the embedded tiny model and on a random-initialised ~35M-parameter Qwen3 with a
32k vocabulary (`mid`). The first step of a round encodes the 10 texts; later steps find them in
the cache. Every figure is also given as model FLOP/s against this machine's measured fp32 matmul
peak (benchmarks/flops.py).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import markdown_table, quiet_libraries, save, start_ray, stop_ray, tiny_model_path
from benchmarks.flops import Arch, measured_peak, timed
from benchmarks.paper_shape import build_random
from oel_ray.config import FLOAT32, TeacherConfig
from oel_ray.prefix_cache import shared_prefix_groups
from oel_ray.types import DistillSample

TEACHER_FULL = "teacher, full prompts"
TEACHER_FIRST = "teacher, knowledge encoded (first step)"
TEACHER_REUSED = "teacher, knowledge reused (later steps)"
TEACHER_PREFILL = "teacher, prompts prefilled (during generation)"
TEACHER_AFTER = "teacher, replies on prefilled prompts (after generation)"
MID_ARCH = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                num_key_value_heads=4, head_dim=64, vocab_size=32_000, tie_word_embeddings=True)


@dataclass(frozen=True)
class Step:
    batch: int = 64
    knowledge: int = 2048
    distinct: int = 10
    situation: int = 256
    reply: int = 128
    support_k: int = 64


def paper_samples(step: Step, vocab: int, seed: int = 0) -> list[DistillSample]:
    """Random ids in the paper's shape: sample i reads knowledge text i mod `distinct`."""
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(8, vocab, n).tolist()  # noqa: E731
    knowledge = [ids(step.knowledge) for _ in range(step.distinct)]
    out = []
    for i in range(step.batch):
        situation, reply = ids(step.situation), ids(step.reply)
        support = np.stack([rng.choice(vocab, step.support_k, replace=False) for _ in reply]).astype(np.int32)
        out.append(DistillSample(situation, knowledge[i % step.distinct] + situation, reply, support))
    return out


def measure(teacher, samples: list[DistillSample], arch: Arch, device: torch.device) -> tuple[dict, list, float]:
    """The teacher's measurements on one step's samples: {label: (seconds, model FLOPs)}, the scores
    with reuse, and the largest |reused or prefilled - full| log-prob. `teacher` is a TeacherServer
    whose prefix cache is empty. The prefilled step's two parts are timed apart: the first runs
    while the workers generate, where the teacher has a device of its own; the second is what a
    step waits for."""
    out = {}
    cache, teacher.prefixes = teacher.prefixes, None  # the plain path: every prompt in full
    full, seconds = timed(device, teacher.score, samples)
    out[TEACHER_FULL] = seconds, sum(arch.scoring(len(s.teacher_prompt_ids), len(s.response_ids)) for s in samples)
    teacher.prefixes = cache
    groups = shared_prefix_groups([s.teacher_prompt_ids for s in samples])
    skip = {i: shared for shared, run in groups for i in run}
    suffixes = sum(arch.forward(len(s.teacher_prompt_ids) - skip[i] + len(s.response_ids), past=skip[i],
                                head=len(s.response_ids)) for i, s in enumerate(samples))
    for label, encodes in ((TEACHER_FIRST, True), (TEACHER_REUSED, False)):
        scores, seconds = timed(device, teacher.score, samples)
        out[label] = seconds, suffixes + encodes * sum(arch.forward(p, head=0) for p, _ in groups if p)
    _, seconds = timed(device, teacher.prefill, [s.teacher_prompt_ids for s in samples])
    out[TEACHER_PREFILL] = seconds, sum(arch.forward(len(s.teacher_prompt_ids) - skip[i], past=skip[i], head=0)
                                        for i, s in enumerate(samples))
    prefilled, seconds = timed(device, teacher.score, samples)
    out[TEACHER_AFTER] = seconds, sum(arch.forward(len(s.response_ids), past=len(s.teacher_prompt_ids),
                                                   head=len(s.response_ids)) for s in samples)
    error = max(float(np.abs(a - b).max()) for ours in (scores, prefilled) for a, b in zip(ours, full) if a.size)
    return out, scores, error


def server(path: str, reuse_prefix: bool = True):
    from oel_ray.teacher import TeacherServer

    return TeacherServer(path, dtype=FLOAT32, temperature=1.0, chunk_tokens=TeacherConfig.chunk_tokens,
                         batch_tokens=TeacherConfig.batch_tokens, reuse_prefix=reuse_prefix)


def actors_ratio(path: str, samples: list[DistillSample]) -> dict:
    """Seconds to score one step (knowledge reused, warm cache) over 1 and 2 teacher actors."""
    from oel_ray.teacher import TeacherGroup

    start_ray()
    seconds = {}
    try:
        for n in (1, 2):
            group = TeacherGroup(path, num_actors=n, num_cpus=0.5, num_gpus=0, dtype=FLOAT32, temperature=1.0,
                                 chunk_tokens=TeacherConfig.chunk_tokens, batch_tokens=TeacherConfig.batch_tokens)
            try:
                group.set_threads(max(1, len(os.sched_getaffinity(0)) // n))
                group.score(samples)  # fills each actor's cache
                start = time.perf_counter()
                group.score(samples)
                seconds[n] = time.perf_counter() - start
            finally:
                group.shutdown()
    finally:
        stop_ray()
    cores = len(os.sched_getaffinity(0))
    why = None if cores >= 4 else (f"{cores} cores: one actor already computes on all of them, two split them "
                                   "(each actor's share is cores / actors torch threads)")
    return dict(seconds_1=seconds[1], seconds_2=seconds[2], throughput_ratio=seconds[1] / seconds[2], why=why)


def main() -> dict:
    step = Step()
    device = torch.device("cpu")
    peak = measured_peak(device, torch.float32)
    rows, result = [], {"shape": step.__dict__, "matmul_peak_tflops": peak / 1e12, "models": {}}
    with tempfile.TemporaryDirectory(prefix="oel_ray_teacher_bench.") as tmp:
        mid = build_random(MID_ARCH, Path(tmp) / "mid", MID_ARCH["vocab_size"])
        for name, path in (("tiny", tiny_model_path()), ("mid-35m", str(mid))):
            teacher = server(path)
            arch = Arch.of(teacher.model.config)
            samples = paper_samples(step, arch.vocab)
            teacher.score(samples[:2])  # warm-up (two texts: nothing shared)
            figures, _, error = measure(teacher, samples, arch, device)
            full = figures[TEACHER_FULL][0]
            for label, (seconds, flops) in figures.items():
                rows.append([name, label, seconds, full / seconds, flops / seconds / 1e12, flops / seconds / peak])
            result["models"][name] = dict(params=arch.params, max_abs_diff=error,
                                          seconds={k: v[0] for k, v in figures.items()},
                                          speedup_later_steps=full / figures[TEACHER_REUSED][0],
                                          wait_after_generation_vs_reused=figures[TEACHER_REUSED][0]
                                          / figures[TEACHER_AFTER][0])
            print(rows[-len(figures):], flush=True)
            if name == "tiny":
                result["actors"] = actors_ratio(path, samples)
    table = markdown_table(["model", "teacher", "s/step", "vs full", "TFLOP/s", "of fp32 peak"], rows)
    actors = result["actors"]
    note = (f"64 samples, 10 knowledge texts of 2048 tokens, situations 256, replies 128; largest |reused or "
            f"prefilled - full| log-prob {max(m['max_abs_diff'] for m in result['models'].values()):.2g}. Prefilled: "
            "the prompts (after the cached knowledge) are encoded while the workers generate, on a teacher device "
            "of its own (on by default with teacher GPUs; on shared CPU cores the two slow each other down), and "
            "a step waits only for the replies' part. teacher.num_actors=2 vs 1 "
            f"(tiny, knowledge reused): {actors['throughput_ratio']:.2f}x throughput"
            + (f" ({actors['why']})" if actors["why"] else ""))
    print(table + "\n\n" + note)
    title = "Teacher at the paper's shape, knowledge prefix reused or not"
    save("teacher", result, tables={title: table + "\n\n" + note}, readme=[title])
    return result


if __name__ == "__main__":
    quiet_libraries()
    main()
