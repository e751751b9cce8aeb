"""Consolidation speed-ups that must not change what is learned: the learner's length buckets (same
loss and gradient as one padded block), each bucket's shared prompt start run once (same loss and
gradient as every row in full) and the asynchronous mode (consolidation.async_steps=1) on
the real roles: one vLLM rollout worker, the teacher server and the DeepSpeed learner on Ray."""

import itertools
import random

import numpy as np
import pytest
import torch
from distill_setup import KNOWLEDGE, distill_config, distill_roles

from oel_ray.batching import collate, length_buckets, plan_step, shared_starts
from oel_ray.deepspeed_setup import DistillModule
from oel_ray.types import DistillSample

TEMP, K = 0.7, 16


def padded_cost(lengths, buckets, overhead):
    return sum(len(b) * max(lengths[i] for i in b) + overhead for b in buckets)


def test_length_buckets_partition_the_samples_at_the_least_padded_cost():
    rng = random.Random(0)
    for overhead in (0, 40, 10**6):
        lengths = [rng.randrange(5, 300) for _ in range(9)]
        buckets = length_buckets(lengths, overhead)
        assert sorted(i for b in buckets for i in b) == list(range(9))
        # Every split of the sorted order into runs, tried one by one: none pads less.
        order = sorted(range(9), key=lambda i: -lengths[i])
        best = min(padded_cost(lengths, [order[a:b] for a, b in zip((0, *cuts), (*cuts, 9))], overhead)
                   for n in range(9) for cuts in itertools.combinations(range(1, 9), n))
        assert padded_cost(lengths, buckets, overhead) == best
    assert len(length_buckets([7, 300, 8, 290], 10**6)) == 1  # padding never worth a second pass
    assert length_buckets([7, 300, 8, 290], 0) == [[1], [3], [2], [0]]


def distill_loss_and_grads(tiny_model, cfg, samples, targets, buckets, loss, shared=None, checkpointing=False):
    """The learner's forward and backward on `samples` in `buckets` (their first `shared` tokens run
    once per bucket; `checkpointing`: the layers' activations recomputed in the backward pass), on a
    fresh fp64 copy of the tiny model: (token-mean loss, gradient per weight)."""
    from transformers import AutoModelForCausalLM

    from oel_ray.batching import enable_checkpointing

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64)
    if checkpointing:
        enable_checkpointing(model)
    runs = []  # the last layer's MLP starts once per pass (a checkpointed pass: again in the backward)
    model.model.layers[-1].mlp.register_forward_pre_hook(lambda *_: runs.append(1))
    order = [i for b in buckets for i in b]
    batch = collate([samples[i] for i in order], [targets[i] for i in order], list(map(len, buckets)), 0, shared)
    tokens = sum(len(s.response_ids) for s in samples)
    value, *_ = DistillModule(model, cfg)(**batch, num_units=tokens, loss=loss)
    value.backward()
    starts = sum(map(bool, shared or []))  # a shared start's own pass fills a cache: never checkpointed
    assert len(runs) == (2 if checkpointing else 1) * len(buckets) + starts
    return value.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss, tail", [("topk_reverse_kl", False), ("topk_reverse_kl", True),
                                        ("sampled_reverse_kl", False), ("k3", False)])
def test_length_buckets_give_the_loss_and_gradient_of_one_padded_block(tiny_model, loss, tail):
    """The learner's forward on its samples grouped into buckets equals one block over all of
    them padded to the longest: same token-mean loss, same gradient for every weight (in fp64, so
    that float rounding, which the new order of the sums changes, stays far below the tolerance)."""
    from oel_ray.config import LearnerConfig

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    samples, targets = [], []
    for _ in range(12):  # prompts of 3..200 tokens: far apart, so the buckets differ from one block
        prompt, reply = rng.integers(3, 500, rng.integers(3, 200)).tolist(), rng.integers(3, 500, rng.integers(1, 20))
        k = K if loss == "topk_reverse_kl" else 1
        support = reply[:, None] if k == 1 else np.stack([rng.permutation(512)[:K] for _ in reply])
        samples.append(DistillSample(prompt, prompt, reply.tolist(), support.astype(np.int32)))
        # 0.9 of the mass on the support: the tail entry has something to hold
        targets.append((support.astype(np.int64), np.log(0.9 * rng.dirichlet(np.ones(k), len(reply))).astype(np.float32)))
    cfg = LearnerConfig(temperature=TEMP, dtype="float64", tail=tail)

    def loss_and_grads(buckets):
        return distill_loss_and_grads(tiny_model, cfg, samples, targets, buckets, loss)

    lengths = [len(s.student_prompt_ids) + len(s.response_ids) for s in samples]
    buckets = length_buckets(lengths)
    assert len(buckets) > 2
    one_value, one_grads = loss_and_grads([list(range(len(samples)))])
    value, grads = loss_and_grads(buckets)
    assert abs(value - one_value) <= 1e-12 * abs(one_value)
    assert grads.keys() == one_grads.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads[name], one_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def test_a_buckets_shared_prompt_start_run_once_gives_the_loss_and_gradient_of_every_row_in_full(tiny_model):
    """Prompts that start alike (a chat header and a game intro, then each its own situation), in
    buckets of several rows: run once per bucket and expanded, the shared start gives the same
    loss and the same gradient for every weight as each row run in full (fp64)."""
    from oel_ray.config import LearnerConfig

    rng = np.random.default_rng(1)
    intro = rng.integers(3, 500, 60).tolist()
    samples, targets = [], []
    for _ in range(10):
        prompt = intro + rng.integers(3, 500, rng.integers(1, 120)).tolist()
        reply = rng.integers(3, 500, rng.integers(1, 12))
        support = np.stack([rng.permutation(512)[:K] for _ in reply])
        samples.append(DistillSample(prompt, prompt, reply.tolist(), support.astype(np.int32)))
        targets.append((support.astype(np.int64), np.log(0.9 * rng.dirichlet(np.ones(K), len(reply))).astype(np.float32)))
    samples.append(DistillSample(intro[:5], intro[:5], [7, 8], np.zeros((2, K), np.int32)))  # shorter than the intro
    targets.append((np.zeros((2, K), np.int64), np.full((2, K), -3.0, np.float32)))
    lengths = [len(s.student_prompt_ids) + len(s.response_ids) for s in samples]
    plan = plan_step(lengths, 1, 1)
    starts = shared_starts(plan, [s.student_prompt_ids for s in samples], min_tokens=4)[0][0]
    buckets = plan[0][0]
    assert len(buckets) > 1 and max(starts) >= 60 and all(s <= min(len(samples[i].student_prompt_ids) for i in b) - 1
                                                           for s, b in zip(starts, buckets))
    cfg = LearnerConfig(temperature=TEMP, dtype="float64")

    def loss_and_grads(shared):
        return distill_loss_and_grads(tiny_model, cfg, samples, targets, buckets, "topk_reverse_kl", shared)

    full_value, full_grads = loss_and_grads(None)
    value, grads = loss_and_grads(starts)
    assert abs(value - full_value) <= 1e-12 * abs(full_value)
    assert grads.keys() == full_grads.keys() and len(grads) > 10
    for name in grads:  # Qwen3's RMSNorm computes in fp32 even here: a start run on one row instead of
        # ten is rounded there a little differently (measured up to 6e-8 of the largest gradient)
        scale = float(full_grads[name].abs().max())
        torch.testing.assert_close(grads[name], full_grads[name], rtol=1e-6, atol=1e-6 * scale, msg=name)
    # Gradient checkpointing recomputes each layer in the backward pass, on the same cached start:
    # the same floats, computed again (with no shared start too).
    for shared, reference in ((starts, grads), (None, full_grads)):
        again_value, again = distill_loss_and_grads(tiny_model, cfg, samples, targets, buckets, "topk_reverse_kl",
                                                    shared, checkpointing=True)
        assert again_value == (value if shared else full_value)
        assert again.keys() == reference.keys()
        for name in again:
            torch.testing.assert_close(again[name], reference[name], rtol=0, atol=0, msg=name)


def test_shared_starts_are_run_alike_on_every_rank():
    """A bucket place where any rank shares too little (or holds a placeholder) runs in full on every
    rank, so the ranks' forward passes stay in step (ZeRO-3); elsewhere each rank keeps its own."""
    intro_a, intro_b = list(range(100, 140)), list(range(200, 250))
    prompts = [intro_a + [1, 2], intro_b + [3], intro_a + [4, 5, 6], intro_b + [7, 8]]
    plan = [[[[0, 2]]], [[[1, 3]]]]  # rank 0: two prompts sharing 40 tokens; rank 1: 50
    assert shared_starts(plan, prompts, min_tokens=32) == [[[40]], [[50]]]
    assert shared_starts(plan, prompts, min_tokens=45) == [[[0]], [[0]]]  # rank 0 shares too little
    assert shared_starts([[[[0, 2]]], [[[]]]], prompts, min_tokens=32) == [[[0]], [[0]]]  # a placeholder
    assert shared_starts([[[[0]]]], prompts, min_tokens=32) == [[[41]]]  # one row: all but its last token


def test_async_steps_must_be_0_or_1(tiny_model, tmp_path):
    from oel_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^consolidation.async_steps: 2 is not one of 0, 1"):
        distill_config(tiny_model, str(tmp_path), steps=2, batch=8, lr=1e-3, consolidation={"async_steps": 2})


class Recorded:
    """The real RolloutGroup, noting the weights version each generate call ran at and each sync."""

    def __init__(self, group):
        self.group, self.version, self.log = group, 0, []

    def generate(self, *args, **kwargs):
        self.log.append(("generate", self.version))
        return self.group.generate(*args, **kwargs)

    def load_weights(self, weights_ref, version: int) -> float:
        self.log.append(("sync", version))
        self.version = version
        return self.group.load_weights(weights_ref, version=version)

    def __getattr__(self, name):
        return getattr(self.group, name)


def test_async_consolidation_samples_one_step_behind_and_syncs_every_step(ray_cluster, tiny_model, tmp_path):
    from oel_ray.consolidate import consolidate
    from oel_ray.games import Game, train_specs

    steps, batch = 4, 8
    cfg = distill_config(tiny_model, str(tmp_path), steps=steps, batch=batch, lr=3e-3,
                         consolidation={"async_steps": 1})
    with distill_roles(cfg, ray_cluster) as (roles, tokenizer, _, _):
        group, learner = roles.workers, roles.learner
        roles.workers = workers = Recorded(group)
        prefixes = [Game(spec, cfg.env.max_turns).prompt() for spec in train_specs(cfg.env, 1, batch, 1)]
        probe = tokenizer(prefixes[0])["input_ids"][:64]
        metrics, gaps = [], []

        def on_step(m):  # nothing is in flight here: the next batch is sampled, the learner is idle
            metrics.append(m)
            engine = ray_cluster.get(group.workers[0].prompt_logprobs.remote(probe))
            gaps.append(float(np.abs(engine - learner.sequence_logprobs(probe)).max()))

        start = learner.sequence_logprobs(probe)
        consolidate(roles, cfg, [prefixes] * steps, [KNOWLEDGE], tokenizer, first_step=10, on_step=on_step)
        moved = float(np.abs(learner.sequence_logprobs(probe) - start).max())
    assert [m.step for m in metrics] == [11, 12, 13, 14]
    # Batch 11 comes from the weights the learner starts from; batch t + 1 is sampled while the
    # learner takes step t, from the weights synced after step t - 1: one step old.
    assert [m.policy_lag for m in metrics] == [0, 1, 1, 1]
    assert workers.log == [("generate", 0), ("generate", 0), ("sync", 11), ("generate", 11), ("sync", 12),
                           ("generate", 12), ("sync", 13), ("sync", 14)]
    # Every step's weights reached the engine before the next step: it matches the learner then.
    assert moved > 1e-2, "the learner should move, or the comparison below proves nothing"
    assert max(gaps) < 1e-4, gaps
    assert all({"generate", "teacher", "learner", "sync", "learner_compute"} <= m.seconds.keys() for m in metrics[:-1])
