import pytest
import torch

from oel_ray.losses import (
    full_reverse_kl,
    sampled_reverse_kl,
    sampled_reverse_kl_from_hidden,
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


def reference(logits, support, lt, mask, renormalize=False):
    """Direct formula, written independently: loops over positions, token mean."""
    total, n = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if not mask[b, t]:
                continue
            ls = torch.log_softmax(logits[b, t] / TEMP, -1)[support[b, t]]
            lq = lt[b, t]
            if renormalize:
                ls, lq = ls - torch.logsumexp(ls, 0), lq - torch.logsumexp(lq, 0)
            total = total + (torch.exp(ls) * (ls - lq)).sum()
            n += 1
    return total / n


def test_full_support_equals_full_kl_and_gradient_matches_reference():
    logits, teacher, mask = make(dtype=torch.float32)
    support = torch.arange(V).expand(B, T, V)
    lt = teacher_on(teacher, support)
    a = logits.clone().requires_grad_()
    out = topk_reverse_kl(a, support, lt, mask, TEMP)
    full = full_reverse_kl(logits, teacher, mask, TEMP)
    assert abs(out.loss.item() - full.item()) < 1e-5
    assert abs(out.reverse_kl.item() - full.item()) < 1e-5
    assert abs(out.student_mass.item() - 1) < 1e-5 and abs(out.teacher_mass.item() - 1) < 1e-5

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
def test_hidden_chunked_matches_logits(chunk, renormalize):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / 2
    _, teacher, mask = make()
    support = student_support(hidden @ weight.t())
    lt = teacher_on(teacher, support)

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = topk_reverse_kl(h1 @ w1.t(), support, lt, mask, TEMP, renormalize)
    ref.loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = topk_reverse_kl_from_hidden(h2, w2, support, lt, mask, TEMP, renormalize, chunk_tokens=chunk)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss)
    for name in ("reverse_kl", "student_mass", "teacher_mass"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name))
    torch.testing.assert_close(h2.grad, h1.grad)
    torch.testing.assert_close(w2.grad, w1.grad)
    # a module as the head (what the learner passes) gives the same value
    lin = torch.nn.Linear(H, V, bias=False, dtype=torch.float64)
    lin.weight.data.copy_(weight)
    out3 = topk_reverse_kl_from_hidden(hidden, lin, support, lt, mask, TEMP, renormalize, chunk_tokens=chunk)
    torch.testing.assert_close(out3.loss, ref.loss)


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
    assert torch.allclose(out.reverse_kl, raw.loss)
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
    torch.testing.assert_close(a.reverse_kl, b.reverse_kl)
