"""Consolidation losses: reverse KL(student || teacher) per response token, pure torch.

Shapes: B sequences, T response positions, V vocabulary, H hidden size, k support size.
`mask` [B, T] (bool) marks real response tokens; padded positions contribute nothing.
Student logits are divided by `temperature` before the softmax; teacher log-probs arrive already
temperature-scaled (the teacher server scores at the rollout temperature).

All variants share one per-token function (`_token_terms`) and one aggregation (`_aggregate`).
The `*_from_hidden` variants never hold the fp32 [B, T, V] log-softmax: they project hidden states
to logits `chunk_tokens` positions at a time under `torch.utils.checkpoint`, so backward recomputes
each chunk and the peak extra memory is a few x chunk_tokens x V floats.

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


def _token_terms(logits, support, teacher_lp, temperature, renormalize, sampled):
    """Per-position loss and metrics for N positions: logits [N, V], support/teacher_lp [N, k]."""
    ls = torch.log_softmax(_upcast(logits) / temperature, dim=-1).gather(-1, support)
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


def _aggregate(values, mask, aggregation, num_units):
    """Mean of per-token `values` [N] (the unmasked positions of `mask` [B, T], row-major)."""
    if aggregation == "token_mean":
        denom = mask.sum() if num_units is None else num_units
        return values.sum() / max(float(denom), 1.0)
    if aggregation == "sequence_mean":
        lengths = mask.sum(1)
        row = mask.nonzero()[:, 0]
        denom = (lengths > 0).sum() if num_units is None else num_units
        return (values / lengths[row]).sum() / max(float(denom), 1.0)
    raise ValueError(f"aggregation {aggregation!r} is not one of {', '.join(AGGREGATIONS)}")


def _finish(terms, mask, aggregation, num_units) -> KLOutput:
    loss, kl, smass, tmass = terms
    n = int(mask.sum())
    mean = lambda x: x.sum() / max(n, 1)  # noqa: E731
    return KLOutput(_aggregate(loss, mask, aggregation, num_units), mean(kl), mean(smass), mean(tmass), n)


def _from_logits(student_logits, support, teacher_lp, mask, temperature, renormalize,
                 aggregation, num_units, sampled) -> KLOutput:
    mask = mask.bool()
    terms = _token_terms(student_logits[mask], support[mask].long(), teacher_lp[mask],
                         temperature, renormalize, sampled)
    return _finish(terms, mask, aggregation, num_units)


def _from_hidden(hidden, lm_head, support, teacher_lp, mask, temperature, renormalize,
                 aggregation, num_units, chunk_tokens, sampled) -> KLOutput:
    mask = mask.bool()
    head = lm_head if callable(lm_head) else (lambda h: h @ lm_head.t())
    rows, sup, lt = hidden[mask], support[mask].long(), teacher_lp[mask]
    if rows.shape[0] == 0:  # nothing to learn from; keep the graph so backward still runs
        zero = hidden.sum() * 0.0
        return KLOutput(zero, zero.detach(), zero.detach(), zero.detach(), 0)

    def chunk_terms(h, s, t):
        return _token_terms(head(h), s, t, temperature, renormalize, sampled)

    parts = []
    for i in range(0, rows.shape[0], chunk_tokens):
        args = (rows[i:i + chunk_tokens], sup[i:i + chunk_tokens], lt[i:i + chunk_tokens])
        if torch.is_grad_enabled():
            parts.append(checkpoint(chunk_terms, *args, use_reentrant=False))
        else:
            parts.append(chunk_terms(*args))
    terms = [torch.cat(x) for x in zip(*parts)]
    return _finish(terms, mask, aggregation, num_units)


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
    return _aggregate((ls.exp() * (ls - lt)).sum(-1), mask, aggregation, num_units)
