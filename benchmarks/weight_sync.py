"""Seconds per weight sync learner -> rollout worker, per transport, for the tiny model.

    python -m benchmarks.weight_sync

The roles a `tiny` run starts, from the project config: one rollout worker with its vLLM
engine, one DeepSpeed learner rank. Transports: object_store (the CPU default) and the collective
transport's code over gloo (nccl is the same code on GPUs; it cannot run here). One `WeightSync.sync`
is what a consolidation step pays: learner gather -> transport -> vLLM in-place reload (post-load
processing) -> prefix-cache reset. After untimed warm-up syncs the transports alternate, so machine
noise hits both; after the last sync the engine's log-probs are checked against the learner's.
Prints a table and saves benchmarks/results/weight_sync.json.
"""

from __future__ import annotations

import statistics

from benchmarks.common import load_config, markdown_table, quiet_libraries, save, start_ray, stop_ray, tiny_model_path

TRANSPORTS = ("object_store", "gloo")
WARMUP, REPEATS = 3, 20


def main() -> None:
    import numpy as np
    import ray

    from oel_ray.roles import build_roles
    from oel_ray.weight_sync import make_weight_sync

    cfg = load_config()
    cfg.model.path = tiny_model_path(cfg)
    start_ray()
    try:
        c = cfg.cluster
        roles = build_roles(cfg)  # the run's own roles: one rollout worker, the teacher, the learner
        workers, learner = roles.workers, roles.learner
        weights = learner.state_dict()
        size = sum(t.numel() * t.element_size() for t in weights.values())
        syncs = {t: make_weight_sync(t, learner, workers, use_gpu=False, bucket_mb=cfg.learner.sync_bucket_mb,
                                     timeout_s=c.timeout_s) for t in TRANSPORTS}
        seconds: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
        for rep in range(WARMUP + REPEATS):
            for t, sync in syncs.items():
                s = sync.sync(version=rep)
                if rep >= WARMUP:
                    seconds[t].append(s)
        fixed = list(range(3, 60))
        engine = ray.get(workers.workers[0].prompt_logprobs.remote(fixed))
        error = float(np.abs(engine - learner.sequence_logprobs(fixed)).max())
        for sync in syncs.values():
            sync.close()
        roles.shutdown()
    finally:
        stop_ray()

    rows = {t: {"median_ms": 1e3 * statistics.median(v), "mean_ms": 1e3 * statistics.fmean(v),
                "min_ms": 1e3 * min(v), "max_ms": 1e3 * max(v), "syncs": len(v)} for t, v in seconds.items()}
    title = (f"Weight sync, tiny model: {len(weights)} tensors, {size / 2**20:.2f} MiB ({cfg.model.dtype}), "
             "1 learner rank -> 1 vLLM worker")
    table = markdown_table(["transport", "median ms", "mean ms", "min ms", "max ms"],
                           [[t, r["median_ms"], r["mean_ms"], r["min_ms"], r["max_ms"]] for t, r in rows.items()])
    note = f"after the last sync: max |engine - learner| log-prob = {error:.2e}; gloo runs the nccl transport's code"
    print(f"\n{title}\n\n{table}\n\n{note}")
    path = save("weight_sync", {"model": {"tensors": len(weights), "bytes": size, "dtype": cfg.model.dtype},
                                "transports": rows, "max_logprob_error_after_sync": error,
                                "note": "gloo runs the nccl transport's packing/streaming code on CPU"},
                tables={title: f"{table}\n\n{note}"}, readme=[title])
    print(f"saved {path}")
    assert error < 1e-4, "the worker does not run the learner's weights"


if __name__ == "__main__":
    quiet_libraries()
    main()
