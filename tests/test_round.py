"""A whole OEL round through the user's entry point, with every real part: Ray, vLLM (CPU build),
DeepSpeed, TextArena, Hydra. Small sizes, same code path as `make run`. And what it shows: per-step
metrics in CSV and TensorBoard, the per-round plot."""

import csv
import json

import pytest

STEPS, GAMES, EVAL_MAPS = 3, 4, 4
e2e = pytest.mark.e2e


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model, warm_run):
    out = tmp_path_factory.mktemp("run")
    proc = warm_run([f"model.path={tiny_model}", f"hydra.run.dir={out}", f"learner.steps={STEPS}",
                     f"rollout.games_per_round={GAMES}", "rollout.deploy_games_per_step=2", "extractor.k=2",
                     f"env.eval_maps={EVAL_MAPS}", "learner.batch_size=4"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@e2e
def test_round_ends_with_a_summary(run_dir):
    out, stdout = run_dir
    assert "=== OEL summary ===" in stdout and "pass rate" in stdout and "reverse KL first step" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and 0.0 <= summary["pass_rate"] <= 1.0
    assert summary["kl_first_step"] >= 0.0 and summary["response_tokens_per_turn"] > 0


@e2e
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
    assert len(rows) == 1 + STEPS and "kl" in rows[0] and "seconds_sync" in rows[0]
    report = json.loads((r1 / "eval.json").read_text())
    assert report["games"] == EVAL_MAPS
    assert not list(out.rglob("*.partial")) and not list(out.rglob("*.tmp"))


def first_step_file(out) -> str:
    return (out / "round_1" / "knowledge_steps" / "step_0000.json").read_text()


@e2e
def test_round_measures_the_in_context_curve(run_dir):
    """extractor.k=2: the default steps 0, K/4 = 0, K/2 = 1 and K = 2, every chain's knowledge in the
    teacher's prompt; step 0 plays the plain prompt on the same seeds: the initial model's eval."""
    import matplotlib.image

    out, stdout = run_dir
    curve = json.loads((out / "round_1" / "knowledge_eval.json").read_text())
    assert (curve["use_step"], curve["chains"], curve["maps"]) == (1, 2, EVAL_MAPS)
    assert [row["step"] for row in curve["steps"]] == [0, 1, 2]
    for row in curve["steps"]:
        assert row["games"] == EVAL_MAPS * 2 and len(row["per_chain_pass_rates"]) == 2
        assert 0 <= row["ci_low"] <= row["pass_rate"] <= row["ci_high"] <= 1 and row["response_tokens_per_turn"] > 0
    start, step0 = json.loads((out / "round_0" / "eval.json").read_text()), curve["steps"][0]
    assert step0["knowledge_tokens"] == 0 and step0["empty_chains"] == 2
    for key in ("pass_rate", "ci_low", "ci_high", "response_tokens_per_turn", "turns_per_game"):
        assert step0[key] == pytest.approx(start[key], abs=1e-12), key  # game for game the same games
    assert curve["steps"][1]["knowledge_tokens"] > 0
    # per accumulation step, as the public code saves them: the figures and the same sample maps
    for row in curve["steps"]:
        step = json.loads((out / "round_1" / "knowledge_steps" / f"step_{row['step']:04d}.json").read_text())
        assert {k: step[k] for k in row} == row and step["round"] == 1
        assert step["response_tokens_per_game"] == pytest.approx(step["response_tokens_per_turn"] * step["turns_per_game"])
        assert [g["seed"] for g in step["sample_games"]] == [g["seed"] for g in
                                                             json.loads(first_step_file(out))["sample_games"]]
    summary = json.loads((out / "summary.json").read_text())
    assert [p["step"] for p in summary["in_context_curve"]["1"]] == [0, 1, 2] and summary["knowledge_step"] == 1
    assert "in-context pass rate by accumulation step, round 1: 0 " in stdout and "1* " in stdout
    assert "| 1 | 1* |" in (out / "rounds.md").read_text()
    width = matplotlib.image.imread(out / "rounds.png").shape[1]
    assert width == 450 * 4  # pass rate, in-context curve, tokens per turn, IF-Eval


@e2e
def test_final_model_loads_in_transformers(run_dir, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    out, _ = run_dir
    trained = AutoModelForCausalLM.from_pretrained(out / "round_1" / "model")
    initial = AutoModelForCausalLM.from_pretrained(tiny_model)
    moved = [not torch.equal(a, b) for a, b in zip(trained.parameters(), initial.parameters())]
    assert any(moved), "consolidation did not change the weights"


@e2e
def test_step_metrics_reach_the_csv_and_tensorboard(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = run_dir
    with open(out / "round_1" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"loss", "kl", "kl_direction", "grad_norm", "lr", "tokens_per_second"} <= set(rows[0])
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    assert all(float(r["tokens_per_second"]) > 0 and float(r["lr"]) > 0 for r in rows)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for name in ("loss", "kl", "grad_norm", "lr", "tokens_per_second"):
        scalars = events.Scalars(f"consolidate/{name}")
        assert [e.step for e in scalars] == list(range(1, STEPS + 1)), name
        assert [e.value for e in scalars] == pytest.approx([float(r[name]) for r in rows], rel=1e-5), name


def report(r: int, ifeval: bool) -> dict:
    """A round's eval.json as the evaluate stage writes it (the fields the plot reads)."""
    rep = {"round": r, "pass_rate": 0.2 * r, "ci_low": 0.0, "ci_high": 0.5, "response_tokens_per_turn": 10.0 + r,
           "invalid_rate": 0.0}
    if ifeval:
        rep["ifeval"] = {"strict_prompt_accuracy": 0.1 * r}
    return rep


def curve(r: int) -> dict:
    """A round's knowledge_eval.json (the fields the plot and the table read)."""
    return {"use_step": 2, "chains": 2, "steps": [{"step": s, "pass_rate": 0.1 * s, "ci_low": 0.0, "ci_high": 0.6,
                                                   "response_tokens_per_turn": 9.0, "knowledge_tokens": 30.0 * s,
                                                   "games": 64}
                                     for s in (0, 1, 2, 4)]}


@pytest.mark.parametrize("ifeval,curves,panels", [(True, False, 3), (False, False, 2), (True, True, 4),
                                                  (False, True, 3)])
def test_round_plot_draws_the_ifeval_panel_when_measured(tmp_path, ifeval, curves, panels):
    import matplotlib.image

    from oel_ray import tracking

    path = tracking.plot_rounds([report(r, ifeval) for r in range(3)], tmp_path / "rounds.png",
                                {r: curve(r) for r in (1, 2)} if curves else None)
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width == round(450 * panels) and height == 350  # 4.5 x 3.5 inches per panel at 100 dpi
    table = tracking.rounds_table([report(r, ifeval) for r in range(3)], {})
    assert ("| 0.200 |" in table.splitlines()[-1]) is ifeval  # round 2's IF-Eval beside its pass rate
    rows = tracking.curves_table({r: curve(r) for r in (1, 2)}).splitlines()
    assert rows[-4:] == [f"| 2 | {s} | 2 | 64 | {30 * int(s[0])} | {0.1 * int(s[0]):.3f} | [0.000, 0.600] | 9.0 |"
                         for s in ("0", "1", "2*", "4")] and tracking.curves_table({}) == ""
