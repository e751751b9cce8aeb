"""The teacher's prompts encoded before their replies exist.

Within a consolidation step the teacher prompts are fixed before the workers sample: a prefix plus
its drawn knowledge text. So the teacher encodes them while the workers generate (`encode_prompts`)
and keeps their keys and values; once the replies are in, scoring runs only the reply tokens on top
(`reply_hidden`). The hidden state that predicts a reply's first token is the prompt's last one,
kept from the encoding. Both steps are the plain forward pass split in two: exact, up to float
rounding.

The encoded prompts of a batch are right-padded to its longest: when the replies follow, the
padding between a prompt's end and its reply is masked out and each reply token gets the position
it has in the unpadded sequence.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch

from oel_ray import batching
from oel_ray.prefix_cache import expand_cache, fixed_start_cache, start_parts


@dataclass
class EncodedPrompts:
    """One batch of teacher prompts, encoded: the shared start's keys/values (one row, or None),
    the rest's per layer [B, heads, longest rest, dim], and each prompt's last hidden state [B, H]."""

    prompts: list[tuple[int, ...]]
    skip: int  # tokens of the shared start
    start: Optional[list[tuple[torch.Tensor, torch.Tensor]]]
    rest: list[tuple[torch.Tensor, torch.Tensor]]
    rest_lengths: list[int]
    last_hidden: torch.Tensor


@dataclass
class Prefilled:
    """The batches of the last prefill, until they are scored."""

    batches: list[EncodedPrompts] = field(default_factory=list)
    encoded_tokens: int = 0

    def add(self, encoded: EncodedPrompts) -> None:
        self.batches.append(encoded)
        self.encoded_tokens += sum(encoded.rest_lengths)

    def take(self, prompts: list[list[int]]) -> tuple[list[tuple[EncodedPrompts, list[int]]], list[int]]:
        """(each encoded batch whose every prompt is among `prompts`, with the indices of `prompts`
        in its row order) and the indices left to score in full. A batch taken is dropped: its
        replies are scored once."""
        where: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(prompts):
            where.setdefault(tuple(p), []).append(i)
        taken, kept = [], []
        for encoded in self.batches:
            if all(len(where.get(p, ())) >= n for p, n in Counter(encoded.prompts).items()):
                taken.append((encoded, [where[p].pop(0) for p in encoded.prompts]))
            else:
                kept.append(encoded)
        self.batches = kept
        rest = sorted(i for left in where.values() for i in left)
        return taken, rest


@torch.no_grad()
def encode_prompts(model, prompts: list[list[int]], skip: int = 0,
                   start: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None) -> EncodedPrompts:
    """Run `prompts` (after their first `skip` tokens, whose keys/values `start` holds) through
    `model` and keep what their replies will need."""
    device = model.device
    rests = [p[skip:] for p in prompts]
    ids, last = batching.pack(rests, [[] for _ in rests], pad_id=0)
    base = getattr(model, model.base_model_prefix)
    if start:
        past = recording_cache()(start_parts(start, len(rests)), model.config)
        hidden = base(input_ids=ids.to(device), past_key_values=past, use_cache=True).last_hidden_state
        rest = past.new
    else:
        out = base(input_ids=ids.to(device), use_cache=True)
        hidden, rest = out.last_hidden_state, [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    last_hidden = hidden.gather(1, last.to(device)[..., None].expand(-1, -1, hidden.shape[-1]))[:, 0]
    return EncodedPrompts([tuple(p) for p in prompts], skip, start, rest, [len(r) for r in rests], last_hidden)


@torch.no_grad()
def reply_hidden(model, encoded: EncodedPrompts, replies: list[list[int]]) -> list[torch.Tensor]:
    """Per row of `encoded`, the hidden states [len(reply), H] that predict the reply's tokens: the
    prompt's last state, then the reply's own but its last."""
    device, n = model.device, len(replies)
    width = max(1, max(map(len, replies)))
    ids = torch.zeros(n, width, dtype=torch.long)
    for b, reply in enumerate(replies):
        ids[b, :len(reply)] = torch.tensor(reply, dtype=torch.long)
    longest = encoded.rest[0][0].shape[-2]
    lengths = torch.tensor(encoded.rest_lengths)
    # Keys: [shared start | rest, right-padded to `longest` | reply]; the padding is masked out.
    mask = torch.cat([torch.ones(n, encoded.skip, dtype=torch.long),
                      (torch.arange(longest)[None, :] < lengths[:, None]).long(),
                      torch.ones(n, width, dtype=torch.long)], 1)
    positions = encoded.skip + lengths[:, None] + torch.arange(width)[None, :]
    past = expand_cache(encoded.start, n, model.config, rest=encoded.rest)
    base = getattr(model, model.base_model_prefix)
    hidden = base(input_ids=ids.to(device), past_key_values=past, attention_mask=mask.to(device),
                  position_ids=positions.to(device), use_cache=False).last_hidden_state
    return [torch.cat([encoded.last_hidden[b:b + 1], hidden[b, :max(0, len(r) - 1)]])[:len(r)]
            for b, r in enumerate(replies)]


def kv_bytes_per_token(model) -> int:
    """Bytes of keys and values one token leaves in every layer."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * model.dtype.itemsize


@functools.cache
def recording_cache() -> type:
    """A fixed-start cache (prefix_cache.fixed_start_cache) that also keeps, in `new`, the keys and
    values a pass adds after the start (built on first use: transformers is imported then)."""

    class Recording(fixed_start_cache()):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.new: list[tuple[torch.Tensor, torch.Tensor]] = []

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            self.new.append((key_states, value_states))
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    return Recording
