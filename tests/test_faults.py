"""Faults a long run meets: a rollout worker killed mid-collection, mid-extraction or around a
collective weight sync, a game that throws."""

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from oel_ray.config import EnvConfig, LearnerConfig, ModelConfig
from oel_ray.games import Game, train_specs
from oel_ray.types import GameSpec, Sampling

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


@contextlib.contextmanager
def kill_when_in(pid: int, method: str, nth: int = 1, timeout_s: float = 300):
    """SIGKILL `pid` the moment it runs `method` for the `nth` time seen, while the block runs; yields
    a list that holds the kill once it landed. Ray titles an actor's process ray::<class>.<method>
    while a call runs (ray::<class> between calls), so the call in progress is cut off however fast
    the machine is, if the title is read often enough: every millisecond (at 5 ms, an AMD EPYC's
    extraction calls all came and went unseen)."""
    landed, stop = [], threading.Event()

    def watch() -> None:
        deadline, seen, inside = time.time() + timeout_s, 0, False
        while not stop.is_set() and time.time() < deadline:
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            except OSError:
                return  # gone already
            now_inside = title.endswith(f".{method}")
            seen += now_inside and not inside
            inside = now_inside
            if inside and seen >= nth:
                os.kill(pid, signal.SIGKILL)
                landed.append(pid)
                return
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield landed
    finally:  # the block is over: a kill that has not landed by now never will
        stop.set()
        watcher.join()


def test_killed_worker_games_are_replayed_elsewhere_exactly_once(ray_cluster, tiny_model):
    from oel_ray.rollout import RolloutGroup

    group = RolloutGroup(ModelConfig(path=tiny_model, build=None, max_model_len=2048), num_workers=2, seed=0,
                         max_logprobs=1, kv_cache_gib=1, gpu_memory_utilization=0.5, num_cpus=0.5, num_gpus=0)
    victim = ray_cluster.get(group.workers[1].pid.remote())
    specs = train_specs(SOKOBAN, 0, GAMES)
    sampling = Sampling(max_tokens=64, temperature=1.0, top_p=1.0, top_k=-1, seed=3)
    # As soon as the victim starts its shard: it dies mid-collection, its games unfinished.
    with kill_when_in(victim, "play") as landed:
        trajectories = group.play(specs, sampling, 5, round=1)
    assert landed and group.lost == 1 and len(group.workers) == 1  # the kill landed while the victim was playing
    assert len(trajectories) == GAMES
    assert [t.seed for t in trajectories] == [s.seed for s in specs]  # none lost, none duplicated
    # the replayed games are the same games: per-game seeds travel with them
    again = group.play(specs, sampling, 5, round=1)
    assert [[u.response for u in t.turns] for t in again] == [[u.response for u in t.turns] for t in trajectories]
    group.shutdown()  # its engines' memory back for the next tests


def test_killed_worker_chains_are_extracted_elsewhere_with_the_same_knowledge(ray_cluster, tiny_model):
    """Six chains on two workers; one worker is killed in its second extraction call (the chains'
    second accumulation step). Its chains go to the other worker with their seeds: every chain
    comes out once, with the knowledge of an undisturbed run."""
    from oel_ray.config import ExtractorConfig
    from oel_ray.extractor import Extractor, chain_orders
    from oel_ray.rollout import RolloutGroup
    from oel_ray.types import Trajectory, Turn

    group = RolloutGroup(ModelConfig(path=tiny_model, build=None), num_workers=2, seed=0, max_logprobs=1,
                         kv_cache_gib=0.25, gpu_memory_utilization=0.5, num_cpus=0.5, num_gpus=0)
    trajectories = [Trajectory("Sokoban-v0", seed, "train", 1, 0,
                               [Turn(f"board {seed}", "I go [up]", 4, "up", "moved")], "loss", 0.0, "done")
                    for seed in range(8)]
    cfg = ExtractorConfig(format="unstructured", k=4, num_chains=6, max_knowledge_tokens=64, max_response_tokens=24,
                          prompt="{trajectory}\nLessons:")
    undisturbed = Extractor(cfg, tiny_model, group.workers, thinking=False, seed=5).run(trajectories)
    extractor = Extractor(cfg, tiny_model, group.workers, thinking=False, seed=5)
    victim = ray_cluster.get(group.workers[1].pid.remote())
    with kill_when_in(victim, "generate", nth=2) as landed:
        chains = extractor.run(trajectories)
    assert landed and len(extractor.engines) == 1  # the kill landed while the victim extracted
    assert [[s.text for s in c] for c in chains] == [[s.text for s in c] for c in undisturbed]
    assert [[s.chain for s in c] for c in chains] == [[c] * (cfg.k + 1) for c in range(cfg.num_chains)]
    orders = chain_orders(trajectories, cfg.k, cfg.num_chains, 5, round=1)
    assert [c[-1].trajectory_seeds for c in chains] == [[t.seed for t in order] for order in orders]
    assert all(c[-1].text for c in chains)
    group.shutdown()


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


# ----------------------------------------------------------------------------- collective weight sync

FIXED = list(range(3, 60))  # a token sequence whose log-probs tell the weights apart


@pytest.fixture(scope="module")
def sync_roles(ray_cluster, tiny_model, tmp_path_factory):
    """Three rollout workers at the tiny model and a learner at a perturbed copy of it, so that a
    sync visibly moves the workers (a reset puts them back to the tiny model)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from oel_ray.learner import LearnerGroup
    from oel_ray.rollout import RolloutGroup

    perturbed = tmp_path_factory.mktemp("perturbed") / "model"
    shutil.copytree(tiny_model, perturbed)
    original = load_file(f"{tiny_model}/model.safetensors")
    noise = torch.Generator().manual_seed(0)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=noise) for k, v in original.items()},
              str(perturbed / "model.safetensors"), metadata={"format": "pt"})
    workers = RolloutGroup(ModelConfig(path=tiny_model, build=None), num_workers=3, seed=0, max_logprobs=1,
                           kv_cache_gib=0.25, gpu_memory_utilization=0.5, num_cpus=0.5, num_gpus=0)
    learner = LearnerGroup(LearnerConfig(batch_size=4, zero_stage=2, dtype="float32"), str(perturbed), num_cpus=0.5)
    yield workers, learner, ray_cluster.put(original)
    for role in (learner, workers):
        role.shutdown()


def engine_logprobs(ray, workers) -> list:
    return ray.get([w.prompt_logprobs.remote(FIXED) for w in workers.workers])


def test_a_dead_worker_leaves_the_collective_sync_group_without_a_timeout(ray_cluster, sync_roles):
    """gloo runs the nccl transport's code. A worker killed between two syncs, then one killed in
    the middle of a sync: each next sync finishes in seconds (the group's timeout is 600 s) and the
    surviving worker holds the learner's weights."""
    from oel_ray.weight_sync import make_weight_sync

    ray = ray_cluster
    workers, learner, original = sync_roles
    target = learner.sequence_logprobs(FIXED)
    sync = make_weight_sync("gloo", learner, workers, use_gpu=False, bucket_mb=1 / 64, timeout_s=600)
    sync.sync(version=1)
    for got in engine_logprobs(ray, workers):
        np.testing.assert_allclose(got, target, atol=1e-4)

    def reset_and_time_a_sync(version: int, kill) -> float:
        workers.load_weights(original, version=0)  # the survivors back at the tiny model
        assert all(np.abs(got - target).max() > 0.05 for got in engine_logprobs(ray, workers))
        started = time.perf_counter()
        kill()
        sync.sync(version=version)
        return time.perf_counter() - started

    between = ray.get(workers.workers[2].pid.remote())
    seconds = reset_and_time_a_sync(2, lambda: os.kill(between, signal.SIGKILL))
    assert workers.lost == 1 and len(sync.members) == 2 and seconds < 60, seconds
    for got in engine_logprobs(ray, workers):
        np.testing.assert_allclose(got, target, atol=1e-4)

    during = ray.get(workers.workers[1].pid.remote())
    with kill_when_in(during, "receive_weights", timeout_s=120) as landed:
        seconds_during = reset_and_time_a_sync(3, lambda: None)
    assert landed and workers.lost == 2 and len(sync.members) == 1 and seconds_during < 60, seconds_during
    np.testing.assert_allclose(engine_logprobs(ray, workers)[0], target, atol=1e-4)
    print(f"sync after a kill between syncs: {seconds:.2f} s; with a kill during the sync: {seconds_during:.2f} s")
    sync.close()
