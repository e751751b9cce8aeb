"""Every file of a run, named once: the run directory's own files and each round's.

    <output_dir>/
      manifest.json  placement.json  oel.log  summary.json  rounds.md  rounds.png  tensorboard/
      round_0/  eval.json eval.md eval_trajectories.jsonl ifeval.json [ifeval_lm_eval.json]
      round_<r>/
        trajectories.jsonl   collect: the games extraction reads
        knowledge.json       extract: every chain's snapshots and the set the teacher reads
        knowledge_eval.json  the in-context curve (and .md)
        deploy.jsonl         the games whose turn prefixes consolidation trains on
        metrics.jsonl/.csv   one row per consolidation step
        learner_state/       resumable training state, removed once the round's model is saved
        eval.json ...        as round 0, for the consolidated model
        model/               the round's Hugging Face checkpoint: the next round's start

A stage's outputs are these paths; the manifest records them relative to the run directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

STATE_STEP = re.compile(r"^step_(\d+)$")  # learner_state/step_<steps>: the state after that many steps


@dataclass(frozen=True)
class RoundLayout:
    run: Path
    round: int

    @property
    def dir(self) -> Path:
        return self.run / f"round_{self.round}"

    def stage(self, name: str) -> str:
        """The manifest's name of this round's stage `name`."""
        return f"round_{self.round}/{name}"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.run).as_posix()

    trajectories = property(lambda self: self.dir / "trajectories.jsonl")
    knowledge = property(lambda self: self.dir / "knowledge.json")
    knowledge_eval = property(lambda self: self.dir / "knowledge_eval.json")
    knowledge_eval_md = property(lambda self: self.dir / "knowledge_eval.md")
    deploy = property(lambda self: self.dir / "deploy.jsonl")
    metrics_jsonl = property(lambda self: self.dir / "metrics.jsonl")
    metrics_csv = property(lambda self: self.dir / "metrics.csv")
    learner_state = property(lambda self: self.dir / "learner_state")
    eval = property(lambda self: self.dir / "eval.json")
    eval_md = property(lambda self: self.dir / "eval.md")
    eval_trajectories = property(lambda self: self.dir / "eval_trajectories.jsonl")
    ifeval = property(lambda self: self.dir / "ifeval.json")
    lm_eval = property(lambda self: self.dir / "ifeval_lm_eval.json")  # ood.ifeval=lm_eval
    model = property(lambda self: self.dir / "model")
    model_config = property(lambda self: self.dir / "model" / "config.json")

    def state_after(self, steps: int) -> Path:
        """Where the training state after `steps` steps of this round is saved."""
        return self.learner_state / f"step_{steps:06d}"

    def saved_states(self) -> list[tuple[int, Path]]:
        """(steps, directory) of every saved training state of this round, oldest first."""
        found = [(int(m.group(1)), p) for p in self.learner_state.glob("step_*") if (m := STATE_STEP.match(p.name))]
        return sorted(found)


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def round(self, r: int) -> RoundLayout:
        return RoundLayout(self.root, r)

    manifest = property(lambda self: self.root / "manifest.json")
    placement = property(lambda self: self.root / "placement.json")  # where each role ran
    log = property(lambda self: self.root / "oel.log")
    summary = property(lambda self: self.root / "summary.json")
    rounds_md = property(lambda self: self.root / "rounds.md")
    rounds_png = property(lambda self: self.root / "rounds.png")
    tensorboard = property(lambda self: self.root / "tensorboard")
