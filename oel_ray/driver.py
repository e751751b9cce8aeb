"""The OEL loop, read top to bottom: collect -> extract -> consolidate -> evaluate -> checkpoint.

Round r starts from round r-1's final weights, which are also that round's frozen teacher (round 1:
the initial model). Everything a round produces lands under <output_dir>/round_<r>/.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import ray

from oel_ray import artifacts
from oel_ray.config import OELConfig
from oel_ray.consolidate import Roles, consolidate, step_prefixes
from oel_ray.engine import Sampling
from oel_ray.evaluate import EvalReport, evaluate
from oel_ray.extractor import Extractor
from oel_ray.games import train_specs
from oel_ray.learner import LearnerGroup
from oel_ray.rollout import RolloutGroup
from oel_ray.teacher import start_teacher
from oel_ray.types import StepMetrics

log = logging.getLogger("oel_ray")

EXTRACTION_STREAM, DEPLOY_STREAM = 0, 1  # independent map streams within a round


def run(cfg: OELConfig) -> dict:
    out = Path(cfg.output_dir)
    started = time.perf_counter()
    roles, extractor, tokenizer = start_roles(cfg)
    artifacts.write_json(out / "round_0" / "eval.json", stage(f"evaluate round 0 (initial model)",
                                                              lambda: evaluate(roles.workers, cfg, 0)[0].to_json()))
    reports: list[EvalReport] = []
    steps_done = 0
    kl_first = kl_last = None
    for r in range(1, cfg.rounds + 1):
        rdir = out / f"round_{r}"
        explore = sampling_for_play(cfg)

        # 1. collect: the deployed model plays new training maps, no knowledge in context
        trajectories = stage(f"round {r}: collect", lambda: roles.workers.play(
            train_specs(cfg.env, r, cfg.rollout.games_per_round, EXTRACTION_STREAM), explore, cfg.env.max_turns, r))
        artifacts.write_trajectories(rdir / "trajectories.jsonl", trajectories)
        log.info("  %d games, %d passed", len(trajectories), sum(t.passed for t in trajectories))

        # 2. extract: N chains accumulate knowledge over K trajectories each
        chains = stage(f"round {r}: extract", lambda: ray.get(extractor.run.remote(trajectories)))
        use_step = cfg.extractor.use_step or max(1, cfg.extractor.k // 2)
        knowledge_set = [chain[use_step].text for chain in chains]
        artifacts.write_json(rdir / "knowledge.json", {
            "use_step": use_step, "format": cfg.extractor.format,
            "chains": [[vars(s) for s in chain] for chain in chains]})
        log.info("  %d chains, knowledge at step %d: %s tokens", len(chains), use_step,
                 [chain[use_step].num_tokens for chain in chains])

        # 3. consolidate: deploy prefixes, then on-policy distillation step by step
        deploy = stage(f"round {r}: deploy", lambda: roles.workers.play(
            train_specs(cfg.env, r, cfg.learner.steps * cfg.rollout.deploy_games_per_step, DEPLOY_STREAM),
            explore, cfg.env.max_turns, r))
        artifacts.write_trajectories(rdir / "deploy.jsonl", deploy)
        batches = step_prefixes(deploy, cfg.learner.steps, cfg.learner.batch_size, cfg.seed + r)
        metrics: list[dict] = []

        def on_step(m: StepMetrics) -> None:
            metrics.append(flat_metrics(m))
            log.info("  step %d/%d  kl %.4f  loss %.4f  grad %.3f  %s", m.step - steps_done, cfg.learner.steps,
                     m.reverse_kl, m.loss, m.grad_norm,
                     " ".join(f"{k} {v:.2f}s" for k, v in m.seconds.items()))

        stage(f"round {r}: consolidate ({cfg.learner.steps} steps)", lambda: consolidate(
            roles, cfg, batches, knowledge_set or [""], tokenizer, first_step=steps_done, on_step=on_step))
        steps_done += cfg.learner.steps
        artifacts.write_csv(rdir / "metrics.csv", metrics)
        kl_first = metrics[0]["reverse_kl"] if kl_first is None else kl_first
        kl_last = metrics[-1]["reverse_kl"]

        # 4. evaluate the consolidated model on the held-out maps
        report, eval_trajs = stage(f"round {r}: evaluate", lambda: evaluate(roles.workers, cfg, r))
        artifacts.write_trajectories(rdir / "eval_trajectories.jsonl", eval_trajs)
        artifacts.write_json(rdir / "eval.json", report.to_json())
        artifacts.atomic_write_text(rdir / "eval.md", report.markdown())
        reports.append(report)

        # 5. checkpoint; the consolidated weights become the next round's frozen teacher
        stage(f"round {r}: checkpoint", lambda: roles.learner.save(str(rdir / "model")))
        if r < cfg.rounds:
            ray.get(roles.teacher.load_weights.remote(roles.learner.state_dict_ref()))

    summary = {
        "rounds": cfg.rounds, "steps": steps_done, "wall_seconds": round(time.perf_counter() - started, 1),
        "pass_rate": reports[-1].pass_rate, "pass_rate_ci": [reports[-1].ci_low, reports[-1].ci_high],
        "response_tokens_per_turn": reports[-1].response_tokens_per_turn,
        "reverse_kl_first_step": kl_first, "reverse_kl_last_step": kl_last,
        "final_model": str(out / f"round_{cfg.rounds}" / "model"),
    }
    artifacts.write_json(out / "summary.json", summary)
    return summary


def start_roles(cfg: OELConfig) -> tuple[Roles, "ray.actor.ActorHandle", object]:
    """One rollout group, one teacher, one learner group, one extractor; resources from config."""
    from transformers import AutoTokenizer

    c = cfg.cluster
    gpus = 1.0 if c.use_gpu else 0.0
    lcfg = cfg.learner
    workers = stage(f"start {cfg.rollout.num_workers} rollout worker(s) (vLLM)", lambda: RolloutGroup(
        cfg.model, num_workers=cfg.rollout.num_workers, seed=cfg.rollout.seed,
        max_logprobs=lcfg.support_k, kv_cache_gib=cfg.rollout.kv_cache_gib,
        gpu_memory_utilization=cfg.rollout.gpu_memory_utilization, num_cpus=c.cpus_per_actor, num_gpus=gpus))
    teacher = stage("start teacher", lambda: start_teacher(
        cfg.model.path, num_cpus=c.cpus_per_actor, num_gpus=gpus, dtype=cfg.model.dtype,
        temperature=lcfg.temperature, chunk_tokens=cfg.teacher.chunk_tokens,
        batch_tokens=cfg.teacher.batch_tokens, trust_remote_code=cfg.model.trust_remote_code))
    learner = stage(f"start learner ({lcfg.num_ranks} DeepSpeed rank(s), ZeRO-{lcfg.zero_stage})",
                    lambda: LearnerGroup(lcfg, cfg.model.path, num_cpus=c.cpus_per_actor, num_gpus=gpus))
    engines = workers.workers
    if cfg.extractor.model != "policy":
        engines = RolloutGroup(
            _with_path(cfg.model, cfg.extractor.model), num_workers=1, seed=cfg.seed, max_logprobs=1,
            kv_cache_gib=cfg.rollout.kv_cache_gib, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
            num_cpus=c.cpus_per_actor, num_gpus=gpus).workers
    extractor_path = cfg.model.path if cfg.extractor.model == "policy" else cfg.extractor.model
    extractor = ray.remote(num_cpus=0)(Extractor).remote(
        cfg.extractor, extractor_path, engines, thinking=cfg.model.thinking, seed=cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    return Roles(workers=workers, teacher=teacher, learner=learner), extractor, tokenizer


def _with_path(model, path: str):
    from dataclasses import replace

    return replace(model, path=path, build=None)


def sampling_for_play(cfg: OELConfig) -> Sampling:
    r = cfg.rollout
    return Sampling(max_tokens=r.max_response_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)


def flat_metrics(m: StepMetrics) -> dict:
    row = {k: v for k, v in vars(m).items() if k != "seconds"}
    row.update({f"seconds_{k}": round(v, 4) for k, v in m.seconds.items()})
    return row


def stage(name: str, fn):
    log.info("[%s] ...", name)
    start = time.perf_counter()
    result = fn()
    log.info("[%s] done in %.1fs", name, time.perf_counter() - start)
    return result


def init_ray(cfg: OELConfig) -> None:
    c = cfg.cluster
    if c.address:
        ray.init(address=c.address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster, not reachable off-host
    ray.init(num_cpus=c.num_cpus or max(2, os.cpu_count() or 2), include_dashboard=c.dashboard,
             dashboard_host="127.0.0.1", log_to_driver=True)
