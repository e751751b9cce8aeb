"""The loop learns, end to end, on the model organism (conf/experiment/organism.yaml): one round of
the main experiment through the entry point (real Ray, vLLM, DeepSpeed, TextArena) must raise the
held-out pass rate beyond round 0's interval, and the empty-knowledge control, identical but for
what the teacher reads, must not move it out of that interval. A loop that stopped learning (a
teacher that lost its knowledge, workers left on stale weights, knowledge placed where the teacher
never reads it, a flipped loss sign) fails the first; a gain that came from training alone fails
the second.

The organism is built once (minutes, cached where `make run` keeps it) before the runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ONE_ROUND = ["rounds=1", "env.eval_samples=4", "extractor.eval_steps=[]", "tracking.progress_bars=false"]


@pytest.fixture(scope="module")
def organism_path() -> str:
    from hydra import compose, initialize_config_dir

    from oel_ray import config
    from oel_ray.tiny_model import build_model

    config.register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        path = compose("config", overrides=["+experiment=organism", "output_dir=/tmp/x"]).model.path
    return str(build_model(path, "organism"))


def one_round(experiment: str, out: Path, model: str) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "oel_ray.main", f"+experiment={experiment}", f"model.path={model}",
                           f"hydra.run.dir={out}", *ONE_ROUND], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, [line for line in proc.stderr.splitlines() if "Warning" in line][:3]
    return [json.loads((out / f"round_{r}" / "eval.json").read_text()) for r in (0, 1)]


def test_one_round_beats_round_0_and_the_empty_knowledge_control_does_not(organism_path, tmp_path):
    main = one_round("organism", tmp_path / "main", organism_path)
    empty = one_round("organism_empty_knowledge", tmp_path / "empty", organism_path)
    (before, after), (_, control) = main, empty
    print("round 0", before["pass_rate"], "OEL", after["pass_rate"], "empty knowledge", control["pass_rate"])
    assert empty[0]["pass_rate"] == before["pass_rate"]  # same model, maps and sampling seeds
    assert after["ci_low"] > before["ci_high"], (before["pass_rate"], after["pass_rate"])
    assert before["ci_low"] <= control["pass_rate"] <= before["ci_high"], (before["pass_rate"], control["pass_rate"])
    assert after["pass_rate"] - control["pass_rate"] >= 0.08
