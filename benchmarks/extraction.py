"""Knowledge extraction: N=4 chains run together on 2 workers vs the same chains one after another.

    python -m benchmarks.extraction

Chains are independent, so each accumulation step sends every chain's prompt at once, spread over
the engines; the sequential baseline runs each chain alone on one engine. Same chains, same
trajectories, same seeds, one run. Prints a table and saves benchmarks/results/extraction.json.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from oel_ray.artifacts import write_json
from oel_ray.config import EnvConfig, ExtractorConfig, ModelConfig
from oel_ray.engine import Sampling
from oel_ray.extractor import Extractor
from oel_ray.games import train_specs
from oel_ray.tiny_model import build_tiny_model

CHAINS, K, WORKERS = 4, 6, 2
RESULTS = Path(__file__).parent / "results" / "extraction.json"


def main() -> None:
    import ray

    from oel_ray.rollout import RolloutGroup

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    path = str(build_tiny_model(os.path.expanduser(os.environ.get("OEL_RAY_CACHE", "~/.cache/oel_ray")) + "/tiny-qwen3"))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    workers = RolloutGroup(ModelConfig(path=path, build=None), num_workers=WORKERS, seed=0, max_logprobs=1,
                           kv_cache_gib=1, gpu_memory_utilization=0.5, num_cpus=1, num_gpus=0)
    trajectories = workers.play(train_specs(EnvConfig(), 1, 12), Sampling(max_tokens=32, temperature=0.7, seed=1),
                                5, 1)
    cfg = ExtractorConfig(format="unstructured", k=K, num_chains=CHAINS, max_knowledge_tokens=512,
                          max_response_tokens=64, prompt="{trajectory}\n\nLessons learned:")
    Extractor(replace(cfg, k=1), path, workers.workers, thinking=False, seed=0).run(trajectories)  # warm-up

    start = time.perf_counter()
    together = Extractor(cfg, path, workers.workers, thinking=False, seed=0).run(trajectories)
    concurrent_s = time.perf_counter() - start

    # The same chains one after another, each alone on one engine (same orders and seeds).
    start = time.perf_counter()
    single = Extractor(cfg, path, workers.workers[:1], thinking=False, seed=0)
    alone = [single.run(trajectories, chains=[c])[0] for c in range(CHAINS)]
    sequential_s = time.perf_counter() - start
    ray.shutdown()

    same = [[s.text for s in chain] for chain in together] == [[s.text for s in chain] for chain in alone]
    result = {
        "chains": CHAINS, "k": K, "workers": WORKERS, "concurrent_seconds": round(concurrent_s, 2),
        "sequential_seconds": round(sequential_s, 2), "speedup": round(sequential_s / concurrent_s, 2),
        "same_knowledge": same, "cpu_count": os.cpu_count(),
    }
    print(f"| mode | chains | workers | seconds |\n|---|---|---|---|\n"
          f"| concurrent | {CHAINS} | {WORKERS} | {concurrent_s:.2f} |\n"
          f"| one after another | {CHAINS} | 1 | {sequential_s:.2f} |\n"
          f"speed-up {result['speedup']}x; identical knowledge: {same}")
    write_json(RESULTS, result)


if __name__ == "__main__":
    main()
