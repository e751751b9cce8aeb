"""Consolidation samples/s: oel_ray against TRL's GKDTrainer and a plain PyTorch loop, in one run.

    python -m benchmarks.consolidation

Same tiny model, same prompts, same batch, same machine. oel_ray runs its real roles (rollout
worker, teacher server, DeepSpeed learner, weight sync, `consolidate.consolidate`) as `make run`
starts them; its prompts are real: turn prefixes of games the model just played, a knowledge set
the extractor just wrote. The baselines then replay exactly those (student prompt, teacher prompt)
pairs with the same sampling, max new tokens, optimizer settings and step count. Each system runs
`WARMUP_STEPS` untimed steps first. Ray is shut down before the baselines run, so they have the
machine to themselves.

Also reported: where an oel_ray step spends its time (generation, teacher, learner, weight sync,
and the rest: driver work and Ray overhead = wall - their sum) and per-stage throughput (teacher
server tokens/s, learner tokens/s and step time). Prints tables and saves
benchmarks/results/consolidation.json.
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.baselines.work import Run, Work
from benchmarks.common import load_config, markdown_table, save, start_ray, stop_ray, stopwatch, tiny_model_path

BATCH_SIZES = (64, 8)  # the paper's samples per step; the tiny config's learner.batch_size
WARMUP_STEPS, TIMED_STEPS = 1, 3
DEPLOY_GAMES_PER_STEP = 64  # enough distinct turn prefixes that a batch of 64 rarely repeats one


def step_pairs(cfg, prefixes, knowledge_set, tokenizer, step):
    """The (student, teacher) prompt ids `consolidate` builds for `step` (same seeded knowledge draws)."""
    from oel_ray.consolidate import make_samples

    return make_samples(prefixes, knowledge_set, tokenizer, cfg, random.Random(cfg.seed * 1_000_003 + step))


def prepare(dep, cfg):
    """Real prompts: deploy-game turn prefixes and a knowledge set, as round 1 of `make run` makes them."""
    import ray

    from oel_ray.games import train_specs
    from oel_ray.roles import sampling_for_play

    play = lambda count, stream: dep.workers.play(  # noqa: E731
        train_specs(cfg.env, 1, count, stream), sampling_for_play(cfg), cfg.env.max_turns, 1)
    chains = ray.get(dep.extractor.run.remote(play(cfg.rollout.games_per_round, 0)))
    use_step = cfg.extractor.use_step or max(1, cfg.extractor.k // 2)
    knowledge_set = [chain[use_step].text for chain in chains]
    deploy = play((WARMUP_STEPS + TIMED_STEPS) * DEPLOY_GAMES_PER_STEP, 1)
    return deploy, knowledge_set


def run_oel_ray(dep, cfg, prefixes, knowledge_set, first_step: int) -> tuple[Run, list[dict]]:
    """WARMUP_STEPS + TIMED_STEPS real consolidation steps; per timed step, the wall time and the
    stage seconds `consolidate` measured."""
    from oel_ray.consolidate import consolidate

    run, profile = Run("oel_ray", len(prefixes[0])), []
    marks: list[float] = []

    def on_step(metrics) -> None:
        marks.append(time.perf_counter())
        if metrics.step > first_step + WARMUP_STEPS:
            wall = marks[-1] - marks[-2]
            run.step_seconds.append(wall)
            run.response_tokens.append(metrics.response_tokens)
            profile.append({"step": metrics.step, "wall": wall, **metrics.seconds})

    marks.append(time.perf_counter())
    consolidate(dep.roles, cfg, prefixes, knowledge_set, dep.tokenizer, first_step=first_step, on_step=on_step)
    return run, profile


def summarize_profile(profile: list[dict], pairs_per_step: list[list[tuple]]) -> tuple[dict, dict]:
    """Mean seconds per stage, and per-stage throughput from the same steps."""
    keys = ("generate", "teacher", "learner", "sync", "learner_compute")
    mean = {k: sum(p.get(k, 0.0) for p in profile) / len(profile) for k in ("wall", *keys)}
    mean["driver_and_ray_overhead"] = mean["wall"] - sum(mean[k] for k in ("generate", "teacher", "learner", "sync"))
    mean["learner_transfer"] = mean["learner"] - mean["learner_compute"]  # Ray call + batch hand-off
    reply = sum(p["response_tokens"] for p in profile)
    teacher_tokens = sum(len(t) for pairs in pairs_per_step for _, t in pairs) + reply
    learner_tokens = sum(len(s) for pairs in pairs_per_step for s, _ in pairs) + reply
    seconds = {k: sum(p.get(k, 0.0) for p in profile) for k in keys}
    stages = {
        "generation_response_tokens_per_s": reply / seconds["generate"],
        "teacher_tokens_per_s": teacher_tokens / seconds["teacher"],  # prompt with knowledge + reply, scored
        "teacher_response_tokens_per_s": reply / seconds["teacher"],
        "learner_tokens_per_s": learner_tokens / seconds["learner"],  # forward + backward over prompt + reply
        "learner_step_s": seconds["learner"] / len(profile),
        "learner_compute_step_s": seconds["learner_compute"] / len(profile),
        "sync_s": seconds["sync"] / len(profile),
    }
    return ({k: round(v, 4) for k, v in mean.items()}, {k: round(v, 4) for k, v in stages.items()})


def main() -> None:
    from oel_ray.roles import Deployment

    from benchmarks.baselines.plain_loop import run_plain_loop
    from benchmarks.baselines.trl_gkd import run_trl

    cfg = load_config(f"learner.batch_size={max(BATCH_SIZES)}")
    cfg.model.path = tiny_model_path(cfg)
    steps = WARMUP_STEPS + TIMED_STEPS
    oel, works, profiles, stages, timings = {}, {}, {}, {}, {}
    start_ray()
    try:
        with tempfile.TemporaryDirectory(prefix="oel_bench_consolidation.") as out:
            with stopwatch() as t:
                dep = Deployment(cfg, Path(out)).at_round_start(1)  # the roles `make run` starts
            timings["start_roles_s"] = t["s"]
            with stopwatch() as t:
                deploy, knowledge_set = prepare(dep, cfg)
            timings["prepare_prompts_s"] = t["s"]
            first_step = 0
            from oel_ray.consolidate import step_prefixes

            for batch in BATCH_SIZES:
                prefixes = step_prefixes(deploy, steps, batch, cfg.seed + 1)
                pairs = [step_pairs(cfg, p, knowledge_set, dep.tokenizer, first_step + 1 + i)
                         for i, p in enumerate(prefixes)]
                oel[batch], profile = run_oel_ray(dep, cfg, prefixes, knowledge_set, first_step)
                for p, n in zip(profile, oel[batch].response_tokens):
                    p["response_tokens"] = n
                profiles[batch], stages[batch] = summarize_profile(profile, pairs[WARMUP_STEPS:])
                profiles[batch]["steps"] = profile
                works[batch] = make_work(cfg, dep.tokenizer, pairs)
                first_step += steps
            dep.shutdown()
    finally:
        stop_ray()

    rows, comparisons = [], []
    for batch in BATCH_SIZES:
        with stopwatch() as t:
            trl = run_trl(works[batch])
        timings[f"trl_batch_{batch}_s"] = t["s"]
        with stopwatch() as t:
            plain = run_plain_loop(works[batch])
        timings[f"plain_batch_{batch}_s"] = t["s"]
        ours = oel[batch]
        comparisons.append({
            "batch_size": batch, "runs": [r.to_json() for r in (ours, trl, plain)],
            "oel_ray_vs_trl": round(ours.samples_per_s / trl.samples_per_s, 2),
            "oel_ray_vs_plain_loop": round(ours.samples_per_s / plain.samples_per_s, 2),
            "oel_ray_profile_mean_s": {k: v for k, v in profiles[batch].items() if k != "steps"},
            "oel_ray_profile_steps": profiles[batch]["steps"], "stages": stages[batch]})
        for r in (ours, trl, plain):
            rows.append([r.system, batch, r.samples_per_s, r.response_tokens_per_s,
                         sum(r.step_seconds) / len(r.step_seconds), ours.samples_per_s / r.samples_per_s])

    print(markdown_table(["system", "batch", "samples/s", "reply tokens/s", "s/step", "oel_ray speed-up"], rows))
    print()
    print(markdown_table(
        ["batch", "wall s", "generate", "teacher", "learner (compute)", "sync", "driver + Ray overhead"],
        [[b, p["wall"], p["generate"], p["teacher"], f"{p['learner']:.3f} ({p['learner_compute']:.3f})", p["sync"],
          p["driver_and_ray_overhead"]] for b, p in profiles.items()]))
    print()
    print(markdown_table(["batch", "teacher tokens/s", "learner tokens/s", "learner step s", "generation tokens/s"],
                         [[b, s["teacher_tokens_per_s"], s["learner_tokens_per_s"], s["learner_step_s"],
                           s["generation_response_tokens_per_s"]] for b, s in stages.items()]))
    save("consolidation", {
        "model": "tiny", "warmup_steps": WARMUP_STEPS, "timed_steps": TIMED_STEPS,
        "max_new_tokens": cfg.rollout.max_response_tokens, "temperature": cfg.rollout.temperature,
        "learner": {"lr": cfg.learner.lr, "loss": cfg.learner.loss, "support_k": cfg.learner.support_k,
                    "zero_stage": cfg.learner.zero_stage, "dtype": cfg.learner.dtype,
                    "weight_sync": cfg.learner.weight_sync},
        "baselines": {"trl": "trl.experimental.gkd.GKDTrainer, lmbda=1, beta=1, teacher reads its own prompt",
                      "plain_loop": "HF generate + full-vocabulary reverse KL + AdamW, one process"},
        "knowledge_tokens": [len(dep.tokenizer(k)["input_ids"]) for k in knowledge_set],
        "comparisons": comparisons, "timings_s": {k: round(v, 1) for k, v in timings.items()},
    })


def make_work(cfg, tokenizer, pairs) -> Work:
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(cfg.model.path).eos_token_id  # the stop tokens vLLM uses too
    lr = cfg.learner
    return Work(model_path=cfg.model.path, batches=pairs, max_new_tokens=cfg.rollout.max_response_tokens,
                temperature=cfg.rollout.temperature, lr=lr.lr, weight_decay=lr.weight_decay,
                betas=tuple(lr.betas), grad_clip=lr.grad_clip, stop_ids=eos if isinstance(eos, list) else [eos],
                pad_id=tokenizer.pad_token_id, seed=cfg.seed, warmup_steps=WARMUP_STEPS)


if __name__ == "__main__":
    main()
