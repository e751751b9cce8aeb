"""Faults a long run meets: a rollout worker killed mid-collection, a game that throws."""

import os
import signal
import threading

import pytest

from oel_ray.config import EnvConfig, ModelConfig
from oel_ray.engine import Sampling
from oel_ray.games import Game, train_specs
from oel_ray.types import GameSpec

SOKOBAN = EnvConfig(id="Sokoban-v0", kwargs={"dim_room": [6, 6], "num_boxes": 1}, eval_maps=4)
GAMES = 60


def test_a_game_that_raises_ends_as_error_and_the_round_goes_on():
    game = Game(GameSpec(SOKOBAN.id, 1, "train", SOKOBAN.kwargs), 5)
    game.step("[up]", 1)

    def broken(action):  # what a bug inside a TextArena env looks like to us
        raise KeyError("player_position")

    game._base.step = broken
    assert game.step("[down]", 1) is True
    traj = game.trajectory(0, 0)
    assert (traj.outcome, traj.reward, len(traj.turns)) == ("error", 0.0, 2)
    assert "KeyError" in traj.reason and not traj.passed


def test_killed_worker_games_are_replayed_elsewhere_exactly_once(ray_cluster, tiny_model):
    from oel_ray.rollout import RolloutGroup

    group = RolloutGroup(ModelConfig(path=tiny_model, build=None, max_model_len=2048), num_workers=2, seed=0,
                         max_logprobs=1, kv_cache_gib=1, gpu_memory_utilization=0.5, num_cpus=0.5, num_gpus=0)
    victim = ray_cluster.get(group.workers[1].pid.remote())
    specs = train_specs(SOKOBAN, 0, GAMES)
    sampling = Sampling(max_tokens=64, temperature=1.0, top_p=1.0, top_k=-1, seed=3)
    # Shortly after the shards go out: the victim is mid-collection, its shard unfinished.
    killer = threading.Timer(1.0, os.kill, (victim, signal.SIGKILL))
    killer.start()
    trajectories = group.play(specs, sampling, 5, round=1)
    killer.join()
    assert group.lost == 1 and len(group.workers) == 1
    assert len(trajectories) == GAMES
    assert [t.seed for t in trajectories] == [s.seed for s in specs]  # none lost, none duplicated
    # the replayed games are the same games: per-game seeds travel with them
    again = group.play(specs, sampling, 5, round=1)
    assert [[u.response for u in t.turns] for t in again] == [[u.response for u in t.turns] for t in trajectories]
