"""The DeepSpeed learner on real Ray actors and the tiny Qwen3 (tied embeddings), no mocks."""

import itertools
import time
from dataclasses import replace

import numpy as np
import pytest
import ray
import torch

from oel_ray import batching
from oel_ray.batching import length_buckets
from oel_ray.config import LearnerConfig
from oel_ray.strategy import ESTIMATORS, REVERSE
from oel_ray.types import DistillSample

TEMP, K, BATCH, STEPS = 0.7, 32, 8, 5
WARMUP = 3  # LR warm-up steps: a resumed run must continue the schedule, not restart it
CURVE_KEYS = ("loss", "kl", "student_mass", "teacher_mass", "grad_norm", "lr", "response_tokens")


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def logprobs_at(model, ids, temperature=1.0):
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float() / temperature, -1)


def token_logprobs(model, ids):
    """What Learner.sequence_logprobs returns: log p(ids[i] | ids[:i]) for i >= 1."""
    return logprobs_at(model, ids)[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def make_batch(tiny_model, response_lengths, intro: int = 0):
    """Samples with these reply lengths (prompts of 4-29 tokens after `intro` tokens they all start
    with); teacher = perturbed copy of the model, scored on the student's top-k (teacher_logprobs).
    Returns (samples, teacher)."""
    student, teacher = load(tiny_model), load(tiny_model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(p.std() * torch.randn(p.shape, generator=g))
    rng = np.random.default_rng(0)
    start = rng.integers(10, 500, intro).tolist()
    samples = []
    for length in response_lengths:
        prompt = start + rng.integers(10, 500, rng.integers(4, 30)).tolist()
        response = rng.integers(10, 500, length).tolist()
        ids = prompt + response
        pos = slice(len(prompt) - 1, len(ids) - 1)  # positions predicting the response tokens
        support = logprobs_at(student, ids, TEMP)[pos].topk(K, -1).indices
        scores = logprobs_at(teacher, ids, TEMP)[pos].gather(-1, support).numpy()
        samples.append(DistillSample(prompt, prompt, response, support.numpy().astype(np.int32), scores))
    return samples, teacher


@pytest.fixture(scope="module")
def batch(tiny_model):
    """Samples of unequal lengths: replies of 16, 24, ..., 72 tokens."""
    return make_batch(tiny_model, [16 + 8 * i for i in range(BATCH)])


def full_kl(model, teacher, samples):
    """Token-mean KL(student || teacher) over the whole vocabulary at the rollout temperature."""
    total, n = 0.0, 0
    for s in samples:
        ids = s.student_prompt_ids + s.response_ids
        pos = slice(len(s.student_prompt_ids) - 1, len(ids) - 1)
        ls, lt = logprobs_at(model, ids, TEMP)[pos], logprobs_at(teacher, ids, TEMP)[pos]
        total += float((ls.exp() * (ls - lt)).sum())
        n += len(s.response_ids)
    return total / n


def topk_kl(model, samples):
    """Token-mean top-k reverse KL (un-renormalised) and student mass, computed here."""
    kl, mass, n = 0.0, 0.0, 0
    for s in samples:
        lt = s.teacher_logprobs
        ids = s.student_prompt_ids + s.response_ids
        pos = slice(len(s.student_prompt_ids) - 1, len(ids) - 1)
        ls = logprobs_at(model, ids, TEMP)[pos].gather(-1, torch.from_numpy(s.support_ids).long())
        kl += float((ls.exp() * (ls - torch.from_numpy(lt))).sum())
        mass += float(ls.exp().sum())
        n += len(s.response_ids)
    return kl / n, mass / n


def config(**kw):
    base = dict(batch_size=BATCH, lr=1e-3, renormalize=True, temperature=TEMP, dtype="float32",
                support_k=K, seed=0, warmup_steps=WARMUP)
    return LearnerConfig(**{**base, **kw})


# ZeRO-3 really partitions and gathers every tiny weight (persistence threshold 0).
PARTITION_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


@pytest.fixture(scope="module")
def ranks_of(ray_cluster, tiny_model):
    """ranks_of(n): one group of n ranks (every weight partitioned under ZeRO-3) per rank count, made
    on first use and held for the module. Whoever takes it reloads it with its own settings
    (Learner.reload: a new group's very steps, to the bit, as the ZeRO-3 test below shows), sparing a
    group's start (5-12 s) each time. Only from module fixtures: a group a test made would count as
    left running by it."""
    from oel_ray.learner import LearnerGroup

    groups = {}

    def get(ranks: int):
        if ranks not in groups:
            groups[ranks] = LearnerGroup(config(zero_stage=2, grad_accum=1, num_ranks=ranks), tiny_model,
                                         num_cpus=0.5, ds_overrides=PARTITION_ALL)
        return groups[ranks]
    yield get
    for group in groups.values():
        group.shutdown()


@pytest.fixture(scope="module")
def two_ranks(ranks_of):
    return ranks_of(2)


@pytest.fixture(scope="module")
def trained(ray_cluster, tiny_model, batch):
    """1 rank, ZeRO-2, 2 micro-batches: STEPS steps on the fixed batch."""
    from oel_ray.learner import LearnerGroup

    samples, _ = batch
    t0 = time.perf_counter()
    group = LearnerGroup(config(zero_stage=2, grad_accum=2, num_ranks=1), tiny_model, num_cpus=0.5)
    start = time.perf_counter() - t0
    metrics = [group.train_step(samples, s) for s in range(STEPS)]
    print(f"learner start {start:.1f}s; steps", [(round(m.seconds["learner_compute"], 3), round(m.kl, 4),
                                                  round(m.student_mass, 3)) for m in metrics])
    yield group, metrics
    group.shutdown()


def test_steps_lower_the_reverse_kl(trained, batch, tiny_model):
    # Renormalised over the support: without it, a fixed (stale) support lets the student lower the
    # loss by moving its mass out of the support (seen here: the full KL rose while the loss fell).
    group, metrics = trained
    samples, teacher = batch
    losses = [m.loss for m in metrics]
    assert losses[-1] < 0.6 * losses[0] and min(losses) >= 0, losses
    m = metrics[0]
    assert m.response_tokens == sum(len(s.response_ids) for s in samples)
    assert 0 < m.student_mass <= 1 and 0 < m.teacher_mass <= 1
    assert m.grad_norm > 0 and [m.lr for m in metrics] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3])
    # the learner's first metrics (before any update) are the KL at the right positions
    initial = load(tiny_model)
    kl0, mass0 = topk_kl(initial, samples)
    assert m.kl == pytest.approx(kl0, rel=1e-4)
    assert m.kl_direction == "reverse"
    assert m.student_mass == pytest.approx(mass0, rel=1e-4)
    # and the student really moved towards the teacher over the whole vocabulary
    before = full_kl(initial, teacher, samples)
    initial.load_state_dict(group.state_dict(), strict=False)
    assert full_kl(initial, teacher, samples) < 0.8 * before


def test_state_dict_loads_strictly_and_reproduces_logprobs(trained, tiny_model, ray_cluster):
    from transformers import AutoConfig, Qwen3ForCausalLM

    group, _ = trained
    sd = group.state_dict()
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in sd.values())
    fresh = Qwen3ForCausalLM(AutoConfig.from_pretrained(tiny_model)).eval()
    assert sorted(ray_cluster.get(group.state_dict_ref())) == sorted(sd)
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert unexpected == [] and missing == ["lm_head.weight"]  # the tied head is left out
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()
    ids = list(range(20, 80))
    ours = token_logprobs(fresh, ids)
    np.testing.assert_allclose(group.sequence_logprobs(ids), ours, atol=1e-5)


def test_save_writes_a_loadable_checkpoint(trained, tmp_path):
    from transformers import AutoTokenizer

    group, _ = trained
    path = tmp_path / "ckpt"
    group.save(str(path))
    group.save(str(path))  # replacing an existing checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    model = load(str(path))
    ids = list(range(30, 90))
    ours = token_logprobs(model, ids)
    np.testing.assert_allclose(group.sequence_logprobs(ids), ours, atol=1e-5)
    assert AutoTokenizer.from_pretrained(str(path)).chat_template


def receive_weights(group, bucket_bytes):
    """What the collective weight sync sends (gloo, as on CPU clusters), received here as a rollout
    worker would: every rank runs send_weights, rank 0 broadcasts."""
    from oel_ray.weight_sync import Channel, receive

    rank0 = group.ranks[0]
    metas = ray.get(rank0.weight_metas.remote())
    address, port = ray.get(rank0.weight_channel_address.remote())
    opened = rank0.open_weight_channel.remote("gloo", address, port, 2, 120)
    channel = Channel("gloo", address, port, 1, 2, 120)
    ray.get(opened)
    try:
        sending = [r.send_weights.remote(bucket_bytes) for r in group.ranks]
        got = {name: t.clone() for name, t in receive(channel, metas, bucket_bytes)}
        ray.get(sending)
    finally:
        ray.get(rank0.close_weight_channel.remote())
        channel.close()
    return got


def test_two_ranks_zero3_match_one_rank_and_reload_as_a_new_group(trained, batch, tiny_model, tmp_path):
    """Two ZeRO-3 ranks, every weight partitioned (persistence threshold 0: ZeRO-3 really partitions and
    gathers every tiny weight), take the one-rank curve. Then a round's start (Learner.reload, in the
    ranks' own processes): from the start model they take the very steps they took as a new group
    (fresh optimizer and LR schedule, to the bit), and from a saved checkpoint they hold its weights:
    what lets the other tests here reload one group per rank count (ranks_of)."""
    from oel_ray.learner import LearnerGroup

    _, reference = trained
    samples, _ = batch
    group = LearnerGroup(config(zero_stage=3, grad_accum=1, num_ranks=2), tiny_model, num_cpus=0.5,
                         ds_overrides=PARTITION_ALL)
    try:
        got = [group.train_step(samples, s) for s in range(3)]
        sd = group.state_dict()
        ids = list(range(20, 60))
        theirs = group.sequence_logprobs(ids)
        sent = receive_weights(group, bucket_bytes=64 * 1024)  # several gathered buckets, the embedding alone
        group.save(str(tmp_path / "trained"))
        group.reload(tiny_model)
        again = [group.train_step(samples, s) for s in range(3)]
        group.reload(str(tmp_path / "trained"))
        back = group.state_dict()
    finally:
        group.shutdown()
    assert list(sent) == list(sd) and all(torch.equal(sent[k], sd[k]) for k in sd)
    for ours, ref in zip(got, reference):
        for key in CURVE_KEYS:
            assert getattr(ours, key) == pytest.approx(getattr(ref, key), rel=1e-4, abs=1e-6), key
    model = load(tiny_model)
    assert set(sd) == {k for k in model.state_dict() if k != "lm_head.weight"}
    model.load_state_dict(sd, strict=False)  # the gathered ZeRO-3 weights are the ones it runs
    ours = token_logprobs(model, ids)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)
    assert [(m.loss, m.kl, m.grad_norm, m.lr) for m in again] == [(m.loss, m.kl, m.grad_norm, m.lr) for m in got]
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_frozen_parameters_stay_fixed_under_zero3(batch, tiny_model, two_ranks):
    """learner.freeze on two ZeRO-3 ranks with every weight partitioned: the named parameters come out
    bit-identical after steps, the others move."""
    samples, _ = batch
    patterns = ["model.embed_tokens.weight", "model.layers.0.*"]
    two_ranks.reload(tiny_model, config(zero_stage=3, grad_accum=1, num_ranks=2, freeze=patterns))
    for s in range(2):
        two_ranks.train_step(samples, s)
    after = two_ranks.state_dict()
    before = load(tiny_model).state_dict()
    fixed = {k for k in after if k == patterns[0] or k.startswith("model.layers.0.")}
    assert fixed and all(torch.equal(after[k], before[k]) for k in fixed)
    assert all(not torch.equal(after[k], before[k]) for k in after if k.endswith("proj.weight") and k not in fixed)


@pytest.fixture(scope="module")
def zero2_two_ranks(tiny_model, batch, tmp_path_factory, two_ranks):
    """2 ranks, ZeRO-2, 1 micro-batch each (the reference's global batch): one step, save_state
    (mid warm-up), two more steps."""
    samples, _ = batch
    path = tmp_path_factory.mktemp("resume") / "state"
    group = two_ranks
    group.reload(tiny_model, config(zero_stage=2, grad_accum=1, num_ranks=2))
    metrics = [group.train_step(samples, 0)]
    t0 = time.perf_counter()
    group.save_state(str(path))
    group.save_state(str(path))  # replacing an existing state
    print(f"save_state {(time.perf_counter() - t0) / 2:.2f}s")
    metrics += [group.train_step(samples, s) for s in (1, 2)]
    return metrics, path


def test_two_ranks_zero2_match_one_rank(trained, zero2_two_ranks):
    _, reference = trained
    got, _ = zero2_two_ranks
    for ours, ref in zip(got, reference):
        for key in CURVE_KEYS:
            assert getattr(ours, key) == pytest.approx(getattr(ref, key), rel=1e-4, abs=1e-6), key


def test_resume_continues_like_an_uninterrupted_run(zero2_two_ranks, batch, tiny_model):
    """save_state -> a new LearnerGroup -> load_state: the next steps equal those of the run that
    went on (weights, Adam moments in the ZeRO shards, the warm-up schedule and the step count)."""
    from oel_ray.learner import LearnerGroup

    uninterrupted, path = zero2_two_ranks
    samples, _ = batch
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp or old copies left
    group = LearnerGroup(config(zero_stage=2, grad_accum=1, num_ranks=2), tiny_model, num_cpus=0.5)
    try:
        assert group.load_state(str(path)) == 1
        resumed = [group.train_step(samples, s) for s in (1, 2)]
    finally:
        group.shutdown()
    for ours, ref in zip(resumed, uninterrupted[1:]):
        for key in CURVE_KEYS:
            assert getattr(ours, key) == pytest.approx(getattr(ref, key), rel=1e-6, abs=1e-9), key


def sampled_logprobs(model, samples) -> torch.Tensor:
    """[T, 1]: the model's log-probs of each sample's reply tokens, all samples in a row."""
    out = []
    for s in samples:
        ids = s.student_prompt_ids + s.response_ids
        pos = slice(len(s.student_prompt_ids) - 1, len(ids) - 1)
        out.append(logprobs_at(model, ids, TEMP)[pos].gather(-1, torch.tensor(s.response_ids)[:, None]))
    return torch.cat(out)


@pytest.fixture(scope="class")
def zero0_at_start(tiny_model, tmp_path_factory, ranks_of):
    """The module's one rank reloaded as ZeRO-0 for the sampled-token losses, and its training state
    saved before any step: each loss's test restores it (Learner.load_state) and steps with that
    loss (train_step's `loss`), as a fresh group would, without a group's start (~7 s) per loss."""
    group = ranks_of(1)
    group.reload(tiny_model, config(zero_stage=0, renormalize=False, warmup_steps=0))
    start = tmp_path_factory.mktemp("zero0") / "start"
    group.save_state(str(start))
    return group, str(start)


def one_sampled_token_step(batch, tiny_model, zero0_at_start, loss: str):
    """One ZeRO-0 step of `loss` from the start model, with the teacher's [T, 1] scores of the sampled
    tokens: (metrics, the student's sampled log-probs before it, the teacher's, the student after)."""
    samples, teacher = batch
    group, start = zero0_at_start
    student = load(tiny_model)
    lt = [sampled_logprobs(teacher, [s]).numpy() for s in samples]
    ls0 = sampled_logprobs(student, samples)
    assert group.load_state(start) == 0
    got = group.train_step([replace(s, teacher_logprobs=t) for s, t in zip(samples, lt)], 0, loss=loss)
    student.load_state_dict(group.state_dict(), strict=False)
    return got, ls0, torch.from_numpy(np.concatenate(lt)), student


class TestSampledTokenLosses:
    """sampled_reverse_kl and the estimators k1..abs, each one ZeRO-0 step from the start model."""

    def test_sampled_token_loss(self, batch, tiny_model, zero0_at_start):
        """sampled_reverse_kl with the teacher's [T, 1] scores of the sampled tokens, ZeRO-0."""
        got, ls0, lt_all, student = one_sampled_token_step(batch, tiny_model, zero0_at_start, "sampled_reverse_kl")
        assert got.kl == pytest.approx(float((ls0 - lt_all).mean()), rel=1e-4)
        # The step descends the REINFORCE surrogate mean(ls_y * stopgrad(ls_y - lt_y)) it was built on.
        # (Its KL estimate on these fixed, off-policy tokens need not fall: only on-policy samples say so.)
        advantage = ls0 - lt_all
        assert got.grad_norm > 0
        assert float((sampled_logprobs(student, batch[0]) * advantage).mean()) < float((ls0 * advantage).mean())

    @pytest.mark.parametrize("loss", ESTIMATORS)
    def test_each_estimator_steps_on_what_it_names(self, batch, tiny_model, zero0_at_start, loss):
        """The public code's sampled-token estimators through the learner (learner.loss=k1|k2|k3|abs): the
        reported KL is the mean of d = log p_student - log p_teacher over the reply tokens, the loss the
        estimator's mean of d (k1 = d, k2 = d^2 / 2, k3 = exp(-d) + d - 1 up to 10, abs = |d|), and the step moves
        the student. (Each estimator's gradient: test_losses.py; one end to end: test_comparisons.py.)"""
        got, ls0, lt_all, student = one_sampled_token_step(batch, tiny_model, zero0_at_start, loss)
        d = (ls0 - lt_all).double()
        k3 = ((-d).clamp(-20, 20).exp() + d.clamp(-20, 20) - 1).clamp(max=10)  # clamped as the public code does
        value = {"k1": d, "k2": d.square() / 2, "k3": k3, "abs": d.abs()}[loss]
        assert got.kl_direction == REVERSE and got.kl == pytest.approx(float(d.mean()), rel=1e-4)
        assert got.loss == pytest.approx(float(value.mean()), rel=1e-4, abs=1e-7)
        assert got.grad_norm > 0 and not torch.equal(sampled_logprobs(student, batch[0]), ls0)


# ----------------------------------------------------------------------------- exact full-vocabulary KL

@pytest.fixture(scope="module")
def knowledge_samples(batch):
    """The batch's replies with a knowledge-conditioned teacher prompt. The learner's teacher copy is
    the round-start model itself (the path it is built from), so only this context separates it
    from the student, as in consolidation."""
    samples, _ = batch
    knowledge = np.random.default_rng(1).integers(10, 500, 48).tolist()
    return [DistillSample(s.student_prompt_ids, knowledge + s.student_prompt_ids, s.response_ids) for s in samples]


def exact_kl(student, teacher, samples):
    """Token-mean KL(student(prompt + reply) || teacher(teacher prompt + reply)) over the whole
    vocabulary at the rollout temperature: full log-softmax of the Hugging Face models."""
    total, n = 0.0, 0
    for s in samples:
        ls = logprobs_at(student, s.student_prompt_ids + s.response_ids, TEMP)[len(s.student_prompt_ids) - 1:-1]
        lt = logprobs_at(teacher, s.teacher_prompt_ids + s.response_ids, TEMP)[len(s.teacher_prompt_ids) - 1:-1]
        total += float((ls.exp() * (ls - lt)).sum())
        n += len(s.response_ids)
    return total / n


def full_config(**kw):
    return config(loss="full_reverse_kl", renormalize=False, **kw)  # with the LR warm-up: no overshoot


@pytest.fixture(scope="module")
def full_trained(tiny_model, knowledge_samples, ranks_of):
    """learner.loss=full_reverse_kl, 1 rank, ZeRO-2, 2 micro-batches: STEPS steps. Each rank holds
    a frozen teacher copy; the samples carry no teacher_logprobs."""
    t0 = time.perf_counter()
    group = ranks_of(1)
    group.reload(tiny_model, full_config(zero_stage=2, grad_accum=2))
    metrics = [group.train_step(knowledge_samples, s) for s in range(STEPS)]
    trained = load(tiny_model)
    trained.load_state_dict(group.state_dict(), strict=False)
    print(f"full_reverse_kl: {time.perf_counter() - t0:.1f}s;", [round(m.kl, 5) for m in metrics])
    return metrics, trained


def test_full_reverse_kl_is_exact_and_steps_lower_it(full_trained, tiny_model, knowledge_samples):
    metrics, trained = full_trained
    initial = load(tiny_model)
    reference = exact_kl(initial, initial, knowledge_samples)
    assert reference > 1e-2, "the knowledge context should move the teacher"
    first = metrics[0]  # measured before the first update
    assert abs(first.kl - reference) < 1e-4 and first.loss == pytest.approx(reference, rel=1e-4)
    assert first.student_mass == pytest.approx(1.0) and first.teacher_mass == pytest.approx(1.0)
    assert first.grad_norm > 0
    kls = [m.kl for m in metrics]
    assert kls[-1] < 0.8 * kls[0], kls
    # the teacher stayed frozen: measured against the round-start model, the trained student is closer
    assert exact_kl(trained, initial, knowledge_samples) < 0.7 * reference


def test_full_reverse_kl_two_ranks_zero3_match_one_rank(full_trained, tiny_model, knowledge_samples, two_ranks):
    """The teacher's hidden states and head enter DeepSpeed's forward as inputs: under ZeRO-3 (every
    weight partitioned) two ranks follow the one-rank curve."""
    reference, _ = full_trained
    two_ranks.reload(tiny_model, full_config(zero_stage=3, grad_accum=1, num_ranks=2))
    got = [two_ranks.train_step(knowledge_samples, s) for s in range(3)]
    for ours, ref in zip(got, reference):
        for key in CURVE_KEYS:
            assert getattr(ours, key) == pytest.approx(getattr(ref, key), rel=1e-4, abs=1e-6), key


def test_full_reverse_kl_needs_the_teacher_copy(trained, knowledge_samples):
    group, _ = trained  # built with learner.loss=topk_reverse_kl: no teacher copy was loaded
    with pytest.raises(ValueError, match="teacher copy"):
        group.train_step(knowledge_samples, 0, loss="full_reverse_kl")


# ----------------------------------------------------------------------------- ranks with unequal work

# Persistence threshold 0: ZeRO-3 partitions every weight, so every forward pass all-gathers every
# layer, as at real model sizes (the default keeps a tiny model's small weights whole on each rank).
# One long reply among short ones. With 2 ranks (rank r trains on samples r::2) rank 0 draws only
# short replies and rank 1 short and long ones; with 4 ranks rank 1 holds the long one next to a
# short one and rank 3 a single sample. Length buckets planned per rank would give the ranks 1 and 2
# forward passes: under ZeRO-3 a collective mismatch (gloo aborts, NCCL hangs).
UNEVEN = [4, 6, 3, 8, 5, 300, 7]


def padded_tokens(lengths, buckets):
    return sum(len(b) * max(lengths[i] for i in b) for b in buckets)


def test_length_buckets_with_a_count_pad_least():
    """Exactly `count` buckets, partitioning the samples, with the least padding of any split of
    the sorted lengths into `count` runs (checked against all of them)."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = rng.choice([1, 2, 5, 40, 41, 300, 1024], rng.integers(1, 8)).tolist()
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        for count in range(1, len(lengths) + 1):
            buckets = length_buckets(lengths, count=count)
            assert len(buckets) == count and all(buckets)
            assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
            best = min(padded_tokens(lengths, [order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))])
                       for cuts in itertools.combinations(range(1, len(order)), count - 1))
            assert padded_tokens(lengths, buckets) == best
    with pytest.raises(ValueError, match="count=3"):
        length_buckets([5, 6], count=3)


@pytest.mark.parametrize("world,grad_accum", [(1, 1), (2, 1), (2, 2), (3, 2), (4, 1), (8, 1), (8, 2)])
def test_plan_step_gives_every_rank_the_same_passes(world, grad_accum):
    """Adversarial length mixes: every rank runs, in each micro-batch, as many forward passes as the
    rank that wants the most, on exactly its own shard (r::world, as grad_accum parts), splitting
    buckets where it must and padding with empty (placeholder) buckets only when it has fewer
    samples than passes."""
    rng = np.random.default_rng(world * 10 + grad_accum)
    n_min = world * grad_accum
    mixes = [[1024] + [3] * (n_min * 3 - 1),  # one huge reply
             [3, 1024] * n_min,  # odd ranks long, even ranks short (world even)
             [5] * n_min,  # all equal, fewest samples
             list(range(1, 6 * n_min, 3)),  # ascending
             # the last rank one sample short; rank 0's last micro-batch short + long, the last
             # rank's a single sample: it needs a placeholder pass
             [1024 if i == world * (2 * grad_accum - 1) else 3 for i in range(2 * n_min - 1)]]
    mixes += [rng.choice([2, 8, 64, 200, 1024], rng.integers(n_min, 64)).tolist() for _ in range(30)]
    placeholders = 0
    for lengths in mixes:
        plan = batching.plan_step(lengths, world, grad_accum)
        assert len(plan) == world and all(len(micros) == grad_accum for micros in plan)
        assert plan == batching.plan_step(list(lengths), world, grad_accum)  # the same on every rank
        for r, micros in enumerate(plan):
            shard = np.array_split(np.arange(r, len(lengths), world), grad_accum)
            for m, buckets in enumerate(micros):
                assert sorted(i for b in buckets for i in b) == shard[m].tolist()
        for m in range(grad_accum):
            counts = {len(plan[r][m]) for r in range(world)}
            assert len(counts) == 1
            wanted = [len(length_buckets([lengths[i] for b in plan[r][m] for i in b])) for r in range(world)]
            assert counts == {max(wanted)}  # no rank runs more passes than one of them needs
            for r in range(world):
                empty = sum(not b for b in plan[r][m])
                real = sum(map(len, plan[r][m]))
                assert empty == max(0, max(wanted) - real)
                placeholders += empty
    if world > 1:
        assert placeholders, "the mixes should include a rank with fewer samples than passes"


def assert_same_curve(got, reference, rel=1e-4, abs=1e-6):
    assert len(got) <= len(reference)
    for ours, ref in zip(got, reference):
        for key in CURVE_KEYS:
            assert getattr(ours, key) == pytest.approx(getattr(ref, key), rel=rel, abs=abs), (ours.step, key)


@pytest.fixture(scope="module")
def uneven(tiny_model):
    """Prompts that start alike (as a game's turns do), so the learner runs shared starts where
    every rank's bucket has one (batching.shared_starts) and in full where a rank's has not."""
    return make_batch(tiny_model, UNEVEN, intro=40)


@pytest.fixture(scope="module")
def uneven_reference(tiny_model, uneven, ranks_of):
    """One rank, ZeRO-2: 3 steps on the uneven batch."""
    samples, _ = uneven
    group = ranks_of(1)
    group.reload(tiny_model, config(zero_stage=2, grad_accum=1, num_ranks=1))
    return [group.train_step(samples, s) for s in range(3)]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def rank_group(request, ranks_of):
    """(n, ranks_of(n)): each test reloads the group with its own settings."""
    return request.param, ranks_of(request.param)


@pytest.mark.parametrize("stage,checkpointing", [(2, False), (3, False), (3, True)])
def test_unequal_lengths_across_ranks_match_one_rank(uneven_reference, uneven, rank_group, tiny_model, stage,
                                                     checkpointing):
    """... and with learner.gradient_checkpointing, whose backward passes run each layer again (under
    ZeRO-3: gathering its weights again) on the shared starts' caches."""
    ranks, group = rank_group
    samples, _ = uneven
    lengths = [len(s.student_prompt_ids) + len(s.response_ids) for s in samples]
    # the data is adversarial: planned per rank, the ranks would run different numbers of passes
    assert len({len(length_buckets(lengths[r::ranks])) for r in range(ranks)}) > 1
    plan = batching.plan_step(lengths, ranks, 1)
    if ranks == 4:  # rank 3 holds one sample but must run two passes: one is a placeholder
        assert [] in plan[3][0]
    assert any(batching.shared_starts(plan, [s.student_prompt_ids for s in samples])[0][0])
    group.reload(tiny_model, config(zero_stage=stage, grad_accum=1, num_ranks=ranks,
                                    gradient_checkpointing=checkpointing))
    t0 = time.perf_counter()
    got = [group.train_step(samples, s) for s in range(3)]
    print(f"{ranks} ranks, ZeRO-{stage}, checkpointing {checkpointing}: 3 steps {time.perf_counter() - t0:.2f}s")
    assert_same_curve(got, uneven_reference)


def test_rendezvous_ports_come_from_below_the_kernels_ephemeral_range():
    """The learner's rank 0 binds its rendezvous port moments after it is picked: picked from the
    ephemeral range (a bind of port 0), any process's next outgoing connection could take it in
    between (EADDRINUSE in CI once). Picked below it, and free when picked."""
    import socket

    from oel_ray.netif import RENDEZVOUS_PORTS_FROM, ephemeral_ports_from, free_port

    ports = [free_port() for _ in range(20)]
    assert all(RENDEZVOUS_PORTS_FROM <= port < ephemeral_ports_from() for port in ports), ports
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port("127.0.0.1")))
