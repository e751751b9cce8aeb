"""Hydra structured config: one dataclass per config group, each with the checks of its own fields.

`conf/config.yaml` composes the groups on top of the `oel_schema` registered here, so a key that is
not a field below is refused by Hydra. The checks run in one pipeline from `oel_ray.main`: the
command line (oel_ray/overrides.py), then each group's own fields (`check()` below), then what
spans groups or looks at files (oel_ray/validate.py), then what needs the tokenizer and a game
(oel_ray/preflight.py). Every check raises ConfigError with one line naming the field and the fix.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from oel_ray.errors import choice, positive, require
from oel_ray.strategy import LOSSES, STRATEGIES, TOPK_REVERSE_KL, Strategy
from oel_ray.types import KNOWLEDGE, TEACHER_CONTEXTS

SUPPORTED_GAMES = ("Sokoban", "FrozenLake")
FLOAT32, BFLOAT16, FLOAT16 = "float32", "bfloat16", "float16"
DTYPES = (FLOAT32, BFLOAT16, FLOAT16)
TOKEN_MEAN, SEQUENCE_MEAN = "token_mean", "sequence_mean"  # what the loss is averaged over
AGGREGATIONS = (TOKEN_MEAN, SEQUENCE_MEAN)
SUPPORTS = (STUDENT, MERGED) = ("student", "merged")  # learner.support
KNOWLEDGE_FORMATS = ("structured", "unstructured")
CHAIN_GAMES = (PER_STEP, POOL) = ("per_step", "pool")  # extractor.trajectories
SELECTS = (MIX, BEST) = ("mix", "best")  # extractor.select
KNOWLEDGE_POSITIONS = ("user", "system")
HISTORY_FORMATS = ("flattened", "chat")
CONSOLIDATION_MODES = tuple(STRATEGIES)  # oel_ray/strategy.py: what each mode decides
# learner.weight_sync; GLOO (tests on CPU) runs NCCL's collective code over gloo, never from config
AUTO, OBJECT_STORE, NCCL, GLOO = "auto", "object_store", "nccl", "gloo"
WEIGHT_SYNCS = (AUTO, OBJECT_STORE, NCCL)
TINY_MODEL = "tiny"
EMBEDDED_MODELS = (TINY_MODEL, "organism")  # model.build: the models oel_ray builds itself


@dataclass
class ModelConfig:
    # A local checkpoint directory or a hub id (org/name, resolved from the local hub cache).
    path: str = "${oc.env:OEL_RAY_CACHE,${oc.env:HOME}/.cache/oel_ray}/tiny-qwen3"
    # Build the embedded tiny model at `path` when it is missing (CPU default, no hub needed).
    build: Optional[str] = TINY_MODEL
    dtype: str = FLOAT32
    thinking: bool = False  # Qwen3 `enable_thinking` in the chat template
    trust_remote_code: bool = False
    max_model_len: int = 4096

    def check(self) -> None:
        choice("model.dtype", self.dtype, DTYPES)
        positive("model.max_model_len", self.max_model_len)


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

    def check(self) -> None:
        from textarena.envs.registration import ENV_REGISTRY  # cheap: no environment is built

        supported = sorted(e for e in ENV_REGISTRY if e.split("-")[0] in SUPPORTED_GAMES)
        require(self.id in supported, "env.id", f"{self.id!r} is not one of {', '.join(supported)}")
        require(1 <= self.max_turns <= 100, "env.max_turns", f"{self.max_turns} must be in 1..100")
        positive("env.eval_maps", self.eval_maps)
        positive("env.eval_samples", self.eval_samples)
        positive("env.train_seed_offset", self.train_seed_offset, allow_zero=True)
        require(self.eval_seed_offset >= self.train_seed_offset + 1_000_000, "env.eval_seed_offset",
                f"{self.eval_seed_offset} must be at least env.train_seed_offset + 1000000 "
                "so held-out maps never share seeds with training maps")


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

    def check(self) -> None:
        for name in ("num_workers", "games_per_round", "temperature", "max_response_tokens", "kv_cache_gib",
                     "deploy_games_per_step"):
            positive(f"rollout.{name}", getattr(self, name))
        require(0 < self.top_p <= 1, "rollout.top_p", f"{self.top_p} must be in (0, 1]")
        choice("rollout.history", self.history, HISTORY_FORMATS)
        require(not self.keep_reasoning or self.history == "chat", "rollout.keep_reasoning",
                "only applies to rollout.history=chat (the flattened history never shows earlier replies)")


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
    # Template with {trajectory} and {knowledge} (the items so far); conf/extractor/<format>.yaml holds ours.
    prompt: str = "{knowledge}\n\n{trajectory}"
    with_previous: bool = True  # {knowledge} shows the chain's knowledge so far (public code: exp_sel_with_prev)
    keep_reasoning: bool = True  # the policy's <think> text stays in the games it reads (textgame_keep_reasoning)
    # Which games the chains read: "per_step" (public code: at step i every chain plays training map i
    # itself, on its own sampling seed), or "pool" (K drawn from rollout.games_per_round, per chain).
    trajectories: str = POOL
    # The in-context curve (paper Fig. 4): steps (0..k) at which the held-out maps are played with each
    # chain's knowledge of that step in context; None: 0, K/4, the knowledge step and K; []: no curve.
    eval_steps: Optional[list[int]] = None
    # The curve plays the knowledge of the first n chains (each: every held-out map); None: every chain.
    eval_chains: Optional[int] = None
    select: str = MIX  # best: the teacher reads the one chain and curve step of highest in-context pass rate

    @property
    def knowledge_step(self) -> int:
        """The accumulation step whose knowledge the teacher reads: use_step, or the paper's K/2."""
        return self.use_step or max(1, self.k // 2)

    @property
    def curve_steps(self) -> list[int]:
        """The steps of the in-context curve, ascending: eval_steps, or its default."""
        steps = self.eval_steps if self.eval_steps is not None else [0, self.k // 4, self.knowledge_step, self.k]
        return sorted(set(steps))

    def check(self) -> None:
        for name in ("k", "num_chains", "max_knowledge_tokens", "max_response_tokens", "temperature"):
            positive(f"extractor.{name}", getattr(self, name))
        if self.use_step is not None:
            require(1 <= self.use_step <= self.k, "extractor.use_step",
                    f"{self.use_step} must be in 1..extractor.k ({self.k})")
        if self.eval_steps is not None:
            steps = list(self.eval_steps)
            bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= self.k]
            require(not bad, "extractor.eval_steps",
                    f"{bad[0] if bad else ''} must be an integer in 0..extractor.k ({self.k})")
            twice = sorted({s for s in steps if steps.count(s) > 1})
            require(not twice, "extractor.eval_steps", f"{steps} lists step {twice[0] if twice else ''} more than once")
        if self.eval_chains is not None:
            require(1 <= self.eval_chains <= self.num_chains, "extractor.eval_chains",
                    f"{self.eval_chains} must be in 1..extractor.num_chains ({self.num_chains}), "
                    "or null for every chain")
        choice("extractor.format", self.format, KNOWLEDGE_FORMATS)
        choice("extractor.trajectories", self.trajectories, CHAIN_GAMES)
        choice("extractor.select", self.select, SELECTS)
        require(self.select == MIX or any(s > 0 for s in self.curve_steps), "extractor.select", "best picks by the "
                "in-context pass rate at extractor.eval_steps: list a step above 0 there, or leave it unset")
        require(self.select == MIX or self.eval_chains in (None, self.num_chains), "extractor.select",
                "best picks among every chain's curve: set extractor.eval_chains=null")
        require("{trajectory}" in self.prompt, "extractor.prompt", "the template must contain {trajectory}")
        require(not self.with_previous or "{knowledge}" in self.prompt, "extractor.with_previous",
                "true shows the knowledge so far in {knowledge}, which extractor.prompt lacks: add it to the "
                "template, or set extractor.with_previous=false")
        require(self.max_response_tokens <= self.max_knowledge_tokens, "extractor.max_response_tokens",
                f"{self.max_response_tokens} must not exceed extractor.max_knowledge_tokens ({self.max_knowledge_tokens})")
        if self.model.startswith(("http://", "https://")):
            require(bool(self.endpoint_model), "extractor.endpoint_model",
                    "name the model served at extractor.model (an OpenAI-compatible endpoint)")


@dataclass
class TeacherConfig:
    knowledge_position: str = "user"  # the paper puts knowledge inside the user turn
    # What the teacher reads before the prefix: the extracted "knowledge" (OEL), or the raw
    # "trajectories" it would have been extracted from (the paper's ablation), same length cap.
    # Controls: "none" (no knowledge: the student's own prompt), "shuffled" (each line's words shuffled).
    context: str = KNOWLEDGE
    # Another run's directory: the teacher reads its round_<r>/knowledge.json "set" (e.g. another
    # game's knowledge) instead of this run's; context knowledge or shuffled only.
    knowledge_from: Optional[str] = None
    num_actors: int = 1
    batch_tokens: int = 8192  # tokens per teacher forward pass
    chunk_tokens: int = 1024  # positions per log-softmax chunk (bounds fp32 memory at large V)
    reuse_prefix: bool = True  # encode each shared prompt start (a knowledge text) once per round
    # Encode a batch's prompts while its replies are generated (prefill.py); None: with teacher GPUs
    prefill_prompts: Optional[bool] = None
    model: Optional[str] = None  # another checkpoint (same tokenizer) teaching every round; None: the round's start

    def check(self) -> None:
        choice("teacher.knowledge_position", self.knowledge_position, KNOWLEDGE_POSITIONS)
        choice("teacher.context", self.context, TEACHER_CONTEXTS)
        positive("teacher.num_actors", self.num_actors)
        positive("teacher.chunk_tokens", self.chunk_tokens)
        positive("teacher.batch_tokens", self.batch_tokens)


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
    # Parameter names (fnmatch patterns) kept fixed: the organism's hand-set reading heads (reader_heads.py)
    freeze: list[str] = field(default_factory=list)
    zero_stage: int = 2
    num_ranks: int = 1
    loss: str = TOPK_REVERSE_KL
    support_k: int = 256
    support: str = STUDENT  # merged (the public code's kl_merge_indice): up to 2 x support_k ids per token
    renormalize: bool = False
    tail: bool = False  # one more entry per token for the rest of the vocabulary: the KL of whole distributions
    aggregation: str = TOKEN_MEAN
    temperature: float = "${rollout.temperature}"  # type: ignore[assignment]  # score at the sampling temperature
    dtype: str = "${model.dtype}"
    seed: int = 0
    # Learner -> rollout workers after every step: "object_store" (Ray, any machine), "nccl" (one
    # NCCL group between learner rank 0 and the vLLM workers; GPUs only), "auto" (nccl on GPUs).
    weight_sync: str = AUTO
    sync_bucket_mb: float = 256.0  # nccl: tensors are packed into broadcasts of about this size
    # Save the full training state (weights, optimizer, schedule) every this many steps: a killed run
    # resumes mid-consolidation (the paper checkpoints every 2 steps).
    checkpoint_every: int = 2
    # Torch threads per learner rank; 0: the node's cores split over the ranks while the stages run one
    # after another, the rank's CPU share rounded up while sampling overlaps it (consolidation.async_steps=1).
    threads: int = 0
    reuse_prefix: bool = True  # a bucket's shared prompt start runs once (batching.shared_starts; exact)
    gradient_checkpointing: bool = False  # layers' activations recomputed in backward: less memory, ~1/3 more compute

    def check(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "num_ranks", "checkpoint_every"):
            positive(f"learner.{name}", getattr(self, name))
        positive("learner.threads", self.threads, allow_zero=True)
        require(self.batch_size % (self.grad_accum * self.num_ranks) == 0, "learner.batch_size",
                f"{self.batch_size} must be divisible by learner.grad_accum x learner.num_ranks "
                f"({self.grad_accum} x {self.num_ranks})")
        positive("learner.lr", self.lr)
        positive("learner.weight_decay", self.weight_decay, allow_zero=True)
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "learner.betas",
                f"{list(self.betas)} must be two numbers in [0, 1)")
        positive("learner.grad_clip", self.grad_clip, allow_zero=True)
        positive("learner.warmup_steps", self.warmup_steps, allow_zero=True)
        choice("learner.zero_stage", self.zero_stage, (0, 1, 2, 3))
        choice("learner.loss", self.loss, LOSSES)
        positive("learner.support_k", self.support_k)
        choice("learner.support", self.support, SUPPORTS)
        require(self.support == STUDENT or self.loss == TOPK_REVERSE_KL, "learner.support",
                f"merged joins the teacher's top-k to the student's for learner.loss={TOPK_REVERSE_KL}; "
                f"{self.loss} has no support to merge: set learner.support=student")
        choice("learner.aggregation", self.aggregation, AGGREGATIONS)
        require(not (self.tail and self.renormalize), "learner.tail",
                "true keeps the mass outside the support as one entry, learner.renormalize=true spreads it over the "
                "support: set one of them to false")
        positive("learner.temperature", self.temperature)
        choice("learner.dtype", self.dtype, DTYPES)
        choice("learner.weight_sync", self.weight_sync, WEIGHT_SYNCS)
        positive("learner.sync_bucket_mb", self.sync_bucket_mb)


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

    def check(self) -> None:
        for name in ("cpus_per_actor", "rollout_cpus", "teacher_cpus", "learner_cpus"):
            positive(f"cluster.{name}", getattr(self, name))
        positive("cluster.timeout_s", self.timeout_s)
        positive("cluster.nodes", self.nodes)
        positive("cluster.gpus_per_node", self.gpus_per_node, allow_zero=True)
        require(self.nodes == 1 or self.address is not None, "cluster.nodes",
                f"{self.nodes} nodes need a running Ray cluster: set cluster.address (launch/slurm/oel_ray.sbatch "
                "starts one and sets it); a private local Ray spans one node")


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
    def strategy(self) -> Strategy:
        """Which loss, which prompt the workers sample, when weights sync, which KL is reported."""
        return STRATEGIES[self.mode]

    def check(self) -> None:
        choice("consolidation.mode", self.mode, CONSOLIDATION_MODES)
        choice("consolidation.async_steps", self.async_steps, (0, 1))


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

    def check(self) -> None:
        choice("ood.unknown_instructions", self.unknown_instructions, ("skip", "error"))
        require(self.ifeval in ("fixture", "lm_eval", "none") or os.path.isfile(os.path.expanduser(self.ifeval)),
                "ood.ifeval", f"{self.ifeval!r} is not a file; give fixture, lm_eval, none, or the path of an IF-Eval JSONL")
        require(0 < self.lm_eval_gpu_memory_utilization <= 1, "ood.lm_eval_gpu_memory_utilization",
                f"{self.lm_eval_gpu_memory_utilization} must be in (0, 1]")


@dataclass
class TrackingConfig:
    tensorboard: bool = True  # per-step scalars under <output_dir>/tensorboard
    wandb: bool = False  # needs `pip install wandb`; the key comes from WANDB_API_KEY, never config
    wandb_project: str = "oel_ray"
    progress_bars: bool = True

    def check(self) -> None:
        if self.wandb:
            require(importlib.util.find_spec("wandb") is not None, "tracking.wandb",
                    "true needs the wandb package: pip install wandb (or set tracking.wandb=false)")


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

    def check(self) -> None:
        """Each group's own fields, in the order of the groups above."""
        positive("rounds", self.rounds)
        for group in (getattr(self, f.name) for f in fields(self) if hasattr(getattr(self, f.name), "check")):
            group.check()


def register() -> None:
    ConfigStore.instance().store(name="oel_schema", node=OELConfig)
