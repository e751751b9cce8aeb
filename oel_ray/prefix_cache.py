"""The teacher's knowledge prefixes, encoded once and reused.

Every teacher prompt that draws the same knowledge text starts with the same tokens (the chat
header, the game's intro line, the knowledge block: `prompts.teacher_messages`), and within a round
the teacher is frozen and the knowledge set fixed. So the key/value cache of such a shared start is
computed once and every sample that has it runs only its own remainder (situation + reply) on top.
That is exact: a causal model's states at the later positions depend on the earlier ones only
through their keys and values.

The teacher needs no telling where the knowledge ends: it groups a step's prompts by their common
starts (`shared_prefix_groups`). Entries live until the teacher's weights change
(`PrefixCache.clear`, called by `TeacherServer.load_weights` at every round start).
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch

# A shared start shorter than this (a chat header, an intro line) is not worth its own forward pass.
MIN_SHARED_TOKENS = 32


def common_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if len(differ) else n


def shared_prefix_groups(prompts: list[list[int]], min_tokens: int = MIN_SHARED_TOKENS) -> list[tuple[int, list[int]]]:
    """The prompts' indices in groups that share a first part: (its length, indices), length 0 for
    a prompt scored on its own. Sorted, prompts that share a start are adjacent; of the ways to cut
    that order into runs, the one that saves the most prefix tokens is taken (dynamic programming:
    a run of n sharing p tokens saves (n - 1) x p). A prefix never takes a prompt's last token,
    whose hidden state predicts the first reply token."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    n = len(order)
    adjacent = [common_length(prompts[order[i]], prompts[order[i + 1]]) for i in range(n - 1)]
    # Over order[:j]: the best saving, where its last run starts, and the tokens that run shares.
    saved, start, share = [0] * (n + 1), list(range(-1, n)), [0] * (n + 1)
    for j in range(1, n + 1):
        saved[j], start[j] = saved[j - 1], j - 1
        shared = len(prompts[order[j - 1]]) - 1
        for i in range(j - 2, -1, -1):  # the run order[i:j]
            shared = min(shared, adjacent[i], len(prompts[order[i]]) - 1)
            if shared < min_tokens:
                break  # only shrinks as the run grows
            if saved[i] + (j - i - 1) * shared > saved[j]:
                saved[j], start[j], share[j] = saved[i] + (j - i - 1) * shared, i, shared
    groups, j = [], n
    while j > 0:
        groups.append((share[j], sorted(order[start[j]:j])))
        j = start[j]
    return groups[::-1]


class PrefixCache:
    """Key/value caches of shared prompt starts for one frozen model, reused across steps: a group
    whose start extends a cached one by fewer than `MIN_SHARED_TOKENS` tokens reuses it."""

    def __init__(self, model):
        self.model = model
        self.entries: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.encoded_tokens = 0  # prefix tokens run through the model since the last clear

    def clear(self) -> None:
        self.entries.clear()
        self.encoded_tokens = 0

    @torch.no_grad()
    def lookup(self, prefix: list[int], device: torch.device) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """(length used, per-layer keys and values [1, heads, length, dim]) for `prefix`: a cached
        start of it covering all but fewer than MIN_SHARED_TOKENS of its tokens, else `prefix`
        encoded now and kept."""
        best: Optional[tuple[int, ...]] = None
        for key in self.entries:
            if len(prefix) - MIN_SHARED_TOKENS < len(key) <= len(prefix) and tuple(prefix[:len(key)]) == key:
                best = key if best is None or len(key) > len(best) else best
        if best is None:
            best = tuple(prefix)
            base = getattr(self.model, self.model.base_model_prefix)
            cache = base(input_ids=torch.tensor([prefix], device=device), use_cache=True).past_key_values
            self.entries[best] = [(layer.keys, layer.values) for layer in cache.layers]
            self.encoded_tokens += len(prefix)
        return len(best), self.entries[best]

    def expanded(self, kv: list[tuple[torch.Tensor, torch.Tensor]], batch: int):
        return expand_cache(kv, batch, self.model.config)


def expand_cache(kv: Optional[list[tuple[torch.Tensor, torch.Tensor]]], batch: int, config,
                 rest: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None):
    """A cache of a fixed start (`fixed_start_cache`) over `start_parts(kv, batch, rest)`."""
    return fixed_start_cache()(start_parts(kv, batch, rest), config)


def start_parts(kv: Optional[list[tuple[torch.Tensor, torch.Tensor]]], batch: int,
                rest: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None) -> list[list[tuple]]:
    """Per layer, the parts of a fixed start for `batch` rows: one row's keys and values `kv` seen by
    every row (views), then, if given, each row's own `rest` [batch, heads, n, dim]; at least one of
    the two. Nothing is copied here: a fixed-start cache joins a layer's parts only when the forward
    pass reaches that layer, so a batch never holds more than one layer's joined keys."""
    return [([(kv[i][0].expand(batch, -1, -1, -1), kv[i][1].expand(batch, -1, -1, -1))] if kv else [])
            + ([rest[i]] if rest else []) for i in range(len(kv or rest))]


@functools.cache
def fixed_start_cache() -> type:
    """A transformers cache of a fixed start that a forward pass reads and never extends (built on
    first use: transformers is imported then, not with this module)."""
    from transformers import DynamicCache

    class FixedStart(DynamicCache):
        """`update` returns the start (its parts joined) followed by the new keys and values and
        keeps nothing: the states are the plain cache's, and a pass can run twice on one cache with
        the same result, as a gradient-checkpointed layer runs again in the backward pass
        (learner.gradient_checkpointing). A cache that kept what it was given would hand that second
        run the first run's keys as well. Each layer's keys and values are a stand-in of the start's
        shape (no memory), from which transformers sizes its masks."""

        def __init__(self, parts: list[list[tuple[torch.Tensor, torch.Tensor]]], config):
            super().__init__(config=config)
            self.parts = parts
            for layer, layer_parts in zip(self.layers, parts):
                first = layer_parts[0][0]
                shape = (*first.shape[:2], sum(k.shape[-2] for k, _ in layer_parts), first.shape[-1])
                layer.lazy_initialization(first, first)
                layer.keys = layer.values = first.new_zeros(()).expand(shape)

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            parts = self.parts[layer_idx]
            return (torch.cat([*(k for k, _ in parts), key_states], -2),
                    torch.cat([*(v for _, v in parts), value_states], -2))

    return FixedStart
