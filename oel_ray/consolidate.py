"""Consolidation: context distillation of the knowledge into the weights, one step after another.

Per step the rollout workers reply to partial-trajectory prefixes, the frozen teacher scores the
replies with the knowledge in context, and the learner takes one step; the mode's strategy
(oel_ray/strategy.py) decides which prompt the workers reply to, which KL the learner minimises and
whether the weights go back to the workers after the step (on-policy: every step, so each step is
strictly on-policy). With learner.loss=full_reverse_kl the teacher server is not asked: each learner
rank holds a teacher copy and takes the exact KL over the vocabulary.

consolidation.async_steps=1 overlaps the stages: the workers sample (and the teacher scores) batch
t+1 while the learner takes step t, so batch t+1 comes from the weights before step t, one step
old (StepMetrics.policy_lag). The weight sync after step t still runs every step, once both are
done, so the workers never change weights in the middle of a batch.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Optional

import ray

from oel_ray.config import OELConfig
from oel_ray.prompts import chat_ids, teacher_messages
from oel_ray.seeds import step_draw_seed, step_prefix_seed
from oel_ray.strategy import FORWARD_KL, FULL_REVERSE_KL, TOPK_REVERSE_KL, scores_sampled_tokens
from oel_ray.types import DistillSample, Sampling, StepMetrics, Trajectory
from oel_ray.weight_sync import for_roles

if TYPE_CHECKING:
    from oel_ray.roles import Roles


def step_prefixes(trajectories: list[Trajectory], steps: int, batch_size: int, seed: int) -> list[list[str]]:
    """Split the deploy games into `steps` equal groups (step s uses the prompts of deploy step s)
    and draw `batch_size` turn prompts from each, cycling when a group has fewer."""
    per_step = max(1, len(trajectories) // steps)
    batches = []
    for s in range(steps):
        pool = [t.prompt for traj in trajectories[s * per_step:(s + 1) * per_step] for t in traj.turns]
        rng = random.Random(step_prefix_seed(seed, s))
        rng.shuffle(pool)
        batches.append([pool[i % len(pool)] for i in range(batch_size)])
    return batches


def make_samples(prefixes: list[str], knowledge_set: list[str], tokenizer, cfg: OELConfig,
                 rng: random.Random) -> list[tuple[list[int], list[int]]]:
    """(student prompt ids, teacher prompt ids) per prefix; one knowledge text drawn per sample."""
    pairs = []
    for prefix in prefixes:
        system, user = teacher_messages(prefix, rng.choice(knowledge_set), cfg.teacher.knowledge_position)
        pairs.append((
            chat_ids(tokenizer, prefix, thinking=cfg.model.thinking),
            chat_ids(tokenizer, user, system=system, thinking=cfg.model.thinking),
        ))
    return pairs


def learner_loss(cfg: OELConfig) -> str:
    """What the learner minimises (oel_ray/strategy.py)."""
    return cfg.consolidation.strategy.loss(cfg.learner.loss)


def consolidate(roles: Roles, cfg: OELConfig, batches: list[list[str]], knowledge_set: list[str], tokenizer,
                *, first_step: int, on_step: Callable[[StepMetrics], None]) -> None:
    loss, strategy = learner_loss(cfg), cfg.consolidation.strategy
    steps = list(enumerate(batches, start=first_step + 1))
    threads = stage_threads(cfg)
    roles.learner.set_threads(cfg.learner.threads or threads)
    roles.teacher.set_threads(threads)

    def sample(step: int, prefixes: list[str], seconds: dict[str, float]):
        return sample_and_score(roles, cfg, step, prefixes, knowledge_set, tokenizer, seconds)

    if cfg.consolidation.async_steps:
        return _consolidate_overlapped(roles, cfg, steps, sample, on_step)
    for step, prefixes in steps:
        seconds: dict[str, float] = {}
        samples = sample(step, prefixes, seconds)
        with timed(seconds, "learner"):
            metrics = roles.learner.train_step(samples, step, loss=loss)
        if strategy.sync_each_step:  # off-policy: the workers keep the teacher's (round-start) weights
            seconds["sync"] = for_roles(roles, cfg).sync(version=step)
        metrics.seconds.update(seconds)
        on_step(metrics)


def sample_and_score(roles: Roles, cfg: OELConfig, step: int, prefixes: list[str], knowledge_set: list[str],
                     tokenizer, seconds: dict[str, float]) -> list[DistillSample]:
    """Step `step`'s samples (the workers' replies) with the teacher's scores of them (none for
    full_reverse_kl: the learner's own teacher copy scores the whole vocabulary)."""
    strategy, loss = cfg.consolidation.strategy, learner_loss(cfg)
    support_k = cfg.learner.support_k if loss in (TOPK_REVERSE_KL, FORWARD_KL) else 0
    sampling = Sampling(max_tokens=cfg.rollout.max_response_tokens, temperature=cfg.rollout.temperature,
                        top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, support_k=support_k)
    rng = random.Random(step_draw_seed(cfg.seed, step))
    pairs = make_samples(prefixes, knowledge_set, tokenizer, cfg, rng)
    seeds = [rng.randrange(2**31) for _ in pairs]
    if loss != FULL_REVERSE_KL and prefills_prompts(cfg):
        roles.teacher.prefill([t for _, t in pairs])  # encoded while the workers generate: prefill.py
    with timed(seconds, "generate"):  # off-policy: the round-start weights with the knowledge
        replies = roles.workers.generate([strategy.worker_prompt(p, t) for p, t in pairs], sampling, seeds)
    samples = [DistillSample(p, t, g.token_ids, g.topk_ids) for (p, t), g in zip(pairs, replies)]
    if loss == FULL_REVERSE_KL:
        return samples
    with timed(seconds, "teacher"):
        return roles.teacher.score(samples, scores_sampled_tokens(loss))


def _consolidate_overlapped(roles: Roles, cfg: OELConfig, steps: list[tuple[int, list[str]]], sample,
                            on_step: Callable[[StepMetrics], None]) -> None:
    """async_steps=1. A step's seconds are the driver's during that step: sampling and scoring the
    next batch (the first step also its own), then `learner`, the wait the overlap did not hide."""
    if not steps:
        return
    loss, strategy = learner_loss(cfg), cfg.consolidation.strategy
    seconds: dict[str, float] = {}
    batch, lag = sample(*steps[0], seconds), 0  # the first batch comes from the current weights
    for i, (step, _) in enumerate(steps):
        running = roles.learner.submit_train_step(batch, step, loss=loss)
        try:
            if i + 1 < len(steps):  # while the learner takes this step, from the weights before it
                upcoming = sample(*steps[i + 1], seconds)
        except Exception:  # the learner's step still counts: a state saved now then matches the steps done
            metrics = ray.get(running)[0]
            metrics.policy_lag = lag
            on_step(metrics)
            raise
        with timed(seconds, "learner"):
            metrics = ray.get(running)[0]
        if strategy.sync_each_step:
            seconds["sync"] = for_roles(roles, cfg).sync(version=step)
        metrics.seconds.update(seconds)
        metrics.policy_lag = lag
        on_step(metrics)
        if i + 1 < len(steps):
            batch, lag, seconds = upcoming, int(strategy.sync_each_step), {}


def prefills_prompts(cfg: OELConfig) -> bool:
    """teacher.prefill_prompts, its default resolved: on where the teacher has GPUs of its own. Where
    it shares CPU cores with the rollout workers the two slow each other down more than the overlap
    saves (2 cores, `tiny` at batch 8: 0.18 s a step without, 0.52 s with)."""
    setting = cfg.teacher.prefill_prompts
    return setting if setting is not None else cfg.cluster.use_gpu and cfg.cluster.teacher_gpus >= 1


def stage_threads(cfg: OELConfig) -> Optional[int]:
    """Torch threads for the teacher and the learner ranks (learner.threads overrides the latter):
    None, every core they may run on, when the stages run one after another (nothing else computes
    meanwhile); their CPU share rounded up when sampling and scoring overlap the learner."""
    return max(1, math.ceil(cfg.cluster.cpus_per_actor)) if cfg.consolidation.async_steps else None


@contextmanager
def timed(seconds: dict[str, float], name: str):
    start = time.perf_counter()
    yield
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
