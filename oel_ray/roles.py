"""The roles of a run: the rollout workers, the teacher actors and the learner ranks.

`build_roles` starts them, each role in its own placement group sized from `cluster.*` (see
placement.py): the one factory the driver, the tests and the benchmarks use. The settings each
role is built from are named here once (`rollout_settings`, `teacher_settings`,
`learner_processes`), so a later run can tell whether roles left running would be built alike
(session.py). Which weights they hold during a run is deployment.py's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable, Optional

from oel_ray.config import MERGED, ModelConfig, OELConfig
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
                while_starting: Optional[Callable[[RolloutGroup], None]] = None,
                running: Optional[dict] = None) -> Roles:
    """The rollout workers, teacher actors and learner ranks of `cfg`, all at `model_path` (default
    the configured model). The learner is placed first: its bundles are the largest and it packs
    its ranks on as few nodes as they fit on; then the teacher and the workers take what is left.
    The roles load side by side (each start is mostly its own imports and model load);
    `while_starting(workers)` runs once every actor is created, before the wait, so whatever it
    starts loads beside them. `running`: roles already up, by Roles field ("workers", "teacher",
    "learner"), taken over from the previous job (session.take_kept_roles): only the others
    start, and a failure stops these too."""
    r, lcfg = cfg.rollout, cfg.learner
    path = model_path or cfg.model.path
    model = cfg.model if path == cfg.model.path else replace(cfg.model, path=path, build=None)
    running = running or {}
    makers = {"learner": lambda: learner_group(cfg, path, wait=False),
              "teacher": lambda: TeacherGroup(**teacher_settings(cfg, path), wait=False),
              "workers": lambda: rollout_group(cfg, model, wait=False)}
    to_start = [name for name in makers if name not in running]
    what = (f"start the roles built otherwise than the previous job's: {', '.join(to_start)}" if running else
            f"start roles: learner ({lcfg.num_ranks} DeepSpeed rank(s), ZeRO-{lcfg.zero_stage}), teacher "
            f"({cfg.teacher.num_actors} actor(s)), {r.num_workers} rollout worker(s) (vLLM)")
    started: dict = {}
    try:
        for name in to_start:
            started[name] = makers[name]()
        if while_starting is not None:
            while_starting({**running, **started}["workers"])
        if started:  # the engines start last: wait there first
            timed(what, lambda: [role.wait() for role in reversed(started.values())])
    except BaseException:
        for role in [*started.values(), *running.values()]:
            role.shutdown()
        raise
    return Roles(**running, **started)


def rollout_group(cfg: OELConfig, model: Optional[ModelConfig] = None, num_workers: Optional[int] = None,
                  max_logprobs: Optional[int] = None, wait: bool = True) -> RolloutGroup:
    """The rollout workers of `cfg` (by default rollout.num_workers engines of the configured model
    that return up to learner.support_k log-probs per token)."""
    return RolloutGroup(**rollout_settings(cfg, model, num_workers, max_logprobs), wait=wait)


def rollout_settings(cfg: OELConfig, model: Optional[ModelConfig] = None, num_workers: Optional[int] = None,
                     max_logprobs: Optional[int] = None) -> dict:
    """Everything rollout workers are built from (`rollout_group`'s defaults). They load model.path:
    whether main built it first (model.build) is not theirs to know."""
    c, r = cfg.cluster, cfg.rollout
    return dict(model=replace(model or cfg.model, build=None), num_workers=num_workers or r.num_workers, seed=r.seed,
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


def sampling_for_play(cfg: OELConfig) -> Sampling:
    r = cfg.rollout
    return Sampling(max_tokens=r.max_response_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                    seed=cfg.seed)
