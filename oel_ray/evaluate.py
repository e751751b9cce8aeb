"""Evaluation on the fixed held-out maps: pass rate (reward == 1) with a 95% interval, lengths.

Every held-out map is played `env.eval_samples` times with temperature sampling and no knowledge in
context, all in one call. Sampling seeds are per game, derived from `seed` and the sample index
(`seeds.game_sampling_seeds`), so the samples of one map differ from each other but each is the same in
every round (rounds are compared on common random numbers) and on any number of workers.

The in-context curve (`evaluate_knowledge`, paper Fig. 4) plays the same games with each chain's
knowledge of an accumulation step in the teacher's prompt, on the same seeds: at step 0 (no
knowledge yet) it is the round-start model's plain evaluation, game for game.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

from oel_ray.config import OELConfig
from oel_ray.games import eval_specs, invalid_turns
from oel_ray.tracking import curve_cells
from oel_ray.types import INVALID, GameSpec, KnowledgeSnapshot, Sampling, Trajectory


@dataclass
class EvalReport:
    round: int
    games: int  # maps x samples
    passes: int
    pass_rate: float
    ci_low: float  # 95% Wilson interval at the effective number of games
    ci_high: float
    response_tokens_per_turn: float
    turns_per_game: float
    invalid_rate: float  # fraction of games that ended on invalid moves
    invalid_turn_rate: float = 0.0  # fraction of turns with no parsable action or a refused move
    maps: int = 0
    samples: int = 1
    per_sample_pass_rates: list[float] = field(default_factory=list)  # one per sampling seed
    effective_games: float = 0.0  # independent games the samples are worth (see effective_games)

    def to_json(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        samples = ", ".join(f"{p:.3f}" for p in self.per_sample_pass_rates)
        return (
            "| round | maps x samples | pass rate | 95% CI | per sample | tokens/turn | turns/game "
            "| invalid games | invalid turns |\n"
            "|---|---|---|---|---|---|---|---|---|\n"
            f"| {self.round} | {self.maps} x {self.samples} | {self.pass_rate:.3f} "
            f"| [{self.ci_low:.3f}, {self.ci_high:.3f}] | {samples} | {self.response_tokens_per_turn:.1f} "
            f"| {self.turns_per_game:.2f} | {self.invalid_rate:.3f} | {self.invalid_turn_rate:.3f} |\n"
        )


def wilson_interval(passes: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval: well-behaved at 0% and 100%, unlike the normal approximation.
    `n` may be an effective (fractional) count, `passes` then the pass rate times it."""
    if n == 0:
        return 0.0, 0.0
    p = passes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def effective_games(per_map: list[list[bool]]) -> float:
    """How many independent games `per_map` (each map's samples) are worth for a pass-rate interval.

    Samples of one map are correlated (an easy map tends to pass every time), so maps x samples
    overstates the evidence. Design effect: n / (1 + (s - 1) * ICC), with the intraclass correlation
    from the one-way ANOVA of passes by map, kept between the number of maps (samples perfectly
    correlated) and of games (independent). With one sample per map it is the number of games; when
    every game passed or every game failed the correlation cannot be estimated and it is the
    number of maps (the cautious end)."""
    m, s = len(per_map), len(per_map[0]) if per_map else 0
    n = m * s
    if s <= 1:
        return float(n)
    rates = [sum(games) / s for games in per_map]
    mean = sum(rates) / m
    between = s * sum((r - mean) ** 2 for r in rates) / (m - 1) if m > 1 else 0.0
    within = s * sum(r * (1 - r) for r in rates) / (m * (s - 1))
    if m < 2 or between + (s - 1) * within == 0:
        return float(m)
    design_effect = 1 + (s - 1) * (between - within) / (between + (s - 1) * within)
    return float(n) if design_effect <= 1 else max(float(m), n / design_effect)


def summarize(trajectories: list[Trajectory], round: int, samples: int = 1) -> EvalReport:
    """`trajectories` sample-major: the first `maps` are sample 0 of every map, then sample 1, ..."""
    n = len(trajectories)
    if samples < 1 or n % samples:
        raise ValueError(f"{n} trajectories do not split into {samples} samples of equal size")
    maps = n // samples
    passes = sum(t.passed for t in trajectories)
    turns = [turn for t in trajectories for turn in t.turns]
    effective = effective_games([[t.passed for t in trajectories[m::maps]] for m in range(maps)])
    low, high = wilson_interval(passes / n * effective if n else 0, effective)
    per_sample = [sum(t.passed for t in trajectories[s * maps:(s + 1) * maps]) / max(1, maps)
                  for s in range(samples)]
    return EvalReport(
        round=round, games=n, passes=passes, pass_rate=passes / n if n else 0.0, ci_low=low, ci_high=high,
        response_tokens_per_turn=sum(t.response_tokens for t in turns) / max(1, len(turns)),
        turns_per_game=len(turns) / max(1, n),
        invalid_rate=sum(t.outcome == INVALID for t in trajectories) / max(1, n),
        invalid_turn_rate=sum(invalid_turns(t) for t in trajectories) / max(1, len(turns)),
        maps=maps, samples=samples, per_sample_pass_rates=per_sample, effective_games=effective,
    )


def eval_sampling(cfg: OELConfig) -> Sampling:
    r = cfg.rollout
    return Sampling(max_tokens=r.max_response_tokens, temperature=r.temperature, top_p=r.eval_top_p,
                    top_k=r.eval_top_k, seed=cfg.seed)


def held_out_games(cfg: OELConfig) -> list[GameSpec]:
    """The games `evaluate` plays, in its order: every held-out map, `env.eval_samples` times, sample-major."""
    return eval_specs(cfg.env) * cfg.env.eval_samples


def evaluate(workers, cfg: OELConfig, round: int, on_games=None) -> tuple[EvalReport, list[Trajectory]]:
    """One rollout per held-out map and sampling seed, no knowledge in context; trajectories come
    back sample-major (see `summarize`). `on_games` as in `RolloutGroup.play` (streaming)."""
    specs = held_out_games(cfg)
    trajectories = workers.play(specs, eval_sampling(cfg), cfg.env.max_turns, round, on_games=on_games)
    return summarize(trajectories, round, cfg.env.eval_samples), trajectories


SAMPLE_GAMES = 3  # held-out games kept per accumulation step, the same maps at every step


def play_with_knowledge(workers, cfg: OELConfig, texts: list[str], round: int,
                        on_games=None) -> dict[str, list[Trajectory]]:
    """Every held-out map `env.eval_samples` times with each of `texts` in the teacher's place ("":
    the plain prompt), all in one call with `evaluate`'s sampling and seeds; per text, its games
    sample-major (as `summarize` reads them)."""
    games = held_out_games(cfg)
    specs = [replace(spec, knowledge=text) for text in texts for spec in games]
    played = workers.play(specs, eval_sampling(cfg), cfg.env.max_turns, round, on_games=on_games)
    per_text = len(games)
    return {text: played[i * per_text:(i + 1) * per_text] for i, text in enumerate(texts)}


def evaluate_knowledge(workers, cfg: OELConfig, round: int, chains: list[list[KnowledgeSnapshot]],
                       steps: list[int], on_games=None, plain: Optional[list[Trajectory]] = None) -> list[dict]:
    """The in-context curve: one row per accumulation step in `steps`, the held-out maps played
    `env.eval_samples` times with each chain's knowledge of that step in the teacher's prompt.

    Each distinct knowledge text is played once, all in one call, with `evaluate`'s sampling and
    seeds: step 0 and a chain still empty later play the plain prompt, the games of `evaluate`.
    `plain`: those games, where `evaluate` already played them with these weights (not played again;
    ignored unless they are `held_out_games` in that order).
    The chains count as further samples of each map, so the interval clusters by map (`summarize`)."""
    samples = cfg.env.eval_samples
    texts = sorted({chain[s].text.strip() for s in steps for chain in chains})
    evaluated = plain is not None and [t.seed for t in plain] == [g.seed for g in held_out_games(cfg)]
    per_text = {"": plain} if evaluated and "" in texts else {}
    if to_play := [text for text in texts if text not in per_text]:
        per_text.update(play_with_knowledge(workers, cfg, to_play, round, on_games))
    rows = []
    for step in steps:
        games = [per_text[chain[step].text.strip()] for chain in chains]
        # the same held-out maps at every step, as chain 0 played them: the step's sample games
        samples_played = [t.to_json() for t in games[0][:SAMPLE_GAMES]]
        report = summarize([t for chain_games in games for t in chain_games], round, samples * len(chains))
        rows.append({
            "step": step, "pass_rate": report.pass_rate, "ci_low": report.ci_low, "ci_high": report.ci_high,
            "response_tokens_per_turn": report.response_tokens_per_turn, "turns_per_game": report.turns_per_game,
            "invalid_rate": report.invalid_rate, "games": report.games, "effective_games": report.effective_games,
            "response_tokens_per_game": sum(turn.response_tokens for g in games for t in g for turn in t.turns)
            / max(1, sum(len(g) for g in games)),
            "per_chain_pass_rates": [sum(t.passed for t in g) / len(g) for g in games],
            "knowledge_tokens": sum(chain[step].num_tokens for chain in chains) / len(chains),
            "empty_chains": sum(not chain[step].text.strip() for chain in chains),
            "sample_games": samples_played,
        })
    return rows


def select_best(rows: list[dict], chains: list[list[KnowledgeSnapshot]]) -> dict:
    """extractor.select=best: the chain and accumulation step (above 0, with knowledge) whose knowledge
    in context gave the highest held-out pass rate on the curve; the earliest step and lowest chain
    on a tie. {"step", "chain", "pass_rate"}."""
    candidates = [(rate, -row["step"], -c) for row in rows if row["step"] > 0
                  for c, rate in enumerate(row["per_chain_pass_rates"]) if chains[c][row["step"]].text.strip()]
    if not candidates:
        raise ValueError("no chain has knowledge at any curve step above 0: nothing to select")
    rate, step, chain = max(candidates)
    return {"step": -step, "chain": -chain, "pass_rate": rate}


def curve_markdown(rows: list[dict], use_step: int) -> str:
    """One round's in-context curve as a table; the step consolidation reads is marked."""
    lines = ["| step | knowledge tokens | pass rate | 95% CI | per chain | tokens/turn | games | empty chains |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        chains = ", ".join(f"{p:.3f}" for p in row["per_chain_pass_rates"])
        mark = " (used)" if row["step"] == use_step else ""
        lines.append(f"| {row['step']}{mark} | {curve_cells(row)} | {chains} "
                     f"| {row['response_tokens_per_turn']:.1f} | {row['games']} | {row['empty_chains']} |")
    return "\n".join(lines) + "\n"
