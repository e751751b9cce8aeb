"""Host memory per learner rank, ZeRO-2 vs ZeRO-3, on Qwen3-architecture models.

    python -m benchmarks.learner_memory [--layers 4 16]

Builds Qwen3-0.6B-shaped models (hidden 1024, 16 query / 8 KV heads of 128, MLP 3072, vocabulary
151,936, tied embeddings) with the given numbers of layers and random bf16 weights, saved locally
(nothing is downloaded). For each model and setting (`SETTINGS`) it starts a 2-rank LearnerGroup
(bf16, the learner's AdamW, every ZeRO-3 weight partitioned) and reads each rank's memory from
/proc/self/status after init and after one optimizer step: VmRSS (resident), RssAnon (its private
part: the memory-mapped checkpoint is file-backed and shared through the page cache) and VmHWM
(the peak so far, loading included). On CPU every weight, gradient and optimizer moment is host
memory. Two model sizes give a fixed cost and bytes per parameter per rank, extrapolated to the
paper's models (their parameter counts from their architectures, built on the meta device).
Prints tables and saves benchmarks/results/learner_memory.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import markdown_table, quiet_libraries, save, start_ray, stop_ray

RANKS = 2
ALL_PARTITIONED = {"stage3_param_persistence_threshold": 0}  # as at real sizes: no weight stays whole
# (ZeRO stage, zero_optimization settings). DeepSpeed's ZeRO-3 defaults keep up to 1e9 gathered
# parameters alive and reduce gradients in buckets of 5e8 elements: more than these whole models.
# "lean" bounds both (slower: layers are gathered again for the backward pass).
SETTINGS = {"ZeRO-2": (2, {}), "ZeRO-3": (3, ALL_PARTITIONED),
            "ZeRO-3 lean": (3, {**ALL_PARTITIONED, "stage3_max_live_parameters": 1e8, "stage3_max_reuse_distance": 0,
                                "stage3_prefetch_bucket_size": 5e7, "reduce_bucket_size": 5e7})}
GIB = 2**30
BASE_ARCH = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, max_position_embeddings=4096, tie_word_embeddings=True)
# The paper's models (Qwen3 model cards' config.json), for their parameter counts only.
PAPER = {
    "Qwen3-1.7B": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen3-4B": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen3-8B": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}


def build_model(layers: int, root: Path) -> tuple[str, int]:
    """A random-weight bf16 Qwen3 model with `layers` layers at root/qwen3-<layers>l (reused when
    there); returns (path, parameters)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = root / f"qwen3-{layers}l"
    config = Qwen3Config(num_hidden_layers=layers, **BASE_ARCH)
    if not (path / "model.safetensors").exists():
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(path)
        del model
    return str(path), count_parameters(config)


def count_parameters(config) -> int:
    import torch
    from transformers import Qwen3ForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in Qwen3ForCausalLM(config).parameters())  # a tied head counts once


def _memory(_learner) -> dict:
    """Runs inside a Learner actor (through __ray_call__): this process's memory in bytes."""
    from benchmarks.common import process_memory

    return process_memory()


def batch(vocab: int, k: int = 8):
    """4 samples (2 per rank) of 32 prompt and 32 reply tokens, a random top-k support and scores."""
    import numpy as np

    from oel_ray.types import DistillSample

    rng = np.random.default_rng(0)
    samples = []
    for _ in range(4):
        prompt, reply = rng.integers(10, vocab, 32).tolist(), rng.integers(10, vocab, 32).tolist()
        support = np.stack([rng.choice(vocab, k, replace=False) for _ in reply]).astype(np.int32)
        lp = rng.standard_normal((len(reply), k)).astype(np.float32)
        samples.append(DistillSample(prompt, prompt, reply, support, lp - np.log(np.exp(lp).sum(-1, keepdims=True)) - 1.0))
    return samples


def measure(path: str, stage: int, ranks: int, zero: dict) -> dict:
    import ray

    from oel_ray.config import LearnerConfig
    from oel_ray.learner import LearnerGroup

    cfg = LearnerConfig(batch_size=4, lr=1e-6, zero_stage=stage, num_ranks=ranks, support_k=8, temperature=1.0,
                        dtype="bfloat16")
    t0 = time.perf_counter()
    group = LearnerGroup(cfg, path, num_cpus=1, ds_overrides={"zero_optimization": zero})
    try:
        init_s = time.perf_counter() - t0
        after_init = ray.get([r.__ray_call__.remote(_memory) for r in group.ranks])
        t0 = time.perf_counter()
        group.train_step(batch(BASE_ARCH["vocab_size"]), 0)
        step_s = time.perf_counter() - t0
        after_step = ray.get([r.__ray_call__.remote(_memory) for r in group.ranks])
    finally:
        group.shutdown()
    return {"init_s": init_s, "step_s": step_s, "after_init": after_init, "after_step": after_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs=2, default=[4, 16], help="layers of the two models")
    parser.add_argument("--dir", default="/tmp/oel_ray_bench/learner_memory", help="where the models are built")
    args = parser.parse_args()
    from transformers import Qwen3Config

    models = {layers: build_model(layers, Path(args.dir)) for layers in args.layers}
    params = {layers: p for layers, (_, p) in models.items()}
    start_ray()
    try:
        runs = {(layers, setting): measure(path, SETTINGS[setting][0], RANKS, SETTINGS[setting][1])
                for layers, (path, _) in models.items() for setting in SETTINGS}
    finally:
        stop_ray()

    rows = []
    for (layers, setting), r in runs.items():
        for rank in range(RANKS):
            i, s = r["after_init"][rank], r["after_step"][rank]
            rows.append([f"{params[layers] / 1e9:.3f}B ({layers} layers)", setting, rank, i["VmRSS"] / GIB,
                         i["RssAnon"] / GIB, s["VmRSS"] / GIB, s["RssAnon"] / GIB, s["VmHWM"] / GIB])
    measured = markdown_table(["model", "setting", "rank", "RSS after init GiB", "private after init GiB",
                               "RSS after step GiB", "private after step GiB", "peak GiB"], rows)
    # Linear in the parameters, from the costliest rank's peak (loading and the step included).
    small, big = args.layers
    fits = {}
    for setting in SETTINGS:
        peak = {layers: max(m["VmHWM"] for m in runs[(layers, setting)]["after_step"]) for layers in (small, big)}
        per_param = (peak[big] - peak[small]) / (params[big] - params[small])
        fits[setting] = {"bytes_per_parameter": per_param, "fixed_bytes": peak[small] - per_param * params[small]}
    paper = {name: count_parameters(Qwen3Config(**arch)) for name, arch in PAPER.items()}
    extrapolated = markdown_table(
        ["model", "parameters", *SETTINGS],
        [[name, f"{p / 1e9:.2f}B", *[(f["fixed_bytes"] + f["bytes_per_parameter"] * p) / GIB for f in fits.values()]]
         for name, p in paper.items()])
    fit_line = "; ".join(f"{s}: {f['fixed_bytes'] / GIB:.2f} GiB + {f['bytes_per_parameter']:.1f} B/parameter"
                         for s, f in fits.items())
    t_measured = f"Learner host memory per rank, measured ({RANKS} ranks, bf16, CPU, one optimizer step)"
    t_extra = f"Learner peak host memory per rank in GiB, extrapolated ({RANKS} ranks, bf16, CPU)"
    print(f"\n{t_measured}\n\n{measured}\n\nfit of the costliest rank's peak: {fit_line}\n\n{t_extra}\n\n{extrapolated}")
    result = {"ranks": RANKS, "architecture": BASE_ARCH, "settings": SETTINGS, "parameters": params,
              "runs": [{"layers": layers, "setting": setting, **r} for (layers, setting), r in runs.items()],
              "fit": fits, "paper_parameters": paper}
    path = save("learner_memory", result, tables={t_measured: measured, t_extra: f"{extrapolated}\n\n{fit_line}"})
    print(f"saved {path}")


if __name__ == "__main__":
    quiet_libraries()
    main()
