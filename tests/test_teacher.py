"""The teacher server's scores are exact: batching, padding and chunking change nothing, and the
log-softmax is taken at the temperature the server was given."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from oel_ray.types import DistillSample

TEMP, K = 0.7, 16


@pytest.fixture(scope="module")
def reference_model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def samples(reference_model):
    """Unequal prompt and reply lengths (one empty reply, one of a single token); random supports."""
    rng = np.random.default_rng(0)
    vocab = reference_model.config.vocab_size
    out = []
    for prompt_len, reply_len in [(5, 40), (33, 3), (12, 0), (1, 25), (60, 1), (8, 17)]:
        prompt = rng.integers(10, vocab, prompt_len).tolist()
        reply = rng.integers(10, vocab, reply_len).tolist()
        support = np.stack([rng.choice(vocab, K, replace=False) for _ in range(reply_len)]).astype(np.int32) \
            if reply_len else np.zeros((0, K), np.int32)
        out.append(DistillSample(prompt[:2], prompt, reply, support))
    return out


@torch.no_grad()
def expected(model, sample: DistillSample, temperature: float, sampled_only: bool = False) -> np.ndarray:
    """log_softmax(logits / T) of one unpadded sequence, at the reply's positions, gathered."""
    ids = sample.teacher_prompt_ids + sample.response_ids
    logits = model(torch.tensor([ids])).logits[0].float()
    start = len(sample.teacher_prompt_ids) - 1
    lp = torch.log_softmax(logits[start:start + len(sample.response_ids)] / temperature, -1)
    support = (torch.tensor(sample.response_ids)[:, None] if sampled_only
               else torch.from_numpy(sample.support_ids).long())
    return lp.gather(-1, support).numpy()


def server(tiny_model, temperature=TEMP, chunk_tokens=1024, batch_tokens=8192):
    from oel_ray.teacher import TeacherServer

    return TeacherServer(tiny_model, dtype="float32", temperature=temperature, chunk_tokens=chunk_tokens,
                         batch_tokens=batch_tokens)


@pytest.mark.parametrize("chunk_tokens,batch_tokens", [(1, 10_000), (7, 100), (1024, 1), (16, 64)])
def test_support_logprobs_are_exact(tiny_model, reference_model, samples, chunk_tokens, batch_tokens):
    teacher = server(tiny_model, chunk_tokens=chunk_tokens, batch_tokens=batch_tokens)
    scores = teacher.score(samples)
    assert len(scores) == len(samples)
    for sample, got in zip(samples, scores):
        assert got.dtype == np.float32 and got.shape == (len(sample.response_ids), K)
        np.testing.assert_allclose(got, expected(reference_model, sample, TEMP), atol=1e-5, rtol=0)


def test_batches_respect_the_token_budget(tiny_model, samples):
    teacher = server(tiny_model, batch_tokens=100)
    batches = teacher._batches([teacher._length(s) for s in samples])
    assert sorted(i for b in batches for i in b) == list(range(len(samples)))
    for batch in batches:
        padded = len(batch) * max(teacher._length(samples[i]) for i in batch)
        assert len(batch) == 1 or padded <= 100


def test_sampled_only_scores_the_reply_tokens(tiny_model, reference_model, samples):
    scores = server(tiny_model, chunk_tokens=5, batch_tokens=128).score(samples, sampled_only=True)
    for sample, got in zip(samples, scores):
        assert got.shape == (len(sample.response_ids), 1)
        np.testing.assert_allclose(got, expected(reference_model, sample, TEMP, sampled_only=True), atol=1e-5)


def test_merged_support_is_the_union_of_both_top_k_padded_to_twice_k(tiny_model, reference_model, samples):
    """learner.support=merged: per reply token the student's K ids, then the teacher's own top-K, an id
    already among the student's replaced by padding (log-prob -inf); every other log-prob exact."""
    from oel_ray.teacher import TeacherServer

    teacher = TeacherServer(tiny_model, dtype="float32", temperature=TEMP, chunk_tokens=7, batch_tokens=128,
                            merge_support=True)
    for sample, (ids, got) in zip(samples, teacher.score(samples)):
        r = len(sample.response_ids)
        assert ids.shape == got.shape == (r, 2 * K) and got.dtype == np.float32
        if not r:
            continue
        full = expected(reference_model, replace(sample, support_ids=np.tile(np.arange(
            reference_model.config.vocab_size, dtype=np.int32), (r, 1))), TEMP)
        np.testing.assert_array_equal(ids[:, :K], sample.support_ids)
        for t in range(r):
            own = set(np.argsort(-full[t])[:K].tolist())
            real = got[t] > -np.inf
            assert set(ids[t][real].tolist()) == set(sample.support_ids[t].tolist()) | own
            assert len(set(ids[t][real].tolist())) == int(real.sum())  # no id twice
            np.testing.assert_allclose(got[t][real], full[t][ids[t][real]], atol=1e-5)


def test_the_teacher_uses_its_temperature(tiny_model, reference_model, samples):
    for temperature in (0.7, 1.0, 1.3):
        got = server(tiny_model, temperature=temperature).score(samples[:2])[0]
        np.testing.assert_allclose(got, expected(reference_model, samples[0], temperature), atol=1e-5)
        other = expected(reference_model, samples[0], 1.0 if temperature != 1.0 else 0.7)
        assert np.abs(got - other).max() > 1e-2, "scores must depend on the temperature"


def test_teacher_actors_return_the_same_scores_in_order(ray_cluster, tiny_model, samples):
    """Through Ray (what consolidation calls), split over two teacher actors: the same scores as
    in-process, in the samples' order. Not bit-equal: the actors run torch with one thread, this
    process with two, and fp32 sums then differ in order."""
    from oel_ray.teacher import TeacherGroup, balance

    group = TeacherGroup(tiny_model, num_actors=2, num_cpus=0.5, num_gpus=0, dtype="float32", temperature=TEMP,
                         chunk_tokens=8, batch_tokens=256)
    try:
        remote = [s.teacher_logprobs for s in group.score(samples)]
    finally:
        group.shutdown()
    local = server(tiny_model, chunk_tokens=8, batch_tokens=256).score(samples)
    assert len(samples) > 2 and all(balance([len(s.response_ids) for s in samples], 2))  # both actors scored
    assert len(remote) == len(local)
    for a, b in zip(remote, local):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_prefilled_actors_score_as_one_server(ray_cluster, tiny_model, placed_samples):
    """teacher.prefill_prompts through Ray: each sample goes to the actor that encoded its prompt."""
    from oel_ray.teacher import TeacherGroup, balance

    samples = placed_samples["user"]
    assert all(balance([len(s.teacher_prompt_ids) for s in samples], 2))  # both actors encode some
    group = TeacherGroup(tiny_model, num_actors=2, num_cpus=0.5, num_gpus=0, dtype="float32", temperature=TEMP,
                         chunk_tokens=8, batch_tokens=256)
    try:
        group.prefill([s.teacher_prompt_ids for s in samples])
        remote = [s.teacher_logprobs for s in group.score(samples)]
    finally:
        group.shutdown()
    for a, b in zip(remote, server(tiny_model, chunk_tokens=8, batch_tokens=256).score(samples)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_scoring_is_balanced_by_tokens():
    from oel_ray.teacher import balance

    lengths = [100, 90, 10, 10, 10, 10, 10, 10, 10, 10, 40]
    shares = balance(lengths, 3)
    assert sorted(i for share in shares for i in share) == list(range(len(lengths)))  # each sample once
    loads = [sum(lengths[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(lengths[2:])  # no share heavier than another by more than a short one
    assert 0 in shares[0] and 1 in shares[1] and 10 in shares[2]  # longest first, each to the least loaded
    assert balance([5, 5], 4) == [[0], [1], [], []]


def test_new_round_weights_replace_the_teacher_exactly(tiny_model, reference_model, samples):
    """Round r's teacher is round r-1's final model: after load_weights the scores are those of the
    new weights (tied head included), and a state dict that lacks a weight is refused."""
    from transformers import AutoModelForCausalLM

    moved = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in moved.parameters():  # embeddings too: the tied output head must follow them
            p.add_(0.1 * p.std() * torch.randn(p.shape, generator=g))
    weights = {k: v for k, v in moved.state_dict().items() if k != "lm_head.weight"}
    teacher = server(tiny_model)
    before = teacher.score(samples[:1])[0]
    teacher.load_weights(weights)
    got = teacher.score(samples[:1])[0]
    np.testing.assert_allclose(got, expected(moved, samples[0], TEMP), atol=1e-5, rtol=0)
    assert np.abs(got - before).max() > 1e-3
    with pytest.raises(ValueError, match="missing"):
        teacher.load_weights({k: v for k, v in weights.items() if "layers.0.mlp" not in k})


# ---------------------------------------------------------------- shared knowledge prefixes (prefix_cache.py)

def test_shared_prefix_groups_cut_where_the_most_is_saved():
    from oel_ray.prefix_cache import MIN_SHARED_TOKENS, shared_prefix_groups

    head = list(range(1000, 1010))  # a chat header every prompt has: too short to be worth a pass
    a, b = head + list(range(100, 160)), head + list(range(200, 250))
    prompts = [a + [1, 2], b + [3], a + [4], [7] * 40, a, b + [5, 6], head + [9] * 30]
    groups = shared_prefix_groups(prompts)
    assert sorted(i for _, run in groups for i in run) == list(range(len(prompts)))
    by_members = {tuple(run): shared for shared, run in groups}
    assert by_members[(0, 2, 4)] == len(a) - 1  # prompt 4 is `a` itself: its last token stays out
    assert by_members[(1, 5)] == len(b)
    assert all(shared == 0 for run, shared in by_members.items() if len(run) == 1)
    assert shared_prefix_groups([head + [1], head + [2]]) == [(0, [0]), (0, [1])]
    assert len(head) < MIN_SHARED_TOKENS


@pytest.fixture(scope="module")
def placed_samples(tiny_model):
    """Teacher prompts as the rollout builds them: two knowledge texts, each placed (user turn after
    the intro line, or system) in front of six situations; replies and supports random."""
    from transformers import AutoTokenizer

    from oel_ray.prompts import chat_ids, teacher_messages

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rng = np.random.default_rng(1)
    vocab = len(tok)
    knowledge = ["- Holes end the game; walk around them.\n- The goal is in the bottom-right corner.\n" * 3,
                 "- Boxes cannot be pulled.\n- A box in a corner is stuck for good.\n" * 3]
    situations = [f"Intro: you play a grid game.\n\nTurn {t}. Board row {'#' * t} then {'.' * (9 - t)}."
                  for t in range(1, 7)]
    out = {}
    for position in ("user", "system"):
        samples = []
        for i, situation in enumerate(situations * 2):
            system, user = teacher_messages(situation, knowledge[i % 2], position)
            reply = rng.integers(10, vocab, int(rng.integers(1, 12))).tolist()
            support = np.stack([rng.choice(vocab, K, replace=False) for _ in reply]).astype(np.int32)
            samples.append(DistillSample(chat_ids(tok, situation), chat_ids(tok, user, system=system), reply, support))
        out[position] = samples
    return out


@pytest.mark.parametrize("position", ["user", "system"])
def test_reused_knowledge_prefix_scores_equal_the_plain_forward(tiny_model, reference_model, placed_samples, position):
    samples = placed_samples[position]
    teacher = server(tiny_model, chunk_tokens=7, batch_tokens=200)
    scores = teacher.score(samples)
    for sample, got in zip(samples, scores):
        np.testing.assert_allclose(got, expected(reference_model, sample, TEMP), atol=1e-5, rtol=0)
    total = sum(len(s.teacher_prompt_ids) for s in samples)
    encoded = teacher.prefixes.encoded_tokens
    assert len(teacher.prefixes.entries) == 2 and 0 < encoded < total / 3, "one start per knowledge text"
    again = teacher.score(samples[::-1])  # the next step: the same starts come from the cache
    assert teacher.prefixes.encoded_tokens == encoded
    for got, ref in zip(again[::-1], scores):
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    teacher.load_weights(teacher.model.state_dict())  # a new round's teacher: the old keys/values go
    assert not teacher.prefixes.entries


def test_prompts_that_share_nothing_are_scored_in_full(tiny_model, reference_model, samples, caplog):
    teacher = server(tiny_model)
    with caplog.at_level("INFO", logger="oel_ray.teacher"):
        scores = teacher.score(samples)
    assert "share no start" in caplog.text and not teacher.prefixes.entries
    for sample, got in zip(samples, scores):
        np.testing.assert_allclose(got, expected(reference_model, sample, TEMP), atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", ["user", "system"])
@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_prompts_prefilled_before_their_replies_score_as_the_plain_forward(tiny_model, reference_model,
                                                                            placed_samples, position, reuse_prefix):
    """teacher.prefill_prompts: the prompts encoded first (several batches, a prompt drawn twice, a
    reply of one token), the replies run on top later: the plain forward's scores."""
    from oel_ray.teacher import TeacherServer

    samples = placed_samples[position] + [replace(placed_samples[position][0], response_ids=[7],
                                                  support_ids=placed_samples[position][1].support_ids[:1])]
    teacher = TeacherServer(tiny_model, dtype="float32", temperature=TEMP, chunk_tokens=7, batch_tokens=200,
                            reuse_prefix=reuse_prefix)
    encoded = teacher.prefill([s.teacher_prompt_ids for s in samples])
    shared = teacher.prefixes.encoded_tokens if reuse_prefix else 0
    assert encoded + shared < sum(len(s.teacher_prompt_ids) for s in samples) or not reuse_prefix
    assert len(teacher.prefilled.batches) > 1
    scores = teacher.score(samples[::-1])[::-1]  # any order: each reply finds its prompt
    assert not teacher.prefilled.batches, "scored once, then dropped"
    for sample, got in zip(samples, scores):
        np.testing.assert_allclose(got, expected(reference_model, sample, TEMP), atol=1e-5, rtol=0)


def test_replies_to_other_prompts_than_the_prefilled_ones_are_scored_in_full(tiny_model, reference_model,
                                                                             placed_samples):
    from oel_ray.teacher import TeacherServer

    samples = placed_samples["user"]
    teacher = TeacherServer(tiny_model, dtype="float32", temperature=TEMP, chunk_tokens=7, batch_tokens=10_000)
    teacher.prefill([s.teacher_prompt_ids for s in samples[:6]])
    scores = teacher.score(samples[3:6])  # part of each prefilled batch: they stay, every sample is scored in full
    assert len(teacher.prefilled.batches) == 2
    for sample, got in zip(samples[3:6], scores):
        np.testing.assert_allclose(got, expected(reference_model, sample, TEMP), atol=1e-5, rtol=0)
    teacher.new_round()
    assert not teacher.prefilled.batches


def test_a_shared_start_is_not_copied_per_row_until_a_layer_reads_it(reference_model):
    """prefix_cache.expand_cache: a batch over a long shared start holds no row copies of it up front
    (transformers' cache would concatenate what it is given, a copy per row for every layer)."""
    from oel_ray.prefix_cache import expand_cache

    config = reference_model.config
    heads, dim = config.num_key_value_heads, config.head_dim
    start = [(torch.randn(1, heads, 1000, dim), torch.randn(1, heads, 1000, dim))
             for _ in range(config.num_hidden_layers)]
    rest = [(torch.randn(64, heads, 7, dim), torch.randn(64, heads, 7, dim)) for _ in start]
    cache = expand_cache(start, 64, config, rest=rest)
    assert cache.get_seq_length() == 1007
    for layer in cache.layers:
        assert layer.keys.shape == (64, heads, 1007, dim) and layer.keys.untyped_storage().nbytes() <= 4
    new = torch.randn(64, heads, 2, dim)
    keys, _ = cache.update(new, new, 0)
    torch.testing.assert_close(keys, torch.cat([start[0][0].expand(64, -1, -1, -1), rest[0][0], new], -2))
