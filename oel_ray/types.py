"""The data that crosses actor boundaries, defined once.

Everything here is a plain dataclass of Python scalars, strings and numpy arrays, so Ray moves it
through the object store without custom serialisers (numpy arrays travel zero-copy).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

TRAJECTORY_SCHEMA_VERSION = 1
TRAIN, EVAL = "train", "eval"  # GameSpec.split: collection and extraction, or the held-out maps
# Trajectory.outcome; ERROR: the environment raised (a bug in a game ends that game, not the round)
WIN, LOSS, INVALID, TURN_LIMIT, ERROR = "win", "loss", "invalid", "turn_limit", "error"


def turn_limit_reason(turns: int) -> str:
    """A game's closing reason when it reached a limit of `turns` turns unfinished."""
    return f"The turn limit of {turns} turns was reached before the game ended."
# teacher.context, what the teacher reads before the prefix (oel_ray/controls.py): the extracted
# knowledge (OEL), the raw trajectories instead, nothing, or each line's words shuffled
KNOWLEDGE, TRAJECTORIES, NO_KNOWLEDGE, SHUFFLED = "knowledge", "trajectories", "none", "shuffled"
TEACHER_CONTEXTS = (KNOWLEDGE, TRAJECTORIES, NO_KNOWLEDGE, SHUFFLED)
RAW_TRAJECTORIES = "raw_trajectories"  # KnowledgeRecord.format under teacher.context=trajectories


@dataclass(frozen=True)
class GameSpec:
    """One game to play: which environment, which map (seed), and why (train/eval)."""

    env_id: str
    seed: int
    split: str = TRAIN  # TRAIN or EVAL
    env_kwargs: dict = field(default_factory=dict)
    # Knowledge in the prompt, placed as the teacher reads it (the in-context curve); "" plays the
    # plain student prompt. Turn.prompt records the prompt without it either way.
    knowledge: str = ""


@dataclass
class Turn:
    prompt: str  # the user message the model saw this turn (flattened history, no knowledge)
    response: str  # the model's full reply, reasoning included
    response_tokens: int
    action: Optional[str]  # parsed action ("up", ...) or None when none could be parsed
    feedback: str  # what the environment answered (move result, invalid-move reason, new board)


@dataclass
class Trajectory:
    env_id: str
    seed: int
    split: str
    round: int
    model_version: int  # number of optimizer steps behind the weights that played this game
    turns: list[Turn]
    outcome: str  # WIN, LOSS, INVALID, TURN_LIMIT or ERROR
    reward: float  # the game's own reward; a pass is reward == 1.0
    reason: str  # the environment's closing reason
    schema_version: int = TRAJECTORY_SCHEMA_VERSION

    @property
    def passed(self) -> bool:
        return self.reward == 1.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> "Trajectory":
        row = dict(row)
        version = row.get("schema_version")
        if version != TRAJECTORY_SCHEMA_VERSION:
            raise ValueError(
                f"trajectory schema_version {version!r} is not {TRAJECTORY_SCHEMA_VERSION}; "
                "re-collect with this version of oel_ray"
            )
        row["turns"] = [Turn(**t) for t in row["turns"]]
        return cls(**row)


@dataclass
class Generation:
    """One sampled reply from a rollout engine."""

    token_ids: list[int]
    text: str
    finished: bool  # ended on EOS/stop rather than on the token limit
    # Student top-k support per generated position, shape [len(token_ids), k], int32; None unless asked.
    topk_ids: Optional[np.ndarray] = None


@dataclass
class DistillSample:
    """One consolidation example: a reply to a partial-trajectory prefix, and what the frozen
    teacher says of it (filled by TeacherGroup.score; None for full_reverse_kl, whose teacher copy
    lives in the learner)."""

    student_prompt_ids: list[int]  # chat-templated prefix without knowledge
    teacher_prompt_ids: list[int]  # the same prefix with the knowledge text in context
    response_ids: list[int]  # the sampled reply (identical under both prompts)
    support_ids: Optional[np.ndarray] = None  # [len(response_ids), k] int32 top-k ids of the sampling model
    # [len(response_ids), k] float32 teacher log-probs on support_ids; [len(response_ids), 1] on the
    # reply's own tokens for sampled_reverse_kl
    teacher_logprobs: Optional[np.ndarray] = None


@dataclass
class StepMetrics:
    step: int
    loss: float
    kl: float  # token-mean KL the loss minimises (kl_direction), on the support, before renormalisation
    student_mass: float  # mean student probability mass inside the support
    teacher_mass: float  # mean teacher probability mass inside the support
    grad_norm: float
    lr: float
    response_tokens: int
    seconds: dict[str, float] = field(default_factory=dict)  # per-phase wall time
    # Optimizer steps the sampling weights were behind the learner's: 0 on-policy, 1 for batches
    # sampled while the learner took the previous step (consolidation.async_steps=1).
    policy_lag: int = 0
    kl_direction: str = ""  # strategy.REVERSE or strategy.FORWARD


@dataclass
class KnowledgeSnapshot:
    """One chain's accumulated knowledge after `step` trajectories (step 0: empty)."""

    chain: int
    step: int
    text: str
    num_tokens: int
    trajectory_seeds: list[int]  # the maps it was extracted from, in order


@dataclass
class KnowledgeRecord:
    """A round's knowledge.json: what the chains extracted, and what the teacher reads."""

    use_step: int  # the accumulation step consolidation reads (extractor.knowledge_step)
    format: str  # extractor.format, or RAW_TRAJECTORIES
    teacher_reads: str  # teacher.context
    set: list[str]  # the texts the teacher reads (controls.teacher_set): one empty text under NO_KNOWLEDGE
    chains: list[list[KnowledgeSnapshot]]  # every chain at every accumulation step 0..k
    knowledge_from: Optional[str] = None  # teacher.knowledge_from: the run whose knowledge `set` is

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        if self.knowledge_from is None:
            del row["knowledge_from"]
        return row

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> "KnowledgeRecord":
        return cls(**{**row, "chains": [[KnowledgeSnapshot(**s) for s in chain] for chain in row["chains"]]})

    def set_problem(self) -> Optional[str]:
        """Why the teacher cannot read `set` (None when it can)."""
        if self.teacher_reads == NO_KNOWLEDGE and self.set == [""]:
            return None
        if not isinstance(self.set, list) or not any(isinstance(t, str) and t.strip() for t in self.set):
            return "the knowledge set is empty"
        return None


@dataclass(frozen=True)
class Sampling:
    """How a reply is sampled (vLLM's SamplingParams, the fields oel_ray sets): sent to the rollout
    workers with every batch."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: Optional[int] = None
    support_k: int = 0  # return the student's top-k token ids per generated position when > 0
