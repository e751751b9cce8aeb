"""Faults a long run meets: a rollout worker killed mid-collection, a game that throws."""

import os
import signal
import threading
import time
from pathlib import Path


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


def kill_when_in(pid: int, method: str, timeout_s: float = 300) -> None:
    """SIGKILL `pid` the moment it runs `method`. Ray titles an actor's process
    ray::<class>.<method> while a call runs (ray::<class> between calls), so the call in progress,
    here a shard of games, is cut off however fast the machine is."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            return  # gone already
        if title.endswith(f".{method}"):
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.01)


def test_killed_worker_games_are_replayed_elsewhere_exactly_once(ray_cluster, tiny_model):
    from oel_ray.rollout import RolloutGroup

    group = RolloutGroup(ModelConfig(path=tiny_model, build=None, max_model_len=2048), num_workers=2, seed=0,
                         max_logprobs=1, kv_cache_gib=1, gpu_memory_utilization=0.5, num_cpus=0.5, num_gpus=0)
    victim = ray_cluster.get(group.workers[1].pid.remote())
    specs = train_specs(SOKOBAN, 0, GAMES)
    sampling = Sampling(max_tokens=64, temperature=1.0, top_p=1.0, top_k=-1, seed=3)
    # As soon as the victim starts its shard: it dies mid-collection, its games unfinished.
    killer = threading.Thread(target=kill_when_in, args=(victim, "play"))
    killer.start()
    trajectories = group.play(specs, sampling, 5, round=1)
    killer.join()
    assert group.lost == 1 and len(group.workers) == 1  # the kill landed while the victim was playing
    assert len(trajectories) == GAMES
    assert [t.seed for t in trajectories] == [s.seed for s in specs]  # none lost, none duplicated
    # the replayed games are the same games: per-game seeds travel with them
    again = group.play(specs, sampling, 5, round=1)
    assert [[u.response for u in t.turns] for t in again] == [[u.response for u in t.turns] for t in trajectories]


def test_what_stops_a_run_in_one_line_and_what_keeps_its_traceback():
    """main reports operational failures (a role died, a wait timed out), also when wrapped, as one
    line with exit code 1; anything else is a bug and keeps its traceback (stop_reason: None)."""
    from ray.exceptions import ActorDiedError, GetTimeoutError

    from oel_ray.main import stop_reason

    def raised(err, cause=None):
        try:
            raise err from cause
        except Exception as caught:
            return caught

    all_dead = raised(RuntimeError("every rollout worker has died; the run stops here"), ActorDiedError())
    assert stop_reason(ActorDiedError()) == "a role died (ActorDiedError)"
    assert stop_reason(all_dead) == "every rollout worker has died; the run stops here (a role died)"
    assert stop_reason(TimeoutError("weight sync (nccl): could not send within 60 s\n(details)")) == \
        "weight sync (nccl): could not send within 60 s"
    assert stop_reason(GetTimeoutError("Get timed out")) == "Get timed out"
    assert stop_reason(ValueError("a bug")) is None and stop_reason(raised(KeyError("k"), ValueError())) is None
