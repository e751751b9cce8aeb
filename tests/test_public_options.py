"""The public code's switches that change how a round runs, together in one `tiny` run end to end
with every real part: a merged support with the tail entry (learner.support=merged, learner.tail),
an extractor that sees no earlier knowledge and no reasoning (extractor.with_previous=false,
extractor.keep_reasoning=false), chains that each play map i at step i (extractor.trajectories=per_step),
and a teacher reading the one chain and step of best in-context pass rate (extractor.select=best). Each has its exactness test beside its code's (test_losses,
test_teacher, test_extractor); here the run must finish and record them."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

OPTIONS = {"learner.support": "merged", "learner.tail": True, "extractor.with_previous": False,
           "extractor.keep_reasoning": False, "extractor.trajectories": "per_step", "extractor.num_chains": 2,
           "extractor.select": "best"}


def test_the_public_codes_switches_run_end_to_end(tiny_model, smallest_tiny, tmp_path):
    out = tmp_path / "run"
    switches = [f"{key}={str(value).lower()}" for key, value in OPTIONS.items()]
    base = [arg for arg in smallest_tiny if not arg.startswith("extractor.num_chains=")]
    proc = subprocess.run([sys.executable, "-m", "oel_ray.main", *base, "learner.steps=2",
                           f"model.path={tiny_model}", *switches, f"hydra.run.dir={out}"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    config = json.loads((out / "manifest.json").read_text())["config"]
    for key, value in OPTIONS.items():
        group, name = key.split(".")
        assert config[group][name] == value, key
    rows = [json.loads(line) for line in (out / "round_1" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:  # the mass outside the support, both models, every step
        assert 0 < row["student_mass"] <= 1 + 1e-6 and 0 < row["teacher_mass"] <= 1 + 1e-6
        assert row["kl"] >= 0 and row["kl"] == row["kl"]  # the tail KL of whole distributions: never negative
    # per_step: K maps played once per chain; each chain's steps read maps 0..K-1 in order
    k = config["extractor"]["k"]
    games = (out / "round_1" / "trajectories.jsonl").read_text().splitlines()
    assert len(games) == 2 * k
    chains = json.loads((out / "round_1" / "knowledge.json").read_text())["chains"]
    maps = [json.loads(g)["seed"] for g in games][::2]
    assert [[step["trajectory_seeds"] for step in chain] for chain in chains] == [[maps[:i] for i in range(k + 1)]] * 2
    # select=best: the choice is recorded with the curve it was made from, and said in the log
    curve = json.loads((out / "round_1" / "knowledge_eval.json").read_text())
    chosen = curve["selected"]
    best = max(rate for row in curve["steps"] if row["step"] > 0 for rate in row["per_chain_pass_rates"])
    assert chosen["pass_rate"] == best and chosen["step"] > 0
    assert f"chain {chosen['chain']} at step {chosen['step']}" in proc.stderr
