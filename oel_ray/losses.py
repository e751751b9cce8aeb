"""Consolidation losses: reverse KL(student || teacher) per response token, pure torch.

Shapes: B sequences, T response positions, V vocabulary, H hidden size, k support size.
`mask` [B, T] (bool) marks real response tokens; padded positions contribute nothing.
Student logits are divided by `temperature` before the softmax; teacher log-probs arrive already
temperature-scaled (the teacher server scores at the rollout temperature).

All variants share one per-token function on the support log-probs (`_support_terms`) and one
aggregation (per-token weights, `_token_weights`). The `*_from_hidden` variants never hold the
[B, T, V] logits: `_HeadKL` projects `chunk_tokens` positions at a time and computes the gradient
in the same pass, so forward and backward together hold one fp32 [chunk_tokens, V] block plus the
head's gradient (benchmarks/kl_memory.py measures it against the materialised loss).

`num_units` lets a batch split into micro-batches / ranks add up to the global mean: it is the
global number of tokens (token_mean) or sequences (sequence_mean) the loss is averaged over
(default: this batch's own count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch.utils.checkpoint import checkpoint

AGGREGATIONS = ("token_mean", "sequence_mean")


@dataclass
class KLOutput:
    loss: torch.Tensor  # scalar, differentiable
    reverse_kl: torch.Tensor  # token mean of the un-renormalised KL on the support (detached)
    student_mass: torch.Tensor  # token mean of the student's probability mass on the support
    teacher_mass: torch.Tensor  # token mean of the teacher's probability mass on the support
    tokens: int  # unmasked tokens in this batch


def _upcast(x):
    """At least fp32 (bf16/fp16 logits are upcast; fp64 stays fp64 for exact tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _support_terms(ls, teacher_lp, renormalize, sampled):
    """Per-position loss and metrics from the student's log-probs on the support `ls` [N, k]."""
    lt = _upcast(teacher_lp)
    p = ls.exp()
    if sampled:  # REINFORCE: E_{y~p}[grad(log p_y) * (log p_y - log q_y)] = grad KL(p || q)
        kl = (ls - lt).sum(-1)  # single-sample estimate of KL(p || q)
        loss = (ls * (ls - lt).detach()).sum(-1)
    else:
        kl = (p * (ls - lt)).sum(-1)
        if renormalize:
            lsn = ls - ls.logsumexp(-1, keepdim=True)
            ltn = lt - lt.logsumexp(-1, keepdim=True)
            loss = (lsn.exp() * (lsn - ltn)).sum(-1)
        else:
            loss = kl
    return loss, kl.detach(), p.sum(-1).detach(), lt.exp().sum(-1)


def _token_terms(logits, support, teacher_lp, temperature, renormalize, sampled):
    """Per-position loss and metrics for N positions: logits [N, V], support/teacher_lp [N, k]."""
    ls = torch.log_softmax(_upcast(logits) / temperature, dim=-1).gather(-1, support)
    return _support_terms(ls, teacher_lp, renormalize, sampled)


def _token_weights(mask, aggregation, num_units, dtype):
    """w [N] over the unmasked positions (row-major) such that the loss is sum(w * per-token loss)."""
    n = int(mask.sum())
    if aggregation == "token_mean":
        denom = n if num_units is None else num_units
        return torch.full((n,), 1.0 / max(float(denom), 1.0), dtype=dtype, device=mask.device)
    if aggregation == "sequence_mean":
        lengths = mask.sum(1)
        denom = int((lengths > 0).sum()) if num_units is None else num_units
        return (1.0 / (lengths[mask.nonzero()[:, 0]].to(dtype) * max(float(denom), 1.0)))
    raise ValueError(f"aggregation {aggregation!r} is not one of {', '.join(AGGREGATIONS)}")


def _finish(loss, kl, smass, tmass, n) -> KLOutput:
    mean = lambda x: x.sum() / max(n, 1)  # noqa: E731
    return KLOutput(loss, mean(kl), mean(smass), mean(tmass), n)


def _from_logits(student_logits, support, teacher_lp, mask, temperature, renormalize,
                 aggregation, num_units, sampled) -> KLOutput:
    mask = mask.bool()
    loss, kl, smass, tmass = _token_terms(student_logits[mask], support[mask].long(), teacher_lp[mask],
                                          temperature, renormalize, sampled)
    w = _token_weights(mask, aggregation, num_units, loss.dtype)
    return _finish((loss * w).sum(), kl, smass, tmass, int(mask.sum()))


def _chunk_logprobs(rows, weight, support, temperature):
    """(ls [n, k], exp(z - max) [n, V], its row sums [n, 1]) for z = rows @ weight.T / temperature.

    The [n, V] block is the only large buffer: logits, then (in place) unnormalised probabilities.
    """
    z = _upcast(rows @ weight.t()).div_(temperature)
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


class _HeadKL(torch.autograd.Function):
    """sum(w * per-token loss) from hidden rows [N, H] and the output head [V, H], chunk by chunk.

    The gradient is computed in the forward pass (the upstream gradient of a scalar only scales it),
    so no chunk's logits are recomputed and the head weight is only read while the caller holds it
    (under ZeRO-3 it is gathered for the forward only). Per chunk, with g = d loss / d ls on the
    small support tensor: d loss / d z = (scatter(g) - softmax(z) * sum(g)) / T, written into the
    [n, V] block in place.
    """

    @staticmethod
    def forward(ctx, rows, weight, support, teacher_lp, w, temperature, renormalize, sampled, chunk):
        need_rows, need_weight = ctx.needs_input_grad[:2]
        acc = _upcast(weight).dtype
        grad_rows = torch.zeros_like(rows) if need_rows else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        loss = torch.zeros((), dtype=acc, device=rows.device)
        kl, smass, tmass = [], [], []
        for i in range(0, rows.shape[0], chunk):
            part, metrics = _HeadKL._chunk(rows[i:i + chunk], weight, support[i:i + chunk], teacher_lp[i:i + chunk],
                                           w[i:i + chunk], temperature, renormalize, sampled,
                                           None if grad_rows is None else grad_rows[i:i + chunk], grad_weight)
            loss += part
            for out, value in zip((kl, smass, tmass), metrics):
                out.append(value)
        # Intermediates, not inputs or outputs: kept on ctx (allowed) so backward can scale them in place.
        ctx.grads, ctx.weight_dtype = (grad_rows, grad_weight), weight.dtype
        kl, smass, tmass = torch.cat(kl), torch.cat(smass), torch.cat(tmass)
        ctx.mark_non_differentiable(kl, smass, tmass)
        return loss, kl, smass, tmass

    @staticmethod
    def _chunk(r, weight, s, lt, w, temperature, renormalize, sampled, grad_rows, grad_weight):
        """Loss and metrics of one chunk; adds its gradients into grad_rows / grad_weight. A function
        of its own so the [n, V] block is freed on return, before the next chunk allocates its own."""
        ls, probs, total = _chunk_logprobs(r, weight, s, temperature)
        need_grad = grad_rows is not None or grad_weight is not None
        with torch.enable_grad():
            ls.requires_grad_(need_grad)
            terms = _support_terms(ls, lt, renormalize, sampled)
            part = (terms[0] * w).sum()
            g = torch.autograd.grad(part, ls)[0] if need_grad else None
        metrics = [t.detach() for t in terms[1:]]
        if g is not None:
            dz = probs.div_(total).mul_(-g.sum(-1, keepdim=True)).scatter_add_(-1, s, g).div_(temperature)
            if grad_rows is not None:
                grad_rows.copy_(dz.to(weight.dtype) @ weight)
            if grad_weight is not None:
                grad_weight.addmm_(dz.t(), r.to(grad_weight.dtype))
        return part.detach(), metrics

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if ctx.grads is None:
            raise RuntimeError("_HeadKL computes its gradients once: backward through it cannot run twice")
        (grad_rows, grad_weight), ctx.grads = ctx.grads, None
        # Scaled in place: a second head-sized buffer would add V x H floats to the peak.
        if grad_rows is not None:
            grad_rows = grad_rows.mul_(grad_loss.to(grad_rows.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_rows, grad_weight, None, None, None, None, None, None, None


def _from_hidden(hidden, lm_head, support, teacher_lp, mask, temperature, renormalize,
                 aggregation, num_units, chunk_tokens, sampled) -> KLOutput:
    mask = mask.bool()
    rows, sup, lt = hidden[mask], support[mask].long(), teacher_lp[mask]
    n = rows.shape[0]
    if n == 0:  # nothing to learn from; keep the graph so backward still runs
        zero = hidden.sum() * 0.0
        return KLOutput(zero, zero.detach(), zero.detach(), zero.detach(), 0)
    if callable(lm_head):  # a module as the head: chunks under checkpoint (recomputed in backward)
        def fn(h, s, t):
            return _token_terms(lm_head(h), s, t, temperature, renormalize, sampled)

        parts = []
        for i in range(0, n, chunk_tokens):
            args = (rows[i:i + chunk_tokens], sup[i:i + chunk_tokens], lt[i:i + chunk_tokens])
            parts.append(checkpoint(fn, *args, use_reentrant=False) if torch.is_grad_enabled() else fn(*args))
        loss, kl, smass, tmass = (torch.cat(x) for x in zip(*parts))
        return _finish((loss * _token_weights(mask, aggregation, num_units, loss.dtype)).sum(), kl, smass, tmass, n)
    w = _token_weights(mask, aggregation, num_units, _upcast(rows).dtype)
    loss, kl, smass, tmass = _HeadKL.apply(rows, lm_head, sup, lt, w, temperature, renormalize, sampled,
                                           chunk_tokens)
    return _finish(loss, kl, smass, tmass, n)


Head = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def topk_reverse_kl(student_logits: torch.Tensor, support_ids: torch.Tensor,
                    teacher_logprobs: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                    renormalize: bool = False, aggregation: str = "token_mean",
                    num_units: Optional[float] = None) -> KLOutput:
    """Top-k reverse KL from logits [B, T, V]; support_ids / teacher_logprobs [B, T, k]."""
    return _from_logits(student_logits, support_ids, teacher_logprobs, mask, temperature,
                        renormalize, aggregation, num_units, sampled=False)


def topk_reverse_kl_from_hidden(hidden: torch.Tensor, lm_head_weight: Head, support_ids: torch.Tensor,
                                teacher_logprobs: torch.Tensor, mask: torch.Tensor,
                                temperature: float = 1.0, renormalize: bool = False,
                                aggregation: str = "token_mean", chunk_tokens: int = 1024,
                                num_units: Optional[float] = None) -> KLOutput:
    """`topk_reverse_kl` on logits = hidden [B, T, H] @ lm_head_weight [V, H].T, chunk by chunk.

    `lm_head_weight` may also be a callable (the output-head module) mapping [n, H] -> [n, V].
    """
    return _from_hidden(hidden, lm_head_weight, support_ids, teacher_logprobs, mask, temperature,
                        renormalize, aggregation, num_units, chunk_tokens, sampled=False)


def sampled_reverse_kl(student_logits: torch.Tensor, token_ids: torch.Tensor,
                       teacher_token_logprobs: torch.Tensor, mask: torch.Tensor,
                       temperature: float = 1.0, aggregation: str = "token_mean",
                       num_units: Optional[float] = None) -> KLOutput:
    """Sampled-token estimator: loss_t = ls_y * stopgrad(ls_y - lt_y) for the sampled token y.

    token_ids / teacher_token_logprobs [B, T]. Metrics: reverse_kl is the mean of ls_y - lt_y (an
    unbiased estimate of the KL); the masses are the probabilities of the sampled tokens.
    """
    return _from_logits(student_logits, token_ids[..., None], teacher_token_logprobs[..., None], mask,
                        temperature, False, aggregation, num_units, sampled=True)


def sampled_reverse_kl_from_hidden(hidden: torch.Tensor, lm_head_weight: Head, token_ids: torch.Tensor,
                                   teacher_token_logprobs: torch.Tensor, mask: torch.Tensor,
                                   temperature: float = 1.0, aggregation: str = "token_mean",
                                   chunk_tokens: int = 1024,
                                   num_units: Optional[float] = None) -> KLOutput:
    """`sampled_reverse_kl` from hidden states, chunked like `topk_reverse_kl_from_hidden`."""
    return _from_hidden(hidden, lm_head_weight, token_ids[..., None], teacher_token_logprobs[..., None],
                        mask, temperature, False, aggregation, num_units, chunk_tokens, sampled=True)


def full_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    temperature: float = 1.0, aggregation: str = "token_mean",
                    num_units: Optional[float] = None) -> torch.Tensor:
    """Exact KL(student || teacher) over the whole vocabulary; both logits [B, T, V] are divided by
    `temperature`; the teacher gets no gradient."""
    mask = mask.bool()
    ls = torch.log_softmax(_upcast(student_logits[mask]) / temperature, dim=-1)
    lt = torch.log_softmax(_upcast(teacher_logits[mask].detach()) / temperature, dim=-1)
    per_token = (ls.exp() * (ls - lt)).sum(-1)
    return (per_token * _token_weights(mask, aggregation, num_units, per_token.dtype)).sum()
