"""Evaluation on the fixed held-out maps: pass rate (reward == 1) with a 95% interval, lengths."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from oel_ray.config import OELConfig
from oel_ray.engine import Sampling
from oel_ray.games import eval_specs
from oel_ray.types import Trajectory


@dataclass
class EvalReport:
    round: int
    games: int
    passes: int
    pass_rate: float
    ci_low: float
    ci_high: float
    response_tokens_per_turn: float
    turns_per_game: float
    invalid_rate: float  # fraction of games that ended on invalid moves

    def to_json(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        return (
            "| round | games | pass rate | 95% CI | tokens/turn | turns/game | invalid |\n"
            "|---|---|---|---|---|---|---|\n"
            f"| {self.round} | {self.games} | {self.pass_rate:.3f} | [{self.ci_low:.3f}, {self.ci_high:.3f}] "
            f"| {self.response_tokens_per_turn:.1f} | {self.turns_per_game:.2f} | {self.invalid_rate:.3f} |\n"
        )


def wilson_interval(passes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval: well-behaved at 0% and 100%, unlike the normal approximation."""
    if n == 0:
        return 0.0, 0.0
    p = passes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(trajectories: list[Trajectory], round: int) -> EvalReport:
    n = len(trajectories)
    passes = sum(t.passed for t in trajectories)
    turns = [turn for t in trajectories for turn in t.turns]
    low, high = wilson_interval(passes, n)
    return EvalReport(
        round=round, games=n, passes=passes, pass_rate=passes / n if n else 0.0, ci_low=low, ci_high=high,
        response_tokens_per_turn=sum(t.response_tokens for t in turns) / max(1, len(turns)),
        turns_per_game=len(turns) / max(1, n),
        invalid_rate=sum(t.outcome == "invalid" for t in trajectories) / max(1, n),
    )


def evaluate(workers, cfg: OELConfig, round: int) -> tuple[EvalReport, list[Trajectory]]:
    """One rollout per held-out map and sampling seed, no knowledge in context."""
    r = cfg.rollout
    trajectories: list[Trajectory] = []
    for sample in range(cfg.env.eval_samples):
        sampling = Sampling(max_tokens=r.max_response_tokens, temperature=r.temperature, top_p=r.eval_top_p,
                            top_k=r.eval_top_k, seed=cfg.seed * 1000 + sample)
        trajectories += workers.play(eval_specs(cfg.env), sampling, cfg.env.max_turns, round)
    return summarize(trajectories, round), trajectories
