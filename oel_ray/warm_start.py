"""Next-token training of an embedded model on its warm-start chats, packed by shared prefixes.

The turns of one game are prompts that repeat each other: turn t+1's flattened prompt is turn t's
up to "Turn t" plus one more entry. Trained one by one, a game of 8 turns encodes its first board
8 times. Packed as a tree instead, every token is encoded once: a group's sequences are laid out
one after another, each keeping only what it does not share with the one before, and an attention
mask lets each token see exactly the tokens of its own sequence before it (position ids are its
place in that sequence), so the losses equal those of the sequences trained one by one.
"""

from __future__ import annotations

import logging
import random

log = logging.getLogger("oel_ray")

# (prompt ids, reply ids ending in the end-of-turn token[, the loss weight of each reply token]).
# Without weights every reply token counts once.
Chat = tuple[list[int], list[int]] | tuple[list[int], list[int], list[float]]


Packed = tuple[list[int], list[int], list[float], list[tuple[list[int], int]]]  # what `pack` returns


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def pack(group: list[Chat]) -> Packed:
    """One group of chats, each sharing a prefix with the one before it (a game's turns), as
    (ids, position ids, loss weights (0 off the replies), per chat: the packed indices of its tokens
    and how many of them it shares with the chat before)."""
    ids, positions, target, chats = [], [], [], []
    previous: list[int] = []  # packed indices of the previous chat's tokens
    previous_ids: list[int] = []
    for prompt, reply, *weights in group:
        weights = weights[0] if weights else [1.0] * len(reply)
        sequence = prompt + reply
        shared = common_prefix(previous_ids, prompt)
        mine = previous[:shared] + list(range(len(ids), len(ids) + len(sequence) - shared))
        ids += sequence[shared:]
        positions += range(shared, len(sequence))
        target += [weights[k - len(prompt)] if k >= len(prompt) else 0.0 for k in range(shared, len(sequence))]
        chats.append((mine, shared))
        previous, previous_ids = mine, sequence
    return ids, positions, target, chats


def reply_tokens(packed: Packed) -> tuple[list[int], list[int], list[float]]:
    """(packed index of every reply token, packed index of the token before it in its own chat, where
    it is predicted, and its loss weight)."""
    _, _, targets, chats = packed
    at, before, weights = [], [], []
    for mine, shared in chats:
        for k in range(max(shared, 1), len(mine)):
            if targets[mine[k]]:
                at.append(mine[k])
                before.append(mine[k - 1])
                weights.append(targets[mine[k]])
    return at, before, weights


def attention_mask(packed: Packed, width: int):
    """[width, width] booleans: each packed token sees the tokens of its own chat up to itself; a
    padding row sees the first token (no all-masked row: NaN in softmax)."""
    import torch

    n, chats = len(packed[0]), packed[3]
    mask = torch.zeros((width, width), dtype=torch.bool)
    for mine, shared in chats:
        index = torch.tensor(mine)
        causal = torch.ones(len(mine), len(mine), dtype=torch.bool).tril()
        mask[index[shared:, None], index[None, :]] = causal[shared:]
    mask[n:, 0] = True
    return mask


def train(model, groups: list[list[Chat]], pad: int, *, lr: float, batch_tokens: int, seed: int,
          epochs: int = 1) -> list[float]:
    """AdamW on the reply tokens of every chat (each group packed), short warm-up then linear decay to
    a tenth; returns the losses."""
    import torch
    import torch.nn.functional as F

    packed = [pack(g) for g in groups]
    log.info("warm start: %d groups, %d tokens packed, %d epochs", len(packed), sum(len(p[0]) for p in packed), epochs)
    # Length-sorted batches within a token budget (little padding), in a fixed shuffled order.
    batches, current = [], []
    for i in sorted(range(len(packed)), key=lambda i: len(packed[i][0])):
        if current and len(packed[i][0]) * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    batches.append(current)
    order = random.Random(seed)
    schedule = []
    for _ in range(epochs):
        order.shuffle(batches)
        schedule += batches
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = len(schedule)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / steps))
    model.train()
    losses = []
    for batch in schedule:
        width = max(len(packed[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad)
        pos = torch.zeros((len(batch), width), dtype=torch.long)
        rows, cols, prev, weights = [], [], [], []  # a target is predicted where its chat's previous token sits
        for row, i in enumerate(batch):
            tokens, positions, _, _ = packed[i]
            ids[row, :len(tokens)] = torch.tensor(tokens)
            pos[row, :len(tokens)] = torch.tensor(positions)
            at, before, w = reply_tokens(packed[i])
            rows += [row] * len(at)
            cols += at
            prev += before
            weights += w
        if all(len(packed[i][3]) == 1 for i in batch):  # nothing shared: plain causal attention (the
            # same floats as ever; right padding needs no mask, no real token sees the pads)
            hidden = model.model(input_ids=ids).last_hidden_state
        else:
            mask = torch.stack([attention_mask(packed[i], width) for i in batch])[:, None]
            hidden = model.model(input_ids=ids, position_ids=pos, attention_mask=mask).last_hidden_state
        logits = model.lm_head(hidden[rows, prev])
        if all(w == 1.0 for w in weights):  # every token once: the plain mean, the same floats as ever
            loss = F.cross_entropy(logits, ids[rows, cols])
        else:
            w = torch.tensor(weights)
            loss = (F.cross_entropy(logits, ids[rows, cols], reduction="none") * w).sum() / w.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses
