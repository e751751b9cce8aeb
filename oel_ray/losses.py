"""Consolidation losses: a KL between student and teacher per response token, pure torch.

The kinds (strategy.LEARNER_LOSSES), all at the rollout temperature:
- topk_reverse_kl (OEL, on-policy): sum over the student's top-k support of p_s (log p_s - log p_t),
  gradients through both p_s and log p_s.
- sampled_reverse_kl: the single-sample (REINFORCE) estimator of the same KL on the sampled token.
- k1, k2, k3, abs, seqkd: the public code's kl_loss_type estimators on the sampled token (`pathwise`),
  and their forward forms (suffix `_forward`) on the teacher's samples off-policy.
- full_reverse_kl: the exact KL(student || teacher) over the whole vocabulary, from both models'
  hidden states (the learner holds a frozen teacher copy: full logits never travel).
- topk_forward_kl (off-policy context-distillation baseline): the teacher sampled the reply, the
  support is the teacher's top-k, and per token sum_v p_t (log p_t - log p_s); the gradient flows
  through log p_s only (the teacher's probabilities are data).

Shapes: B sequences, T response positions, V vocabulary, H hidden size, k support size.
`mask` [B, T] (bool) marks real response tokens; padded positions contribute nothing.
Student logits are divided by `temperature` before the softmax; teacher log-probs arrive already
temperature-scaled (the teacher server scores at the rollout temperature).

The support kinds share one per-token function on the support log-probs (`_support_terms`); all
kinds share one aggregation (per-token weights, `_token_weights`). The `*_from_hidden` variants
never hold the [B, T, V] logits: `_HeadLoss` projects `chunk_tokens` positions at a time and
computes the gradient in the same pass, so forward and backward together hold one fp32
[chunk_tokens, V] block (three for full_reverse_kl: student, teacher and a transient one) plus the
head's gradient (benchmarks/kl_memory.py measures it against the materialised loss).

`num_units` lets a batch split into micro-batches / ranks add up to the global mean: it is the
global number of tokens (token_mean) or sequences (sequence_mean) the loss is averaged over
(default: this batch's own count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from oel_ray.config import AGGREGATIONS, SEQUENCE_MEAN, TOKEN_MEAN
from oel_ray.strategy import ABS, FORWARD, FORWARD_SUFFIX, K1, K2, K3, REVERSE, SAMPLED_REVERSE_KL, SEQKD


@dataclass
class KLOutput:
    loss: torch.Tensor  # scalar, differentiable
    # Token mean of the un-renormalised KL this loss minimises (detached): KL(student || teacher)
    # for the reverse kinds (on the support, or over the vocabulary for full_reverse_kl), and
    # KL(teacher || student) on the teacher's support for topk_forward_kl.
    kl: torch.Tensor
    student_mass: torch.Tensor  # token mean of the student's probability mass on the support
    teacher_mass: torch.Tensor  # token mean of the teacher's probability mass on the support
    tokens: int  # unmasked tokens in this batch


def upcast(x):
    """At least fp32 (bf16/fp16 logits are upcast; fp64 stays fp64 for exact tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _support_terms(ls, teacher_lp, renormalize, kind, tail=False):
    """Per-position loss and metrics from the student's log-probs on the support `ls` [N, k].

    kind: REVERSE (KL(p_s || p_t)), FORWARD (KL(p_t || p_s)), SAMPLED_REVERSE_KL (REINFORCE) or one of
    the public code's estimators (`pathwise`); `tail`: the two directions over the support plus one
    bin for the rest of the vocabulary (`with_tail`). A teacher log-prob of -inf marks an entry that
    only pads a merged support to its width: it adds nothing (`merged_support_logprobs`).
    """
    lt = upcast(teacher_lp).detach()  # the teacher is frozen: its values are data
    pad = torch.isneginf(lt)
    lt = lt.masked_fill(pad, 0.0)  # a finite stand-in, so no gradient meets an inf; its terms are dropped
    real = (~pad).to(ls.dtype)
    masses = (ls.exp() * real).sum(-1).detach(), (lt.exp() * real).sum(-1)
    if kind not in (REVERSE, FORWARD, SAMPLED_REVERSE_KL):  # an estimator on the sampled token ([N, 1])
        loss, kl = pathwise(kind, ls, lt)
        return loss.sum(-1), kl.sum(-1), *masses
    if kind == SAMPLED_REVERSE_KL:  # E_{y~p}[grad(log p_y) * (log p_y - log q_y)] = grad KL(p || q)
        kl = (ls - lt).sum(-1)  # single-sample estimate of KL(p || q)
        loss = (ls * (ls - lt).detach()).sum(-1)
        return loss, kl.detach(), *masses
    # The two directions differ only in the argument order; lt carries no gradient, so the forward
    # KL's gradient flows through log p_s alone and the reverse's through p_s too.
    s_lp, t_lp, w = ls, lt, real
    if tail:
        s_lp, t_lp, w = with_tail(ls, real), with_tail(lt, real), torch.cat([real, torch.ones_like(real[:, :1])], -1)
    first, second = (s_lp, t_lp) if kind == REVERSE else (t_lp, s_lp)
    kl = (w * first.exp() * (first - second)).sum(-1)
    loss = kl
    if renormalize:
        fn = first - first.masked_fill(w == 0, float("-inf")).logsumexp(-1, keepdim=True)
        sn = second - second.masked_fill(w == 0, float("-inf")).logsumexp(-1, keepdim=True)
        loss = (w * fn.exp() * (fn - sn)).sum(-1)
    return loss, kl.detach(), *masses


def with_tail(lp, real):
    """Support log-probs [N, k] with one more entry: the log of the mass outside the support (learner.tail),
    floored at the dtype's smallest positive number, so both distributions are whole. `real` [N, k]: 1
    for the support's entries, 0 for padding."""
    rest = (1 - (lp.exp() * real).sum(-1, keepdim=True)).clamp_min(torch.finfo(lp.dtype).tiny)
    return torch.cat([lp, rest.log()], -1)


def pathwise(loss: str, ls, lt):
    """The public code's estimator `loss` (strategy.ESTIMATORS or SEQKD; with FORWARD_SUFFIX when the
    teacher sampled) of the sampled token's log-probs, differentiated as written; and, detached,
    d = log p_sampler - log p_other, the single-sample estimate of the KL it stands for."""
    name = loss.removesuffix(FORWARD_SUFFIX)
    d = lt - ls if loss.endswith(FORWARD_SUFFIX) else ls - lt
    if name == K1:
        value = d
    elif name == K2:
        value = 0.5 * d.square()
    elif name == K3:  # exp(-d) + d - 1 >= 0, clamped as there
        minus = (-d).clamp(-20, 20)
        value = (minus.exp() - minus - 1).clamp(-10, 10)
    elif name == ABS:
        value = d.abs()
    elif name == SEQKD:  # the teacher's reply as the target
        value = -ls
    else:
        raise ValueError(f"no sampled-token estimator {loss!r}")
    return value, d.detach()


def _token_terms(logits, support, teacher_lp, temperature, renormalize, kind, tail=False):
    """Per-position loss and metrics for N positions: logits [N, V], support/teacher_lp [N, k]."""
    ls = torch.log_softmax(upcast(logits) / temperature, dim=-1).gather(-1, support)
    return _support_terms(ls, teacher_lp, renormalize, kind, tail)


def _token_weights(mask, aggregation, num_units, dtype):
    """w [N] over the unmasked positions (row-major) such that the loss is sum(w * per-token loss)."""
    n = int(mask.sum())
    if aggregation == TOKEN_MEAN:
        denom = n if num_units is None else num_units
        return torch.full((n,), 1.0 / max(float(denom), 1.0), dtype=dtype, device=mask.device)
    if aggregation == SEQUENCE_MEAN:
        lengths = mask.sum(1)
        denom = int((lengths > 0).sum()) if num_units is None else num_units
        return (1.0 / (lengths[mask.nonzero()[:, 0]].to(dtype) * max(float(denom), 1.0)))
    raise ValueError(f"aggregation {aggregation!r} is not one of {', '.join(AGGREGATIONS)}")


def _finish(loss, kl, smass, tmass, n) -> KLOutput:
    mean = lambda x: x.sum() / max(n, 1)  # noqa: E731
    return KLOutput(loss, mean(kl), mean(smass), mean(tmass), n)


def _from_logits(student_logits, support, teacher_lp, mask, temperature, renormalize,
                 aggregation, num_units, kind, tail=False) -> KLOutput:
    mask = mask.bool()
    loss, kl, smass, tmass = _token_terms(student_logits[mask], support[mask].long(), teacher_lp[mask],
                                          temperature, renormalize, kind, tail)
    w = _token_weights(mask, aggregation, num_units, loss.dtype)
    return _finish((loss * w).sum(), kl, smass, tmass, int(mask.sum()))


def _chunk_logprobs(rows, weight, support, temperature):
    """(ls [n, k], exp(z - max) [n, V], its row sums [n, 1]) for z = rows @ weight.T / temperature.

    The [n, V] block is the only large buffer: logits, then (in place) unnormalised probabilities.
    """
    z = upcast(rows @ weight.t()).div_(temperature)
    picked = z.gather(-1, support)
    top = z.amax(-1, keepdim=True)
    probs = z.sub_(top).exp_()
    total = probs.sum(-1, keepdim=True)
    return picked - top - total.log(), probs, total


@torch.no_grad()
def support_logprobs(hidden: torch.Tensor, weight: torch.Tensor, support: torch.Tensor,
                     temperature: float, chunk_tokens: int) -> torch.Tensor:
    """log_softmax(hidden @ weight.T / temperature) gathered at `support` [N, k], chunk by chunk."""
    parts = [_chunk_logprobs(hidden[i:i + chunk_tokens], weight, support[i:i + chunk_tokens], temperature)[0]
             for i in range(0, hidden.shape[0], chunk_tokens)]
    return torch.cat(parts) if parts else hidden.new_zeros((0, support.shape[-1]), dtype=torch.float32)


# A chunk's computation: (lo, hi, rows [n, H], head [V, H], need_grad) -> (its part of the loss,
# per-token metrics [kl, student mass, teacher mass], d part / d logits [n, V] or None).
ChunkTerms = Callable[[int, int, torch.Tensor, torch.Tensor, bool], tuple]


class _HeadLoss(torch.autograd.Function):
    """sum(w * per-token loss) from hidden rows [N, H] and the output head [V, H], chunk by chunk;
    `terms` (a `ChunkTerms`) says what the loss of one chunk of positions is.

    The gradient is computed in the forward pass (the upstream gradient of a scalar only scales it),
    so no chunk's logits are recomputed and the head weight is only read while the caller holds it
    (under ZeRO-3 it is gathered for the forward only). Each chunk's d loss / d logits is turned
    into the rows' and the head's gradients before the next chunk allocates its block.
    """

    @staticmethod
    def forward(ctx, rows, weight, terms, chunk):
        need_rows, need_weight = ctx.needs_input_grad[:2]
        acc = upcast(weight).dtype
        grad_rows = torch.zeros_like(rows) if need_rows else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        loss = torch.zeros((), dtype=acc, device=rows.device)
        metrics = []
        for lo in range(0, rows.shape[0], chunk):
            part, chunk_metrics = _HeadLoss._chunk(terms, lo, lo + chunk, rows, weight, grad_rows, grad_weight)
            loss += part
            metrics.append(chunk_metrics)
        # Intermediates, not inputs or outputs: kept on ctx (allowed) so backward can scale them in place.
        ctx.grads, ctx.weight_dtype = (grad_rows, grad_weight), weight.dtype
        kl, smass, tmass = (torch.cat(m) for m in zip(*metrics))
        ctx.mark_non_differentiable(kl, smass, tmass)
        return loss, kl, smass, tmass

    @staticmethod
    def _chunk(terms, lo, hi, rows, weight, grad_rows, grad_weight):
        """One chunk; adds its gradients into grad_rows / grad_weight. A function of its own so the
        [n, V] blocks are freed on return, before the next chunk allocates its own."""
        r = rows[lo:hi]
        part, metrics, dz = terms(lo, hi, r, weight, grad_rows is not None or grad_weight is not None)
        if dz is not None:
            if grad_rows is not None:
                grad_rows[lo:hi].copy_(dz.to(weight.dtype) @ weight)
            if grad_weight is not None:
                grad_weight.addmm_(dz.t(), r.to(grad_weight.dtype))
        return part.detach(), metrics

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if ctx.grads is None:
            raise RuntimeError("_HeadLoss computes its gradients once: backward through it cannot run twice")
        (grad_rows, grad_weight), ctx.grads = ctx.grads, None
        # Scaled in place: a second head-sized buffer would add V x H floats to the peak.
        if grad_rows is not None:
            grad_rows = grad_rows.mul_(grad_loss.to(grad_rows.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_rows, grad_weight, None, None


def _support_chunk_terms(support, teacher_lp, w, temperature, renormalize, kind, tail=False) -> ChunkTerms:
    """A support kind's chunk: autograd on the small [n, k] support log-probs gives g = d loss / d ls,
    then d loss / d z = (scatter(g) - softmax(z) * sum(g)) / T, written into the [n, V] block in place."""
    def terms(lo, hi, r, weight, need_grad):
        s = support[lo:hi]
        ls, probs, total = _chunk_logprobs(r, weight, s, temperature)
        with torch.enable_grad():
            ls.requires_grad_(need_grad)
            loss, *metrics = _support_terms(ls, teacher_lp[lo:hi], renormalize, kind, tail)
            part = (loss * w[lo:hi]).sum()
            g = torch.autograd.grad(part, ls)[0] if need_grad else None
        metrics = [m.detach() for m in metrics]
        if g is None:
            return part, metrics, None
        dz = probs.div_(total).mul_(-g.sum(-1, keepdim=True)).scatter_add_(-1, s, g).div_(temperature)
        return part, metrics, dz
    return terms


def _log_softmax_block(rows, weight, temperature, dtype=None):
    """log_softmax(rows @ weight.T / temperature) [n, V], in `dtype` (default: at least fp32)."""
    z = rows @ weight.t()
    return torch.log_softmax((upcast(z) if dtype is None else z.to(dtype)).div_(temperature), dim=-1)


def _full_chunk_terms(teacher_rows, teacher_weight, w, temperature) -> ChunkTerms:
    """The exact reverse KL's chunk. With d = log p_s - log p_t and KL = sum_v p_s d per position,
    d KL / d z_s = p_s (d - KL) / T (the teacher is frozen). Both log-softmaxes are upcast blocks;
    d, then the gradient, is written into the teacher's, p_s into the student's."""
    def terms(lo, hi, r, weight, need_grad):
        ls = _log_softmax_block(r, weight, temperature)
        d = _log_softmax_block(teacher_rows[lo:hi], teacher_weight, temperature, ls.dtype).neg_().add_(ls)
        p = ls.exp_()
        kl = (p.unsqueeze(1) @ d.unsqueeze(-1)).view(-1)  # row dot products without a third [n, V] block
        part = (kl * w[lo:hi]).sum()
        ones = torch.ones_like(kl)  # the whole vocabulary: both masses are 1
        dz = d.sub_(kl[:, None]).mul_(p).mul_((w[lo:hi] / temperature)[:, None]) if need_grad else None
        return part, [kl, ones, ones], dz
    return terms


def _apply_head(hidden, lm_head, mask, aggregation, num_units, chunk_tokens,
                make_terms: Callable[[torch.Tensor], ChunkTerms]) -> KLOutput:
    """`_HeadLoss` on the unmasked rows of hidden [B, T, H]; make_terms(w) builds the chunk terms."""
    rows = hidden[mask]
    n = rows.shape[0]
    if n == 0:  # nothing to learn from; keep the graph so backward still runs
        zero = hidden.sum() * 0.0
        return KLOutput(zero, zero.detach(), zero.detach(), zero.detach(), 0)
    w = _token_weights(mask, aggregation, num_units, upcast(rows).dtype)
    loss, kl, smass, tmass = _HeadLoss.apply(rows, lm_head, make_terms(w), chunk_tokens)
    return _finish(loss, kl, smass, tmass, n)


def _from_hidden(hidden, lm_head, support, teacher_lp, mask, temperature, renormalize,
                 aggregation, num_units, chunk_tokens, kind, tail=False) -> KLOutput:
    mask = mask.bool()
    sup, lt = support[mask].long(), teacher_lp[mask]
    return _apply_head(hidden, lm_head, mask, aggregation, num_units, chunk_tokens,
                       lambda w: _support_chunk_terms(sup, lt, w, temperature, renormalize, kind, tail))


def _topk_pair(kind: str, doc: str):
    """The logits and the hidden-state (chunked) form of one top-k KL; `kind` reverse or forward."""
    def from_logits(student_logits: torch.Tensor, support_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                    mask: torch.Tensor, temperature: float = 1.0, renormalize: bool = False,
                    aggregation: str = TOKEN_MEAN, num_units: Optional[float] = None, tail: bool = False) -> KLOutput:
        return _from_logits(student_logits, support_ids, teacher_logprobs, mask, temperature,
                            renormalize, aggregation, num_units, kind=kind, tail=tail)

    def from_hidden(hidden: torch.Tensor, lm_head_weight: torch.Tensor, support_ids: torch.Tensor,
                    teacher_logprobs: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                    renormalize: bool = False, aggregation: str = TOKEN_MEAN, chunk_tokens: int = 1024,
                    num_units: Optional[float] = None, tail: bool = False) -> KLOutput:
        return _from_hidden(hidden, lm_head_weight, support_ids, teacher_logprobs, mask, temperature,
                            renormalize, aggregation, num_units, chunk_tokens, kind=kind, tail=tail)

    from_logits.__doc__ = doc + " From logits [B, T, V]; support_ids / teacher_logprobs [B, T, k]."
    from_hidden.__doc__ = doc + (" On logits = hidden [B, T, H] @ lm_head_weight [V, H].T, chunk by chunk: "
                                 "never the [B, T, V] logits.")
    return from_logits, from_hidden


topk_reverse_kl, topk_reverse_kl_from_hidden = _topk_pair(
    REVERSE, "Reverse KL(student || teacher) on the student's top-k support (with `tail`, plus one entry for "
    "the rest of the vocabulary).")
topk_forward_kl, topk_forward_kl_from_hidden = _topk_pair(
    FORWARD, "Forward KL(teacher || student) on the support (the teacher's top-k on its own samples): per "
    "token sum_v p_t(v) (log p_t(v) - log p_s(v)). With `renormalize`, both distributions are renormalised "
    "over the support first; with `tail`, the rest of the vocabulary is one more entry of the sum.")


def sampled_reverse_kl(student_logits: torch.Tensor, token_ids: torch.Tensor,
                       teacher_token_logprobs: torch.Tensor, mask: torch.Tensor,
                       temperature: float = 1.0, aggregation: str = TOKEN_MEAN,
                       num_units: Optional[float] = None, loss: str = SAMPLED_REVERSE_KL) -> KLOutput:
    """Sampled-token estimator: loss_t = ls_y * stopgrad(ls_y - lt_y) for the sampled token y; or,
    with `loss`, one of the public code's estimators (`pathwise`).

    token_ids / teacher_token_logprobs [B, T]. Metrics: kl is the mean of ls_y - lt_y (an
    unbiased estimate of the KL; lt_y - ls_y for a forward form); the masses are the probabilities
    of the sampled tokens.
    """
    return _from_logits(student_logits, token_ids[..., None], teacher_token_logprobs[..., None], mask,
                        temperature, False, aggregation, num_units, kind=loss)


def sampled_reverse_kl_from_hidden(hidden: torch.Tensor, lm_head_weight: torch.Tensor, token_ids: torch.Tensor,
                                   teacher_token_logprobs: torch.Tensor, mask: torch.Tensor,
                                   temperature: float = 1.0, aggregation: str = TOKEN_MEAN,
                                   chunk_tokens: int = 1024, num_units: Optional[float] = None,
                                   loss: str = SAMPLED_REVERSE_KL) -> KLOutput:
    """`sampled_reverse_kl` from hidden states, chunked like `topk_reverse_kl_from_hidden`."""
    return _from_hidden(hidden, lm_head_weight, token_ids[..., None], teacher_token_logprobs[..., None],
                        mask, temperature, False, aggregation, num_units, chunk_tokens, kind=loss)


def full_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    temperature: float = 1.0, aggregation: str = TOKEN_MEAN,
                    num_units: Optional[float] = None) -> torch.Tensor:
    """Exact KL(student || teacher) over the whole vocabulary; both logits [B, T, V] are divided by
    `temperature`; the teacher gets no gradient. Materialises [B, T, V]: a reference for tests."""
    mask = mask.bool()
    ls = torch.log_softmax(upcast(student_logits[mask]) / temperature, dim=-1)
    lt = torch.log_softmax(upcast(teacher_logits[mask].detach()) / temperature, dim=-1)
    per_token = (ls.exp() * (ls - lt)).sum(-1)
    return (per_token * _token_weights(mask, aggregation, num_units, per_token.dtype)).sum()


def full_reverse_kl_from_hidden(hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                                teacher_hidden: torch.Tensor, teacher_head_weight: torch.Tensor,
                                mask: torch.Tensor, temperature: float = 1.0,
                                aggregation: str = TOKEN_MEAN, chunk_tokens: int = 1024,
                                num_units: Optional[float] = None) -> KLOutput:
    """`full_reverse_kl` on logits = hidden [B, T, H] @ lm_head_weight.T (student) and
    teacher_hidden [B, T, H_t] @ teacher_head_weight.T (frozen teacher, no gradient), chunk by chunk:
    never a [B, T, V] tensor. The masses are 1 (the support is the whole vocabulary)."""
    mask = mask.bool()
    teacher_rows, teacher_weight = teacher_hidden[mask].detach(), teacher_head_weight.detach()
    return _apply_head(hidden, lm_head_weight, mask, aggregation, num_units, chunk_tokens,
                       lambda w: _full_chunk_terms(teacher_rows, teacher_weight, w, temperature))
