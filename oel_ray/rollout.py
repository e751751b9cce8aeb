"""RolloutWorker: one vLLM engine that plays games and answers prompts with the current weights."""

from __future__ import annotations

import numpy as np
import ray

from oel_ray.config import ModelConfig
from oel_ray.engine import Sampling, VLLMEngine
from oel_ray.games import Game
from oel_ray.prompts import chat_ids
from oel_ray.types import GameSpec, Generation, Trajectory


class RolloutWorker:
    def __init__(self, model: ModelConfig, *, seed: int, max_logprobs: int, kv_cache_gib: float,
                 gpu_memory_utilization: float):
        self.engine = VLLMEngine(
            model.path, dtype=model.dtype, max_model_len=model.max_model_len, seed=seed,
            max_logprobs=max_logprobs, kv_cache_gib=kv_cache_gib,
            gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=model.trust_remote_code,
        )
        self.tokenizer = self.engine.tokenizer
        self.thinking = model.thinking
        self.max_model_len = model.max_model_len
        self.version = 0  # optimizer steps behind the loaded weights

    def ready(self) -> float:
        return self.engine.init_seconds

    def play(self, specs: list[GameSpec], sampling: Sampling, max_turns: int, round: int) -> list[Trajectory]:
        """Play all games to the end; every active game's next turn goes out in one batched call."""
        games = [Game(spec, max_turns) for spec in specs]
        while active := [g for g in games if not g.done]:
            prompts = [chat_ids(self.tokenizer, g.prompt(), thinking=self.thinking) for g in active]
            for game, gen in zip(active, self._generate(prompts, sampling)):
                game.step(gen.text, len(gen.token_ids))
        return [g.trajectory(round, self.version) for g in games]

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Generation]:
        return self._generate(prompts, sampling)

    def _generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Generation]:
        longest = max(len(p) for p in prompts)
        room = self.max_model_len - longest
        if room < 1:
            raise ValueError(
                f"a prompt of {longest} tokens leaves no room to reply within model.max_model_len "
                f"({self.max_model_len}); raise model.max_model_len or shorten the prompts"
            )
        if room < sampling.max_tokens:
            sampling = Sampling(**{**sampling.__dict__, "max_tokens": room})
        return self.engine.generate(prompts, sampling)

    def load_weights(self, weights: dict, version: int) -> float:
        seconds = self.engine.load_weights(weights)
        self.version = version
        return seconds

    def prompt_logprobs(self, token_ids: list[int]) -> np.ndarray:
        return self.engine.prompt_logprobs(token_ids)


class RolloutGroup:
    """N rollout workers; splits games and prompts evenly and gathers results in order."""

    def __init__(self, model: ModelConfig, *, num_workers: int, seed: int, max_logprobs: int,
                 kv_cache_gib: float, gpu_memory_utilization: float, num_cpus: float, num_gpus: float):
        actor = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(RolloutWorker)
        self.workers = [
            actor.remote(model, seed=seed + i, max_logprobs=max_logprobs, kv_cache_gib=kv_cache_gib,
                         gpu_memory_utilization=gpu_memory_utilization)
            for i in range(num_workers)
        ]
        ray.get([w.ready.remote() for w in self.workers])

    def _scatter(self, items: list) -> list[list]:
        n = len(self.workers)
        size = -(-len(items) // n)
        return [items[i * size:(i + 1) * size] for i in range(n)]

    def play(self, specs: list[GameSpec], sampling: Sampling, max_turns: int, round: int) -> list[Trajectory]:
        shards = self._scatter(specs)
        refs = [w.play.remote(s, sampling, max_turns, round) for w, s in zip(self.workers, shards) if s]
        return [t for part in ray.get(refs) for t in part]

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Generation]:
        shards = self._scatter(prompts)
        refs = [w.generate.remote(s, sampling) for w, s in zip(self.workers, shards) if s]
        return [g for part in ray.get(refs) for g in part]

    def load_weights(self, weights_ref: ray.ObjectRef, version: int) -> float:
        """Every worker loads the same object-store copy; returns the slowest worker's seconds."""
        return max(ray.get([w.load_weights.remote(weights_ref, version) for w in self.workers]))
