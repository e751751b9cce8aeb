"""Kill the driver during consolidation, rerun the same command: it resumes from the last saved
training state and finishes with the same steps and no stage run twice. Real parts throughout."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.e2e

ROUNDS, STEPS = 2, 4


def command(tiny_model, out):
    return [sys.executable, "-m", "oel_ray.main", f"model.path={tiny_model}", f"hydra.run.dir={out}",
            f"rounds={ROUNDS}", f"learner.steps={STEPS}", "learner.checkpoint_every=2", "learner.batch_size=4",
            "rollout.games_per_round=2", "rollout.deploy_games_per_step=1", "extractor.k=2", "extractor.num_chains=1",
            "env.eval_maps=2", "tracking.progress_bars=false"]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, tiny_model):
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
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
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
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert all(s.get("finished") for s in stages.values()) and len(stages) == 1 + 6 * ROUNDS
    # only the stage that was cut off ran again; everything before it was skipped
    assert {name: s["attempts"] for name, s in stages.items() if s["attempts"] != 1} == {"round_1/consolidate": 2}
    assert "[round_1/collect] finished earlier, skipped" in log
    assert "resuming consolidation after step 2 of round 1" in log


def test_rerunning_a_finished_run_starts_nothing(resumed, tiny_model):
    out, _ = resumed
    started = time.perf_counter()
    again = subprocess.run(command(tiny_model, out), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "=== OEL summary ===" in again.stdout and "start learner" not in again.stderr
    assert time.perf_counter() - started < 60


def test_resume_with_other_settings_is_refused(resumed, tiny_model):
    out, _ = resumed
    other = [arg.replace(f"learner.steps={STEPS}", "learner.steps=5") for arg in command(tiny_model, out)]
    proc = subprocess.run(other, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("oel_ray: config error: learner.steps: is 5 but")
