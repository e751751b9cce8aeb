import pytest
import torch

from oel_ray.losses import (
    full_reverse_kl,
    full_reverse_kl_from_hidden,
    sampled_reverse_kl,
    sampled_reverse_kl_from_hidden,
    topk_forward_kl,
    topk_forward_kl_from_hidden,
    topk_reverse_kl,
    topk_reverse_kl_from_hidden,
)

B, T, V, H, K, TEMP = 3, 7, 50, 16, 8, 0.7


def make(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype) * 2
    teacher = torch.randn(B, T, V, generator=g, dtype=dtype) * 2
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, 2:] = False
    return logits, teacher, mask


def teacher_on(teacher_logits, support):
    return torch.log_softmax(teacher_logits / TEMP, -1).gather(-1, support)


def student_support(logits, k=K):
    return logits.topk(k, dim=-1).indices


def token_mean(mask, value):
    """The mean of value(b, t) over the unmasked positions, one at a time: the references' loop."""
    positions = [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
    return sum(value(b, t) for b, t in positions) / len(positions)


def reference(logits, support, lt, mask, renormalize=False, forward=False):
    """Direct formula, written independently: loops over positions, token mean. Reverse KL
    sum_v p_s(v) (log p_s(v) - log p_t(v)) on the support, or with `forward` the off-policy loss
    sum_v p_t(v) (log p_t(v) - log p_s(v))."""
    def kl(b, t):
        ls = torch.log_softmax(logits[b, t] / TEMP, -1)[support[b, t]]
        lq = lt[b, t]
        if renormalize:
            ls, lq = ls - torch.logsumexp(ls, 0), lq - torch.logsumexp(lq, 0)
        return ((torch.exp(lq) * (lq - ls)) if forward else (torch.exp(ls) * (ls - lq))).sum()
    return token_mean(mask, kl)


def test_full_support_equals_full_kl_and_gradient_matches_reference():
    logits, teacher, mask = make(dtype=torch.float32)
    support = torch.arange(V).expand(B, T, V)
    lt = teacher_on(teacher, support)
    a = logits.clone().requires_grad_()
    out = topk_reverse_kl(a, support, lt, mask, TEMP)
    full = full_reverse_kl(logits, teacher, mask, TEMP)
    assert abs(out.loss.item() - full.item()) < 1e-5
    assert abs(out.kl.item() - full.item()) < 1e-5
    assert abs(out.student_mass.item() - 1) < 1e-5 and abs(out.teacher_mass.item() - 1) < 1e-5
    # ...and its gradient at k = V is the exact KL's and the direct formula's (written above)
    out.loss.backward()
    f, r = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    full_reverse_kl(f, teacher, mask, TEMP).backward()
    reference(r, support, lt, mask).backward()
    torch.testing.assert_close(a.grad, f.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-7)

    # gradient through both exp(ls) and ls, compared with autograd of the direct formula (top-k)
    logits64, teacher64, _ = make()
    support = student_support(logits64)
    lt = teacher_on(teacher64, support)
    a = logits64.clone().requires_grad_()
    r = logits64.clone().requires_grad_()
    topk_reverse_kl(a, support, lt, mask, TEMP).loss.backward()
    reference(r, support, lt, mask).backward()
    torch.testing.assert_close(a.grad, r.grad, rtol=1e-9, atol=1e-12)
    assert a.grad[~mask].abs().max() == 0  # masked positions contribute nothing


@pytest.mark.parametrize("chunk", [1, 4, 5, 1000])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("kind", ["reverse", "forward"])
def test_hidden_chunked_matches_logits(kind, chunk, renormalize):
    """The chunked *_from_hidden losses give the logits version's values and gradients; the reverse
    KL runs on the student's top-k, the forward (off-policy) one on the teacher's."""
    from_logits, from_hidden = {"reverse": (topk_reverse_kl, topk_reverse_kl_from_hidden),
                                "forward": (topk_forward_kl, topk_forward_kl_from_hidden)}[kind]
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / 2
    _, teacher, mask = make()
    support = student_support(hidden @ weight.t() if kind == "reverse" else teacher)
    lt = teacher_on(teacher, support)

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = from_logits(h1 @ w1.t(), support, lt, mask, TEMP, renormalize)
    ref.loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = from_hidden(h2, w2, support, lt, mask, TEMP, renormalize, chunk_tokens=chunk)
    out.loss.backward()
    for name in ("loss", "kl", "student_mass", "teacher_mass"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name))
    torch.testing.assert_close(h2.grad, h1.grad)
    torch.testing.assert_close(w2.grad, w1.grad)


def test_renormalisation_semantics():
    logits, teacher, mask = make()
    support = student_support(logits, k=4)
    lt = teacher_on(teacher, support)
    # renormalised: equals KL of the two distributions renormalised on the support, and is >= 0
    out = topk_reverse_kl(logits, support, lt, mask, TEMP, renormalize=True)
    assert torch.allclose(out.loss, reference(logits, support, lt, mask, renormalize=True))
    ls = torch.log_softmax(logits / TEMP, -1).gather(-1, support)
    p = torch.softmax(ls, -1)
    q = torch.softmax(lt, -1)
    per_token = (p * (p.log() - q.log())).sum(-1)
    assert (per_token[mask] >= -1e-12).all()
    assert torch.allclose(out.loss, per_token[mask].mean())
    # un-renormalised truncated KL can be negative; the reported metric is always un-renormalised
    raw = topk_reverse_kl(logits, support, lt, mask, TEMP, renormalize=False)
    assert torch.allclose(out.kl, raw.loss)
    # a support holding (numerically) all the mass of both: the two modes agree
    peaked = logits.clone()
    peaked.scatter_(-1, support, 60.0 + torch.randn(support.shape, dtype=peaked.dtype))
    tpeak = teacher.clone()
    tpeak.scatter_(-1, support, 60.0 + torch.randn(support.shape, dtype=tpeak.dtype))
    lt = teacher_on(tpeak, support)
    a = topk_reverse_kl(peaked, support, lt, mask, TEMP, renormalize=True)
    b = topk_reverse_kl(peaked, support, lt, mask, TEMP, renormalize=False)
    assert torch.allclose(a.loss, b.loss, atol=1e-10) and abs(b.student_mass.item() - 1) < 1e-10


def test_masked_positions_contribute_nothing():
    logits, teacher, mask = make()
    support = student_support(logits)
    lt = teacher_on(teacher, support)
    base = topk_reverse_kl(logits, support, lt, mask, TEMP)
    junk = logits.clone()
    junk[~mask] = 1e4 * torch.randn_like(junk[~mask])
    lt_junk = lt.clone()
    lt_junk[~mask] = -1e3
    other = topk_reverse_kl(junk, support, lt_junk, mask, TEMP)
    assert torch.equal(base.loss, other.loss) and base.tokens == other.tokens == int(mask.sum())


def test_sequence_mean_vs_token_mean():
    logits, teacher, mask = make()
    support = student_support(logits)
    lt = teacher_on(teacher, support)
    tok = topk_reverse_kl(logits, support, lt, mask, TEMP, aggregation="token_mean").loss
    seq = topk_reverse_kl(logits, support, lt, mask, TEMP, aggregation="sequence_mean").loss
    per_seq = torch.stack([reference(logits[b:b + 1], support[b:b + 1], lt[b:b + 1], mask[b:b + 1])
                           for b in range(B)])
    lengths = mask.sum(1).double()
    assert torch.allclose(seq, per_seq.mean())
    assert torch.allclose(tok, (per_seq * lengths).sum() / lengths.sum())
    assert not torch.allclose(tok, seq)  # unequal lengths weigh sequences differently
    # with equal lengths the two agree
    full = torch.ones_like(mask)
    a = topk_reverse_kl(logits, support, lt, full, TEMP, aggregation="token_mean").loss
    b = topk_reverse_kl(logits, support, lt, full, TEMP, aggregation="sequence_mean").loss
    assert torch.allclose(a, b)


def test_num_units_lets_micro_batches_add_up_to_the_global_mean():
    logits, teacher, mask = make()
    support = student_support(logits)
    lt = teacher_on(teacher, support)
    for agg, units in (("token_mean", int(mask.sum())), ("sequence_mean", B)):
        whole = topk_reverse_kl(logits, support, lt, mask, TEMP, aggregation=agg).loss
        parts = sum(topk_reverse_kl(logits[i:i + 1], support[i:i + 1], lt[i:i + 1], mask[i:i + 1], TEMP,
                                    aggregation=agg, num_units=units).loss for i in range(B))
        assert torch.allclose(whole, parts)


def test_sampled_estimator_gradient_is_unbiased():
    # E_y~p[grad ls_y * (ls_y - lt_y)] == grad KL(p||q): check exactly by summing over y weighted by p
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 1, 6, generator=g, dtype=torch.float64)
    teacher = torch.randn(1, 1, 6, generator=g, dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    lq = torch.log_softmax(teacher / TEMP, -1)
    p = torch.softmax(logits / TEMP, -1)[0, 0]
    expected = torch.zeros_like(logits)
    for y in range(6):
        x = logits.clone().requires_grad_()
        ids = torch.tensor([[y]])
        sampled_reverse_kl(x, ids, lq[..., y], mask, TEMP).loss.backward()
        expected += p[y] * x.grad
    x = logits.clone().requires_grad_()
    full_reverse_kl(x, teacher, mask, TEMP).backward()
    torch.testing.assert_close(expected, x.grad)
    # the chunked hidden-state variant is the same function
    hidden = torch.randn(B, T, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T))
    lt = -torch.rand(B, T, dtype=torch.float64)
    _, _, m = make()
    a = sampled_reverse_kl(hidden @ weight.t(), ids, lt, m, TEMP)
    b = sampled_reverse_kl_from_hidden(hidden, weight, ids, lt, m, TEMP, chunk_tokens=3)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.kl, b.kl)


# ----------------------------------------------------------------------------- forward KL (off-policy)

@pytest.mark.parametrize("renormalize", [False, True])
def test_forward_kl_value_and_gradient_match_a_direct_reference(renormalize):
    logits, teacher, mask = make(dtype=torch.float32)
    support = student_support(teacher)  # the teacher's own top-k, as off-policy sampling returns it
    lt = teacher_on(teacher, support).requires_grad_()
    a, r = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out = topk_forward_kl(a, support, lt, mask, TEMP, renormalize)
    out.loss.backward()
    ref = reference(r, support, lt.detach(), mask, renormalize, forward=True)
    ref.backward()
    assert abs(out.loss.item() - ref.item()) < 1e-5
    torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-7)
    assert a.grad[~mask].abs().max() == 0
    assert lt.grad is None  # the teacher's probabilities are data, not parameters
    # the reported KL is always the un-renormalised forward KL; the masses are the usual ones
    raw = reference(logits, support, lt.detach(), mask, forward=True)
    assert abs(out.kl.item() - raw.item()) < 1e-5
    assert abs(out.teacher_mass.item() - lt.detach()[mask].exp().sum(-1).mean().item()) < 1e-5
    # full support: the exact forward KL(teacher || student) over the vocabulary
    everything = torch.arange(V).expand(B, T, V)
    exact = topk_forward_kl(logits, everything, teacher_on(teacher, everything), mask, TEMP)
    lq, ls = torch.log_softmax(teacher / TEMP, -1)[mask], torch.log_softmax(logits / TEMP, -1)[mask]
    assert abs(exact.loss.item() - (lq.exp() * (lq - ls)).sum(-1).mean().item()) < 1e-5


def test_forward_kl_is_minimised_by_the_teacher_renormalised_on_the_support():
    """Un-renormalised, the forward KL on a support is lowest when the student puts all its mass on
    the support in the teacher's proportions (a bounded objective, unlike the reverse one)."""
    _, teacher, mask = make()
    support = student_support(teacher, k=4)
    lt = teacher_on(teacher, support)
    match = torch.full((B, T, V), -1e4, dtype=torch.float64)
    match.scatter_(-1, support, (lt - lt.logsumexp(-1, keepdim=True)) * TEMP)
    best = topk_forward_kl(match, support, lt, mask, TEMP).loss
    logits, _, _ = make(seed=5)
    assert best < topk_forward_kl(logits, support, lt, mask, TEMP).loss
    x = match.clone().requires_grad_()
    topk_forward_kl(x, support, lt, mask, TEMP).loss.backward()
    assert x.grad.abs().max() < 1e-9  # a stationary point


# ----------------------------------------------------------------------------- exact full reverse KL

@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_full_reverse_kl_from_hidden_matches_materialised_logits(chunk, aggregation):
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / 2
    teacher_hidden = torch.randn(B, T, H + 3, generator=g, dtype=torch.float64)  # another model's width
    teacher_weight = torch.randn(V, H + 3, generator=g, dtype=torch.float64) / 2
    _, _, mask = make()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = full_reverse_kl(h1 @ w1.t(), teacher_hidden @ teacher_weight.t(), mask, TEMP, aggregation)
    ref.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    th, tw = teacher_hidden.clone().requires_grad_(), teacher_weight.clone().requires_grad_()
    out = full_reverse_kl_from_hidden(h2, w2, th, tw, mask, TEMP, aggregation, chunk_tokens=chunk)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(h2.grad, h1.grad)
    torch.testing.assert_close(w2.grad, w1.grad)
    assert th.grad is None and tw.grad is None  # the teacher is frozen
    assert out.student_mass.item() == out.teacher_mass.item() == 1.0
    if aggregation == "token_mean":
        torch.testing.assert_close(out.kl, ref.detach())


def test_full_reverse_kl_from_hidden_fp32_equals_topk_with_the_whole_vocabulary():
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / 2
    teacher_hidden = torch.randn(B, T, H, generator=g)
    _, _, mask = make()
    everything = torch.arange(V).expand(B, T, V)
    lt = torch.log_softmax(teacher_hidden @ weight.t() / TEMP, -1)
    topk = topk_reverse_kl_from_hidden(hidden, weight, everything, lt, mask, TEMP, chunk_tokens=4)
    full = full_reverse_kl_from_hidden(hidden, weight, teacher_hidden, weight, mask, TEMP, chunk_tokens=4)
    assert abs(full.loss.item() - topk.loss.item()) < 1e-5 and abs(full.kl.item() - topk.kl.item()) < 1e-5


# ----------------------------------------------------------------------------- the public code's estimators

def estimator_reference(name, logits, ids, lt, mask, forward):
    """The public code's kl_penalty(logprob, ref_logprob) on the sampled token, written per position:
    logprob is the sampler's log-prob (the student's on-policy, the teacher's off-policy), ref the
    other model's; token mean."""
    def value(b, t):
        ls = torch.log_softmax(logits[b, t] / TEMP, -1)[ids[b, t]]
        logprob, ref = (lt[b, t], ls) if forward else (ls, lt[b, t])
        if name == "k1":
            return logprob - ref
        if name == "k2":
            return 0.5 * (logprob - ref) ** 2
        if name == "k3":
            kl = torch.clamp(ref - logprob, -20, 20)
            return torch.clamp(torch.exp(kl) - kl - 1, -10, 10)
        if name == "abs":
            return torch.abs(logprob - ref)
        return -ls  # seqkd: the teacher's sampled reply as the target (off-policy)
    return token_mean(mask, value)


# every estimator in both directions; seqkd only forward (the teacher's replies exist off-policy only)
@pytest.mark.parametrize("name, forward", [(n, f) for n in ("k1", "k2", "k3", "abs") for f in (False, True)]
                         + [("seqkd", True)])
def test_each_estimator_value_and_gradient_match_a_direct_computation(name, forward):
    loss = name + ("_forward" if forward else "")
    logits, teacher, mask = make(seed=5)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    lt = teacher_on(teacher, ids[..., None])[..., 0]
    a, r = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out = sampled_reverse_kl(a, ids, lt, mask, TEMP, loss=loss)
    expected = estimator_reference(name, r, ids, lt, mask, forward)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    expected.backward()
    torch.testing.assert_close(a.grad, r.grad)
    assert a.grad.abs().sum() > 0
    # kl: the single-sample estimate of the KL the loss stands for, log p_sampler - log p_other
    ls = torch.log_softmax(logits / TEMP, -1).gather(-1, ids[..., None])[..., 0]
    torch.testing.assert_close(out.kl, ((lt - ls) if forward else (ls - lt))[mask].mean())
    # the chunked hidden-state variant the learner runs is the same function, gradients included
    hidden = torch.randn(B, T, H, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    weight = torch.randn(V, H, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    plain = sampled_reverse_kl(h1 @ w1.t(), ids, lt, mask, TEMP, loss=loss)
    chunked = sampled_reverse_kl_from_hidden(h2, w2, ids, lt, mask, TEMP, chunk_tokens=4, loss=loss)
    torch.testing.assert_close(plain.loss, chunked.loss)
    plain.loss.backward()
    chunked.loss.backward()
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


def test_k3_is_clamped_as_the_public_code_clamps_it():
    logits = torch.zeros(1, 1, V, dtype=torch.float64)
    logits[0, 0, 0] = 60.0  # the sampled token certain for the student, nearly impossible for the teacher
    ids, mask = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool)
    out = sampled_reverse_kl(logits, ids, torch.tensor([[-50.0]], dtype=torch.float64), mask, TEMP, loss="k3_forward")
    assert out.loss.item() == 10.0  # exp(+50 clamped to 20) - ... clamped to 10


# ----------------------------------------------------------------------------- the tail bucket

def tail_reference(logits, teacher, support, mask, forward=False):
    """The KL between the two (k+1)-bin distributions (the support's ids, then everything else),
    from the full softmaxes, token mean."""
    def kl(b, t):
        s = torch.softmax(logits[b, t] / TEMP, -1)[support[b, t]]
        q = torch.softmax(teacher[b, t] / TEMP, -1)[support[b, t]]
        s, q = torch.cat([s, (1 - s.sum())[None]]), torch.cat([q, (1 - q.sum())[None]])
        first, second = (q, s) if forward else (s, q)
        return (first * (first.log() - second.log())).sum()
    return token_mean(mask, kl)


@pytest.mark.parametrize("kind", ["reverse", "forward"])
def test_tail_bucket_value_and_gradient_match_the_coarsened_full_distributions(kind):
    logits, teacher, mask = make(seed=7)
    support = student_support(logits) if kind == "reverse" else student_support(teacher)
    lt = teacher_on(teacher, support)
    fn = topk_reverse_kl if kind == "reverse" else topk_forward_kl
    a, r = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out = fn(a, support, lt, mask, TEMP, tail=True)
    expected = tail_reference(r, teacher, support, mask, forward=kind == "forward")
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.kl, expected.detach())
    out.loss.backward()
    expected.backward()
    torch.testing.assert_close(a.grad, r.grad)
    # the mass outside the support, both models, as every step logs it
    assert 0 < 1 - out.student_mass.item() < 1 and 0 < 1 - out.teacher_mass.item() < 1
    # the chunked hidden-state path the learner runs is the same function
    hidden = torch.randn(B, T, H, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    weight = torch.randn(V, H, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    w1, w2 = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    plain = fn(hidden @ w1.t(), support, lt, mask, TEMP, tail=True)
    hfn = topk_reverse_kl_from_hidden if kind == "reverse" else topk_forward_kl_from_hidden
    chunked = hfn(hidden, w2, support, lt, mask, TEMP, chunk_tokens=4, tail=True)
    torch.testing.assert_close(plain.loss, chunked.loss)
    plain.loss.backward()
    chunked.loss.backward()
    torch.testing.assert_close(w1.grad, w2.grad)


def test_tail_bucket_over_the_whole_vocabulary_is_the_full_kl():
    logits, teacher, mask = make(seed=8)
    support = torch.arange(V).expand(B, T, V)
    with_tail = topk_reverse_kl(logits, support, teacher_on(teacher, support), mask, TEMP, tail=True).loss
    torch.testing.assert_close(with_tail, full_reverse_kl(logits, teacher, mask, TEMP))


def test_the_tail_kl_never_exceeds_the_full_kl():
    """Merging every id outside the support into one bin can only lose information: whatever the
    support, the KL with the tail is a lower bound of the full KL (data-processing inequality), and
    equal to it once the support holds the whole vocabulary (test above)."""
    for seed in range(10):
        logits, teacher, mask = make(seed=seed)
        support = student_support(logits)
        tailed = topk_reverse_kl(logits, support, teacher_on(teacher, support), mask, TEMP, tail=True).loss
        assert tailed <= full_reverse_kl(logits, teacher, mask, TEMP) + 1e-12


# ----------------------------------------------------------------------------- merged supports (padding)

def merged(logits, teacher, k=K):
    """A merged support as the teacher server builds it: the student's top-k, then the teacher's own
    top-k, an id already present replaced by the first one with teacher log-prob -inf."""
    student, own = student_support(logits, k), student_support(teacher, k)
    repeated = (own[..., :, None] == student[..., None, :]).any(-1)
    ids = torch.cat([student, torch.where(repeated, student[..., :1], own)], -1)
    lt = teacher_on(teacher, ids)
    lt[..., k:] = lt[..., k:].masked_fill(repeated, float("-inf"))
    return ids, lt, repeated


@pytest.mark.parametrize("renormalize, tail", [(False, False), (True, False), (False, True)])
def test_padding_of_a_merged_support_adds_nothing(renormalize, tail):
    """The loss on the padded [2k] support equals the loss on the union itself, per position, in
    value and gradient (the padding's repeated ids would count twice if it were not skipped)."""
    logits, teacher, mask = make(seed=11)
    ids, lt, repeated = merged(logits, teacher)
    assert repeated.any() and not repeated.all()
    a = logits.clone().requires_grad_()
    out = topk_reverse_kl(a, ids, lt, mask, TEMP, renormalize=renormalize, tail=tail)
    out.loss.backward()
    r = logits.clone().requires_grad_()

    def on_the_union(b, t):  # this position's loss on its union alone, without the padding
        keep = torch.isfinite(lt[b, t])
        return topk_reverse_kl(r[b:b + 1, t:t + 1], ids[b, t, keep][None, None], lt[b, t, keep][None, None],
                               torch.ones(1, 1, dtype=torch.bool), TEMP, renormalize=renormalize, tail=tail).loss
    expected = token_mean(mask, on_the_union)
    expected.backward()
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(a.grad, r.grad)
    assert torch.isfinite(a.grad).all()
    # the chunked path the learner runs skips it too
    hidden = torch.randn(B, T, H, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    weight = torch.randn(V, H, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    ids, lt, _ = merged(hidden @ weight.t(), teacher)
    plain = topk_reverse_kl(hidden @ weight.t(), ids, lt, mask, TEMP, renormalize=renormalize, tail=tail)
    chunked = topk_reverse_kl_from_hidden(hidden, weight, ids, lt, mask, TEMP, renormalize=renormalize, tail=tail,
                                          chunk_tokens=3)
    torch.testing.assert_close(plain.loss, chunked.loss)
    torch.testing.assert_close(plain.student_mass, chunked.student_mass)
