"""The running roles of a run and which weights they hold.

`Deployment` starts the rollout workers, teacher, learner and extractor on first use (a resumed run
whose stages all finished starts nothing) and brings them to the weights a stage needs: the model
that starts round r, or round r's consolidated model. It also saves and restores the learner's full
training state, so consolidation resumes mid-round.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Optional

import ray

from oel_ray.config import InputError, OELConfig
from oel_ray.consolidate import Roles
from oel_ray.endpoint import ChatEndpoint
from oel_ray.engine import Sampling
from oel_ray.extractor import Extractor
from oel_ray.learner import LearnerGroup
from oel_ray.rollout import RolloutGroup
from oel_ray.teacher import start_teacher
from oel_ray.weight_sync import for_roles

log = logging.getLogger("oel_ray")
STATE_DIR = re.compile(r"^step_(\d+)$")


class Deployment:
    def __init__(self, cfg: OELConfig, out: Path):
        self.cfg, self.out = cfg, out
        self.roles: Optional[Roles] = None
        self.extractor = None
        self.tokenizer = None
        self.holds: Optional[tuple] = None  # ("start", r) or ("trained", r, steps of round r)

    # The stages read these three; they are only valid after one of the methods below.
    @property
    def workers(self):
        return self.roles.workers

    @property
    def learner(self):
        return self.roles.learner

    @property
    def teacher(self):
        return self.roles.teacher

    def at_round_start(self, r: int) -> "Deployment":
        """Workers, teacher and learner at the model round r starts from; the learner with a fresh
        optimizer."""
        if self.holds == ("start", r):
            return self
        if self.roles is None:
            self._start()
        if r > 1:
            previous = self.out / f"round_{r - 1}" / "model"
            if not (previous / "config.json").exists():
                raise InputError(f"{previous}: round {r - 1}'s model is missing; rerun from a new output_dir")
            self.roles.learner.shutdown()
            self.roles.learner = self._learner(str(previous))
            ray.get(self.roles.teacher.load_weights.remote(self.roles.learner.state_dict_ref()))
            self.sync_workers(version=(r - 1) * self.cfg.learner.steps)
        self.holds = ("start", r)
        return self

    def resume_consolidation(self, r: int) -> int:
        """Restore round r's last saved training state, if any; returns the steps it had done."""
        self.at_round_start(r)
        saved = self._saved_states(r)
        if not saved:
            return 0
        steps, path = saved[-1]
        log.info("  resuming consolidation after step %d of round %d", steps, r)
        self.roles.learner.load_state(str(path))
        if self.cfg.consolidation.on_policy:  # off-policy: the workers keep the teacher's weights
            self.sync_workers(version=(r - 1) * self.cfg.learner.steps + steps)
        self.holds = ("trained", r, steps)
        return steps

    def save_training_state(self, r: int, steps: int) -> None:
        """Save the state after `steps` steps of round r, then drop older saves (each save is
        complete before the older one goes)."""
        root = self.out / f"round_{r}" / "learner_state"
        self.roles.learner.save_state(str(root / f"step_{steps:06d}"))
        for _, path in self._saved_states(r)[:-1]:
            shutil.rmtree(path, ignore_errors=True)
        self.holds = ("trained", r, steps)

    def try_save_training_state(self, r: int, steps: int) -> None:
        """After a failure elsewhere: save what the learner has, if it can. Never raises: the
        failure being handled is the one to report."""
        saved = self._saved_states(r)
        if steps == 0 or (saved and saved[-1][0] == steps):
            return
        try:
            self.save_training_state(r, steps)
            log.warning("  saved the training state after step %d of round %d before stopping", steps, r)
        except Exception as err:  # the learner died too, or timed out
            log.warning("  could not save the training state (%s: %s); the run resumes from the last saved step",
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")

    def after_consolidation(self, r: int) -> "Deployment":
        """Workers and learner at round r's consolidated weights."""
        final = ("trained", r, self.cfg.learner.steps)
        if self.holds == final:
            return self
        self.at_round_start(r)
        saved = self._saved_states(r)
        if not saved or saved[-1][0] != self.cfg.learner.steps:
            raise InputError(f"{self.out / f'round_{r}'}: the consolidated training state is missing; "
                              "rerun from a new output_dir")
        self.roles.learner.load_state(str(saved[-1][1]))
        self.sync_workers(version=r * self.cfg.learner.steps)
        self.holds = final
        return self

    def shutdown(self) -> None:
        if self.roles is not None:
            self.roles.learner.shutdown()

    # ------------------------------------------------------------------------- internals

    def _saved_states(self, r: int) -> list[tuple[int, Path]]:
        root = self.out / f"round_{r}" / "learner_state"
        found = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := STATE_DIR.match(p.name))]
        return sorted(found)

    def sync_workers(self, version: int) -> None:
        """The learner's weights to the rollout workers, through the configured transport."""
        for_roles(self.roles, self.cfg).sync(version=version)

    def _learner(self, model_path: str) -> LearnerGroup:
        c = self.cfg.cluster
        return LearnerGroup(self.cfg.learner, model_path, num_cpus=c.cpus_per_actor,
                            num_gpus=1.0 if c.use_gpu else 0.0)

    def _start(self) -> None:
        from transformers import AutoTokenizer

        from oel_ray.driver import init_ray, timed

        cfg, c = self.cfg, self.cfg.cluster
        if not ray.is_initialized():
            init_ray(cfg)
        gpus = 1.0 if c.use_gpu else 0.0
        r, lcfg = cfg.rollout, cfg.learner
        workers = timed(f"start {r.num_workers} rollout worker(s) (vLLM)", lambda: RolloutGroup(
            cfg.model, num_workers=r.num_workers, seed=r.seed, max_logprobs=lcfg.support_k,
            kv_cache_gib=r.kv_cache_gib, gpu_memory_utilization=r.gpu_memory_utilization,
            num_cpus=c.cpus_per_actor, num_gpus=gpus, history=r.history, keep_reasoning=r.keep_reasoning,
            bind_cores=r.bind_cores))
        teacher = timed("start teacher", lambda: start_teacher(
            cfg.model.path, num_cpus=c.cpus_per_actor, num_gpus=gpus, dtype=cfg.model.dtype,
            temperature=lcfg.temperature, chunk_tokens=cfg.teacher.chunk_tokens,
            batch_tokens=cfg.teacher.batch_tokens, trust_remote_code=cfg.model.trust_remote_code))
        learner = timed(f"start learner ({lcfg.num_ranks} DeepSpeed rank(s), ZeRO-{lcfg.zero_stage})",
                        lambda: self._learner(cfg.model.path))
        self.roles = Roles(workers=workers, teacher=teacher, learner=learner)
        self.extractor = ray.remote(num_cpus=0)(Extractor).remote(
            cfg.extractor, cfg.model.path, self._extractor_engines(workers, gpus),
            thinking=cfg.model.thinking, seed=cfg.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)

    def _extractor_engines(self, workers: RolloutGroup, gpus: float) -> list:
        """The policy's own workers (default), an endpoint, or workers of another local model."""
        e, c, r = self.cfg.extractor, self.cfg.cluster, self.cfg.rollout
        if e.model == "policy":
            return workers.workers
        if e.model.startswith(("http://", "https://")):
            log.info("  knowledge extracted by %s at %s", e.endpoint_model, e.model)
            return [ChatEndpoint(e.model, e.endpoint_model, api_key_env=e.api_key_env, timeout_s=c.timeout_s)]
        from oel_ray.driver import timed

        return timed(f"start the extractor's own engine ({e.model})", lambda: RolloutGroup(
            replace(self.cfg.model, path=e.model, build=None), num_workers=1, seed=self.cfg.seed, max_logprobs=1,
            kv_cache_gib=r.kv_cache_gib, gpu_memory_utilization=r.gpu_memory_utilization,
            num_cpus=c.cpus_per_actor, num_gpus=gpus)).workers


def sampling_for_play(cfg: OELConfig) -> Sampling:
    r = cfg.rollout
    return Sampling(max_tokens=r.max_response_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                    seed=cfg.seed)
