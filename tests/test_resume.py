"""Kill the driver during consolidation, rerun the same command: it resumes from the last saved
training state and finishes with the same steps and no stage run twice. Kill the teacher instead:
the driver stops by itself, saving the steps done, and the rerun resumes the same way. Real parts
throughout."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from entry_point import main_in_process

pytestmark = pytest.mark.e2e

ROUNDS, STEPS = 2, 4


def command(tiny_model, out, rounds=ROUNDS, checkpoint_every=2, *extra):
    return [sys.executable, "-m", "oel_ray.main", f"model.path={tiny_model}", f"hydra.run.dir={out}",
            f"rounds={rounds}", f"learner.steps={STEPS}", f"learner.checkpoint_every={checkpoint_every}",
            "learner.batch_size=4", "rollout.games_per_round=2", "rollout.deploy_games_per_step=1", "extractor.k=2",
            "extractor.num_chains=1", "env.eval_maps=2", "tracking.progress_bars=false", *extra]


def stages_of(out) -> dict:
    return json.loads((out / "manifest.json").read_text())["stages"]


def metric_steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, tiny_model, warm_run):
    out = tmp_path_factory.mktemp("resume")
    cmd = command(tiny_model, out)
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    saved = out / "round_1" / "learner_state" / "step_000002"
    deadline = time.time() + 600
    while not saved.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert saved.exists(), "the first run never saved a training state"
    os.killpg(first.pid, signal.SIGKILL)  # the driver and everything it started, mid-consolidation
    first.wait()
    assert not (out / "round_1" / "metrics.csv").exists(), "killed too late: consolidation had finished"
    # the rerun joins another cluster (where a run executes may change on resume: RESUMABLE_CHANGES)
    second = warm_run(cmd[3:])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return out, second.stdout + second.stderr


def test_resumed_run_finishes_with_every_step_once(resumed):
    out, _ = resumed
    for r in range(1, ROUNDS + 1):
        steps = [int(line.split(",")[0]) for line in (out / f"round_{r}" / "metrics.csv").read_text().splitlines()[1:]]
        assert steps == list(range((r - 1) * STEPS + 1, r * STEPS + 1))
        assert (out / f"round_{r}" / "model" / "model.safetensors").exists()
        assert not (out / f"round_{r}" / "learner_state").exists()  # the round's model replaced it
    assert json.loads((out / "summary.json").read_text())["steps"] == ROUNDS * STEPS


def test_no_finished_stage_ran_twice(resumed):
    out, log = resumed
    stages = stages_of(out)
    assert all(s.get("finished") for s in stages.values()) and len(stages) == 1 + 7 * ROUNDS
    assert all(f"round_{r}/knowledge_eval" in stages for r in range(1, ROUNDS + 1))
    # only the stage that was cut off ran again; everything before it was skipped
    assert {name: s["attempts"] for name, s in stages.items() if s["attempts"] != 1} == {"round_1/consolidate": 2}
    assert "[round_1/collect] finished earlier, skipped" in log
    assert "resuming consolidation after step 2 of round 1" in log


def test_rerunning_a_finished_run_starts_nothing(resumed, tiny_model):
    out, _ = resumed
    started = time.perf_counter()
    again = main_in_process(command(tiny_model, out)[3:])  # without `python -m oel_ray.main`
    assert again.returncode == 0, again.stderr[-2000:]
    assert "=== OEL summary ===" in again.stdout and "start roles" not in again.stderr
    assert time.perf_counter() - started < 60


def test_resume_with_other_settings_is_refused(resumed, tiny_model):
    out, _ = resumed
    other = [arg.replace(f"learner.steps={STEPS}", "learner.steps=5") for arg in command(tiny_model, out)]
    proc = main_in_process(other[3:])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("oel_ray: config error: learner.steps: is 5 but")


# ----------------------------------------------------------------------------- a dead teacher

def process_tree(root: int) -> list[int]:
    """`root` and every process below it (the driver's local Ray: GCS, raylet, role workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def actor_pid(driver: int, class_name: str) -> int:
    """The process of the driver's `class_name` actor: Ray titles it ray::<class>[.<method>]."""
    for pid in process_tree(driver):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if title.split(".")[0] == f"ray::{class_name}":
            return pid
    raise AssertionError(f"no ray::{class_name} process under the driver {driver}")


def one_round(tiny_model, out) -> list[str]:
    """The smallest one-round run; the learner saves only at the round's end."""
    return command(tiny_model, out, 1, STEPS, "rollout.max_response_tokens=16", "extractor.max_response_tokens=16",
                   "env.eval_maps=1", "ood.ifeval=none")


@pytest.fixture(scope="module")
def teacher_killed(tmp_path_factory, tiny_model, warm_run):
    """One round; the learner saves only at the round's end, so a state found mid-round was saved
    by the driver on its way out. The teacher's process is killed once the first step is logged."""
    out, logs = tmp_path_factory.mktemp("dead_teacher"), tmp_path_factory.mktemp("dead_teacher_logs")
    cmd = one_round(tiny_model, out)
    with open(logs / "stderr", "w") as err:  # a file, not a pipe: nobody reads it while the run goes on
        first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    metrics = out / "round_1" / "metrics.jsonl"
    deadline = time.time() + 600
    while not metric_steps(metrics) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert metric_steps(metrics), "consolidation never logged a step"
    os.kill(actor_pid(first.pid, "TeacherServer"), signal.SIGKILL)
    code = first.wait(timeout=300)
    state = out / "round_1" / "learner_state"  # the rerun's checkpoint stage removes it
    after_first = {"stages": stages_of(out), "steps": metric_steps(metrics),
                   "saved": sorted(p.name for p in state.iterdir()) if state.exists() else []}
    second = warm_run(cmd[3:])
    return out, code, (logs / "stderr").read_text(), after_first, second


def test_a_dead_teacher_stops_the_run_in_one_line_with_its_state_saved(teacher_killed):
    out, code, stderr, first, _ = teacher_killed
    assert code == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("oel_ray: stopped: the TeacherServer actor died (ActorDiedError); ") and \
        last.endswith("rerun the same command to resume"), last
    done = first["steps"]
    assert 1 <= len(done) < STEPS and done == list(range(1, len(done) + 1))
    finished = sorted(name for name, s in first["stages"].items() if s.get("finished"))
    assert finished == ["round_0/evaluate", "round_1/collect", "round_1/deploy", "round_1/extract",
                        "round_1/knowledge_eval"]
    assert "round_1/consolidate" in first["stages"]  # started, cut off
    # The steps done were saved on the way out (checkpoint_every = STEPS never saves mid-round).
    assert first["saved"] == [f"step_{len(done):06d}"]


def test_the_rerun_after_a_dead_teacher_resumes_and_finishes_every_step_once(teacher_killed):
    out, _, _, first, second = teacher_killed
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert f"resuming consolidation after step {len(first['steps'])} of round 1" in log
    steps = [int(line.split(",")[0]) for line in (out / "round_1" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, STEPS + 1))
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS
    # Every stage finished before the teacher died ran once; only consolidation ran twice.
    assert {name: s["attempts"] for name, s in stages_of(out).items() if s["attempts"] != 1} == {
        "round_1/consolidate": 2}
    assert "[round_1/deploy] finished earlier, skipped" in log


def test_a_round_evaluated_again_after_its_checkpoint_loads_the_round_model(teacher_killed, tiny_model, warm_run):
    """Last in this module: it reruns a stage of the finished run. With round 1's eval.json deleted,
    the rerun evaluates round 1 again although its training state is gone (the checkpoint removed
    it): from round_1/model, so the games repeat the first evaluation's move for move."""
    out = teacher_killed[0]
    rdir = out / "round_1"
    first = (rdir / "eval_trajectories.jsonl").read_text()
    attempts = stages_of(out)["round_1/evaluate"]["attempts"]
    (rdir / "eval.json").unlink()
    again = warm_run(one_round(tiny_model, out)[3:])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "[round_1/consolidate] finished earlier, skipped" in log
    assert "[round_1/checkpoint] finished earlier, skipped" in log
    assert stages_of(out)["round_1/evaluate"]["attempts"] == attempts + 1
    assert (rdir / "eval.json").exists() and not (rdir / "learner_state").exists()
    assert (rdir / "eval_trajectories.jsonl").read_text() == first
