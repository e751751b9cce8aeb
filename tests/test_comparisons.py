"""The paper's comparisons as config switches, each end to end on `tiny` with every real part and
written beside the on-policy run in one output root: off-policy context distillation, raw
trajectories as the teacher's context, knowledge extracted by another model than the policy, the
public code's sequence-level baseline (seqkd) and its other switches (tiny_public_code). Each
reports the same summary (pass rate, the KL it minimised, the OOD metric IF-Eval) as the baseline."""

import json

import pytest

from oel_ray.strategy import REVERSE

pytestmark = pytest.mark.e2e

BASELINE = "tiny"
# experiment -> (consolidation.mode, teacher.context, extractor.model is the policy, what the learner minimised)
EXPERIMENTS = {
    BASELINE: ("on_policy", "knowledge", True, "topk_reverse_kl"),
    "tiny_off_policy": ("off_policy", "knowledge", True, "topk_forward_kl"),
    "tiny_raw_trajectories": ("on_policy", "trajectories", True, "topk_reverse_kl"),
    "tiny_other_extractor": ("on_policy", "knowledge", False, "topk_reverse_kl"),
    "tiny_seqkd": ("off_policy", "knowledge", True, "seqkd_forward"),
    # Last: its merged support builds the teacher otherwise, so the jobs before it share one start.
    "tiny_public_code": ("on_policy", "knowledge", True, "topk_reverse_kl"),
}
# Switches without an experiment of their own, on `tiny`: run label -> (overrides, the same four facts)
OPTION_RUNS = {
    # Switches that act on different parts, in one run (each run is mostly start-up): another
    # checkpoint teaching both rounds, a deeper one, which a round start that handed it the student's
    # weights (as the default teacher gets them) would refuse; one of the public code's
    # sampled-token estimators end to end (each one's values and gradient through the learner:
    # test_learner.py, test_losses.py); and an in-context curve of the first chain only
    "tiny_teacher_model_k1": (["teacher.model={teacher}", "rounds=2", "learner.loss=k1", "extractor.num_chains=2",
                               "extractor.eval_chains=1"],
                              "on_policy", "knowledge", True, "k1"),
}
COMPARED = {"pass_rate", "pass_rate_ci", "kl_first_step", "kl_last_step", "consolidation_loss",
            "ifeval_strict_prompt_accuracy", "response_tokens_per_turn"}


@pytest.fixture(scope="module")
def finished():
    """Runs already made in this module, by experiment: each runs once, whichever test asks first."""
    return {}


@pytest.fixture(scope="module")
def deeper_teacher(tiny_model, tmp_path_factory) -> str:
    """The tiny model's tokenizer on a model one layer deeper, its own random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = tmp_path_factory.mktemp("deeper_teacher")
    config = AutoConfig.from_pretrained(tiny_model)
    config.num_hidden_layers += 1
    config.layer_types = config.layer_types + config.layer_types[-1:]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(where)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(where)
    return str(where)


@pytest.fixture
def run(finished, tmp_path_factory, tiny_model, smallest_tiny, warm_run, request):
    """run(name) -> (process, run dir): the experiment (or the OPTION_RUNS switch on `tiny`) at the
    smallest sizes in the shared root, with its own number of rounds. The EXPERIMENTS run as one
    sweep (`-m`, one process, as a user compares them), each job in <root>/<name>: after the first
    job the others take over its roles (rollout workers, teacher, learner ranks) where they would
    build them alike."""
    def get(name: str):
        if "root" not in finished:
            finished["root"] = tmp_path_factory.mktemp("comparisons")
        root = finished["root"]
        overrides = [arg for arg in smallest_tiny if not arg.startswith(("+experiment=", "rounds="))]
        common = [*overrides, f"model.path={tiny_model}"]
        if name in EXPERIMENTS and name not in finished:
            proc = warm_run(["-m", f"+experiment={','.join(EXPERIMENTS)}", *common, f"hydra.sweep.dir={root}",
                             "hydra.sweep.subdir=${name}"])
            finished.update({experiment: (proc, root / experiment) for experiment in EXPERIMENTS})
        elif name not in finished:
            teacher = request.getfixturevalue("deeper_teacher") if name == "tiny_teacher_model_k1" else ""
            switches = ["+experiment=tiny", *(o.format(teacher=teacher) for o in OPTION_RUNS[name][0])]
            finished[name] = (warm_run([*common, *switches, f"hydra.run.dir={root / name}"]), root / name)
        return finished[name]
    return get


def summary_printed(proc, out) -> str:
    """The summary the run in `out` printed (a sweep's process prints one per job)."""
    printed = proc.stdout.split("=== OEL summary ===")[1:]
    blocks = [block for block in printed if f"rounds table {out}/rounds.md" in block]
    assert len(blocks) == 1, proc.stdout[-2000:]
    return blocks[0]


@pytest.mark.parametrize("name", list(EXPERIMENTS) + list(OPTION_RUNS))
def test_mode_runs_end_to_end_and_reports_beside_the_on_policy_run(run, name, tiny_model):
    proc, out = run(name)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    mode, context, own_extractor, loss = EXPERIMENTS[name] if name in EXPERIMENTS else OPTION_RUNS[name][1:]
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert (config["consolidation"]["mode"], config["teacher"]["context"]) == (mode, context)
    assert config["extractor"]["model"] == ("policy" if own_extractor else tiny_model)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == config["rounds"] * config["learner"]["steps"] and 0.0 <= summary["pass_rate"] <= 1.0
    assert 0.0 <= summary["ifeval_strict_prompt_accuracy"] <= 1.0  # the OOD metric
    assert summary["consolidation_loss"] == loss
    table = (out / "rounds.md").read_text().split("\n\n")[0].splitlines()  # the rounds (the curve follows)
    assert "IF-Eval strict" in table[0] and len(table) == 2 + config["rounds"] + 1  # rounds 0..R
    assert (out / "rounds.png").stat().st_size > 0
    assert "IF-Eval prompt-level strict accuracy (OOD)" in summary_printed(proc, out)

    _, baseline = run(BASELINE)
    assert out.parent == baseline.parent  # side by side in one output root
    base = json.loads((baseline / "summary.json").read_text())
    assert COMPARED <= set(summary) and set(summary) == set(base)
    assert (table[0], table[1]) == tuple((baseline / "rounds.md").read_text().splitlines()[:2])


def test_raw_trajectory_context_is_the_trajectories_themselves(run):
    _, out = run("tiny_raw_trajectories")
    knowledge = json.loads((out / "round_1" / "knowledge.json").read_text())
    assert knowledge["format"] == "raw_trajectories"
    assert all("### Turn 1" in text and "### Summary" in text for text in knowledge["set"])


def test_other_extractor_runs_on_its_own_engine_while_the_policy_moves_on(run, tiny_model):
    """Round 2's knowledge comes from the initial checkpoint, the policy being round 1's model."""
    _, out = run("tiny_other_extractor")
    assert f"[start the extractor's own engine ({tiny_model})] done" in (out / "oel.log").read_text()
    assert (out / "round_1" / "model" / "model.safetensors").exists()
    assert json.loads((out / "round_2" / "knowledge.json").read_text())["set"]


def test_the_public_codes_switches_act_end_to_end(run):
    """tiny_public_code: per_step chains read their own games of maps 0..K-1 in order; the merged
    support with the tail reports both models' mass on the support every step and a KL of whole
    distributions; select=best records its choice from the in-context curve and says it. (Each has
    its exactness test beside its code's: test_losses, test_teacher, test_extractor, test_evaluate.)"""
    _, out = run("tiny_public_code")
    config = json.loads((out / "manifest.json").read_text())["config"]
    e, n = config["extractor"], config["extractor"]["num_chains"]
    assert (e["trajectories"], e["with_previous"], e["keep_reasoning"], e["select"]) == ("per_step", False, False, "best")
    assert (config["learner"]["support"], config["learner"]["tail"]) == ("merged", True)
    for row in (json.loads(line) for line in (out / "round_1" / "metrics.jsonl").read_text().splitlines()):
        assert 0 < row["student_mass"] <= 1 + 1e-6 and 0 < row["teacher_mass"] <= 1 + 1e-6 and row["kl"] >= 0
    games = [json.loads(line) for line in (out / "round_1" / "trajectories.jsonl").read_text().splitlines()]
    assert len(games) == n * e["k"]  # maps 0..K-1, once per chain
    maps = [g["seed"] for g in games][::n]
    chains = json.loads((out / "round_1" / "knowledge.json").read_text())["chains"]
    assert [[step["trajectory_seeds"] for step in chain] for chain in chains] == [[maps[:i] for i in range(e["k"] + 1)]] * n
    curve = json.loads((out / "round_1" / "knowledge_eval.json").read_text())
    chosen = curve["selected"]
    best = max(rate for row in curve["steps"] if row["step"] > 0 for rate in row["per_chain_pass_rates"])
    assert chosen["pass_rate"] == best and chosen["step"] > 0
    assert f"chain {chosen['chain']} at step {chosen['step']}" in (out / "oel.log").read_text()


def test_an_estimator_reports_what_it_minimised(run):
    """learner.loss=k1 end to end: every step's loss is its KL estimate d = log p_student - log
    p_teacher of the sampled tokens, in the reverse direction."""
    _, out = run("tiny_teacher_model_k1")
    for m in (json.loads(line) for line in (out / "round_1" / "metrics.jsonl").read_text().splitlines()):
        assert m["kl_direction"] == REVERSE and m["response_tokens"] > 0
        assert m["loss"] == pytest.approx(m["kl"], rel=1e-6, abs=1e-9)


def test_the_curve_plays_the_first_eval_chains(run):
    """extractor.eval_chains=1 of tiny's 2 chains: each curve step plays the held-out games once, with
    chain 0's knowledge (its token count, where the chains differ not the mean over both)."""
    _, out = run("tiny_teacher_model_k1")
    for r in (1, 2):
        chains = json.loads((out / f"round_{r}" / "knowledge.json").read_text())["chains"]
        curve = json.loads((out / f"round_{r}" / "knowledge_eval.json").read_text())
        assert len(chains) == 2 and curve["chains"] == 1
        for row in curve["steps"]:
            assert row["games"] == curve["maps"] * curve["samples"] and len(row["per_chain_pass_rates"]) == 1
            assert row["knowledge_tokens"] == chains[0][row["step"]]["num_tokens"]


def test_another_checkpoint_teaches_every_round(run, deeper_teacher):
    """teacher.model: the deeper random teacher taught both rounds (a round start handing it the
    student's weights would have failed), and being far from the student, the KL is large from each
    round's first step (against ~0.0003 with the round-start teacher, whose only difference is the
    knowledge; the k1 estimate of the sampled tokens, this run's loss)."""
    _, out = run("tiny_teacher_model_k1")
    assert json.loads((out / "manifest.json").read_text())["config"]["teacher"]["model"] == deeper_teacher
    rows = [json.loads(line) for r in (1, 2) for line in (out / f"round_{r}" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(row["kl"] > 0.5 for row in rows), [row["kl"] for row in rows]


def test_a_job_whose_teacher_is_built_otherwise_takes_over_the_workers_and_the_learner(run):
    """tiny_public_code merges the teacher's support into the student's, so its teacher is built from
    other arguments than the job before it: it takes over that job's rollout workers and learner
    ranks and starts a teacher alone (session.take_kept_roles)."""
    proc, out = run("tiny_public_code")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "oel.log").read_text()
    assert "reusing the 1 rollout worker(s) the previous job left running (same settings)" in log
    assert "reusing the learner's 1 rank(s)" in log
    assert "[start the roles built otherwise than the previous job's: teacher] done" in log
    assert "start roles:" not in log
