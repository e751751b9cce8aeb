"""Every file of a run, named once: the run directory's own files and each round's.

    <output_dir>/
      manifest.json  placement.json  oel.log  summary.json  rounds.md  rounds.png  tensorboard/
      round_0/  eval.json eval.md eval_trajectories.jsonl ifeval.json [ifeval_lm_eval.json]
      round_<r>/
        trajectories.jsonl   collect: the games extraction reads
        knowledge.json       extract: every chain's snapshots and the set the teacher reads
        knowledge_eval.json  the in-context curve (and .md)
        knowledge_steps/step_<i>.json  per accumulation step: its figures and fixed sample games
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


def _files(*names: str, base: str = "dir") -> tuple[property, ...]:
    """A read-only path attribute per file name, under the object's `base` directory."""
    return tuple(property(lambda self, name=name: getattr(self, base) / name) for name in names)


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

    trajectories, knowledge, knowledge_eval, knowledge_eval_md = _files(
        "trajectories.jsonl", "knowledge.json", "knowledge_eval.json", "knowledge_eval.md")
    deploy, metrics_jsonl, metrics_csv, learner_state = _files(
        "deploy.jsonl", "metrics.jsonl", "metrics.csv", "learner_state")
    # lm_eval: ood.ifeval=lm_eval's IF-Eval of the round's checkpoint
    eval, eval_md, eval_trajectories, ifeval, lm_eval = _files(
        "eval.json", "eval.md", "eval_trajectories.jsonl", "ifeval.json", "ifeval_lm_eval.json")
    model, model_config = _files("model", "model/config.json")

    def knowledge_step(self, step: int) -> Path:
        """The in-context evaluation of accumulation step `step`: its figures and fixed sample games."""
        return self.dir / "knowledge_steps" / f"step_{step:04d}.json"

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

    # placement.json: where each role ran
    manifest, placement, log, summary = _files("manifest.json", "placement.json", "oel.log", "summary.json",
                                               base="root")
    rounds_md, rounds_png, tensorboard = _files("rounds.md", "rounds.png", "tensorboard", base="root")
