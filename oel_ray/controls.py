"""What the teacher reads, per `teacher.context`: the controls of the organism experiment.

- knowledge: the round's extracted knowledge (OEL).
- trajectories: the raw trajectories instead (paper Table 2); extracted in extractor.run(raw=True).
- none: no knowledge. Blank knowledge is no block at all (`prompts.teacher_messages`, as in the
  paper's code), so the teacher is the round-start model on the student's own prompt: consolidation
  has nothing to take in, and whatever the student still moves is the machinery's own drift.
- shuffled: each chain's knowledge with the words of each line shuffled (item markers kept at the
  line start): the same words, no meaning.
`teacher.knowledge_from` points at another run (e.g. another game's): the teacher reads that run's
knowledge of the same round instead of this run's (shuffled too under context=shuffled).
Extraction always runs; knowledge.json keeps the chains and records in "set" what the teacher read.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

from oel_ray.artifacts import knowledge_texts
from oel_ray.config import TeacherConfig
from oel_ray.errors import ConfigError, InputError
from oel_ray.extractor import ITEM_LINE
from oel_ray.layout import RunLayout
from oel_ray.seeds import shuffle_seed
from oel_ray.types import KNOWLEDGE, NO_KNOWLEDGE, SHUFFLED

SOURCES = (KNOWLEDGE, SHUFFLED)  # the contexts that read a knowledge set, so may read another run's


def shuffle_line(line: str, rng: random.Random) -> str:
    """The line's words in a random order, an item marker ("- EXPERIENCE ITEM:") kept in front.
    Never the original order when the words allow another (a shuffle can draw the identity)."""
    marker = ITEM_LINE.match(line)
    head = marker.group(0).strip() if marker else ""
    words = line[marker.end():].split() if marker else line.split()
    order = words[:]
    rng.shuffle(order)
    if order == words and len(set(words)) > 1:
        order = order[1:] + order[:1]  # a rotation differs unless every word is the same
    return " ".join(([head] if head else []) + order)


def shuffle_words(text: str, seed: int) -> str:
    """Every line of `text` shuffled (see shuffle_line), lines in their order; empty lines kept."""
    rng = random.Random(seed)
    return "\n".join(shuffle_line(line, rng) if line.strip() else line for line in text.splitlines())


def teacher_set(cfg: TeacherConfig, texts: list[str], seed: int, round: int) -> list[str]:
    """The texts the teacher reads this round, from the round's knowledge `texts` (this run's chains,
    or another run's set): one empty text for `none`; chain c's text shuffled with its own seed."""
    if cfg.context == NO_KNOWLEDGE:
        return [""]
    if cfg.context == SHUFFLED:
        return [shuffle_words(text, shuffle_seed(seed, round, c)) for c, text in enumerate(texts)]
    return texts


def other_run_file(cfg: TeacherConfig, round: int) -> Optional[Path]:
    """teacher.knowledge_from's knowledge.json for `round`; None when the teacher reads this run's."""
    if not cfg.knowledge_from:
        return None
    return RunLayout(Path(cfg.knowledge_from).expanduser()).round(round).knowledge


def other_run_set(cfg: TeacherConfig, round: int, error=InputError) -> list[str]:
    """The "set" the other run's teacher read in `round`, refused in one line (`error`) when the file is
    missing, unreadable or empty."""
    path = other_run_file(cfg, round)
    texts, problem = knowledge_texts(path)
    if problem and problem.startswith("not a knowledge file"):
        raise error(f"teacher.knowledge_from: {path} is {problem}; "
                    f"give the directory of a run that finished extraction in rounds 1..{round} or more")
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise error(f"teacher.knowledge_from: {path} holds no knowledge (its set is empty); give another run")
    return texts


def check_knowledge_from(cfg: TeacherConfig, rounds: int) -> None:
    """Before anything starts: the other run's knowledge for every round this run will consolidate."""
    if not cfg.knowledge_from:
        return
    if cfg.context not in SOURCES:
        raise ConfigError(f"teacher.knowledge_from: only with teacher.context={' or '.join(SOURCES)} "
                          f"(teacher.context={cfg.context} reads no knowledge set)")
    for r in range(1, rounds + 1):
        other_run_set(cfg, r, error=ConfigError)


def teacher_reads(cfg: TeacherConfig) -> str:
    """What the teacher reads, in a few words, for summary.json and rounds.md."""
    text = {NO_KNOWLEDGE: "none (no block)", SHUFFLED: "shuffled knowledge"}.get(cfg.context, cfg.context)
    return f"{text} of {cfg.knowledge_from}" if cfg.knowledge_from else text
