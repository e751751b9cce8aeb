"""Consolidation samples/s: oel_ray against TRL's two on-policy trainers (GKDTrainer and
DistillationTrainer; "best TRL" is the faster of them at each batch size) and a plain PyTorch loop,
in one run.

    python -m benchmarks.consolidation [--workloads tiny paper-small paper-mid paper-large]

Two workloads by default (`WORKLOADS`). `tiny`: the embedded tiny model at batch 64 and 8, on real
prompts (below), whose replies run a few tokens. `paper-small`: the paper's step shape
(benchmarks/paper_shape.py: 64 samples, 10 knowledge texts of 2048 tokens, student prompts of 256,
replies up to 128) on a random-initialised ~3M-parameter Qwen3; `paper-mid` the same on the teacher
benchmark's larger model (~20M; its steps cost about six times paper-small's) and `paper-large` on a
~48M one (`LARGE_ARCH`: minutes a step per system, one timed step after one warm-up). Those two are run by
hand, outside `make bench`'s 20 minutes, and save beside the default run's results
(consolidation-<workloads>.json, `results_name`) instead of replacing them.
Within a workload: same model, same prompts, same batch, same machine. oel_ray runs its real roles (rollout
worker, teacher server, DeepSpeed learner, weight sync, `consolidate.consolidate`) as a `tiny`
run starts them; at `tiny` its prompts are real: turn prefixes of games the model just played, a knowledge set
the extractor just wrote. The baselines then replay exactly those (student prompt, teacher prompt)
pairs with the same sampling, max new tokens, optimizer settings and step count. Each system runs
`WARMUP_STEPS` untimed steps first. oel_ray runs in two configurations,
four with `--all-variants` (`OEL_VARIANTS`): as the `tiny` run configures it (strictly on-policy),
asynchronous (consolidation.async_steps=1: batch t+1 is sampled and scored while the learner takes
step t), and with the learner on one thread (what it had before it took the idle cores). oel_ray runs
one more, untimed, step after the timed ones, so that in the asynchronous mode the last timed step
also overlaps the sampling of a next batch. Ray is shut down before the baselines run, so they have
the machine to themselves. The load average and a 0.1 s matmul probe of the machine's speed before
each measurement are saved with it: other work on the machine shows there, and each verdict says how
far apart the probes were.

Also reported: where an oel_ray step spends its time (generation, teacher, learner, weight sync,
and the rest: driver work and Ray overhead = wall - their sum; asynchronous: the learner column is
the wait the overlap did not hide, its compute in the actor beside it) and per-stage throughput
(teacher server tokens/s, learner tokens/s and step time), and each system's model FLOPs per step
with the fraction of this machine's fp32 matmul peak (measured at the start of the same run) it
reaches, end to end and, for oel_ray, per stage (with teacher.prefill_prompts on, off by default on
CPU, the teacher's prompts are encoded during generation: its column is then the wait after it, and
its per-stage FLOP/s, all its work over that wait, overstates it; end to end is unaffected). Prints
tables and saves benchmarks/results/consolidation.json.
"""

from __future__ import annotations

import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from benchmarks.baselines.work import Run, Work
from benchmarks.common import (RAY_CPUS, load_config, markdown_table, quiet_libraries, save, start_ray, stop_ray,
                               stopwatch, tiny_model_path)
from benchmarks.paper_shape import LARGE_ARCH, SMALL_ARCH, build_random, paper_prompts
from benchmarks.teacher import MID_ARCH, Step

PAPER_STEP = Step()  # the paper's step: 64 samples, 10 knowledge texts of 2048 tokens, prompts 256, replies 128
# random-initialised, with oel_ray's vocabulary
PAPER_MODELS = {"small": SMALL_ARCH, "mid": MID_ARCH, "large": LARGE_ARCH}

# A step's stages and the profile seconds each one's FLOPs are divided by (the learner's: its compute
# in the actor, which in the asynchronous mode overlaps the others).
STAGE_FLOPS = {"generate": "generate", "teacher": "teacher", "learner": "learner_compute"}
WARMUP_STEPS, COOLDOWN_STEPS = 1, 1  # oel_ray only: one untimed step after the timed ones
DEPLOY_GAMES_PER_STEP = 64  # enough distinct turn prefixes that a batch of 64 rarely repeats one


@dataclass(frozen=True)
class Workload:
    """A shape the systems are compared at."""

    name: str
    batch_sizes: tuple[int, ...]  # the first is the headline's
    timed_steps: int
    model: str | None = None  # a paper_shape architecture, random-initialised; None: the tiny model

    @property
    def steps(self) -> int:
        return WARMUP_STEPS + self.timed_steps + COOLDOWN_STEPS

    @property
    def timed(self) -> slice:
        """The timed steps among a variant's `steps`."""
        return slice(WARMUP_STEPS, WARMUP_STEPS + self.timed_steps)


# tiny: the paper's samples per step and the tiny config's learner.batch_size. The paper shape's
# steps take seconds to minutes on 2 cores: two timed, batch 64 only. Every workload runs oel_ray
# strict and asynchronous; --all-variants adds the learner's before-and-after variants (a minute more
# at tiny), which `make bench` leaves out to stay within its 20 minutes.
# paper-large's steps take minutes per system: one timed step, by hand only. Its warm-up step stays:
# without it the asynchronous mode's one timed step is its first, which samples and scores two
# batches (its own and the next), and measured 237 s against 145 s strict (2026-12-07).
WORKLOADS = {"tiny": Workload("tiny", (64, 8), 4),
             "paper-small": Workload("paper-small", (PAPER_STEP.batch,), 2, "small"),
             "paper-mid": Workload("paper-mid", (PAPER_STEP.batch,), 2, "mid"),
             "paper-large": Workload("paper-large", (PAPER_STEP.batch,), 1, "large")}
DEFAULT_WORKLOADS = ("tiny", "paper-small")
DEFAULT_VARIANTS = 2  # the first two of OEL_VARIANTS, strict and asynchronous: what `verdict` compares


def step_pairs(cfg, prefixes, knowledge_set, tokenizer, step):
    """The (student, teacher) prompt ids `consolidate` builds for `step` (same seeded knowledge draws)."""
    from oel_ray.consolidate import make_samples
    from oel_ray.seeds import step_draw_seed

    return make_samples(prefixes, knowledge_set, tokenizer, cfg, random.Random(step_draw_seed(cfg.seed, step)))


def prepare(dep, cfg, workload: Workload) -> tuple[dict[int, list[list[str]]], list[str]]:
    """Each batch size's prefixes per step, and the knowledge set. tiny: real ones, deploy-game turn
    prefixes and the extractor's knowledge, as round 1 of a `tiny` run makes them; paper-shaped: random
    words of the paper's lengths (benchmarks/paper_shape.py)."""
    import ray

    from oel_ray.consolidate import step_prefixes
    from oel_ray.extractor import knowledge_set
    from oel_ray.games import train_specs
    from oel_ray.roles import sampling_for_play

    if workload.model:
        batches, texts = paper_prompts(dep.tokenizer, PAPER_STEP, workload.steps)
        return {PAPER_STEP.batch: batches}, texts
    play = lambda count, stream: dep.workers.play(  # noqa: E731
        train_specs(cfg.env, 1, count, stream), sampling_for_play(cfg), cfg.env.max_turns, 1)
    chains = ray.get(dep.extractor.run.remote(play(cfg.rollout.games_per_round, 0)))
    texts, _ = knowledge_set(chains, cfg.extractor.knowledge_step)  # as the driver picks them
    deploy = play(workload.steps * DEPLOY_GAMES_PER_STEP, 1)
    return {b: step_prefixes(deploy, workload.steps, b, cfg.seed + 1) for b in workload.batch_sizes}, texts


def run_oel_ray(dep, cfg, prefixes, knowledge_set, first_step: int, workload: Workload) -> tuple[Run, list[dict]]:
    """The workload's warm-up and timed steps (+ COOLDOWN_STEPS), real consolidation steps; per timed
    step, the wall time and the stage seconds `consolidate` measured."""
    from oel_ray.consolidate import consolidate

    run, profile = Run("oel_ray", len(prefixes[0])), []
    marks: list[float] = []

    def on_step(metrics) -> None:
        marks.append(time.perf_counter())
        if first_step + workload.timed.start < metrics.step <= first_step + workload.timed.stop:
            wall = marks[-1] - marks[-2]
            run.step_seconds.append(wall)
            run.response_tokens.append(metrics.response_tokens)
            profile.append({"step": metrics.step, "wall": wall, "policy_lag": metrics.policy_lag, **metrics.seconds})

    marks.append(time.perf_counter())
    consolidate(dep.roles, cfg, prefixes, knowledge_set, dep.tokenizer, first_step=first_step, on_step=on_step)
    return run, profile


def step_flops(arch, pairs_per_step: list[list[tuple]], replies_per_step: list[int]) -> dict[str, float]:
    """Mean model FLOPs per step by stage (benchmarks/flops.py: every prompt in full), each sample's
    reply taken as its step's mean reply length (the runs record replies per step, not per sample)."""
    totals = dict.fromkeys(STAGE_FLOPS, 0.0)
    for pairs, replies in zip(pairs_per_step, replies_per_step):
        reply = round(replies / len(pairs))
        for student, teacher in pairs:
            totals["generate"] += arch.generation(len(student), reply)
            totals["teacher"] += arch.scoring(len(teacher), reply)
            totals["learner"] += arch.training(len(student), reply)
    return {k: v / len(pairs_per_step) for k, v in totals.items()}


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
        # forward + backward over prompt + reply, in the actor (asynchronous: `learner` is only the wait)
        "learner_tokens_per_s": learner_tokens / seconds["learner_compute"],
        "learner_step_s": seconds["learner"] / len(profile),
        "learner_compute_step_s": seconds["learner_compute"] / len(profile),
        "sync_s": seconds["sync"] / len(profile),
        # real prompt tokens / the padded [batch, longest prompt] block every system computes on
        "prompt_padding_efficiency": sum(len(s) for pairs in pairs_per_step for s, _ in pairs)
        / sum(len(pairs) * max(len(s) for s, _ in pairs) for pairs in pairs_per_step),
    }
    return ({k: round(v, 4) for k, v in mean.items()}, {k: round(v, 4) for k, v in stages.items()})


# oel_ray as a `tiny` run starts it (conf/cluster/local.yaml: every role asks for half a CPU; the
# rollout worker binds its engine to all cores and the learner takes them all while it computes, as
# a strictly on-policy step runs its stages one after another; the teacher runs one thread);
# asynchronous, where sampling and the learner run at once, so each gets its own core (a worker
# bound to both cores would fight the learner for them); with the learner on the one thread it
# had before it took the idle cores; and with each length bucket's prompts run in full, as before
# the learner ran their shared start once (learner.reuse_prefix).
OEL_VARIANTS = {"oel_ray": [], "oel_ray async": ["consolidation.async_steps=1", "rollout.bind_cores=false"],
                "oel_ray learner.threads=1": ["learner.threads=1"],
                "oel_ray learner.reuse_prefix=false": ["learner.reuse_prefix=false"]}


def ray_cpus(cfg) -> int:
    """Logical CPUs for every role's request: rollout workers, teacher actors, learner ranks."""
    roles = cfg.rollout.num_workers + cfg.teacher.num_actors + cfg.learner.num_ranks
    return max(RAY_CPUS, math.ceil(cfg.cluster.cpus_per_actor * roles))


def workload_config(workload: Workload, model_path: str, *overrides: str):
    """The `tiny` config at the workload's batch size, model and reply length, plus `overrides`;
    validated with the workload's model (a paper shape needs no tiny model built)."""
    shape = [f"rollout.max_response_tokens={PAPER_STEP.reply}", "model.build=null"] if workload.model else []
    return load_config(f"learner.batch_size={max(workload.batch_sizes)}", f"model.path={model_path}", *shape,
                       *overrides)


def run_variant(workload: Workload, overrides: list[str], data: dict, out: Path, model_path: str) -> dict:
    """Start the roles with these config overrides and run every batch size's steps; on the first
    variant, also make the prompts (`data`) that every later system replays."""
    from oel_ray.layout import RunLayout
    from oel_ray.deployment import Deployment

    cfg = workload_config(workload, model_path, *overrides)
    result = {"overrides": overrides, "ray_cpus": ray_cpus(cfg)}
    start_ray(ray_cpus(cfg))
    try:
        with stopwatch() as t:
            dep = Deployment(cfg, RunLayout(out)).at_round_start(1)  # the roles a run starts
        result["start_roles_s"] = round(t["s"], 1)
        if not data:
            with stopwatch() as t:
                prefixes, knowledge_set = prepare(dep, cfg, workload)
            data.update(cfg=cfg, tokenizer=dep.tokenizer, knowledge_set=knowledge_set, prepare_s=t["s"], pairs={},
                        prefixes=prefixes)
        first_step = 0
        # One learner serves every batch size (the later ones start from slightly trained weights;
        # the baselines start fresh): reply lengths are saved per step, so the work can be compared.
        for batch in workload.batch_sizes:
            prefixes = data["prefixes"][batch]
            pairs = data["pairs"].setdefault(batch, [
                step_pairs(cfg, p, data["knowledge_set"], data["tokenizer"], first_step + 1 + i)
                for i, p in enumerate(prefixes)])
            before = machine_state()
            run, profile = run_oel_ray(dep, cfg, prefixes, data["knowledge_set"], first_step, workload)
            for p, n in zip(profile, run.response_tokens):
                p["response_tokens"] = n
            mean, stages = summarize_profile(profile, pairs[workload.timed])
            result[batch] = {"run": run, "profile_mean_s": mean, "profile_steps": profile, "stages": stages,
                             "load_before": before["load"], "gflops_before": before["gflops"]}
            first_step += workload.steps
        dep.shutdown()
    finally:
        stop_ray()
    return result


def measure(workload: Workload, peak: float, tables: dict[str, list], n_variants: int) -> dict:
    """Every system at every batch size of `workload`; adds its rows to `tables` (by table) and
    returns what is saved of it."""
    from benchmarks.baselines.plain_loop import run_plain_loop
    from benchmarks.baselines.trl_distillation import run_trl_distillation
    from benchmarks.baselines.trl_gkd import run_trl

    from transformers import AutoConfig

    from benchmarks.flops import Arch

    data: dict = {}
    with tempfile.TemporaryDirectory(prefix="oel_bench_consolidation.") as out:
        if workload.model:
            model_path = str(build_random(PAPER_MODELS[workload.model], Path(out) / "model"))
        else:
            model_path = tiny_model_path()
        variants = {name: run_variant(workload, overrides, data, Path(out), model_path)
                    for name, overrides in list(OEL_VARIANTS.items())[:n_variants]}
        cfg, tokenizer = data["cfg"], data["tokenizer"]
        arch = Arch.of(AutoConfig.from_pretrained(model_path))

        def flops_row(run, batch: int, mean: Optional[dict] = None) -> tuple[list, dict]:
            """(table row, saved figures): the run's model FLOPs per timed step, its achieved FLOP/s end
            to end and, with its stage seconds (`mean`), per stage, against the measured peak."""
            timed = data["pairs"][batch][workload.timed]
            stages = step_flops(arch, timed, run.response_tokens)
            wall = sum(run.step_seconds) / len(run.step_seconds)
            per_s = {"end_to_end": sum(stages.values()) / wall}
            per_s.update({k: stages[k] / mean[key] for k, key in STAGE_FLOPS.items()} if mean else {})
            fraction = {k: v / peak for k, v in per_s.items()}
            cells = [fraction.get(k, "") for k in ("end_to_end", *STAGE_FLOPS)]
            return ([workload.name, run.system, batch, sum(stages.values()) / 1e9, per_s["end_to_end"] / 1e12, *cells],
                    {"gflop_per_step": {k: round(v / 1e9, 3) for k, v in stages.items()},
                     "tflop_per_s": {k: round(v / 1e12, 4) for k, v in per_s.items()},
                     "of_matmul_peak": {k: round(v, 4) for k, v in fraction.items()}})

        comparisons = []
        for batch in workload.batch_sizes:
            work = make_work(cfg, tokenizer, data["pairs"][batch][:workload.timed.stop], WARMUP_STEPS)
            baselines, loads, speeds, walls = {}, {}, {}, {}
            for name, fn in (("trl", run_trl), ("trl_distillation", run_trl_distillation),
                             ("plain_loop", run_plain_loop)):
                before = machine_state()
                loads[name], speeds[name] = before["load"], before["gflops"]
                with stopwatch() as t:
                    baselines[name] = fn(work)  # fresh models: model loading and set-up are in wall_s only
                walls[name] = round(t["s"], 1)
            # "TRL" below is the faster of TRL's two trainers at this batch size
            trl = max(baselines["trl"], baselines["trl_distillation"], key=lambda r: r.samples_per_s)
            plain = baselines["plain_loop"]
            entry = {"workload": workload.name, "batch_size": batch, "params": arch.params,
                     "baselines": {k: r.to_json() for k, r in baselines.items()}, "best_trl": trl.system,
                     "baselines_load_before": loads, "baselines_gflops_before": speeds, "baselines_wall_s": walls,
                     "oel_ray": {}}
            flops = []
            for key, r in baselines.items():
                row, entry["baselines"][key]["flops"] = flops_row(r, batch)
                flops.append(row)
            for name, v in variants.items():
                ours = v[batch]["run"]
                ours.system = name
                entry["oel_ray"][name] = {
                    **ours.to_json(), "overrides": v["overrides"],
                    "vs_trl": round(ours.samples_per_s / trl.samples_per_s, 2),
                    "vs_plain_loop": round(ours.samples_per_s / plain.samples_per_s, 2),
                    "profile_mean_s": v[batch]["profile_mean_s"], "profile_steps": v[batch]["profile_steps"],
                    "stages": v[batch]["stages"], "load_before": v[batch]["load_before"],
                    "gflops_before": v[batch]["gflops_before"]}
                row, entry["oel_ray"][name]["flops"] = flops_row(ours, batch, v[batch]["profile_mean_s"])
                tables["flops"].append(row)
                p, s = v[batch]["profile_mean_s"], v[batch]["stages"]
                tables["profile"].append([workload.name, name, batch, p["wall"], p["generate"], p["teacher"],
                                          f"{p['learner']:.3f} ({p['learner_compute']:.3f})", p["sync"],
                                          p["driver_and_ray_overhead"]])
                tables["stages"].append([workload.name, name, batch, s["teacher_tokens_per_s"],
                                         s["learner_tokens_per_s"], s["learner_compute_step_s"],
                                         s["generation_response_tokens_per_s"], s["prompt_padding_efficiency"]])
            tables["flops"] += flops
            best = max((v[batch]["run"] for v in variants.values()), key=lambda r: r.samples_per_s)
            for r in [v[batch]["run"] for v in variants.values()] + list(baselines.values()):
                tables["speed"].append([workload.name, r.system, batch, r.samples_per_s, r.response_tokens_per_s,
                                        sum(r.step_seconds) / len(r.step_seconds), r.samples_per_s / trl.samples_per_s,
                                        r.samples_per_s / plain.samples_per_s,
                                        "best oel_ray" if r is best else "best TRL" if r is trl else ""])
            comparisons.append(entry)
    return {"workload": workload.name, "model": workload.model or "tiny", "params": arch.params,
            "warmup_steps": WARMUP_STEPS, "timed_steps": workload.timed_steps,
            "max_new_tokens": cfg.rollout.max_response_tokens,
            "knowledge_tokens": [len(tokenizer(k)["input_ids"]) for k in data["knowledge_set"]],
            "student_prompt_tokens": mean_prompt(data["pairs"], 0),
            "teacher_prompt_tokens": mean_prompt(data["pairs"], 1),
            "prepare_prompts_s": round(data["prepare_s"], 1),
            "start_roles_s": {name: v["start_roles_s"] for name, v in variants.items()},
            "comparisons": comparisons, "verdicts": [verdict(e) for e in comparisons],
            "learner": {"lr": cfg.learner.lr, "loss": cfg.learner.loss, "support_k": cfg.learner.support_k,
                        "zero_stage": cfg.learner.zero_stage, "dtype": cfg.learner.dtype,
                        "weight_sync": cfg.learner.weight_sync}, "temperature": cfg.rollout.temperature}


def mean_prompt(pairs: dict[int, list], which: int) -> float:
    """Mean length in tokens of the student (0) or teacher (1) prompts of every step and batch size."""
    lengths = [len(pair[which]) for steps in pairs.values() for step in steps for pair in step]
    return round(sum(lengths) / len(lengths), 1)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import importlib.util

    import torch

    from benchmarks.flops import measured_peak

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(DEFAULT_WORKLOADS))
    parser.add_argument("--all-variants", action="store_true",
                        help=f"every oel_ray variant ({', '.join(OEL_VARIANTS)}), "
                             f"not only the first {DEFAULT_VARIANTS}")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("trl") is None:  # fail now, not after oel_ray's minutes
        raise SystemExit("benchmarks.consolidation compares against TRL: pip install -e '.[bench]'")
    peak = measured_peak(torch.device("cpu"), torch.float32)  # on the quiet machine, before any role starts
    rows: dict[str, list] = {"speed": [], "profile": [], "stages": [], "flops": []}
    n_variants = len(OEL_VARIANTS) if args.all_variants else DEFAULT_VARIANTS
    workloads = [measure(WORKLOADS[name], peak, rows, n_variants) for name in args.workloads]
    verdicts = [v for w in workloads for v in w["verdicts"]]
    steps = ", ".join(f"{w['workload']} {w['timed_steps']} after {w['warmup_steps']}" for w in workloads)
    tables = {
        f"Consolidation samples/s, side by side (timed steps after untimed warm-up steps: {steps})":
            markdown_table(["workload", "system", "batch", "samples/s", "reply tokens/s", "s/step", "vs best TRL",
                            "vs plain loop", ""], rows["speed"]),
        "oel_ray step profile (mean seconds per timed step; overhead = wall - the stages; async: the "
        "learner column is the wait the overlap left, its compute in the actor in brackets)": markdown_table(
            ["workload", "system", "batch", "wall", "generate", "teacher", "learner (in actor)", "sync",
             "driver + Ray overhead"], rows["profile"]),
        "Per-stage throughput inside the oel_ray steps": markdown_table(
            ["workload", "system", "batch", "teacher tokens/s", "learner tokens/s (in actor)",
             "learner step s (in actor)", "generation reply tokens/s", "prompt padding efficiency"], rows["stages"]),
    }
    flops_title = (f"Model FLOPs per step and the fraction of this machine's fp32 matmul peak ({peak / 1e9:.0f} "
                   "GFLOP/s, measured in the same run) each system reaches, end to end and per oel_ray stage")
    tables[flops_title] = markdown_table(
        ["workload", "system", "batch", "GFLOP/step", "TFLOP/s", "end to end", "generate", "teacher",
         "learner (in actor)"], rows["flops"]) + (
        "\n\nFLOPs of the matrix products (benchmarks/flops.py), every prompt counted in full: what a prefix cache "
        "skips counts as done, so every system is credited with the same work.")
    tables["Verdict"] = "\n".join(f"- {v['text']}" for v in verdicts)
    print("\n\n".join(f"{title}\n{table}" for title, table in tables.items()))
    save(results_name(args.workloads), {
        "command": " ".join(["python -m benchmarks.consolidation", *(argv if argv is not None else sys.argv[1:])]),
        "workloads": workloads, "headline": verdicts[0], "verdicts": verdicts,
        "baselines": {"trl": "trl.experimental.gkd.GKDTrainer, lmbda=1, beta=1, teacher reads its own prompt",
                      "trl_distillation": "trl.DistillationTrainer (on-policy), beta=1, teacher reads its own prompt, "
                                          "HF generate (its colocated vLLM fails its weight sync on vLLM 0.32)",
                      "plain_loop": "HF generate + full-vocabulary reverse KL + AdamW, one process"},
        "matmul_peak_tflops": round(peak / 1e12, 4),
    }, tables=tables, readme=[next(iter(tables)), flops_title, "Verdict"])


def results_name(workloads: list[str]) -> str:
    """consolidation.json for `make bench`'s workloads; a run of others, by hand (paper-large's minutes
    a step), saves beside it without replacing it: consolidation-<workloads>.json."""
    if list(workloads) == list(DEFAULT_WORKLOADS):
        return "consolidation"
    return "-".join(["consolidation", *workloads])


def verdict(entry: dict) -> dict:
    """The acceptance figure (strictly on-policy oel_ray >= 2x the best TRL trainer at batch 64, >= 1x
    at batch 8), also in the best configuration, the asynchronous mode's speed-up over the strict one
    on the same work, and, whatever they are, where a strict step's time goes (largest share first)."""
    runs = entry["oel_ray"]
    default, overlapped = runs["oel_ray"], runs["oel_ray async"]
    best = max(runs.values(), key=lambda r: r["samples_per_s"])
    target = 2 if entry["batch_size"] >= 64 else 1
    wall = default["profile_mean_s"]["wall"]
    shares = sorted(((k, v / wall) for k, v in default["profile_mean_s"].items()
                     if k in ("generate", "teacher", "learner", "sync", "driver_and_ray_overhead")),
                    key=lambda kv: -kv[1])
    speedup = round(overlapped["samples_per_s"] / default["samples_per_s"], 2)
    speeds = [r["gflops_before"] for r in runs.values()] + list(entry["baselines_gflops_before"].values())
    spread = max(speeds) / min(speeds) - 1
    met = lambda r: "met" if r["vs_trl"] >= target else "not met"  # noqa: E731
    text = (f"{entry['workload']}, batch {entry['batch_size']}: oel_ray strictly on-policy is {default['vs_trl']}x "
            f"the faster TRL trainer ({entry['best_trl']}) and {default['vs_plain_loop']}x the plain loop; "
            "asynchronous "
            f"(consolidation.async_steps=1, one step off-policy) {overlapped['vs_trl']}x TRL, {speedup}x the strict "
            f"mode on the same work; best oel_ray ({best['system']}) {best['vs_trl']}x TRL. Target >= {target}x TRL: "
            f"strictly on-policy {met(default)}, best {met(best)}. Where a strict step's time goes: "
            + ", ".join(f"{k} {v:.0%}" for k, v in shares) + ". The machine's fp32 matmul speed just before each "
            f"system was measured: {min(speeds):.0f}-{max(speeds):.0f} GFLOP/s ({spread:.0%} apart).")
    return {"workload": entry["workload"], "batch_size": entry["batch_size"], "target_vs_trl": target,
            "oel_ray_vs_trl": default["vs_trl"], "oel_ray_vs_plain_loop": default["vs_plain_loop"],
            "async_vs_trl": overlapped["vs_trl"], "async_speedup": speedup, "best_variant": best["system"],
            "best_vs_trl": best["vs_trl"], "best_vs_plain_loop": best["vs_plain_loop"],
            "meets_target": best["vs_trl"] >= target, "strict_meets_target": default["vs_trl"] >= target,
            "step_time_shares": {k: round(v, 3) for k, v in shares}, "machine_gflops_spread": round(spread, 3),
            "text": text}


def machine_state() -> dict:
    """The machine just before a system is measured: its 1-minute load average and this process's
    fp32 matmul GFLOP/s (a probe of about 0.1 s). Systems are measured minutes apart, one after
    another; a change of the machine's speed between them shows here, beside their ratio."""
    import torch

    from benchmarks.flops import measured_peak

    return {"load": os.getloadavg()[0], "gflops": round(measured_peak(torch.device("cpu"), torch.float32) / 1e9, 1)}


def make_work(cfg, tokenizer, pairs, warmup_steps: int) -> Work:
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(cfg.model.path).eos_token_id  # the stop tokens vLLM uses too
    lr = cfg.learner
    return Work(model_path=cfg.model.path, batches=pairs, max_new_tokens=cfg.rollout.max_response_tokens,
                temperature=cfg.rollout.temperature, lr=lr.lr, weight_decay=lr.weight_decay,
                betas=tuple(lr.betas), grad_clip=lr.grad_clip, stop_ids=eos if isinstance(eos, list) else [eos],
                pad_id=tokenizer.pad_token_id, seed=cfg.seed, warmup_steps=warmup_steps)


if __name__ == "__main__":
    quiet_libraries()
    main()
