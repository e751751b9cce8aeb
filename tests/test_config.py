"""Experiments compose and validate (bad input: tests/test_bad_input.py)."""

import pathlib

import pytest

from oel_ray.validate import validate

CONF = pathlib.Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_experiment(experiment: str):
    """The experiment's config as Hydra composes it from conf/ (not yet checked by the schema)."""
    from hydra import compose, initialize_config_dir

    from oel_ray import config

    config.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"+experiment={experiment}", "output_dir=/tmp/x"])


@pytest.mark.parametrize("experiment", ["tiny", "sokoban_4b"])
def test_experiments_compose(experiment):
    from omegaconf import OmegaConf


    cfg = OmegaConf.to_object(compose_experiment(experiment))
    assert cfg.name == experiment
    assert cfg.learner.temperature == cfg.rollout.temperature  # the teacher scores at the sampling temperature
    if experiment == "sokoban_4b":
        assert (cfg.model.path, cfg.rounds, cfg.learner.lr, cfg.extractor.k, cfg.extractor.use_step) == (
            "Qwen/Qwen3-4B-Instruct-2507", 3, 1e-6, 100, None)  # None: step K/2 = 50, as in the paper
        assert cfg.env.eval_maps == 128 and cfg.learner.steps == 100 and cfg.learner.batch_size == 64
    validate(cfg)  # hub ids pass without loading weights


def test_eval_steps_default_and_errors():
    """The in-context curve's steps: by default 0, K/4, the knowledge step and K; a bad list is
    refused in one line naming extractor.eval_steps."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from oel_ray import config, errors

    config.register()

    def cfg(*overrides):
        conf_dir = str(Path(__file__).resolve().parents[1] / "conf")
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            return OmegaConf.to_object(compose("config", overrides=["output_dir=/tmp/x", *overrides]))

    assert validate(cfg("extractor.k=4")).extractor.curve_steps == [0, 1, 2, 4]
    assert cfg("extractor.k=2", "extractor.use_step=2").extractor.curve_steps == [0, 2]
    assert validate(cfg("extractor.eval_steps=[3,0]")).extractor.curve_steps == [0, 3]
    assert cfg("extractor.eval_steps=[]").extractor.curve_steps == []  # no curve
    for steps, message in [("[0,5]", "extractor.eval_steps: 5 must be an integer in 0..extractor.k (4)"),
                           ("[-1]", "extractor.eval_steps: -1 must be an integer in 0..extractor.k (4)"),
                           ("[0,2,2]", "extractor.eval_steps: [0, 2, 2] lists step 2 more than once")]:
        with pytest.raises(errors.ConfigError) as err:
            validate(cfg("extractor.k=4", f"extractor.eval_steps={steps}"))
        assert str(err.value) == message
    # how many chains the curve plays: 1..num_chains, and every one where select=best picks among them
    assert validate(cfg("extractor.num_chains=3", "extractor.eval_chains=2")).extractor.eval_chains == 2
    for overrides, message in [
            (["extractor.eval_chains=3"], "extractor.eval_chains: 3 must be in 1..extractor.num_chains (2), or null "
                                          "for every chain"),
            (["extractor.eval_chains=0"], "extractor.eval_chains: 0 must be in 1..extractor.num_chains (2), or null "
                                          "for every chain"),
            (["extractor.select=best", "extractor.eval_chains=1"],
             "extractor.select: best picks among every chain's curve: set extractor.eval_chains=null")]:
        with pytest.raises(errors.ConfigError) as err:
            validate(cfg(*overrides))
        assert str(err.value) == message


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_each_experiment_plays_its_env_file_s_game(experiment):
    """The game's kwargs are exactly those of the experiment's env file: none leak in from another
    game (a schema default once merged Sokoban's dim_room into every FrozenLake run)."""
    import yaml
    from omegaconf import OmegaConf

    env = OmegaConf.to_container(compose_experiment(experiment), resolve=False)["env"]
    files = [yaml.safe_load(p.read_text()) for p in (CONF / "env").glob("*.yaml")]
    assert any(f.get("id") == env["id"] and f.get("kwargs") == env["kwargs"] for f in files), (
        f"{experiment}: env.kwargs {env['kwargs']} match no conf/env file for {env['id']}")
