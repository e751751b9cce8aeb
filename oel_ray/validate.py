"""What a config asks for across its groups and of the files it names: checked after each group's
own fields (`OELConfig.check`), before anything expensive starts; one-line ConfigErrors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from oel_ray import checks
from oel_ray.config import EMBEDDED_MODELS, MIX, NCCL, PER_STEP, STUDENT, OELConfig
from oel_ray.errors import ConfigError, choice, require
from oel_ray.strategy import FULL_REVERSE_KL, SEQKD
from oel_ray.seeds import ROUND_SEED_STRIDE, STREAM_SEED_STRIDE
from oel_ray.types import KNOWLEDGE


def validate(cfg: OELConfig) -> OELConfig:
    """Check every value a user can get wrong; raises ConfigError (one line) on the first."""
    checks.finite(cfg)  # first: nan passes no comparison and inf passes every "> 0"
    cfg.check()
    check_model_path(cfg.model.path, cfg.model.build)
    check_seed_ranges(cfg)
    check_lengths(cfg)
    check_extractor_model(cfg)
    require(cfg.extractor.trajectories == PER_STEP or cfg.extractor.k <= cfg.rollout.games_per_round, "extractor.k",
            f"{cfg.extractor.k} trajectories per chain but rollout.games_per_round is {cfg.rollout.games_per_round}; "
            "raise rollout.games_per_round or lower extractor.k")
    if cfg.teacher.knowledge_from:  # another run's knowledge files: read now, not rounds later
        from oel_ray.controls import check_knowledge_from

        check_knowledge_from(cfg.teacher, cfg.rounds)
    strategy = cfg.consolidation.strategy
    require(cfg.learner.loss in strategy.losses, "learner.loss",
            f"{cfg.learner.loss} does not apply to consolidation.mode={strategy.name}: use one of "
            f"{', '.join(strategy.losses)}" + (" (seqkd trains on the teacher's replies: consolidation.mode=off_policy)"
                                               if cfg.learner.loss == SEQKD else ""))
    check_teacher_model(cfg)
    require(cfg.extractor.select == MIX or (cfg.teacher.context == KNOWLEDGE and not cfg.teacher.knowledge_from),
            "extractor.select", "best picks among this run's extracted knowledge: it needs teacher.context=knowledge "
            "and no teacher.knowledge_from; use extractor.select=mix with the controls")
    require(cfg.learner.support == STUDENT or not strategy.workers_read_knowledge, "learner.support",
            "merged joins the teacher's top-k to the student's top-k on the student's replies; off_policy "
            "consolidation samples the teacher, whose top-k is the support already: set learner.support=student")
    require(cfg.learner.weight_sync != NCCL or cfg.cluster.use_gpu, "learner.weight_sync",
            "nccl needs GPUs (cluster.use_gpu=true); use auto or object_store on CPU")
    check_gpus(cfg)
    checks.model_limits(cfg)  # the model's own sizes, from its config.json when it is on disk
    return cfg


def check_model_path(path: str, build: Optional[str], name: str = "model.path") -> None:
    if build is not None:
        choice("model.build", build, EMBEDDED_MODELS)
        problem = checks.tiny_target_problem(Path(path).expanduser(), build)
        require(problem is None, name, f"{path!r} is not a place to build the {build} model: {problem}; model.build={build} "
                "writes only to a new or empty directory or its own earlier build: point model.path elsewhere, or "
                "set model.build=null to load the checkpoint there")
        return
    if os.path.isdir(path):
        problem = checks.checkpoint_problem(Path(path))
        require(problem is None, name, f"{path!r} is not a checkpoint: {problem}; give a checkpoint directory "
                "(config.json, *.safetensors, tokenizer) or a hub id such as Qwen/Qwen3-4B-Instruct-2507")
        return
    if checks.HUB_ID.match(path) and not os.path.exists(path):
        return  # a hub id, resolved from the local hub cache by transformers / vLLM
    raise ConfigError(
        f"{name}: {path!r} does not exist; give a checkpoint directory, a hub id such as "
        "Qwen/Qwen3-4B-Instruct-2507, or model.build=tiny to build the embedded model there"
    )


def check_teacher_model(cfg: OELConfig) -> None:
    """teacher.model: a checkpoint that exists, for the modes whose teacher is the TeacherServer."""
    t = cfg.teacher.model
    if t is None:
        return
    check_model_path(t, cfg.model.build if t == cfg.model.path else None, "teacher.model")
    require(not cfg.consolidation.strategy.workers_read_knowledge, "teacher.model",
            f"{t} cannot teach off_policy consolidation, whose teacher replies come from the rollout workers (the "
            "round's start model): use consolidation.mode=on_policy or unset teacher.model")
    require(cfg.learner.loss != FULL_REVERSE_KL, "teacher.model",
            f"{t} cannot teach learner.loss=full_reverse_kl, whose teacher is a copy of the round's start model in "
            "each learner rank: use topk_reverse_kl (the default) or unset teacher.model")


def check_seed_ranges(cfg: OELConfig) -> None:
    """Training map seeds stay in their streams and below the held-out ones (oel_ray/seeds.py)."""
    env = cfg.env
    if not env.distinct_boards:
        # Seeds are then the only thing keeping the sets apart: the last round's streams must stay
        # below the first held-out seed.
        last = env.train_seed_offset + (cfg.rounds + 1) * ROUND_SEED_STRIDE
        require(last <= env.eval_seed_offset, "env.eval_seed_offset",
                f"{env.eval_seed_offset} must be at least {last} (env.train_seed_offset + (rounds + 1) "
                f"x {ROUND_SEED_STRIDE}) so training seeds never reach held-out seeds")
    deploy = cfg.learner.steps * cfg.rollout.deploy_games_per_step
    require(deploy <= STREAM_SEED_STRIDE, "rollout.deploy_games_per_step",
            f"learner.steps x rollout.deploy_games_per_step = {deploy} maps per round exceeds the "
            f"{STREAM_SEED_STRIDE} seeds of a map stream; lower one of them")


def check_lengths(cfg: OELConfig) -> None:
    """Every reply must leave its prompt some of the model's context."""
    length = cfg.model.max_model_len
    for name, tokens in (("rollout.max_response_tokens", cfg.rollout.max_response_tokens),
                         # the extraction prompt is cut to leave a full reply room: some must be left for it
                         ("extractor.max_response_tokens", cfg.extractor.max_response_tokens)):
        require(tokens < length, name, f"{tokens} must be below model.max_model_len ({length})")
    require(0 < cfg.ood.max_tokens < length, "ood.max_tokens",
            f"{cfg.ood.max_tokens} must be in 1..model.max_model_len - 1 ({length - 1})")


def check_extractor_model(cfg: OELConfig) -> None:
    e = cfg.extractor
    if e.model != "policy" and not e.model.startswith(("http://", "https://")):
        # the initial checkpoint (${model.path}) is built first when model.build says so
        check_model_path(e.model, cfg.model.build if e.model == cfg.model.path else None, "extractor.model")


def check_gpus(cfg: OELConfig) -> None:
    """The roles must fit in the allocation: a misfit fails here, in one line, instead of as Ray
    actors pending forever for GPUs that never appear."""
    c = cfg.cluster
    own_extractor = cfg.extractor.model != "policy" and not cfg.extractor.model.startswith(("http://", "https://"))
    actors = {  # GPU field -> how many actors of that role take it
        "rollout_gpus": cfg.rollout.num_workers + int(own_extractor),  # a separate extractor is one more engine
        "teacher_gpus": cfg.teacher.num_actors,
        "learner_gpus": cfg.learner.num_ranks,
    }
    for name in actors:
        gpus = getattr(c, name)
        if c.use_gpu:
            require(0 < gpus <= c.gpus_per_node, f"cluster.{name}",
                    f"{gpus} must be in (0, cluster.gpus_per_node={c.gpus_per_node}] when cluster.use_gpu is true")
        else:
            require(gpus == 0, f"cluster.{name}", f"{gpus} GPUs but cluster.use_gpu is false; set it to 0")
    need = sum(getattr(c, name) * n for name, n in actors.items())
    have = c.nodes * c.gpus_per_node
    require(need <= have, "cluster.nodes",
            f"the roles need {need:g} GPUs ({', '.join(f'{n} x {getattr(c, k):g} {k}' for k, n in actors.items())}) "
            f"but cluster.nodes x cluster.gpus_per_node is {have}")
