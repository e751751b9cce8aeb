"""Every experiment in conf/experiment/ composes and validates from the command line, without
loading weights: `--cfg job` prints the config, and the printed config passes validate(). The
commands run in the test process (tests/entry_point.py); test_bad_input runs the real command apart."""

import functools
import subprocess
from pathlib import Path

import pytest
from entry_point import main_in_process
from omegaconf import OmegaConf

from oel_ray import config, errors
from oel_ray.validate import validate

REPO = Path(__file__).resolve().parents[1]

# Paper numbers (../shared/notes/oel-reference.md): model, thinking, env, rounds, knowledge format,
# K accumulated, step used, L, lr, consolidation steps per round.
PAPER = {
    "sokoban_4b": ("Qwen/Qwen3-4B-Instruct-2507", False, "Sokoban-v0", 3, "structured", 100, 50, 8192, 1e-6, 100),
    "frozenlake_1p7b": ("Qwen/Qwen3-1.7B", True, "FrozenLake-v0-raw", 2, "unstructured", 30, 15, 2048, 5e-6, 20),
    "frozenlake_4b": ("Qwen/Qwen3-4B", True, "FrozenLake-v0-raw", 2, "structured", 50, 25, 8192, 1e-6, 20),
    "frozenlake_8b": ("Qwen/Qwen3-8B", True, "FrozenLake-v0-raw", 2, "structured", 100, 50, 8192, 1e-6, 100),
}


def show_job_config(*overrides: str) -> subprocess.CompletedProcess:
    return main_in_process([*overrides, "--cfg", "job"], cwd=REPO)


@functools.cache
def printed_config(experiment: str) -> config.OELConfig:
    proc = show_job_config(f"+experiment={experiment}")
    assert proc.returncode == 0, proc.stderr
    printed = OmegaConf.create(proc.stdout)
    printed.output_dir = "unused"  # ${hydra:runtime.output_dir} only exists inside a real run
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(config.OELConfig), printed))


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_experiment_composes_and_validates(experiment):
    cfg = printed_config(experiment)
    assert cfg.rollout.temperature == cfg.learner.temperature  # the teacher scores at the sampling temperature
    validate(cfg)  # a hub id is accepted as model.path: no weights are looked for


def test_paper_experiments_are_all_there():
    assert set(PAPER) <= {p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")}


@pytest.mark.parametrize("experiment", sorted(PAPER))
def test_paper_experiment_has_the_papers_numbers(experiment):
    cfg = printed_config(experiment)
    model, thinking, env_id, rounds, fmt, k, use_step, knowledge, lr, steps = PAPER[experiment]
    assert cfg.name == experiment
    assert (cfg.model.path, cfg.model.build, cfg.model.thinking) == (model, None, thinking)
    assert (cfg.env.id, cfg.env.max_turns, cfg.env.eval_maps, cfg.rounds) == (env_id, 5, 128, rounds)
    assert (cfg.extractor.format, cfg.extractor.k, cfg.extractor.num_chains) == (fmt, k, 10)
    assert cfg.extractor.use_step is None and k // 2 == use_step  # the driver's default: step K/2
    assert cfg.extractor.curve_steps == [0, k // 4, use_step, k]  # the in-context curve (paper Fig. 4)
    assert cfg.extractor.max_knowledge_tokens == knowledge
    assert (cfg.learner.lr, cfg.learner.steps, cfg.learner.batch_size) == (lr, steps, 64)
    assert (cfg.rollout.deploy_games_per_step, cfg.rollout.max_response_tokens) == (64, 1024)
    assert cfg.rollout.temperature == cfg.learner.temperature == 0.7
    # Prompt budget L + 512 x 5 plus a 1024-token response must fit the engine's context.
    assert cfg.model.max_model_len >= knowledge + 512 * 5 + 1024
    # The paper's scale: 3 nodes x 8 GPUs, joined through the Ray cluster launch/slurm starts.
    assert (cfg.cluster.address, cfg.cluster.use_gpu, cfg.cluster.nodes, cfg.cluster.gpus_per_node) == (
        "auto", True, 3, 8)


def test_tiny_experiment_is_the_cpu_default():
    cfg = printed_config("tiny")
    assert (cfg.name, cfg.model.build, cfg.rounds) == ("tiny", "tiny", 1)
    assert (cfg.cluster.address, cfg.cluster.use_gpu, cfg.cluster.nodes, cfg.cluster.gpus_per_node) == (
        None, False, 1, 0)


def test_cfg_job_refuses_an_invalid_experiment_in_one_line():
    """`--cfg job` validates what it prints: 17 GPUs of roles cannot fit on one 8-GPU node."""
    proc = show_job_config("+experiment=frozenlake_4b", "cluster.nodes=1")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "oel_ray: config error: cluster.nodes: the roles need 17 GPUs (8 x 1 rollout_gpus, 1 x 1 teacher_gpus, "
        "8 x 1 learner_gpus) but cluster.nodes x cluster.gpus_per_node is 8"]


CLUSTER_MISFITS = [
    (["cluster.nodes=2"], "cluster.nodes: 2 nodes need a running Ray cluster: set cluster.address"),
    (["cluster.learner_gpus=1"], "cluster.learner_gpus: 1.0 GPUs but cluster.use_gpu is false; set it to 0"),
    (["cluster=gpu", "rollout.num_workers=8", "learner.num_ranks=8"],
     "cluster.nodes: the roles need 17 GPUs"),
    (["cluster=gpu", "cluster.teacher_gpus=0"],
     "cluster.teacher_gpus: 0.0 must be in (0, cluster.gpus_per_node=8] when cluster.use_gpu is true"),
]


@pytest.mark.parametrize("overrides,message", CLUSTER_MISFITS, ids=[" ".join(o) for o, _ in CLUSTER_MISFITS])
def test_cluster_resources_that_cannot_fit_are_refused(overrides, message):
    from hydra import compose, initialize_config_dir

    config.register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        raw = compose("config", overrides=["+experiment=tiny", "output_dir=unused", *overrides])
    with pytest.raises(errors.ConfigError) as err:
        validate(OmegaConf.to_object(raw))
    assert str(err.value).startswith(message)
