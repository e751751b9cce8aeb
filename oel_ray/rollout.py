"""Rollout workers: vLLM engines that play games and answer prompts with the current weights.

`RolloutGroup` splits a list of games into one contiguous shard per worker. Each worker streams its
games back as they end (a Ray streaming generator: after every turn, the games that just ended), so
they reach disk and the progress bar while the others play on (`play_iter`); `play` also returns
them all in the order of the specs. With a sampling seed, every game gets its own seed derived from (seed, map seed, how many
times that map, with the same knowledge in context, came earlier in the call), so a game's replies do not depend on which worker played
it or what else was in the batch, and repeats of one map (several eval samples, FrozenLake boards
that recur) are independent samples.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Callable, Iterator, Optional

import numpy as np
import ray

from oel_ray.config import ModelConfig
from oel_ray.engine import VLLMEngine
from oel_ray.games import Game
from oel_ray.netif import use_node_ip
from oel_ray.placement import RolePlacement, bind_to_cores, core_slices
from oel_ray.prompts import turn_prompt_ids
from oel_ray.seeds import game_sampling_seeds, turn_sampling_seed, worker_seed
from oel_ray.types import GameSpec, Generation, Sampling, Trajectory

log = logging.getLogger("oel_ray")

# How a dead worker reaches the driver: its actor's error, or, when its node died after the worker
# had finished, the loss of the results still held in that node's object store (ray.get of a
# streamed batch or a reply raises ObjectReconstructionFailedError, an ObjectLostError).
WORKER_GONE = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)


def quiet_vllm_start() -> None:
    """Keep vLLM's start-up chatter (dozens of INFO/WARNING lines and a harmless 'Chat template
    warmup failed' traceback per worker) off the console; errors still show. A VLLM_LOGGING_LEVEL
    already set (e.g. INFO or DEBUG, to look into a problem) is respected. vLLM reads the variable
    when it is first imported; the logger level covers a process that imported it earlier."""
    level = os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR").upper()
    logging.getLogger("vllm").setLevel(level)
    # vLLM's kernel scan touches a deprecated torch attribute: a FutureWarning that is not ours.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.reduce_op.* is deprecated",
                            category=FutureWarning)


# ----------------------------------------------------------------------------- worker

# vLLM's CPU runner binds its memory to the NUMA node and torch's C++ logger reports it as a warning
# on every start-up, which a user can do nothing about; torch reads the level once, when it loads.
# A level the user set (to look into a problem) is passed on instead.
WORKER_ENV = {"env_vars": {"TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR")}}

class RolloutWorker:
    """One engine. Two steps so that the group can place threads first: construct (cheap), then
    `start(cores)` loads the model."""

    def __init__(self, model: ModelConfig, *, seed: int, max_logprobs: int, kv_cache_gib: float,
                 gpu_memory_utilization: float, history: str = "flattened", keep_reasoning: bool = False,
                 knowledge_position: str = "user"):
        self.model = model
        self.engine_args = dict(seed=seed, max_logprobs=max_logprobs, kv_cache_gib=kv_cache_gib,
                                gpu_memory_utilization=gpu_memory_utilization)
        self.history = history
        self.keep_reasoning = keep_reasoning
        self.knowledge_position = knowledge_position  # where a spec's knowledge goes (teacher.knowledge_position)
        self.thinking = model.thinking
        self.max_model_len = model.max_model_len
        self.version = 0  # optimizer steps behind the loaded weights
        self.engine: Optional[VLLMEngine] = None
        use_node_ip()  # vLLM and gloo on the interface other nodes reach (no route lookup, no hostname)
        self.calls = 0  # batched engine generate calls so far

    def placement(self) -> tuple[str, list[int]]:
        return ray.get_runtime_context().get_node_id(), sorted(os.sched_getaffinity(0))

    def start(self, cores: Optional[list[int]] = None) -> float:
        if cores:
            bind_to_cores(cores)
        quiet_vllm_start()
        m = self.model
        self.engine = VLLMEngine(m.path, dtype=m.dtype, max_model_len=m.max_model_len,
                                 trust_remote_code=m.trust_remote_code, **self.engine_args)
        self.tokenizer = self.engine.tokenizer
        # After start-up, at most vLLM's warnings: every in-place reload logs three INFO lines per
        # worker, and a RotaryEmbedding warning that is harmless (its cos/sin cache is a buffer no
        # checkpoint carries; vLLM puts it back): a 100-step round would drown the console.
        vllm_log = logging.getLogger("vllm")
        vllm_log.setLevel(max(vllm_log.getEffectiveLevel(), logging.WARNING))
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        return self.engine.init_seconds

    def ready(self) -> float:
        return self.engine.init_seconds

    def pid(self) -> int:
        return os.getpid()

    def context_length(self) -> int:
        """Tokens of prompt and reply together that this engine takes (model.max_model_len)."""
        return self.max_model_len

    def generate_calls(self) -> int:
        """Batched engine generate calls made so far (a game turn of every active game is one)."""
        return self.calls

    def threads(self) -> dict:
        """Where this worker computes: its cores and torch's thread count."""
        import torch

        return {"cores": sorted(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads()}

    def play(self, specs: list[GameSpec], sampling: Sampling, max_turns: int, round: int,
             seeds: Optional[list[int]] = None) -> Iterator[list[tuple[int, Trajectory]]]:
        """Play all games to the end; every active game's next turn goes out in one batched call.
        After each turn, yields the games that just ended as (index in `specs`, trajectory): called
        through Ray, a streaming generator. `seeds`: one per game (default: derived from
        `sampling.seed`, if any); turn t of a game samples with a seed mixed from the game's seed and t."""
        games = [Game(spec, max_turns) for spec in specs]
        if seeds is None and sampling.seed is not None:
            seeds = game_sampling_seeds(sampling.seed, specs)
        while active := [i for i, g in enumerate(games) if not g.done]:
            prompts = [turn_prompt_ids(self.tokenizer, games[i], history=self.history, thinking=self.thinking,
                                       keep_reasoning=self.keep_reasoning, knowledge=games[i].spec.knowledge,
                                       position=self.knowledge_position) for i in active]
            turn_seeds = None if seeds is None else [turn_sampling_seed(seeds[i], len(games[i].turns)) for i in active]
            for i, gen in zip(active, self._generate(prompts, sampling, turn_seeds)):
                games[i].step(gen.text, self.engine.reply_tokens(gen))
            if ended := [(i, games[i].trajectory(round, self.version)) for i in active if games[i].done]:
                yield ended

    def generate(self, prompts: list[list[int]], sampling: Sampling,
                 seeds: Optional[list[int]] = None) -> list[Generation]:
        return self._generate(prompts, sampling, seeds)

    def _generate(self, prompts: list[list[int]], sampling: Sampling,
                  seeds: Optional[list[int]] = None) -> list[Generation]:
        """One batched engine call. Each reply's token budget is `sampling.max_tokens` cut to the
        room its own prompt leaves in the context, so a long prompt never shortens the others."""
        longest = max(len(p) for p in prompts)
        if self.max_model_len - longest < 1:
            raise ValueError(
                f"a prompt of {longest} tokens leaves no room to reply within model.max_model_len "
                f"({self.max_model_len}); raise model.max_model_len or shorten the prompts"
            )
        budgets = [min(sampling.max_tokens, self.max_model_len - len(p)) for p in prompts]
        self.calls += 1
        return self.engine.generate(prompts, sampling, seeds, max_tokens=budgets)

    def load_weights(self, weights: dict, version: int) -> float:
        seconds = self.engine.load_weights(weights)
        self.version = version
        return seconds

    def prompt_logprobs(self, token_ids: list[int]) -> np.ndarray:
        return self.engine.prompt_logprobs(token_ids)

    # Collective weight sync (oel_ray/weight_sync.py): this worker is rank `rank` >= 1 of a group
    # whose rank 0 is the learner.

    def open_weight_channel(self, backend: str, address: str, port: int, rank: int, world_size: int,
                            timeout_s: float) -> None:
        from oel_ray.weight_sync import Channel

        self.close_weight_channel()  # a group with a learner that has since been replaced
        self.channel = Channel(backend, address, port, rank, world_size, timeout_s)

    def receive_weights(self, metas: list, bucket_bytes: int, version: int) -> float:
        from oel_ray.weight_sync import receive

        failed: list[Exception] = []

        def stream():
            # A broadcast that fails (a peer died) ends the stream instead of raising inside vLLM's
            # reload, which would leave the engine mid-reload and unable to load again; ended, the
            # reload finishes (a layer half-received holds a mix until the sync is done again).
            try:
                yield from receive(self.channel, metas, bucket_bytes)
            except Exception as err:
                failed.append(err)

        seconds = self.engine.load_weights_stream(stream())
        if failed:
            raise failed[0]
        self.version = version
        return seconds

    def close_weight_channel(self) -> None:
        if getattr(self, "channel", None) is not None:
            self.channel.close()
            self.channel = None


# ----------------------------------------------------------------------------- sharding

def split(items: list, n: int) -> list[list]:
    """`n` contiguous shards; shard sizes differ by at most one."""
    size, extra = divmod(len(items), n)
    bounds = [i * size + min(i, extra) for i in range(n + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(n)]


def generate_on(workers: list, prompts: list[list[int]], sampling: Sampling, seeds: Optional[list[int]],
                drop: Callable[[object, Exception], None]) -> list[Generation]:
    """One reply per prompt, in prompt order, from one contiguous shard per live worker of
    `workers` (RolloutWorker actors). The shard of a worker that dies is split over the live ones
    and run again: every prompt is answered exactly once (per-prompt seeds travel with it).
    `drop(worker, err)` takes a dead worker out of `workers` and raises when none is left."""
    out: list[Optional[Generation]] = [None] * len(prompts)
    pending: dict = {}  # result -> (worker, the prompt indices it answers)

    def submit(indices: list[int]) -> None:
        for worker, part in zip(workers, split(indices, len(workers))):
            if part:
                ref = worker.generate.remote([prompts[i] for i in part], sampling,
                                             None if seeds is None else [seeds[i] for i in part])
                pending[ref] = (worker, part)

    submit(list(range(len(prompts))))
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        worker, part = pending.pop(ref)
        try:
            replies = ray.get(ref)
        except WORKER_GONE as err:
            drop(worker, err)
            submit(part)
            continue
        if len(replies) != len(part):
            raise RuntimeError(f"a worker answered {len(replies)} of {len(part)} prompts")
        for i, reply in zip(part, replies):
            out[i] = reply
    return out  # type: ignore[return-value]  # every slot filled: each shard is checked


# ----------------------------------------------------------------------------- group

class RolloutGroup:
    """N rollout workers; splits games and prompts into balanced contiguous shards, results in order."""

    def __init__(self, model: ModelConfig, *, num_workers: int, seed: int, max_logprobs: int,
                 kv_cache_gib: float, gpu_memory_utilization: float, num_cpus: float, num_gpus: float,
                 history: str = "flattened", keep_reasoning: bool = False, bind_cores: bool = True,
                 knowledge_position: str = "user", wait: bool = True):
        """`wait=False`: return once the workers are created; `wait()` binds their cores and starts
        their engines."""
        self.placement = RolePlacement("rollout workers", num_workers, num_cpus, num_gpus).reserve()
        self.workers = [
            ray.remote(RolloutWorker).options(**self.placement.options(i), runtime_env=WORKER_ENV).remote(
                model, seed=worker_seed(seed, i), max_logprobs=max_logprobs, kv_cache_gib=kv_cache_gib,
                gpu_memory_utilization=gpu_memory_utilization, history=history, keep_reasoning=keep_reasoning,
                knowledge_position=knowledge_position)
            for i in range(num_workers)
        ]
        self.bind_cores = bind_cores and not num_gpus
        self.lost = 0  # workers that died; their work went to the others
        if wait:
            self.wait()

    def wait(self) -> "RolloutGroup":
        """Start every worker's engine (on its own cores) and block until all run."""
        try:
            cores: list[Optional[list[int]]] = [None] * len(self.workers)
            if self.bind_cores:
                cores = core_slices(ray.get([w.placement.remote() for w in self.workers]))
            ray.get([w.start.remote(c) for w, c in zip(self.workers, cores)])
        except BaseException:
            self.shutdown()
            raise
        return self

    def shutdown(self) -> None:
        """Stop every worker and give their resources back to the cluster."""
        for w in self.workers:
            ray.kill(w)
        self.placement.release()

    def _split(self, items: list) -> list[list]:
        return split(items, len(self.workers))

    def play_iter(self, specs: list[GameSpec], sampling: Sampling, max_turns: int,
                  round: int) -> Iterator[list[tuple[int, Trajectory]]]:
        """Yield the games as they end, every worker's at once, as lists of (index in `specs`,
        trajectory). The games a dying worker had not yet handed back are split over the live ones
        and played again from the start (same per-game seeds): every game comes exactly once."""
        seeds = None if sampling.seed is None else game_sampling_seeds(sampling.seed, specs)
        streams: dict = {}  # streaming generator -> (worker, the spec indices it plays, those it returned)

        def submit(indices: list[int]) -> None:
            for worker, part in zip(self.workers, self._split(indices)):
                if part:
                    stream = worker.play.remote([specs[i] for i in part], sampling, max_turns, round,
                                                None if seeds is None else [seeds[i] for i in part])
                    streams[stream] = (worker, part, set())

        submit(list(range(len(specs))))
        while streams:
            (stream,), _ = ray.wait(list(streams), num_returns=1)
            worker, part, returned = streams[stream]
            try:
                ended = ray.get(next(stream))
            except StopIteration:
                del streams[stream]
                if len(returned) != len(part):
                    raise RuntimeError(f"a worker returned {len(returned)} of its {len(part)} games") from None
                continue
            except WORKER_GONE as err:
                del streams[stream]
                self._drop(worker, err)
                submit([i for j, i in enumerate(part) if j not in returned])
                continue
            for j, traj in ended:
                if j in returned or traj.seed != specs[part[j]].seed:
                    raise RuntimeError(f"a worker returned game {traj.seed} for map {specs[part[j]].seed}")
                returned.add(j)
            yield [(part[j], traj) for j, traj in ended]

    def play(self, specs: list[GameSpec], sampling: Sampling, max_turns: int, round: int,
             on_games: Optional[Callable[[list[Trajectory]], None]] = None) -> list[Trajectory]:
        """All games, in the order of `specs`; `on_games` sees the games as they end (e.g. to
        stream them into a JsonlWriter and move a progress bar)."""
        out: list[Optional[Trajectory]] = [None] * len(specs)
        for ended in self.play_iter(specs, sampling, max_turns, round):
            for i, traj in ended:
                out[i] = traj
            if on_games is not None:
                on_games([traj for _, traj in ended])
        return out  # type: ignore[return-value]  # every slot filled: play_iter checks each game

    def generate(self, prompts: list[list[int]], sampling: Sampling,
                 seeds: Optional[list[int]] = None) -> list[Generation]:
        """One reply per prompt, in prompt order; a dead worker's shard goes to the live ones
        (see `generate_on`)."""
        return generate_on(self.workers, prompts, sampling, seeds, self._drop)

    def _drop(self, worker, err: Exception) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
            self.lost += 1
            log.warning("a rollout worker died (%s); %d left, its unfinished work goes to them",
                        type(err).__name__, len(self.workers))
        if not self.workers:
            raise RuntimeError("every rollout worker has died; the run stops here and resumes from its "
                               "last finished stage when rerun") from err

    def alive(self) -> list:
        """The workers, after dropping those that have died (one round trip each; an idle worker
        answers at once). A collective weight sync asks this before every sync: a dead member
        would otherwise stall its group until cluster.timeout_s."""
        refs = {w.pid.remote(): w for w in self.workers}
        for ref, worker in refs.items():
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as err:
                self._drop(worker, err)
        return self.workers

    def load_weights(self, weights_ref: ray.ObjectRef, version: int) -> float:
        """Every worker loads the same object-store copy; returns the slowest worker's seconds."""
        refs = {w.load_weights.remote(weights_ref, version): w for w in self.workers}
        seconds = []
        for ref, worker in refs.items():
            try:
                seconds.append(ray.get(ref))
            except ray.exceptions.RayActorError as err:
                self._drop(worker, err)
        return max(seconds)
