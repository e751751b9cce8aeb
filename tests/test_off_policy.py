"""Off-policy context distillation (consolidation.mode=off_policy), the paper's baseline, on the real
roles: one vLLM rollout worker, the teacher server and the DeepSpeed learner on Ray, no mocks.

The workers keep the round-start weights for the whole round (they are the teacher): they reply to
each prefix with the knowledge in context and return the teacher's top-k; the student learns the
forward KL(teacher || student) on those replies while reading the prefix without the knowledge.
"""

import random
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from distill_setup import KNOWLEDGE, distill_config, distill_roles

STEPS, BATCH, LR, SUPPORT_K = 6, 8, 3e-4, 256


def make_config(tiny_model: str, out: str):
    return distill_config(tiny_model, out, steps=STEPS, batch=BATCH, lr=LR, support_k=SUPPORT_K,
                          consolidation={"mode": "off_policy"})


def first_turn_prompts(cfg, count: int) -> list[str]:
    """Prefixes as the deploy games start them: the first turn prompt of `count` training maps."""
    from oel_ray.games import Game, train_specs

    return [Game(spec, cfg.env.max_turns).prompt() for spec in train_specs(cfg.env, 1, count, 1)]


def teacher_samples(workers, cfg, prefixes, tokenizer, step: int):
    """What off-policy step `step` must train on: the draws `consolidate` makes for that step
    (knowledge and seeds from (seed, step)), sampled from the knowledge-conditioned prompt with the
    teacher's top-k as the support."""
    from oel_ray.consolidate import make_samples
    from oel_ray.seeds import step_draw_seed
    from oel_ray.types import DistillSample, Sampling

    rng = random.Random(step_draw_seed(cfg.seed, step))
    pairs = make_samples(prefixes, [KNOWLEDGE], tokenizer, cfg, rng)
    seeds = [rng.randrange(2**31) for _ in pairs]
    r = cfg.rollout
    sampling = Sampling(max_tokens=r.max_response_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                        support_k=cfg.learner.support_k)
    replies = workers.generate([t for _, t in pairs], sampling, seeds)
    return [DistillSample(s, t, g.token_ids, g.topk_ids) for (s, t), g in zip(pairs, replies)]


@torch.no_grad()
def forward_kl(student, teacher, samples, temperature: float) -> tuple[float, float]:
    """(token-mean forward KL(teacher || student) on each sample's support, the fraction of positions
    where the support's first id is the teacher's argmax): the student reads the student prompt,
    the teacher the teacher prompt, both followed by the same reply."""
    total, top1, tokens = 0.0, 0, 0
    for s in samples:
        r, sp, tp = s.response_ids, s.student_prompt_ids, s.teacher_prompt_ids
        ls = torch.log_softmax(student(torch.tensor([sp + r])).logits[0, len(sp) - 1:-1] / temperature, -1)
        lt = torch.log_softmax(teacher(torch.tensor([tp + r])).logits[0, len(tp) - 1:-1] / temperature, -1)
        support = torch.tensor(s.support_ids, dtype=torch.long)
        top1 += int((support[:, 0] == lt.argmax(-1)).sum())
        ls, lt = ls.gather(-1, support), lt.gather(-1, support)
        total += float((lt.exp() * (lt - ls)).sum())
        tokens += len(r)
    return total / tokens, top1 / tokens


@pytest.fixture(scope="module")
def off_policy_roles(ray_cluster, tiny_model, tmp_path_factory):
    """(config, roles, tokenizer, frozen teacher copy, student copy), shared by this module's tests."""
    cfg = make_config(tiny_model, str(tmp_path_factory.mktemp("off_policy")))
    with distill_roles(cfg, ray_cluster) as parts:
        yield (cfg, *parts)


def test_off_policy_steps_lower_the_forward_kl_and_leave_the_workers_at_round_start(ray_cluster, off_policy_roles):
    from oel_ray.consolidate import consolidate

    started = time.perf_counter()
    cfg, roles, tokenizer, frozen, student = off_policy_roles
    temp = cfg.learner.temperature
    workers, learner = roles.workers, roles.learner
    engine = workers.workers[0]
    prefixes = first_turn_prompts(cfg, BATCH)
    samples = teacher_samples(workers, cfg, prefixes, tokenizer, step=1)
    probe = samples[0].student_prompt_ids + samples[0].response_ids  # a fixed sequence
    engine_start = ray_cluster.get(engine.prompt_logprobs.remote(probe))
    learner_start = learner.sequence_logprobs(probe)
    before, top1 = forward_kl(student, frozen, samples, temp)

    metrics, engine_during = [], []

    def on_step(m):
        metrics.append(m)
        engine_during.append(ray_cluster.get(engine.prompt_logprobs.remote(probe)))

    t0 = time.perf_counter()
    # The same prefixes every step, fresh teacher replies each time (seeds differ per step).
    consolidate(roles, cfg, [prefixes] * STEPS, [KNOWLEDGE], tokenizer, first_step=0, on_step=on_step)
    seconds = time.perf_counter() - t0
    student.load_state_dict(learner.state_dict(), strict=False)
    after, _ = forward_kl(student, frozen, samples, temp)
    learner_end = learner.sequence_logprobs(probe)
    print(f"\nforward KL on the teacher's step-1 samples {before:.4f} -> {after:.4f}; per step "
          f"{[round(m.kl, 4) for m in metrics]}; {STEPS} steps in {seconds:.1f}s; "
          f"test {time.perf_counter() - started:.0f}s")
    # The replies and supports are the teacher's: the first support id is its own argmax.
    assert top1 > 0.95
    # Step 1 trained on exactly those samples: the learner's KL before its first update is the
    # forward KL computed here (student without knowledge, teacher with it, teacher's support).
    assert before > 0.01, "the knowledge should change the teacher's distribution"
    assert abs(metrics[0].kl - before) < 1e-4 * max(1.0, before)
    assert {m.kl_direction for m in metrics} == {"forward"}
    assert after < 0.7 * before
    # The workers kept the round-start weights through every step, while the learner moved.
    for logprobs in engine_during:
        np.testing.assert_allclose(logprobs, engine_start, rtol=0, atol=1e-6)
    assert np.abs(learner_end - learner_start).max() > 1e-2
    assert len(metrics) == STEPS and all("sync" not in m.seconds for m in metrics)


@torch.no_grad()
def reply_nll(student, samples) -> float:
    """Token-mean negative log-likelihood of each sample's reply under the student reading the
    student prompt, at the rollout temperature (0.7) as every loss is taken."""
    total, tokens = 0.0, 0
    for s in samples:
        sp, r = s.student_prompt_ids, s.response_ids
        ls = torch.log_softmax(student(torch.tensor([sp + r])).logits[0, len(sp) - 1:-1] / 0.7, -1)
        total -= float(ls.gather(-1, torch.tensor(r)[:, None]).sum())
        tokens += len(r)
    return total / tokens


def test_seqkd_trains_the_student_on_the_teachers_replies(off_policy_roles):
    """learner.loss=seqkd (the public code's sequence-level baseline): off-policy, the loss is the
    student's negative log-likelihood of the teacher's sampled replies; the step metrics still report
    the forward KL's single-sample estimate from the teacher's scores of those tokens. (On the roles
    the test above trained: the student starts from wherever it left the learner.)"""
    from oel_ray.consolidate import consolidate, learner_loss

    shared, roles, tokenizer, _, student = off_policy_roles
    cfg = replace(shared, learner=replace(shared.learner, loss="seqkd"))
    assert learner_loss(cfg) == "seqkd_forward"
    prefixes = first_turn_prompts(cfg, BATCH)
    samples = teacher_samples(roles.workers, cfg, prefixes, tokenizer, step=1)
    student.load_state_dict(roles.learner.state_dict(), strict=False)
    before = reply_nll(student, samples)
    metrics = []
    consolidate(roles, cfg, [prefixes] * STEPS, [KNOWLEDGE], tokenizer, first_step=0, on_step=metrics.append)
    student.load_state_dict(roles.learner.state_dict(), strict=False)
    after = reply_nll(student, samples)
    print(f"\nseqkd: NLL of the teacher's step-1 replies {before:.4f} -> {after:.4f}; per step "
          f"{[round(m.loss, 4) for m in metrics]}")
    # Step 1 trained on exactly those replies: its loss is their NLL under the initial student.
    assert abs(metrics[0].loss - before) < 1e-4 * max(1.0, before)
    assert {m.kl_direction for m in metrics} == {"forward"}
    assert after < 0.9 * before
