"""Hydra structured config: one dataclass per config group, validated before any expensive work.

`conf/config.yaml` composes the groups on top of the `oel_schema` registered here, so a key that
is not a field below is refused by Hydra, and `validate()` checks values with one-line errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

SUPPORTED_GAMES = ("Sokoban", "FrozenLake")
DTYPES = ("float32", "bfloat16", "float16")
LOSSES = ("topk_reverse_kl", "full_reverse_kl", "sampled_reverse_kl")
AGGREGATIONS = ("token_mean", "sequence_mean")
KNOWLEDGE_FORMATS = ("structured", "unstructured")
KNOWLEDGE_POSITIONS = ("user", "system")
HISTORY_FORMATS = ("flattened", "chat")
TEACHER_CONTEXTS = ("knowledge", "trajectories", "none", "shuffled")  # see oel_ray/controls.py
CONSOLIDATION_MODES = ("on_policy", "off_policy")
WEIGHT_SYNCS = ("auto", "object_store", "nccl")
TINY_MODEL = "tiny"
EMBEDDED_MODELS = (TINY_MODEL, "organism")  # model.build: the models oel_ray builds itself


class ConfigError(ValueError):
    """A user's configuration mistake: reported as one line naming the field and the fix."""


class InputError(ConfigError):
    """A file the run reads is missing or corrupt: reported as one line naming the file and the fix."""


@dataclass
class ModelConfig:
    # A local checkpoint directory or a hub id (org/name, resolved from the local hub cache).
    path: str = "${oc.env:OEL_RAY_CACHE,${oc.env:HOME}/.cache/oel_ray}/tiny-qwen3"
    # Build the embedded tiny model at `path` when it is missing (CPU default, no hub needed).
    build: Optional[str] = TINY_MODEL
    dtype: str = "float32"
    thinking: bool = False  # Qwen3 `enable_thinking` in the chat template
    trust_remote_code: bool = False
    max_model_len: int = 4096


@dataclass
class EnvConfig:
    id: str = "Sokoban-v0"
    # Empty here: Hydra merges a dict field with the env file's, so a default here would leak into
    # every other game (FrozenLake refused Sokoban's dim_room). conf/env/*.yaml give them.
    kwargs: dict[str, Any] = field(default_factory=dict)
    max_turns: int = 5
    train_seed_offset: int = 0
    eval_seed_offset: int = 10_000_000  # held-out maps live far from every training seed
    eval_maps: int = 128
    eval_samples: int = 1  # sampling seeds per held-out map
    # True: every map is a distinct board and no training board is a held-out one (Sokoban).
    # False: maps are seeds and boards may repeat (paper's FrozenLake 3x3 has only 19 boards);
    # training and held-out maps are then disjoint by seed only.
    distinct_boards: bool = True


@dataclass
class RolloutConfig:
    num_workers: int = 1
    games_per_round: int = 8  # trajectories collected for extraction each round
    deploy_games_per_step: int = 64  # maps the round-start model plays per consolidation step
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = -1
    eval_top_p: float = 0.8
    eval_top_k: int = 20
    max_response_tokens: int = 1024
    kv_cache_gib: float = 1.0  # CPU engine's KV cache
    gpu_memory_utilization: float = 0.85
    seed: int = 0
    # "flattened" (paper): one user message holding every earlier board and action, no earlier
    # replies. "chat": observations as user turns, earlier replies as assistant turns.
    history: str = "flattened"
    keep_reasoning: bool = False  # chat only: keep earlier <think> blocks the template would drop
    bind_cores: bool = True  # CPU only: each worker's threads on its own share of the node's cores


@dataclass
class ExtractorConfig:
    k: int = 4  # trajectories accumulated per chain
    use_step: Optional[int] = None  # accumulation step whose knowledge is used; None: k // 2 (paper)
    num_chains: int = 2  # N independent chains (orders and sampling seeds)
    format: str = "structured"
    max_knowledge_tokens: int = 8192  # L: bound on each extraction and the accumulated knowledge
    max_response_tokens: int = 1024
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    # "policy" (the deployed weights), a local checkpoint path, or an OpenAI-compatible base URL
    # (http(s)://host/v1) serving `endpoint_model`, with the key in the env var `api_key_env`.
    model: str = "policy"
    endpoint_model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    # Prompt template with {trajectory} and, for accumulation against earlier items, {knowledge};
    # conf/extractor/<format>.yaml holds the team's templates.
    prompt: str = "{knowledge}\n\n{trajectory}"
    # The in-context curve (paper Fig. 4): accumulation steps (0..k) at which the held-out maps are
    # played with each chain's knowledge of that step in the teacher's prompt; None: 0, K/4, the
    # knowledge step and K (follows extractor.k in a sweep); []: no curve.
    eval_steps: Optional[list[int]] = None

    @property
    def knowledge_step(self) -> int:
        """The accumulation step whose knowledge the teacher reads: use_step, or the paper's K/2."""
        return self.use_step or max(1, self.k // 2)

    @property
    def curve_steps(self) -> list[int]:
        """The steps of the in-context curve, ascending: eval_steps, or its default."""
        steps = self.eval_steps if self.eval_steps is not None else [0, self.k // 4, self.knowledge_step, self.k]
        return sorted(set(steps))


@dataclass
class TeacherConfig:
    knowledge_position: str = "user"  # the paper puts knowledge inside the user turn
    # What the teacher reads before the prefix: the extracted "knowledge" (OEL), or the raw
    # "trajectories" it would have been extracted from (the paper's ablation), same length cap.
    # Controls: "none" (an empty knowledge block), "shuffled" (each line's words shuffled).
    context: str = "knowledge"
    # Another run's directory: the teacher reads its round_<r>/knowledge.json "set" (e.g. another
    # game's knowledge) instead of this run's; context knowledge or shuffled only.
    knowledge_from: Optional[str] = None
    num_actors: int = 1
    batch_tokens: int = 8192  # tokens per teacher forward pass
    chunk_tokens: int = 1024  # positions per log-softmax chunk (bounds fp32 memory at large V)


@dataclass
class LearnerConfig:
    steps: int = 100  # optimizer steps per round
    batch_size: int = 64  # prefixes per optimizer step (global)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    warmup_steps: int = 0
    # Parameter names (fnmatch patterns, e.g. "model.layers.0.*") kept fixed during consolidation;
    # the organism keeps its hand-set reading heads (oel_ray/reader_heads.py) this way.
    freeze: list[str] = field(default_factory=list)
    zero_stage: int = 2
    num_ranks: int = 1
    loss: str = "topk_reverse_kl"
    support_k: int = 256
    renormalize: bool = False
    aggregation: str = "token_mean"
    temperature: float = "${rollout.temperature}"  # type: ignore[assignment]  # score at the sampling temperature
    dtype: str = "${model.dtype}"
    seed: int = 0
    # Learner -> rollout workers after every step: "object_store" (Ray, any machine), "nccl" (one
    # NCCL group between learner rank 0 and the vLLM workers; GPUs only), "auto" (nccl on GPUs).
    weight_sync: str = "auto"
    sync_bucket_mb: float = 256.0  # nccl: tensors are packed into broadcasts of about this size
    # Save the full training state (weights, optimizer, schedule) every this many steps, so an
    # interrupted run resumes mid-consolidation (the paper checkpoints every 2 steps).
    checkpoint_every: int = 2
    # Torch threads per learner rank; 0: every core of the node split over the ranks when the
    # consolidation stages run one after another (nothing else computes meanwhile), the rank's CPU
    # share rounded up when sampling overlaps the learner (consolidation.async_steps=1).
    threads: int = 0


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # None: start a local Ray; "auto": join a running cluster
    num_cpus: Optional[float] = None  # local Ray only
    dashboard: bool = False
    use_gpu: bool = False
    cpus_per_actor: float = 0.5  # fractional CPUs let all roles share a small machine
    # CPUs per rollout worker, teacher actor and learner rank (each role's placement-group bundle)
    rollout_cpus: float = "${cluster.cpus_per_actor}"  # type: ignore[assignment]
    teacher_cpus: float = "${cluster.cpus_per_actor}"  # type: ignore[assignment]
    learner_cpus: float = "${cluster.cpus_per_actor}"  # type: ignore[assignment]
    timeout_s: float = 1800.0  # collective / actor-call timeout before failing with a clear message
    # The allocation a job asks for (launch/slurm/submit.sh hands these to sbatch) and the GPUs
    # each actor takes from it: per rollout worker (one vLLM engine), per teacher actor, per
    # learner rank. All zero on CPU; with use_gpu every role must fit in nodes x gpus_per_node.
    nodes: int = 1
    gpus_per_node: int = 0
    rollout_gpus: float = 0.0
    teacher_gpus: float = 0.0
    learner_gpus: float = 0.0


@dataclass
class ConsolidationConfig:
    # "on_policy" (OEL): the student samples, reverse KL to the teacher on the student's support.
    # "off_policy" (context-distillation baseline): the teacher, with the knowledge in context,
    # samples once per prefix at round start; the student minimises forward KL on those replies.
    mode: str = "on_policy"
    # 0: strictly on-policy, every batch is sampled by the current weights. 1: the workers sample
    # (and the teacher scores) batch t+1 while the learner takes step t, so batch t+1 comes from
    # weights one step old (StepMetrics.policy_lag = 1): faster, one step off-policy. On CPU pair it
    # with rollout.bind_cores=false: bound, the workers' engines take every core from the learner.
    async_steps: int = 0

    @property
    def on_policy(self) -> bool:
        """The student samples with the current weights, which reach the rollout workers after every
        step; off-policy, the workers keep the round-start (teacher) weights until the round ends."""
        return self.mode == "on_policy"


@dataclass
class OODConfig:
    # IF-Eval prompt-level strict accuracy, measured every round beside the pass rate (the paper's
    # out-of-distribution check): "fixture" (the team's small IF-Eval-format set), the path of an
    # IF-Eval JSONL (e.g. google-research's input_data.jsonl), "lm_eval" (lm-eval's ifeval task on
    # each round's saved checkpoint through its vLLM backend; needs lm-eval and its data offline), or "none".
    ifeval: str = "fixture"
    max_tokens: int = "${rollout.max_response_tokens}"  # type: ignore[assignment]  # paper: 1280
    unknown_instructions: str = "skip"  # ids without a checker (language detection): skip or error
    seed: int = 42
    # lm_eval: its engine starts beside the idle rollout engines, on the driver node's first GPU
    lm_eval_gpu_memory_utilization: float = 0.1


@dataclass
class TrackingConfig:
    tensorboard: bool = True  # per-step scalars under <output_dir>/tensorboard
    wandb: bool = False  # needs `pip install wandb`; the key comes from WANDB_API_KEY, never config
    wandb_project: str = "oel_ray"
    progress_bars: bool = True


@dataclass
class OELConfig:
    name: str = "tiny"
    rounds: int = 1
    seed: int = 0
    output_dir: str = "${hydra:runtime.output_dir}"
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    consolidation: ConsolidationConfig = field(default_factory=ConsolidationConfig)
    ood: OODConfig = field(default_factory=OODConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def register() -> None:
    ConfigStore.instance().store(name="oel_schema", node=OELConfig)


# ----------------------------------------------------------------------------- validation

def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    _require(value in allowed, name, f"{value!r} is not one of {', '.join(map(str, allowed))}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    _require(ok, name, f"{value} must be {'>= 0' if allow_zero else '> 0'}")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_path(path: str, build: Optional[str], name: str = "model.path") -> None:
    from oel_ray import checks  # lazy: checks imports this module

    if build is not None:
        _choice("model.build", build, EMBEDDED_MODELS)
        problem = checks.tiny_target_problem(Path(path).expanduser(), build)
        _require(problem is None, name, f"{path!r} is not a place to build the {build} model: {problem}; model.build={build} "
                 "writes only to a new or empty directory or its own earlier build: point model.path elsewhere, or "
                 "set model.build=null to load the checkpoint there")
        return
    if os.path.isdir(path):
        problem = checks.checkpoint_problem(Path(path))
        _require(problem is None, name, f"{path!r} is not a checkpoint: {problem}; give a checkpoint directory "
                 "(config.json, *.safetensors, tokenizer) or a hub id such as Qwen/Qwen3-4B-Instruct-2507")
        return
    if HUB_ID.match(path) and not os.path.exists(path):
        return  # a hub id, resolved from the local hub cache by transformers / vLLM
    raise ConfigError(
        f"{name}: {path!r} does not exist; give a checkpoint directory, a hub id such as "
        "Qwen/Qwen3-4B-Instruct-2507, or model.build=tiny to build the embedded model there"
    )


def check_env_id(env_id: str) -> None:
    from textarena.envs.registration import ENV_REGISTRY  # cheap: no environment is built

    supported = sorted(e for e in ENV_REGISTRY if e.split("-")[0] in SUPPORTED_GAMES)
    _require(env_id in supported, "env.id", f"{env_id!r} is not one of {', '.join(supported)}")


def validate(cfg: OELConfig) -> OELConfig:
    """Check every value a user can get wrong; raises ConfigError (one line) on the first."""
    from oel_ray import checks  # lazy: checks imports this module

    checks.finite(cfg)  # first: nan passes no comparison and inf passes every "> 0"
    _positive("rounds", cfg.rounds)
    check_model_path(cfg.model.path, cfg.model.build)
    _choice("model.dtype", cfg.model.dtype, DTYPES)
    _positive("model.max_model_len", cfg.model.max_model_len)

    check_env_id(cfg.env.id)
    _require(1 <= cfg.env.max_turns <= 100, "env.max_turns", f"{cfg.env.max_turns} must be in 1..100")
    _positive("env.eval_maps", cfg.env.eval_maps)
    _positive("env.eval_samples", cfg.env.eval_samples)
    _positive("env.train_seed_offset", cfg.env.train_seed_offset, allow_zero=True)
    _require(
        cfg.env.eval_seed_offset >= cfg.env.train_seed_offset + 1_000_000,
        "env.eval_seed_offset",
        f"{cfg.env.eval_seed_offset} must be at least env.train_seed_offset + 1000000 "
        "so held-out maps never share seeds with training maps",
    )
    if not cfg.env.distinct_boards:
        from oel_ray.games import ROUND_SEED_STRIDE  # lazy: games imports this module

        # Seeds are then the only thing keeping the sets apart: the last round's streams must stay
        # below the first held-out seed.
        last = cfg.env.train_seed_offset + (cfg.rounds + 1) * ROUND_SEED_STRIDE
        _require(last <= cfg.env.eval_seed_offset, "env.eval_seed_offset",
                 f"{cfg.env.eval_seed_offset} must be at least {last} (env.train_seed_offset + (rounds + 1) "
                 f"x {ROUND_SEED_STRIDE}) so training seeds never reach held-out seeds")

    r = cfg.rollout
    _positive("rollout.num_workers", r.num_workers)
    _positive("rollout.games_per_round", r.games_per_round)
    _positive("rollout.temperature", r.temperature)
    _require(0 < r.top_p <= 1, "rollout.top_p", f"{r.top_p} must be in (0, 1]")
    _positive("rollout.max_response_tokens", r.max_response_tokens)
    _require(
        r.max_response_tokens < cfg.model.max_model_len,
        "rollout.max_response_tokens",
        f"{r.max_response_tokens} must be below model.max_model_len ({cfg.model.max_model_len})",
    )
    _positive("rollout.kv_cache_gib", r.kv_cache_gib)
    _positive("rollout.deploy_games_per_step", r.deploy_games_per_step)
    _choice("rollout.history", r.history, HISTORY_FORMATS)
    _require(not r.keep_reasoning or r.history == "chat", "rollout.keep_reasoning",
             "only applies to rollout.history=chat (the flattened history never shows earlier replies)")
    from oel_ray.games import STREAM_SEED_STRIDE  # lazy: games imports this module

    deploy = cfg.learner.steps * r.deploy_games_per_step
    _require(deploy <= STREAM_SEED_STRIDE, "rollout.deploy_games_per_step",
             f"learner.steps x rollout.deploy_games_per_step = {deploy} maps per round exceeds the "
             f"{STREAM_SEED_STRIDE} seeds of a map stream; lower one of them")

    e = cfg.extractor
    _positive("extractor.k", e.k)
    _positive("extractor.num_chains", e.num_chains)
    if e.use_step is not None:
        _require(1 <= e.use_step <= e.k, "extractor.use_step", f"{e.use_step} must be in 1..extractor.k ({e.k})")
    if e.eval_steps is not None:
        steps = list(e.eval_steps)
        bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= e.k]
        _require(not bad, "extractor.eval_steps", f"{bad[0] if bad else ''} must be an integer in 0..extractor.k ({e.k})")
        twice = sorted({s for s in steps if steps.count(s) > 1})
        _require(not twice, "extractor.eval_steps", f"{steps} lists step {twice[0] if twice else ''} more than once")
    _choice("extractor.format", e.format, KNOWLEDGE_FORMATS)
    _positive("extractor.max_knowledge_tokens", e.max_knowledge_tokens)
    _positive("extractor.max_response_tokens", e.max_response_tokens)
    _positive("extractor.temperature", e.temperature)
    _require("{trajectory}" in e.prompt, "extractor.prompt", "the template must contain {trajectory}")
    _require(
        e.max_response_tokens <= e.max_knowledge_tokens,
        "extractor.max_response_tokens",
        f"{e.max_response_tokens} must not exceed extractor.max_knowledge_tokens ({e.max_knowledge_tokens})",
    )
    _require(  # the extraction prompt is cut to leave a full reply room: some must be left for it
        e.max_response_tokens < cfg.model.max_model_len,
        "extractor.max_response_tokens",
        f"{e.max_response_tokens} must be below model.max_model_len ({cfg.model.max_model_len})",
    )
    if e.model.startswith(("http://", "https://")):
        _require(bool(e.endpoint_model), "extractor.endpoint_model",
                 "name the model served at extractor.model (an OpenAI-compatible endpoint)")
    elif e.model != "policy":  # the initial checkpoint (${model.path}) is built first when model.build says so
        check_model_path(e.model, cfg.model.build if e.model == cfg.model.path else None, "extractor.model")
    _require(
        e.k <= r.games_per_round,
        "extractor.k",
        f"{e.k} trajectories per chain but rollout.games_per_round is {r.games_per_round}; "
        "raise rollout.games_per_round or lower extractor.k",
    )

    _choice("teacher.knowledge_position", cfg.teacher.knowledge_position, KNOWLEDGE_POSITIONS)
    _choice("teacher.context", cfg.teacher.context, TEACHER_CONTEXTS)
    if cfg.teacher.knowledge_from:  # another run's knowledge files: read now, not rounds later
        from oel_ray.controls import check_knowledge_from

        check_knowledge_from(cfg.teacher, cfg.rounds)
    _choice("consolidation.mode", cfg.consolidation.mode, CONSOLIDATION_MODES)
    _choice("consolidation.async_steps", cfg.consolidation.async_steps, (0, 1))
    _require(0 < cfg.ood.max_tokens < cfg.model.max_model_len, "ood.max_tokens",
             f"{cfg.ood.max_tokens} must be in 1..model.max_model_len - 1 ({cfg.model.max_model_len - 1})")
    _choice("ood.unknown_instructions", cfg.ood.unknown_instructions, ("skip", "error"))
    _require(cfg.ood.ifeval in ("fixture", "lm_eval", "none") or os.path.isfile(os.path.expanduser(cfg.ood.ifeval)),
             "ood.ifeval", f"{cfg.ood.ifeval!r} is not a file; give fixture, lm_eval, none, or the path of an IF-Eval JSONL")
    _require(0 < cfg.ood.lm_eval_gpu_memory_utilization <= 1, "ood.lm_eval_gpu_memory_utilization",
             f"{cfg.ood.lm_eval_gpu_memory_utilization} must be in (0, 1]")
    _require(cfg.consolidation.on_policy or cfg.learner.loss == "topk_reverse_kl",
             "learner.loss", "off_policy consolidation uses the forward KL on the teacher's own top-k; "
             "keep learner.loss=topk_reverse_kl (the default)")
    _positive("teacher.num_actors", cfg.teacher.num_actors)
    _positive("teacher.chunk_tokens", cfg.teacher.chunk_tokens)
    _positive("teacher.batch_tokens", cfg.teacher.batch_tokens)

    lr = cfg.learner
    _positive("learner.steps", lr.steps)
    _positive("learner.batch_size", lr.batch_size)
    _positive("learner.grad_accum", lr.grad_accum)
    _positive("learner.num_ranks", lr.num_ranks)
    _positive("learner.checkpoint_every", lr.checkpoint_every)
    _positive("learner.threads", lr.threads, allow_zero=True)
    if cfg.tracking.wandb:
        import importlib.util

        _require(importlib.util.find_spec("wandb") is not None, "tracking.wandb",
                 "true needs the wandb package: pip install wandb (or set tracking.wandb=false)")
    _require(
        lr.batch_size % (lr.grad_accum * lr.num_ranks) == 0,
        "learner.batch_size",
        f"{lr.batch_size} must be divisible by learner.grad_accum x learner.num_ranks "
        f"({lr.grad_accum} x {lr.num_ranks})",
    )
    _positive("learner.lr", lr.lr)
    _positive("learner.weight_decay", lr.weight_decay, allow_zero=True)
    _require(len(lr.betas) == 2 and all(0 <= b < 1 for b in lr.betas), "learner.betas",
             f"{list(lr.betas)} must be two numbers in [0, 1)")
    _positive("learner.grad_clip", lr.grad_clip, allow_zero=True)
    _positive("learner.warmup_steps", lr.warmup_steps, allow_zero=True)
    _choice("learner.zero_stage", lr.zero_stage, (0, 1, 2, 3))
    _choice("learner.loss", lr.loss, LOSSES)
    _positive("learner.support_k", lr.support_k)
    _choice("learner.aggregation", lr.aggregation, AGGREGATIONS)
    _positive("learner.temperature", lr.temperature)
    _choice("learner.dtype", lr.dtype, DTYPES)
    _choice("learner.weight_sync", lr.weight_sync, WEIGHT_SYNCS)
    _require(lr.weight_sync != "nccl" or cfg.cluster.use_gpu, "learner.weight_sync",
             "nccl needs GPUs (cluster.use_gpu=true); use auto or object_store on CPU")
    _positive("learner.sync_bucket_mb", lr.sync_bucket_mb)

    check_cluster(cfg)
    checks.model_limits(cfg)  # the model's own sizes, from its config.json when it is on disk
    return cfg


def check_cluster(cfg: OELConfig) -> None:
    """The roles must fit in the allocation: a misfit fails here, in one line, instead of as Ray
    actors pending forever for GPUs that never appear."""
    c = cfg.cluster
    for name in ("cpus_per_actor", "rollout_cpus", "teacher_cpus", "learner_cpus"):
        _positive(f"cluster.{name}", getattr(c, name))
    _positive("cluster.timeout_s", c.timeout_s)
    _positive("cluster.nodes", c.nodes)
    _positive("cluster.gpus_per_node", c.gpus_per_node, allow_zero=True)
    _require(c.nodes == 1 or c.address is not None, "cluster.nodes",
             f"{c.nodes} nodes need a running Ray cluster: set cluster.address (launch/slurm/oel_ray.sbatch "
             "starts one and sets it); a private local Ray spans one node")
    own_extractor = cfg.extractor.model != "policy" and not cfg.extractor.model.startswith(("http://", "https://"))
    actors = {  # GPU field -> how many actors of that role take it
        "rollout_gpus": cfg.rollout.num_workers + int(own_extractor),  # a separate extractor is one more engine
        "teacher_gpus": cfg.teacher.num_actors,
        "learner_gpus": cfg.learner.num_ranks,
    }
    for name in actors:
        gpus = getattr(c, name)
        if c.use_gpu:
            _require(0 < gpus <= c.gpus_per_node, f"cluster.{name}",
                     f"{gpus} must be in (0, cluster.gpus_per_node={c.gpus_per_node}] when cluster.use_gpu is true")
        else:
            _require(gpus == 0, f"cluster.{name}", f"{gpus} GPUs but cluster.use_gpu is false; set it to 0")
    need = sum(getattr(c, name) * n for name, n in actors.items())
    have = c.nodes * c.gpus_per_node
    _require(need <= have, "cluster.nodes",
             f"the roles need {need:g} GPUs ({', '.join(f'{n} x {getattr(c, k):g} {k}' for k, n in actors.items())}) "
             f"but cluster.nodes x cluster.gpus_per_node is {have}")


# ----------------------------------------------------------------------------- override pre-check

def _parse_as(kind: Any, text: str) -> None:
    """Raise ValueError where `text` cannot be a value of the scalar type `kind`."""
    if typing.get_origin(kind) is typing.Union:  # Optional[X]
        if text == "null":
            return
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is bool and text.lower() not in ("true", "false"):
        raise ValueError("true or false")
    if kind is int:
        int(text)
    if kind is float:
        float(text)


def check_override_keys(overrides: list[str]) -> None:
    """Refuse `section.typo=value` and ill-typed values with one line, before Hydra's multi-line
    errors and before anything expensive starts. Group choices (`env=frozenlake`) are left to Hydra."""
    for item in overrides:
        if "=" not in item or item.startswith(("~", "hydra.", "hydra/")):
            continue
        key, value = item.split("=", 1)
        key = key.lstrip("+")
        parts = key.split(".")
        if len(parts) == 1 and key in _GROUPS:
            _check_group_choice(key, item, value)
            continue
        node: Any = OELConfig
        for depth, part in enumerate(parts):
            if not dataclasses.is_dataclass(node):
                break  # inside a free dict such as env.kwargs
            hints = typing.get_type_hints(node)
            if part not in hints:
                where = ".".join(parts[:depth])
                hint = difflib.get_close_matches(part, hints, n=1)
                guess = f"did you mean {'.'.join(parts[:depth] + hint)}? " if hint else ""
                raise ConfigError(f"{key}: no such field; {guess}fields in {where or 'the top level'}: "
                                  f"{', '.join(sorted(hints))}")
            node = hints[part]
        else:
            for one in _swept_values(item, value):
                if one.startswith("${") or dataclasses.is_dataclass(node):
                    continue
                try:
                    _parse_as(node, one)
                except ValueError:
                    name = getattr(node, "__name__", str(node).replace("typing.", ""))
                    raise ConfigError(f"{key}: {one!r} is not a valid {name}") from None


def _check_group_choice(group: str, item: str, value: str) -> None:
    """`env=frozenlake`, `+experiment=sokoban_4b`: each chosen option must be a file in conf/<group>/."""
    options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    for one in _swept_values(item, value):
        if one not in options and not one.startswith("${"):
            raise ConfigError(f"{group}: {one!r} is not one of {', '.join(options)} (files in conf/{group}/)")


def _swept_values(item: str, value: str) -> list[str]:
    """Each value an override sets: one, or every value of a multirun sweep (`extractor.k=2,4`,
    `range(1,5)`, `choice(...)`), so each is type-checked on its own."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        override = OverridesParser.create().parse_override(item)
    except Exception:  # not Hydra syntax: check the text as it is
        return [value]
    if not override.is_sweep_override():
        return [value]
    try:
        return [str(v) for v in override.sweep_string_iterator()]
    except Exception:  # interval(): a continuous range, no list of values to check
        return []


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
_GROUPS = {"model", "env", "rollout", "extractor", "teacher", "learner", "cluster", "experiment"}
