"""The rollout worker's `generate` against a bare vLLM engine on the same prompts and sampling, in
the same process layout (one Ray actor, bound to the same cores, the engine in-process).

    python -m benchmarks.generate

The prompts are the tiny experiment's first turns of 64 fresh Sokoban maps, answered with its
sampling, twice: without log-probs (collection) and with the student's top-k support (the
consolidation step's sampling, `learner.support_k`). The bare engine is what a user would write:
`vllm.LLM` with the same model, dtype, context length and KV-cache size, fed token ids, with
detokenization left on. Each side is measured in alternation, median of `REPEATS` after a warm-up.
"""

from __future__ import annotations

import statistics
import time

import ray

from benchmarks.common import load_config, markdown_table, quiet_libraries, save, start_ray, stop_ray, tiny_model_path
from oel_ray.placement import bind_to_cores

PROMPTS = 64
REPEATS = 7  # each side takes well under a second here: more repeats, less of the machine's noise in the median


class BareVLLM:
    """A plain vLLM engine in its own actor: what one would run instead of the rollout worker."""

    def __init__(self, path: str, dtype: str, max_model_len: int, kv_cache_gib: float, max_logprobs: int, seed: int):
        import os

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process, as the rollout worker's engine
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(round(kv_cache_gib))))
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        self.args = dict(model=path, dtype=dtype, max_model_len=max_model_len, max_logprobs=max_logprobs, seed=seed,
                         enforce_eager=True, enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192))

    def start(self, cores: list[int]) -> None:
        bind_to_cores(cores)
        from vllm import LLM

        self.llm = LLM(**self.args)

    def generate(self, prompts: list[list[int]], max_tokens: int, temperature: float, top_p: float, top_k: int,
                 logprobs: int, seed: int) -> tuple[float, int]:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                logprobs=logprobs or None)
        start = time.perf_counter()
        out = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in out)


def main() -> dict:
    from dataclasses import replace

    from oel_ray.games import Game, train_specs
    from oel_ray.prompts import turn_prompt_ids
    from oel_ray.roles import rollout_group, sampling_for_play

    cfg = load_config()
    cfg.model.path = tiny_model_path(cfg)
    sampling = sampling_for_play(cfg)
    start_ray()
    try:
        group = rollout_group(cfg, num_workers=1)
        worker = group.workers[0]
        cores = ray.get(worker.threads.remote())["cores"]
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(cfg.model.path)
        prompts = [turn_prompt_ids(tok, Game(spec, cfg.env.max_turns), history=cfg.rollout.history, thinking=False,
                                   keep_reasoning=False) for spec in train_specs(cfg.env, 1, PROMPTS)]
        group.shutdown()  # its cores go to the bare engine while it starts, then both run in turn
        bare = ray.remote(BareVLLM).options(num_cpus=cfg.cluster.rollout_cpus).remote(
            cfg.model.path, cfg.model.dtype, cfg.model.max_model_len, cfg.rollout.kv_cache_gib, cfg.learner.support_k,
            cfg.rollout.seed)
        ray.get(bare.start.remote(cores))
        group = rollout_group(cfg, num_workers=1)
        rows, result = [], {"prompts": PROMPTS, "repeats": REPEATS, "cores": cores, "modes": {}}
        for mode, k in (("collection (no log-probs)", 0), (f"top-{cfg.learner.support_k} support", cfg.learner.support_k)):
            asked = replace(sampling, support_k=k)
            args = (asked.max_tokens, asked.temperature, asked.top_p, asked.top_k, k, asked.seed or 0)
            group.generate(prompts[:8], asked), ray.get(bare.generate.remote(prompts[:8], *args))  # warm-up
            ours, theirs = [], []
            for _ in range(REPEATS):
                start = time.perf_counter()
                gens = group.generate(prompts, asked)
                ours.append(sum(len(g.token_ids) for g in gens) / (time.perf_counter() - start))
                start = time.perf_counter()
                _, tokens = ray.get(bare.generate.remote(prompts, *args))
                theirs.append(tokens / (time.perf_counter() - start))
            ratio = statistics.median(ours) / statistics.median(theirs)
            result["modes"][mode] = dict(worker_tokens_per_s=statistics.median(ours),
                                         vllm_tokens_per_s=statistics.median(theirs), ratio=ratio)
            rows.append([mode, statistics.median(ours), statistics.median(theirs), ratio])
        group.shutdown()
        ray.kill(bare)
    finally:
        stop_ray()
    table = markdown_table(["sampling", "rollout worker tokens/s", "bare vLLM tokens/s", "worker / vLLM"], rows)
    note = (f"{PROMPTS} first-turn prompts (tiny, Sokoban), one engine on cores {cores}; median of {REPEATS}; both "
            "timed from the driver, Ray calls included (the worker returns its replies and supports, the bare "
            "engine only counts).")
    print(table + "\n\n" + note)
    save("generate", result, tables={"Rollout worker against bare vLLM": table + "\n\n" + note})
    return result


if __name__ == "__main__":
    quiet_libraries()
    main()
