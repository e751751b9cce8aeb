"""The learner's batches: a micro-batch of distillation samples as tensors, in length buckets.

Right-padded prompt + reply blocks, the index of the hidden state that predicts each reply token,
the reply mask, and for the support losses the support ids and the teacher's log-probs on them.
Samples go through the model in buckets of similar length (`length_buckets`), one forward pass
each, so little compute goes to padding; the loss is the same sum over the same reply tokens. The
start every prompt of a bucket shares (the chat header and the game's intro: a third of a step's
prompt tokens at the `tiny` and organism shapes) runs once per bucket (`shared_starts`).
"""

from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch

from oel_ray.prefix_cache import MIN_SHARED_TOKENS, common_length, expand_cache
from oel_ray.types import DistillSample

# What one more forward pass costs, in padded tokens, when `length_buckets` weighs it against padding.
BUCKET_OVERHEAD_TOKENS = 128


def length_buckets(lengths: list[int], overhead_tokens: int = BUCKET_OVERHEAD_TOKENS,
                   count: Optional[int] = None) -> list[list[int]]:
    """Indices of `lengths` grouped into buckets of similar length, longest first, so that one
    forward pass per bucket computes on as little padding as is worth a pass: the split minimises
    the padded tokens (bucket size x its longest) plus `overhead_tokens` per bucket, exactly, by
    dynamic programming over the sorted lengths. `count` (1..len(lengths)): exactly that many
    buckets, with the least padding. The loss is a sum over response tokens, so the buckets change
    which padding is computed, never the result (up to float rounding)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    if count is not None and not 1 <= count <= n:
        raise ValueError(f"count={count}: need 1 <= count <= {n} (the number of lengths)")
    # cost[j]: the least cost of the first j sorted lengths (with count: in exactly b buckets, layer
    # by layer); cuts[b][j]: where that split's last bucket starts.
    cost, cuts = [0.0] + [math.inf] * n, []
    for _ in range(count or 1):
        new, cut = [math.inf] * (n + 1), [0] * (n + 1)
        if count is None:
            new[0] = 0.0
        for j in range(1, n + 1):
            for i in range(j):  # the last bucket is order[i:j]; its longest is order[i]
                prev = new[i] if count is None else cost[i]
                c = prev + (j - i) * lengths[order[i]] + overhead_tokens
                if c < new[j]:
                    new[j], cut[j] = c, i
        cost = new
        cuts.append(cut)
    buckets, j = [], n
    for cut in reversed(cuts) if count else itertools.repeat(cuts[0]):
        if not j:
            break
        buckets.append(order[cut[j]:j])
        j = cut[j]
    return buckets[::-1]


def plan_step(lengths: list[int], world: int, grad_accum: int,
              overhead_tokens: int = BUCKET_OVERHEAD_TOKENS) -> list[list[list[list[int]]]]:
    """Every forward pass of one optimizer step, on every rank: plan[rank][m] is the micro-batch m
    of `rank` as length buckets of sample indices, one forward pass each. Rank r trains on samples
    r::world, split into `grad_accum` micro-batches.

    Under ZeRO-3 each forward pass all-gathers the layers, so the ranks must run the same number of
    passes whatever their data (otherwise gloo aborts with a collective mismatch and NCCL hangs).
    So in micro-batch m every rank gets as many buckets as the rank that wants the most: a rank
    that wants fewer splits its samples into that many (at the least padding), and one with fewer
    samples than that gets empty buckets, placeholder passes that add nothing to the loss. Every
    rank evaluates this on the same lengths and gets the same plan."""
    shards = [np.array_split(np.arange(r, len(lengths), world), grad_accum) for r in range(world)]
    plan: list[list[list[list[int]]]] = [[] for _ in range(world)]
    for m in range(grad_accum):
        parts = [shards[r][m].tolist() for r in range(world)]
        wanted = [length_buckets([lengths[i] for i in part], overhead_tokens) for part in parts]
        count = max(map(len, wanted))
        for r, (part, own) in enumerate(zip(parts, wanted)):
            if len(own) < count and part:
                own = length_buckets([lengths[i] for i in part], overhead_tokens, min(count, len(part)))
            plan[r].append([[part[i] for i in bucket] for bucket in own] + [[] for _ in range(count - len(own))])
    return plan


def shared_starts(plan: list[list[list[list[int]]]], prompts: list[list[int]],
                  min_tokens: int = MIN_SHARED_TOKENS) -> list[list[list[int]]]:
    """Per rank, micro-batch and bucket of `plan` (`plan_step`): how many first tokens every prompt
    of the bucket shares, never a prompt's last one (its hidden state predicts the first reply
    token). Those run once for the bucket (`response_hidden`), which costs one more forward pass:
    so where any rank's bucket at that place shares fewer than `min_tokens` (an empty one shares
    none), every rank's gets 0 there, and every rank runs the same passes (ZeRO-3 gathers in each)."""
    def shared(bucket: list[int]) -> int:
        if not bucket:
            return 0
        first = prompts[bucket[0]]
        return min(min(common_length(first, prompts[i]) for i in bucket), min(len(prompts[i]) for i in bucket) - 1)

    starts = [[[shared(bucket) for bucket in micro] for micro in rank] for rank in plan]
    for m, micro in enumerate(plan[0]):
        for b in range(len(micro)):
            if any(rank[m][b] < min_tokens for rank in starts):
                for rank in starts:
                    rank[m][b] = 0
    return starts


def targets(sample: DistillSample, logprobs: np.ndarray, sampled: bool):
    """(ids [R, k] int64, teacher log-probs [R, k] float32) for one sample of R response tokens.

    topk_reverse_kl: the student's support ids and the teacher's log-probs on them (topk_forward_kl:
    the teacher's own top-k ids on its own reply, and its log-probs on them). sampled_reverse_kl:
    the sampled tokens and the teacher's log-prob of each ([R] or [R, 1], as the teacher server
    returns with sampled_only=True).
    """
    r, lp = len(sample.response_ids), np.asarray(logprobs, dtype=np.float32)
    if sampled:
        ids, lp = np.asarray(sample.response_ids, dtype=np.int64)[:, None], lp.reshape(-1, 1)
    elif sample.support_ids is None:
        raise ValueError("the top-k losses need DistillSample.support_ids (the sampling model's top-k ids)")
    else:
        ids = np.asarray(sample.support_ids, dtype=np.int64)
    if ids.shape != lp.shape or ids.shape[0] != r:
        raise ValueError(f"ids {ids.shape} and teacher logprobs {lp.shape} must both be "
                         f"[len(response_ids)={r}, k]")
    return ids, lp


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int, width: Optional[int] = None):
    """Right-padded prompt + response ids [B, L], and per response position j the index of the
    hidden state that predicts response token j (len(prompt) - 1 + j) [B, R]; R = `width` or the
    longest response."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every sample needs a non-empty prompt")
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    L, R = max(map(len, seqs)), width or max(1, max(map(len, responses)))
    input_ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    gather_idx = torch.zeros(len(seqs), R, dtype=torch.long)
    for b, (p, seq) in enumerate(zip(prompts, seqs)):
        input_ids[b, :len(seq)] = torch.tensor(seq)
        gather_idx[b] = (len(p) - 1 + torch.arange(R)).clamp(max=L - 1)
    return input_ids, gather_idx


def response_hidden(model, input_ids: torch.Tensor, gather_idx: torch.Tensor, past=None, shared: int = 0) -> torch.Tensor:
    """A causal LM's last hidden states [B, R, H] at `gather_idx` [B, R] of right-padded
    `input_ids` [B, L] (as `pack` makes them): the positions that predict the response tokens.
    `past`: a key/value cache of tokens every row shares before `input_ids` (prefix_cache.py).
    `shared`: the first tokens of `input_ids`, the same in every row, run once on one row and their
    keys and values expanded to all (the gradients flow back through the expansion, summed over the
    rows): the same states and gradients as the plain pass, up to float rounding."""
    base = getattr(model, model.base_model_prefix)
    if shared and past is not None:
        raise ValueError("response_hidden: give `past` (a cached start) or `shared` (run the start here), not both")
    if shared:
        with checkpointing_paused(base):  # a pass that fills a cache: run again in the backward pass, it
            start = base(input_ids=input_ids[:1, :shared], use_cache=True).past_key_values  # would fill it twice
        past = expand_cache([(layer.keys, layer.values) for layer in start.layers], len(input_ids), model.config)
        input_ids, gather_idx = input_ids[:, shared:], gather_idx - shared
    # Right padding with a causal model: real positions never see padding, so no attention mask.
    # The start's cache is only read (prefix_cache.fixed_start_cache): no cache comes back.
    hidden = base(input_ids=input_ids, past_key_values=past, use_cache=False).last_hidden_state
    # hidden at position p predicts token p + 1: gather_idx[b, j] = len(prompt_b) - 1 + j
    return hidden.gather(1, gather_idx[..., None].expand(-1, -1, hidden.shape[-1]))


def enable_checkpointing(model) -> None:
    """Gradient checkpointing of every decoder layer (learner.gradient_checkpointing): its
    activations are dropped after the forward pass and computed again in the backward pass. The
    layers may keep reading a cache under it, because `response_hidden` gives them only caches that
    are read and never extended (transformers drops a cache there otherwise, shared starts with it)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # transformers checkpoints in training mode only (Qwen3 has no dropout to switch on)
    for layer in model.modules():
        if hasattr(layer, "_can_checkpoint_with_cache"):
            layer._can_checkpoint_with_cache = True


@contextmanager
def checkpointing_paused(model):
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    for layer in layers:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer in layers:
            layer.gradient_checkpointing = True


def collate(samples: list[DistillSample], targets: Optional[list[tuple]], bucket_sizes: list[int], pad_id: int,
            shared: Optional[list[int]] = None):
    """The engine's inputs for one micro-batch: the student's sequences (one block per length
    bucket: the samples come grouped, `bucket_sizes` long each, their first `shared` tokens run
    once: `shared_starts`), the response mask and, for the support losses, the support ids and
    teacher log-probs (`targets`)."""
    responses = [s.response_ids for s in samples]
    width = max(1, max(map(len, responses)))
    starts = np.cumsum([0, *bucket_sizes])
    blocks = [pack([s.student_prompt_ids for s in samples[a:b]], responses[a:b], pad_id, width)
              for a, b in zip(starts[:-1], starts[1:])]
    mask = torch.arange(width)[None, :] < torch.tensor([len(r) for r in responses])[:, None]
    batch = dict(input_ids=tuple(ids for ids, _ in blocks), gather_idx=tuple(idx for _, idx in blocks), mask=mask,
                 shared=tuple(shared or [0] * len(blocks)))
    if targets is not None:
        k = targets[0][0].shape[1]
        batch["support"] = torch.zeros(*mask.shape, k, dtype=torch.long)
        batch["teacher_lp"] = torch.zeros(*mask.shape, k, dtype=torch.float32)
        for b, (sup, lt) in enumerate(targets):
            # Copied, not shared: arrays from Ray's object store are read-only, which torch.from_numpy warns about.
            batch["support"][b, :len(sup)], batch["teacher_lp"][b, :len(lt)] = torch.tensor(sup), torch.tensor(lt)
    return batch


def to_device(x, device):
    if isinstance(x, tuple):
        return tuple(t.to(device) if torch.is_tensor(t) else t for t in x)
    return x.to(device)
