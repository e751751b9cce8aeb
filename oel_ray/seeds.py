"""Every seed oel_ray derives, each named for what it seeds. A leaf: it imports nothing of oel_ray.

A run has one `seed` (and `rollout.seed`, `learner.seed`, `ood.seed` for their roles); everything
random below is a function of those and of where it happens (round, step, chain, map, turn), never
of what ran before it, so a run resumed at any stage draws exactly what an uninterrupted one does.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Iterable

import numpy as np

# Map seeds. Training maps of round r, stream s start at
#   env.train_seed_offset + r * ROUND_SEED_STRIDE + s * STREAM_SEED_STRIDE;
# held-out maps from env.eval_seed_offset, which the config keeps far above them.
ROUND_SEED_STRIDE = 100_000
STREAM_SEED_STRIDE = 10_000
EXTRACTION_STREAM, DEPLOY_STREAM = 0, 1  # the independent map streams within a round
# The embedded models' warm starts play boards from here: far from every round's training seeds.
WARM_MAP_SEED = 9_000_000
BUILD_SEED = 1234  # torch and shuffling seed of an embedded model's build


def mix(*values: int) -> int:
    """A well-spread 32-bit seed from integers (SeedSequence hashes them; equal inputs, equal seed)."""
    return int(np.random.SeedSequence([v & (2**64 - 1) for v in values]).generate_state(1)[0])


def train_map_start(train_seed_offset: int, round: int, stream: int) -> int:
    """The first map seed of a round's stream."""
    return int(train_seed_offset) + round * ROUND_SEED_STRIDE + stream * STREAM_SEED_STRIDE


def game_sampling_seeds(base: int, specs: Iterable) -> list[int]:
    """One sampling seed per game (GameSpec): the k-th occurrence of a map in the call gets its own
    stream. The knowledge is part of the key, so each knowledge text's games of a map sample with the
    same seeds as the plain ones."""
    seen: Counter = Counter()
    seeds = []
    for spec in specs:
        key = (spec.env_id, spec.seed, spec.knowledge.strip())  # GameSpec holds a dict: not hashable
        seeds.append(mix(base, spec.seed, seen[key]))
        seen[key] += 1
    return seeds


def turn_sampling_seed(game_seed: int, turn: int) -> int:
    """The sampling seed of one turn of a game."""
    return mix(game_seed, turn)


def chain_order_seed(seed: int, round: int, chain: int) -> int:
    """Which trajectories an extraction chain reads in a round, and in which order."""
    return mix(seed, round, chain)


def chain_sampling_seed(seed: int, round: int, chain: int, step: int) -> int:
    """The sampling seed of one chain's extraction at one accumulation step of one round."""
    return mix(seed, round, chain, step)


def shuffle_seed(seed: int, round: int, chain: int) -> int:
    """The word shuffle of a chain's knowledge (the shuffled-knowledge control)."""
    return mix(seed, round, chain)


def round_prefix_seed(seed: int, round: int) -> int:
    """The base seed of a round's draw of consolidation prefixes."""
    return seed + round


def step_prefix_seed(round_seed: int, step: int) -> int:
    """Which prefixes of its deploy games a consolidation step trains on."""
    return round_seed * 100_003 + step


def step_draw_seed(seed: int, step: int) -> int:
    """A consolidation step's knowledge draws and sampling seeds: a function of (seed, step) only,
    so a run resumed at any step makes the same choices as one never interrupted."""
    return seed * 1_000_003 + step


def worker_seed(rollout_seed: int, index: int) -> int:
    """The engine seed of rollout worker `index`."""
    return rollout_seed + index


def ifeval_prompt_seed(base: int, key) -> int:
    """The sampling seed of one IF-Eval prompt from (base seed, row key): independent of batching."""
    if isinstance(key, int):
        key_int = key & (2**64 - 1)
    else:
        key_int = int.from_bytes(hashlib.sha256(str(key).encode()).digest()[:8], "little")
    return int(np.random.SeedSequence([base & (2**64 - 1), key_int]).generate_state(1)[0])
