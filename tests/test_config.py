"""Experiments compose and validate (bad input: tests/test_bad_input.py)."""

import pytest


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
            "Qwen/Qwen3-4B-Instruct-2507", 3, 1e-6, 100, None)  # None: step K/2 = 50, as in the paper
        assert cfg.env.eval_maps == 128 and cfg.learner.steps == 100 and cfg.learner.batch_size == 64
    config.validate(cfg)  # hub ids pass without loading weights
