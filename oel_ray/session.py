"""What outlives one run in this process: the Ray connection it opened, and the roles a finished
run left running for the next one.

Hydra's basic launcher runs a sweep's jobs one after another in one process; so does a notebook or
a test session that runs the entry point several times. A job reuses the cluster the one before it
started when its cluster settings are the same, and takes over the rollout workers, the teacher
and the learner ranks when it would build them alike (`take_kept_roles`), sparing their start (the
vLLM engines' above all).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

import ray

from oel_ray.config import ClusterConfig, OELConfig
from oel_ray.learner import LearnerGroup
from oel_ray.roles import (JOB_ENV, Roles, build_roles, learner_processes, shared_role_settings,
                           to_learner_weights)
from oel_ray.rollout import RolloutGroup
from oel_ray.teacher import TeacherGroup

log = logging.getLogger("oel_ray")


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


@dataclass
class KeptRoles:
    """The roles a finished job left running, each beside the settings it was built from."""
    rollout: dict
    workers: RolloutGroup
    teacher_args: dict
    teacher: TeacherGroup
    processes: tuple
    learner: LearnerGroup


# What the last finished job of this process left running (Hydra's basic launcher runs a sweep's jobs
# one after another in it): the next job takes over each role it would build alike, sparing its
# start (the vLLM engines' above all): the workers and teacher as they are, the learner's ranks
# reloaded with the job's learner settings. Its own extractor starts as always.
_kept: Optional[KeptRoles] = None


def take_kept_roles(cfg: OELConfig) -> dict:
    """The kept roles `cfg` would build alike, by Roles field (the learner's ranks reloaded at the
    configured model with the job's learner settings); the others are stopped. Empty where nothing
    was kept or nothing kept fits; a kept actor found dead stops them all."""
    global _kept
    kept, _kept = _kept, None
    if kept is None:
        return {}
    rollout, teacher = shared_role_settings(cfg)
    mine: dict = {}
    try:
        if kept.rollout == rollout and len(kept.workers.alive()) == cfg.rollout.num_workers:
            mine["workers"] = kept.workers
        if kept.teacher_args == teacher:
            mine["teacher"] = kept.teacher.wait()  # raises if an actor died
        if kept.processes == learner_processes(cfg):
            kept.learner.reload(cfg.model.path, cfg.learner)
            mine["learner"] = kept.learner
            log.info("  reusing the learner's %d rank(s) the previous job left running, reloaded at the "
                     "start model with this job's learner settings", cfg.learner.num_ranks)
    except Exception as err:
        log.warning("  could not take over the previous job's roles (%s: %s); starting new ones",
                    type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        mine = {}
    for name in ("workers", "teacher", "learner"):
        if name not in mine:
            getattr(kept, name).shutdown()
    reused = [f"the {len(kept.workers.workers)} rollout worker(s)"] * ("workers" in mine) + ["the teacher"] * (
        "teacher" in mine)
    if reused:
        log.info("  reusing %s the previous job left running (same settings)", " and ".join(reused))
    return mine


def start_roles(cfg: OELConfig, while_starting: Optional[Callable[[RolloutGroup], None]] = None) -> Roles:
    """The roles of `cfg`: those the previous job left that it would build alike, the others started
    beside them (roles.build_roles), all brought to the model's weights where any was taken over
    (the previous job left its own last weights in them)."""
    running = take_kept_roles(cfg)
    roles = build_roles(cfg, while_starting=while_starting, running=running)
    if running:
        try:
            to_learner_weights(roles, cfg, version=0)
        except BaseException:
            roles.shutdown()
            raise
    return roles


def keep_roles(cfg: OELConfig, roles: Roles) -> None:
    """Leave `roles` running for the next run of this process (`take_kept_roles`)."""
    global _kept
    rollout, teacher = shared_role_settings(cfg)
    _kept = KeptRoles(rollout, roles.workers, teacher, roles.teacher, learner_processes(cfg), roles.learner)


def kept_roles() -> list:
    """The role groups kept for the next run (each has .placement), if any."""
    return [] if _kept is None else [_kept.workers, _kept.teacher, _kept.learner]


def release_kept_roles() -> None:
    """Stop the roles kept for a next run that will not come (their cluster's CPUs back)."""
    global _kept
    for role in kept_roles():
        role.shutdown()
    _kept = None


# Whether every run of this process leaves its roles to the next, as a sweep's jobs do (a notebook's
# or a test session's runs, one after another on one cluster): keep_roles_between_runs().
_between_runs = False


def keep_roles_between_runs(on: bool = True) -> None:
    global _between_runs
    _between_runs = on


def keeping_roles_between_runs() -> bool:
    return _between_runs
