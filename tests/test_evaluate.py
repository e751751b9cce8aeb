"""The held-out report: the pass-rate interval when maps are played several times, and its table."""

import pytest

from oel_ray.evaluate import effective_games, summarize, wilson_interval
from oel_ray.types import Trajectory, Turn


def sample_major(per_map: list[list[bool]]) -> list[Trajectory]:
    """Games in the order `evaluate` returns them: sample 0 of every map, then sample 1, ..."""
    def game(m: int, passed: bool) -> Trajectory:
        turn = Turn("board", "[up]", 3, "up", "moved")
        return Trajectory("Sokoban-v0", m, "eval", 0, 0, [turn], "win" if passed else "loss", float(passed), "")

    samples = len(per_map[0])
    return [game(m, per_map[m][s]) for s in range(samples) for m in range(len(per_map))]


def test_one_sample_per_map_is_the_plain_wilson_interval():
    per_map = [[m % 3 == 0] for m in range(30)]
    report = summarize(sample_major(per_map), round=1)
    assert report.effective_games == 30 == effective_games(per_map)
    assert (report.ci_low, report.ci_high) == wilson_interval(10, 30)


def test_samples_that_repeat_their_map_count_once():
    # Every map passes all 10 of its samples or none: 10 samples say no more than one.
    per_map = [[m < 8] * 10 for m in range(32)]
    report = summarize(sample_major(per_map), round=1, samples=10)
    assert report.effective_games == 32 and report.pass_rate == 0.25
    assert (report.ci_low, report.ci_high) == pytest.approx(wilson_interval(8, 32))
    naive = wilson_interval(80, 320)
    assert report.ci_high - report.ci_low > 2 * (naive[1] - naive[0])


def test_samples_that_vary_within_every_map_count_fully():
    # Each map passes 5 of 10 samples: no map is easier than another, the games are as good as
    # independent (the estimated correlation is negative: capped at the number of games).
    per_map = [[s % 2 == m % 2 for s in range(10)] for m in range(16)]
    report = summarize(sample_major(per_map), round=1, samples=10)
    assert report.effective_games == 160
    assert (report.ci_low, report.ci_high) == pytest.approx(wilson_interval(80, 160))


def test_partly_correlated_samples_fall_between_maps_and_games():
    # Easy maps pass 9 of 10 samples, hard ones 1 of 10.
    per_map = [[s < (9 if m % 2 else 1) for s in range(10)] for m in range(40)]
    n_eff = effective_games(per_map)
    assert 40 < n_eff < 400
    # One-way ANOVA by hand: between-map mean square 10 * 0.16 * 40/39, within 0.09 * 10/9.
    between, within = 10 * 40 * 0.16 / 39, 10 * 0.09 / 9
    icc = (between - within) / (between + 9 * within)
    assert n_eff == pytest.approx(400 / (1 + 9 * icc))
    report = summarize(sample_major(per_map), round=1, samples=10)
    naive = wilson_interval(200, 400)
    assert report.ci_low < naive[0] and report.ci_high > naive[1] and report.pass_rate == 0.5


def test_all_games_failed_counts_the_maps():
    per_map = [[False] * 10 for _ in range(128)]
    assert effective_games(per_map) == 128
    report = summarize(sample_major(per_map), round=2, samples=10)
    assert (report.ci_low, report.ci_high) == pytest.approx(wilson_interval(0, 128))


def test_markdown_is_one_table_row_under_its_header():
    per_map = [[True, False], [False, False], [True, True]]
    report = summarize(sample_major(per_map), round=4, samples=2)
    header, rule, row, *rest = report.markdown().splitlines()
    assert not rest
    cells = [line.strip("|").split("|") for line in (header, rule, row)]
    assert len(cells[0]) == len(cells[1]) == len(cells[2]) == 9
    assert all(set(c.strip()) == {"-"} for c in cells[1])
    values = dict(zip((c.strip() for c in cells[0]), (c.strip() for c in cells[2])))
    assert values["round"] == "4" and values["maps x samples"] == "3 x 2" and values["pass rate"] == "0.500"
    assert values["95% CI"] == f"[{report.ci_low:.3f}, {report.ci_high:.3f}]"
    assert values["per sample"] == "0.667, 0.333" and values["tokens/turn"] == "3.0"


def test_best_selection_takes_the_highest_in_context_pass_rate_above_step_0():
    """extractor.select=best: the chain and step of the curve with the highest held-out pass rate; step
    0 (no knowledge) and a chain still empty never count; ties go to the earliest step, lowest chain."""
    from oel_ray.evaluate import select_best
    from oel_ray.types import KnowledgeSnapshot

    def chain(c, texts):
        return [KnowledgeSnapshot(c, s, t, len(t), []) for s, t in enumerate(texts)]

    chains = [chain(0, ["", "a", "a b", "a b c"]), chain(1, ["", "", "x", "x y"])]
    rows = [{"step": 0, "per_chain_pass_rates": [0.9, 0.9]},  # the plain prompt: not knowledge
            {"step": 1, "per_chain_pass_rates": [0.2, 0.8]},  # chain 1 is empty at step 1
            {"step": 3, "per_chain_pass_rates": [0.5, 0.6]}]
    assert select_best(rows, chains) == {"step": 3, "chain": 1, "pass_rate": 0.6}
    rows[2]["per_chain_pass_rates"] = [0.2, 0.1]
    assert select_best(rows, chains) == {"step": 1, "chain": 0, "pass_rate": 0.2}  # tie: earliest step
    with pytest.raises(ValueError, match="nothing to select"):
        select_best(rows[:1], chains)
