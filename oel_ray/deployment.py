"""Which weights the roles of a run hold, stage by stage.

`Deployment` starts the roles on first use (a resumed run whose stages all finished starts
nothing; a run after another in this process may take over the roles it left, session.py) and
brings them to the weights a stage needs: the model that starts round r, or round r's consolidated
model. It also saves and restores the learner's full training state, so consolidation resumes
mid-round.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Optional

import ray

from oel_ray import artifacts
from oel_ray.config import OELConfig
from oel_ray.endpoint import ChatEndpoint
from oel_ray.errors import InputError
from oel_ray.extractor import Extractor
from oel_ray.layout import RunLayout
from oel_ray.roles import Roles, to_learner_weights
from oel_ray.rollout import RolloutGroup
from oel_ray.session import init_ray, keep_roles, start_roles
from oel_ray.tracking import timed
from oel_ray.weight_sync import for_roles

log = logging.getLogger("oel_ray")


class Deployment:
    def __init__(self, cfg: OELConfig, run: RunLayout):
        self.cfg, self.run = cfg, run
        self.roles: Optional[Roles] = None
        self.extractor = None
        self.own_extractor: Optional[RolloutGroup] = None  # extractor.model names another local model
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
            previous = self.run.round(r - 1).model
            if not self.run.round(r - 1).model_config.exists():
                raise InputError(f"{previous}: round {r - 1}'s model is missing; rerun from a new output_dir")
            self.roles.learner.reload(str(previous))
            to_learner_weights(self.roles, self.cfg, version=(r - 1) * self.cfg.learner.steps)
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
        if self.cfg.consolidation.strategy.sync_each_step:  # off-policy: the workers keep the teacher's weights
            self.sync_workers(version=(r - 1) * self.cfg.learner.steps + steps)
        self.holds = ("trained", r, steps)
        return steps

    def save_training_state(self, r: int, steps: int) -> None:
        """Save the state after `steps` steps of round r, then drop older saves (each save is
        complete before the older one goes)."""
        self.roles.learner.save_state(str(self.run.round(r).state_after(steps)))
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
        """Workers and learner at round r's consolidated weights: its final training state, or,
        once checkpointed (the state is then removed), the round's model (a stage rerun after the
        checkpoint, e.g. its eval.json deleted)."""
        final = ("trained", r, self.cfg.learner.steps)
        if self.holds == final:
            return self
        saved = self._saved_states(r)
        model = self.run.round(r).model
        if (not saved or saved[-1][0] != self.cfg.learner.steps) and self.run.round(r).model_config.exists():
            if self.roles is None:
                self._start()
            self.roles.learner.reload(str(model))  # the teacher keeps its weights: no stage of round r needs it again
            self.sync_workers(version=r * self.cfg.learner.steps)
            self.holds = final
            return self
        self.at_round_start(r)
        if not saved or saved[-1][0] != self.cfg.learner.steps:
            raise InputError(f"{self.run.round(r).dir}: the consolidated training state is missing; "
                              "rerun from a new output_dir")
        self.roles.learner.load_state(str(saved[-1][1]))
        self.sync_workers(version=r * self.cfg.learner.steps)
        self.holds = final
        return self

    def shutdown(self, keep: bool = False) -> None:
        """Stop every role and give the cluster its resources back; `keep`: the rollout workers, the
        teacher and the learner's ranks stay up for the next job of a sweep (`take_kept_roles`)."""
        if self.roles is not None and keep:
            keep_roles(self.cfg, self.roles)
        elif self.roles is not None:
            self.roles.shutdown()
        if self.extractor is not None:
            ray.kill(self.extractor)
        if self.own_extractor is not None:
            self.own_extractor.shutdown()

    # ------------------------------------------------------------------------- internals

    def _saved_states(self, r: int) -> list[tuple[int, Path]]:
        return self.run.round(r).saved_states()

    def sync_workers(self, version: int) -> None:
        """The learner's weights to the rollout workers, through the configured transport."""
        for_roles(self.roles, self.cfg).sync(version=version)

    def _record_placement(self) -> None:
        """placement.json: where each role runs (the learner's ranks keep their processes from round to round)."""
        where = self.roles.placement()
        artifacts.write_json(self.run.placement, where)
        nodes = {n["node_id"]: n["ip"] for role in where.values() for n in (role if isinstance(role, list) else [role])}
        log.info("  %d Ray node(s): driver on %s, learner ranks on %s, teacher on %s, rollout workers on %s",
                 len(nodes), where["driver"]["ip"], *([n["ip"] for n in where[k]] for k in ("learner", "teacher", "rollout")))

    def _start(self) -> None:
        from transformers import AutoTokenizer

        cfg = self.cfg
        init_ray(cfg)
        self.roles = start_roles(cfg, while_starting=self._start_extractor)
        self._record_placement()
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)

    def _start_extractor(self, workers: RolloutGroup) -> None:
        """The extractor's actor, created while the roles load: its process start and imports (a few
        seconds) would otherwise wait in front of the first extraction."""
        cfg = self.cfg
        self.extractor = ray.remote(num_cpus=0)(Extractor).remote(
            cfg.extractor, cfg.model.path, self._extractor_engines(workers), thinking=cfg.model.thinking,
            seed=cfg.seed)

    def _extractor_engines(self, workers: RolloutGroup) -> list:
        """The policy's own workers (default), an endpoint, or workers of another local model."""
        e, c, r = self.cfg.extractor, self.cfg.cluster, self.cfg.rollout
        if e.model == "policy":
            return workers.workers
        if e.model.startswith(("http://", "https://")):
            log.info("  knowledge extracted by %s at %s", e.endpoint_model, e.model)
            return [ChatEndpoint(e.model, e.endpoint_model, api_key_env=e.api_key_env, timeout_s=c.timeout_s)]
        self.own_extractor = timed(f"start the extractor's own engine ({e.model})", lambda: RolloutGroup(
            replace(self.cfg.model, path=e.model, build=None), num_workers=1, seed=self.cfg.seed, max_logprobs=1,
            kv_cache_gib=r.kv_cache_gib, gpu_memory_utilization=r.gpu_memory_utilization,
            num_cpus=c.rollout_cpus, num_gpus=c.rollout_gpus))
        return self.own_extractor.workers
