"""Config mistakes fail before Ray starts, with one line naming the field and what is allowed."""

import subprocess
import sys

import pytest

BAD = [
    (["learner.lrr=1"], "learner.lrr: no such field; did you mean learner.lr?"),
    (["lerner.lr=1"], "lerner.lr: no such field; did you mean learner?"),
    (["learner.lr=abc"], "learner.lr: 'abc' is not a valid float"),
    (["env.id=Sokoban-v9"], "env.id: 'Sokoban-v9' is not one of FrozenLake-v0"),
    (["model.build=null", "model.path=/no/such/model"], "model.path: '/no/such/model' does not exist"),
    (["learner.zero_stage=5"], "learner.zero_stage: 5 is not one of 0, 1, 2, 3"),
    (["extractor.k=100"], "extractor.k: 100 trajectories per chain but rollout.games_per_round is 8"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[0][-1] for b in BAD])
def test_bad_config_fails_fast_with_one_line(overrides, message, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "oel_ray.main", *overrides, f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("oel_ray: config error: ") and message in lines[0]
    assert "ray" not in proc.stdout.lower()  # nothing started


@pytest.mark.parametrize("experiment", ["tiny", "sokoban_4b"])
def test_experiments_compose(experiment):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from oel_ray import config

    config.register()
    import pathlib

    conf_dir = str(pathlib.Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        raw = compose("config", overrides=[f"+experiment={experiment}", "output_dir=/tmp/x"])
    cfg = OmegaConf.to_object(raw)
    assert cfg.name == experiment
    assert cfg.learner.temperature == cfg.rollout.temperature  # the teacher scores at the sampling temperature
    if experiment == "sokoban_4b":
        assert (cfg.model.path, cfg.rounds, cfg.learner.lr, cfg.extractor.k, cfg.extractor.use_step) == (
            "Qwen/Qwen3-4B-Instruct-2507", 3, 1e-6, 100, 50)
        assert cfg.env.eval_maps == 128 and cfg.learner.steps == 100 and cfg.learner.batch_size == 64
    config.validate(cfg)  # hub ids pass without loading weights
