"""A whole OEL round through the user's entry point, with every real part: Ray, vLLM (CPU build),
DeepSpeed, TextArena, Hydra. Small sizes, same code path as `make run`."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

STEPS, GAMES, EVAL_MAPS = 3, 4, 4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model):
    out = tmp_path_factory.mktemp("run")
    proc = subprocess.run(
        [sys.executable, "-m", "oel_ray.main", f"model.path={tiny_model}", f"hydra.run.dir={out}",
         f"learner.steps={STEPS}", f"rollout.games_per_round={GAMES}", "rollout.deploy_games_per_step=2",
         "extractor.k=2", f"env.eval_maps={EVAL_MAPS}", "learner.batch_size=4"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_round_ends_with_a_summary(run_dir):
    out, stdout = run_dir
    assert "=== OEL summary ===" in stdout and "pass rate" in stdout and "reverse KL first step" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and 0.0 <= summary["pass_rate"] <= 1.0
    assert summary["reverse_kl_first_step"] >= 0.0 and summary["response_tokens_per_turn"] > 0


def test_round_writes_every_artifact(run_dir):
    from oel_ray.artifacts import read_trajectories

    out, _ = run_dir
    r1 = out / "round_1"
    trajectories = read_trajectories(r1 / "trajectories.jsonl")
    assert len(trajectories) == GAMES and len({t.seed for t in trajectories}) == GAMES
    assert all(t.turns and t.outcome in {"win", "loss", "invalid", "turn_limit"} for t in trajectories)
    knowledge = json.loads((r1 / "knowledge.json").read_text())
    assert len(knowledge["chains"]) == 2 and all(len(chain) == 3 for chain in knowledge["chains"])
    assert any(step["text"] for chain in knowledge["chains"] for step in chain[1:])
    rows = (r1 / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + STEPS and "reverse_kl" in rows[0] and "seconds_sync" in rows[0]
    report = json.loads((r1 / "eval.json").read_text())
    assert report["games"] == EVAL_MAPS
    assert not list(out.rglob("*.partial")) and not list(out.rglob("*.tmp"))


def test_final_model_loads_in_transformers(run_dir, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    out, _ = run_dir
    trained = AutoModelForCausalLM.from_pretrained(out / "round_1" / "model")
    initial = AutoModelForCausalLM.from_pretrained(tiny_model)
    moved = [not torch.equal(a, b) for a, b in zip(trained.parameters(), initial.parameters())]
    assert any(moved), "consolidation did not change the weights"
