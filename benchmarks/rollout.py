"""Collection throughput of the tiny model at 1 and 2 rollout workers, side by side in one run.

    python -m benchmarks.rollout

Both groups are started first and measured in alternation on the same fresh maps (Sokoban 6x6 with
one box, `train_specs`), with the sampling of conf/rollout/tiny.yaml, so machine noise hits both
alike; tokens/s counts generated reply tokens. Each repetition plays maps neither group has seen:
vLLM's prefix cache would otherwise skip the prefill of prompts seen before and flatter the later
repetitions. Prints a table and saves benchmarks/results/rollout.json.
"""

from __future__ import annotations

import statistics

from benchmarks.common import (load_config, markdown_table, quiet_libraries, save, start_ray, stop_ray, stopwatch,
                               tiny_model_path)

GAMES = 64  # the paper's samples per consolidation step: one realistic collection batch
WARMUP_GAMES = 8
REPEATS = 3
WORKER_COUNTS = (1, 2)


def start_group(cfg, num_workers: int):
    from oel_ray.roles import rollout_group

    return rollout_group(cfg, num_workers=num_workers, max_logprobs=1)


def measure(group, specs, sampling, max_turns: int) -> dict:
    with stopwatch() as t:
        games = group.play(specs, sampling, max_turns, round=1)
    tokens = sum(turn.response_tokens for g in games for turn in g.turns)
    turns = sum(len(g.turns) for g in games)
    return {"seconds": t["s"], "games": len(games), "turns": turns, "tokens": tokens,
            "games_per_s": len(games) / t["s"], "tokens_per_s": tokens / t["s"],
            "passed": sum(g.passed for g in games)}


def main() -> None:

    from oel_ray.games import train_specs
    from oel_ray.roles import sampling_for_play

    cfg = load_config()
    cfg.model.path = tiny_model_path(cfg)
    sampling = sampling_for_play(cfg)
    # Disjoint maps: one set for the warm-up, one per repetition (each group plays every set once).
    specs = train_specs(cfg.env, 1, WARMUP_GAMES + REPEATS * GAMES)
    warmup, sets = specs[:WARMUP_GAMES], [specs[WARMUP_GAMES + i * GAMES:WARMUP_GAMES + (i + 1) * GAMES]
                                          for i in range(REPEATS)]
    start_ray()
    try:
        groups, init = {}, {}
        for n in WORKER_COUNTS:
            with stopwatch() as t:
                groups[n] = start_group(cfg, n)
                groups[n].play(warmup, sampling, cfg.env.max_turns, round=1)
            init[n] = t["s"]
        runs = {n: [] for n in WORKER_COUNTS}
        for maps in sets:
            for n in WORKER_COUNTS:
                runs[n].append(measure(groups[n], maps, sampling, cfg.env.max_turns))
        for group in groups.values():
            group.shutdown()
    finally:
        stop_ray()

    rows, summary = [], {}
    for n in WORKER_COUNTS:
        games_s = statistics.median(r["games_per_s"] for r in runs[n])
        tokens_s = statistics.median(r["tokens_per_s"] for r in runs[n])
        summary[n] = {"workers": n, "games_per_s": round(games_s, 2), "tokens_per_s": round(tokens_s, 1),
                      "start_and_warmup_s": round(init[n], 1), "runs": runs[n]}
        rows.append([n, games_s, tokens_s, statistics.median(r["seconds"] for r in runs[n]),
                     sum(r["turns"] for r in runs[n]) / REPEATS, init[n]])
    speedup = summary[2]["games_per_s"] / summary[1]["games_per_s"]
    table = markdown_table(["workers", "games/s", "reply tokens/s", "s per batch", "turns per batch", "start+warm-up s"],
                           rows)
    note = f"{GAMES} games per batch, median of {REPEATS}; 2 vs 1 workers: {speedup:.2f}x games/s"
    print(f"{table}\n{note}")
    save("rollout", {
        "model": "tiny", "env": cfg.env.id, "env_kwargs": cfg.env.kwargs, "max_turns": cfg.env.max_turns,
        "games_per_batch": GAMES, "repeats": REPEATS, "statistic": "median",
        "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                     "max_tokens": sampling.max_tokens},
        "results": [summary[n] for n in WORKER_COUNTS], "speedup_2_vs_1_workers": round(speedup, 2),
    }, tables={"Rollout collection (tiny, Sokoban 6x6, 1 box)": f"{table}\n\n{note}"},
        readme=["Rollout collection (tiny, Sokoban 6x6, 1 box)"])


if __name__ == "__main__":
    quiet_libraries()
    main()
