"""Knowledge extraction: N=4 chains run together on 2 workers vs the same chains one after another.

    python -m benchmarks.extraction

Chains are independent, so each accumulation step sends every chain's prompt at once, spread over
the engines; the sequential baseline runs each chain alone on one engine. Same chains, same
trajectories, same seeds, same extractor config (conf/extractor/unstructured.yaml), one run; the two
modes alternate over a few repetitions so machine noise hits both. One untimed run of each mode
comes first: the repetitions then replay the same prompts, so both modes find them in vLLM's prefix
cache alike (a cold cache would favour neither: both modes prefill the same prompts). Prints a
table and saves benchmarks/results/extraction.json.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

from benchmarks.common import (load_config, markdown_table, quiet_libraries, save, start_ray, stop_ray, stopwatch,
                               tiny_model_path)

CHAINS, K, WORKERS = 4, 12, 2
TRAJECTORIES = 24  # each chain draws its own K of these
REPEATS = 5  # the tiny model's extractions are short: repeat to see through machine noise


def main() -> None:

    from oel_ray.extractor import Extractor
    from oel_ray.games import train_specs
    from oel_ray.roles import rollout_group, sampling_for_play

    cfg = load_config()
    path = tiny_model_path(cfg)
    cfg.model.path = path
    ecfg = replace(cfg.extractor, k=K, num_chains=CHAINS)
    start_ray()
    try:
        group = rollout_group(cfg, num_workers=WORKERS, max_logprobs=1)
        trajectories = group.play(train_specs(cfg.env, 1, TRAJECTORIES), sampling_for_play(cfg), cfg.env.max_turns, 1)
        together = Extractor(ecfg, path, group.workers, thinking=False, seed=cfg.seed)
        alone = Extractor(ecfg, path, group.workers[:1], thinking=False, seed=cfg.seed)
        together.run(trajectories)  # warm-up: both modes' prompts end up in the prefix caches
        for c in range(CHAINS):
            alone.run(trajectories, chains=[c])

        concurrent, sequential, same = [], [], True
        for _ in range(REPEATS):
            with stopwatch() as t:
                chains_together = together.run(trajectories)
            concurrent.append(t["s"])
            # The same chains one after another, each alone on one engine (same orders and seeds).
            with stopwatch() as t:
                chains_alone = [alone.run(trajectories, chains=[c])[0] for c in range(CHAINS)]
            sequential.append(t["s"])
            # Chains are independent: running them together must not change what they extract.
            same &= [[s.text for s in ch] for ch in chains_together] == [[s.text for s in ch] for ch in chains_alone]
        knowledge_tokens = [ch[-1].num_tokens for ch in chains_together]
        group.shutdown()
    finally:
        stop_ray()

    concurrent_s, sequential_s = statistics.median(concurrent), statistics.median(sequential)
    speedup = sequential_s / concurrent_s
    table = markdown_table(["mode", "chains", "workers", "seconds (median)", "extractions/s"], [
        ["concurrent", CHAINS, WORKERS, concurrent_s, CHAINS * K / concurrent_s],
        ["one after another", CHAINS, 1, sequential_s, CHAINS * K / sequential_s]])
    note = (f"speed-up {speedup:.2f}x (concurrent vs one after another, K={K} steps, median of {REPEATS}); "
            f"identical knowledge: {same}")
    print(f"{table}\n{note}")
    save("extraction", {
        "chains": CHAINS, "k": K, "workers": WORKERS, "repeats": REPEATS, "statistic": "median",
        "extractor": {"format": ecfg.format, "max_response_tokens": ecfg.max_response_tokens,
                      "max_knowledge_tokens": ecfg.max_knowledge_tokens, "temperature": ecfg.temperature},
        "concurrent_seconds": round(concurrent_s, 3), "sequential_seconds": round(sequential_s, 3),
        "concurrent_runs": [round(s, 3) for s in concurrent], "sequential_runs": [round(s, 3) for s in sequential],
        "speedup": round(speedup, 2), "faster_concurrent": speedup > 1.0, "same_knowledge": same,
        "final_knowledge_tokens": knowledge_tokens,
    }, tables={"Knowledge extraction: N=4 chains": f"{table}\n\n{note}"})


if __name__ == "__main__":
    quiet_libraries()
    main()
