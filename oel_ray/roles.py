"""The running roles of a run and which weights they hold.

`build_roles` starts the rollout workers, the teacher actors and the learner ranks, each role in its
own placement group sized from `cluster.*` (see placement.py): the one factory the driver, the tests
and the benchmarks use. `Deployment` starts them on first use (a resumed run whose stages all
finished starts nothing) and brings them to the weights a stage needs: the model that starts round
r, or round r's consolidated model. It also saves and restores the learner's full training state,
so consolidation resumes mid-round. A sweep's job leaves its rollout workers and teacher to the next
job when that one would build them alike (`take_kept_roles`).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import ray

from oel_ray import artifacts
from oel_ray.config import MERGED, ClusterConfig, ModelConfig, OELConfig
from oel_ray.errors import InputError
from oel_ray.endpoint import ChatEndpoint
from oel_ray.extractor import Extractor
from oel_ray.layout import RunLayout
from oel_ray.learner import LearnerGroup
from oel_ray.placement import driver_node
from oel_ray.rollout import RolloutGroup
from oel_ray.teacher import TeacherGroup
from oel_ray.tracking import timed
from oel_ray.types import Sampling
from oel_ray.weight_sync import WeightSync, for_roles

log = logging.getLogger("oel_ray")


@dataclass
class Roles:
    workers: RolloutGroup
    teacher: TeacherGroup
    learner: LearnerGroup
    sync: Optional[WeightSync] = None  # learner -> workers; built from cfg.learner.weight_sync on first use

    def placement(self) -> dict:
        """Which Ray node (id and IP) runs the driver and each actor of each role, in rank order."""
        return {"driver": driver_node(), "learner": self.learner.placement.nodes(),
                "teacher": self.teacher.placement.nodes(), "rollout": self.workers.placement.nodes()}

    def shutdown(self) -> None:
        """Stop every role and give its placement group back."""
        for role in (self.learner, self.teacher, self.workers):
            role.shutdown()


def build_roles(cfg: OELConfig, model_path: Optional[str] = None,
                while_starting: Optional[Callable[[RolloutGroup], None]] = None) -> Roles:
    """The rollout workers, teacher actors and learner ranks of `cfg`, all at `model_path` (default
    the configured model). The learner is placed first: its bundles are the largest and it packs
    its ranks on as few nodes as they fit on; then the teacher and the workers take what is left.
    The roles load side by side (each start is mostly its own imports and model load);
    `while_starting(workers)` runs once every actor is created, before the wait, so whatever it
    starts loads beside them."""
    r, lcfg = cfg.rollout, cfg.learner
    path = model_path or cfg.model.path
    model = cfg.model if path == cfg.model.path else replace(cfg.model, path=path, build=None)
    started: list = []
    what = (f"start roles: learner ({lcfg.num_ranks} DeepSpeed rank(s), ZeRO-{lcfg.zero_stage}), teacher "
            f"({cfg.teacher.num_actors} actor(s)), {r.num_workers} rollout worker(s) (vLLM)")
    try:
        learner = learner_group(cfg, path, wait=False)
        started.append(learner)
        teacher = TeacherGroup(**teacher_settings(cfg, path), wait=False)
        started.append(teacher)
        workers = rollout_group(cfg, model, wait=False)
        started.append(workers)
        if while_starting is not None:
            while_starting(workers)
        timed(what, lambda: [role.wait() for role in reversed(started)])  # the engines start last: wait there first
    except BaseException:
        for role in started:
            role.shutdown()
        raise
    return Roles(workers=workers, teacher=teacher, learner=learner)


def rollout_group(cfg: OELConfig, model: Optional[ModelConfig] = None, num_workers: Optional[int] = None,
                  max_logprobs: Optional[int] = None, wait: bool = True) -> RolloutGroup:
    """The rollout workers of `cfg` (by default rollout.num_workers engines of the configured model
    that return up to learner.support_k log-probs per token)."""
    return RolloutGroup(**rollout_settings(cfg, model, num_workers, max_logprobs), wait=wait)


def rollout_settings(cfg: OELConfig, model: Optional[ModelConfig] = None, num_workers: Optional[int] = None,
                     max_logprobs: Optional[int] = None) -> dict:
    """Everything rollout workers are built from (`rollout_group`'s defaults)."""
    c, r = cfg.cluster, cfg.rollout
    return dict(model=model or cfg.model, num_workers=num_workers or r.num_workers, seed=r.seed,
                max_logprobs=max_logprobs or cfg.learner.support_k, kv_cache_gib=r.kv_cache_gib,
                gpu_memory_utilization=r.gpu_memory_utilization, num_cpus=c.rollout_cpus, num_gpus=c.rollout_gpus,
                history=r.history, keep_reasoning=r.keep_reasoning, bind_cores=r.bind_cores,
                knowledge_position=cfg.teacher.knowledge_position)


def teacher_settings(cfg: OELConfig, model_path: str) -> dict:
    """Everything the teacher actors are built from, the student's checkpoint at `model_path` (or
    teacher.model) teaching."""
    c, lcfg = cfg.cluster, cfg.learner
    return dict(model_path=cfg.teacher.model or model_path, num_actors=cfg.teacher.num_actors, num_cpus=c.teacher_cpus,
                num_gpus=c.teacher_gpus, dtype=cfg.model.dtype, temperature=lcfg.temperature,
                chunk_tokens=cfg.teacher.chunk_tokens, batch_tokens=cfg.teacher.batch_tokens,
                reuse_prefix=cfg.teacher.reuse_prefix, trust_remote_code=cfg.model.trust_remote_code,
                merge_support=lcfg.support == MERGED)


def learner_group(cfg: OELConfig, model_path: str, wait: bool = True) -> LearnerGroup:
    c = cfg.cluster
    return LearnerGroup(cfg.learner, model_path, num_cpus=c.learner_cpus, num_gpus=c.learner_gpus, wait=wait)


# Every actor of the run: no model-loading progress bars (their lines reach the driver's stderr late,
# after whatever the run printed last, and say nothing a user can act on).
JOB_ENV = {"env_vars": {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}}


# The cluster settings this process last started or joined Ray with: a sweep's next job (Hydra's
# basic launcher runs them one after another in one process) reuses that cluster when its settings
# are the same, instead of paying Ray's start and stop again (about 11 s of a small job on 2 cores).
_ray_started_with: Optional[ClusterConfig] = None


def ray_started_here() -> bool:
    """Whether this process opened the Ray connection it holds (started a local cluster or joined
    cluster.address) rather than finding one open (a test's or a notebook's, which stays open)."""
    return _ray_started_with is not None


def init_ray(cfg: OELConfig) -> None:
    """Start (or join) the Ray cluster cfg.cluster names, unless this process is already connected:
    to one it started with the same settings (reused, and the log says so), or to one it did not
    start (a test's or a notebook's: used as it is). A cluster it started with other settings is
    stopped first."""
    global _ray_started_with, _kept
    c = cfg.cluster
    if ray.is_initialized():
        if _ray_started_with is None or _ray_started_with == c:
            if _ray_started_with is not None:
                log.info("  reusing the Ray cluster this process started for an earlier job")
            return
        ray.shutdown()
    _ray_started_with, _kept = c, None  # roles kept on another cluster ended with it
    if c.address:
        ray.init(address=c.address, log_to_driver=True, runtime_env=JOB_ENV)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster, not reachable off-host
    ray.init(num_cpus=c.num_cpus or max(2, os.cpu_count() or 2), include_dashboard=c.dashboard,
             dashboard_host="127.0.0.1", log_to_driver=True, runtime_env=JOB_ENV)


# The roles that a finished job of a sweep left running (Hydra's basic launcher runs the jobs one
# after another in this process), with the settings they were built from: the next job takes them
# over when it would build them alike, sparing their start (the vLLM engines' above all): the
# workers and teacher as they are, the learner's ranks reloaded with the job's learner settings.
# Its own extractor starts as always.
_kept: Optional[tuple[tuple, RolloutGroup, TeacherGroup, tuple, LearnerGroup]] = None


def shared_role_settings(cfg: OELConfig) -> tuple:
    """Everything the rollout workers and the teacher actors are built from: their constructors'
    arguments, so a job whose other settings differ (games, K, the teacher's context, the learner's
    loss, the consolidation mode) still takes them over."""
    return rollout_settings(cfg), teacher_settings(cfg, cfg.model.path)


def learner_processes(cfg: OELConfig) -> tuple:
    """What the learner's rank processes are built from (their number and placement); every other
    learner setting a kept rank takes on when it reloads (Learner.reload)."""
    c = cfg.cluster
    return cfg.learner.num_ranks, c.learner_cpus, c.learner_gpus


def to_learner_weights(roles: Roles, cfg: OELConfig, version: int) -> None:
    """A round starts from the learner's weights: they teach it (teacher.model, which keeps its own
    weights, only begins a round) and the workers play with them (weight `version`)."""
    if cfg.teacher.model is None:
        roles.teacher.load_weights(roles.learner.state_dict_ref())
    else:
        roles.teacher.new_round()
    for_roles(roles, cfg).sync(version=version)


def take_kept_roles(cfg: OELConfig) -> Optional[Roles]:
    """The kept workers and teacher, and the kept learner ranks reloaded at the configured model (or a
    new learner, where its processes would be built otherwise), all three brought to its weights
    (the previous job left its own last weights in them), or None: nothing kept, workers or teacher
    kept with other settings, or a kept actor gone (whatever was kept is then stopped)."""
    global _kept
    kept, _kept = _kept, None
    if kept is None:
        return None
    settings, workers, teacher, processes, learner = kept
    roles = None
    try:
        if settings == shared_role_settings(cfg) and len(workers.alive()) == cfg.rollout.num_workers:
            teacher.wait()  # raises if an actor died
            if processes == learner_processes(cfg):
                learner.reload(cfg.model.path, cfg.learner)
                log.info("  reusing the learner's %d rank(s) the previous job left running, reloaded at the "
                         "start model with this job's learner settings", cfg.learner.num_ranks)
            else:
                learner, old = None, learner
                old.shutdown()
                learner = learner_group(cfg, cfg.model.path)
            roles = Roles(workers=workers, teacher=teacher, learner=learner)
            to_learner_weights(roles, cfg, version=0)
    except Exception as err:
        log.warning("  could not take over the previous job's roles (%s: %s); starting new ones",
                    type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        roles = None
    if roles is None:
        for role in (workers, teacher, learner):
            if role is not None:
                role.shutdown()
        return None
    log.info("  reusing the %d rollout worker(s) and the teacher the previous job left running (same settings)",
             len(workers.workers))
    return roles


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
        global _kept
        if self.roles is not None and keep:
            _kept = (shared_role_settings(self.cfg), self.roles.workers, self.roles.teacher,
                     learner_processes(self.cfg), self.roles.learner)
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
        self.roles = take_kept_roles(cfg)
        if self.roles is None:
            self.roles = build_roles(cfg, while_starting=self._start_extractor)
        else:
            self._start_extractor(self.roles.workers)
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


def sampling_for_play(cfg: OELConfig) -> Sampling:
    r = cfg.rollout
    return Sampling(max_tokens=r.max_response_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                    seed=cfg.seed)
