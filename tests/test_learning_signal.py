"""Acceptance: consolidation moves the knowledge into the weights, beyond the prefixes it saw.

With the tiny model and a knowledge text that changes the frozen teacher's distribution, 30 steps
of `oel_ray.consolidate` (real rollout worker, teacher server and DeepSpeed learner on Ray; object
store weight sync) cut the reverse KL between student(prefix) and teacher(knowledge + prefix) by
at least half on held-out prefixes: turn prompts of held-out Sokoban boards, never trained on.

KL is measured exactly here, over the whole vocabulary at the rollout temperature, on replies the
rollout worker samples with the weights it was synced to (so it is the student's own distribution,
the quantity on-policy distillation minimises), with a local copy of the learner's weights and of
the frozen initial model.
"""

import random
import time

import numpy as np
import torch
from distill_setup import KNOWLEDGE, distill_config, distill_roles

# 32 prefixes per step: with 8 (the tiny replies are ~5 tokens) the steps are so noisy that the
# result hangs on the learning rate (62% at lr 2e-4, worse at 3e-4, KL up 5x at 1e-3); with 32,
# lr 1e-4..4e-4 all gave 69-79% lower held-out KL.
STEPS, BATCH, LR = 30, 32, 2e-4
TRAIN_GAMES, HELD_OUT_MAPS, SAMPLES_PER_PREFIX = 30, 16, 4


def make_config(tiny_model: str, out: str):
    # The teacher encodes each batch's prompts while the workers generate (off by default on CPU):
    # scores it got wrong that way would teach the student something else than the knowledge.
    return distill_config(tiny_model, out, steps=STEPS, batch=BATCH, lr=LR, env={"eval_maps": HELD_OUT_MAPS},
                          teacher={"prefill_prompts": True})


def turn_prompts(trajectories) -> list[str]:
    return [t.prompt for traj in trajectories for t in traj.turns]


@torch.no_grad()
def held_out_kl(workers, student, teacher, tokenizer, cfg, prefixes: list[str]) -> float:
    """Token-mean KL(student(prefix) || teacher(knowledge + prefix)) over the whole vocabulary at the
    rollout temperature, on replies the rollout worker samples (fixed seeds)."""
    from oel_ray.consolidate import make_samples
    from oel_ray.types import Sampling

    pairs = make_samples(prefixes, [KNOWLEDGE], tokenizer, cfg, random.Random(0))
    pairs = [p for p in pairs for _ in range(SAMPLES_PER_PREFIX)]
    sampling = Sampling(max_tokens=cfg.rollout.max_response_tokens, temperature=cfg.rollout.temperature)
    replies = workers.generate([s for s, _ in pairs], sampling, seeds=list(range(len(pairs))))
    temp, total, tokens = cfg.rollout.temperature, 0.0, 0
    for (s_ids, t_ids), reply in zip(pairs, replies):
        r = reply.token_ids
        ls = torch.log_softmax(student(torch.tensor([s_ids + r])).logits[0, len(s_ids) - 1:-1] / temp, -1)
        lt = torch.log_softmax(teacher(torch.tensor([t_ids + r])).logits[0, len(t_ids) - 1:-1] / temp, -1)
        total += float((ls.exp() * (ls - lt)).sum())
        tokens += len(r)
    return total / tokens


def test_consolidation_reduces_held_out_reverse_kl(ray_cluster, tiny_model, tmp_path):
    from oel_ray.consolidate import consolidate, step_prefixes
    from oel_ray.games import eval_specs, train_specs
    from oel_ray.types import Sampling

    started = time.perf_counter()
    cfg = make_config(tiny_model, str(tmp_path))
    with distill_roles(cfg, ray_cluster) as (roles, tokenizer, frozen, student):
        workers, learner = roles.workers, roles.learner
        # Prefixes as the driver makes them: the turn prompts of games the student played. Training
        # boards and held-out boards are disjoint (games.train_specs excludes every held-out board).
        play = Sampling(max_tokens=cfg.rollout.max_response_tokens, temperature=cfg.rollout.temperature, seed=0)
        train = workers.play(train_specs(cfg.env, 1, TRAIN_GAMES, 1), play, cfg.env.max_turns, 1)
        held_out = turn_prompts(workers.play(eval_specs(cfg.env), play, cfg.env.max_turns, 1))
        batches = step_prefixes(train, STEPS, BATCH, cfg.seed)
        assert not set(held_out) & set(turn_prompts(train))

        before = held_out_kl(workers, student, frozen, tokenizer, cfg, held_out)
        metrics = []
        t0 = time.perf_counter()
        consolidate(roles, cfg, batches, [KNOWLEDGE], tokenizer, first_step=0, on_step=metrics.append)
        seconds = time.perf_counter() - t0
        student.load_state_dict(learner.state_dict(), strict=False)
        after = held_out_kl(workers, student, frozen, tokenizer, cfg, held_out)
    sync = [m.seconds["sync"] for m in metrics]
    print("\ntraining KL per step:", " ".join(f"{m.kl:.3f}" for m in metrics))
    print(f"\nheld-out reverse KL {before:.4f} -> {after:.4f} ({100 * (1 - after / before):.0f}% lower) on "
          f"{len(held_out)} prefixes x {SAMPLES_PER_PREFIX} samples; training KL {metrics[0].kl:.4f} -> "
          f"{metrics[-1].kl:.4f}; {STEPS} steps in {seconds:.1f}s (sync {np.mean(sync) * 1e3:.1f} ms/step); "
          f"test {time.perf_counter() - started:.0f}s")
    assert len(metrics) == STEPS and all(m.seconds["sync"] > 0 for m in metrics)
    assert before > 0.01, "the knowledge should change the teacher's distribution"
    assert after <= 0.5 * before
