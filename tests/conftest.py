"""Shared fixtures: the embedded tiny model (built once per session) and one local Ray cluster."""

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private test cluster on loopback
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Built once per test run: pytest-xdist's workers share the run's directory (each has its own
    below it), and the build's lock lets one of them build while the others wait."""
    from oel_ray.embedded import build_tiny_model

    root = tmp_path_factory.getbasetemp()
    shared = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    return str(build_tiny_model(shared / "model" / "tiny-qwen3"))


@pytest.fixture(scope="session")
def ray_cluster():
    """4 logical CPUs on a 2-core machine: actors ask for fractions and mostly wait on each other."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def smallest_tiny() -> list[str]:
    """Overrides that cut the tiny experiment to the bone for launcher tests: every stage still
    runs, on as little data as it accepts. batch_size 2 divides by any grad_accum of 1 or 2;
    4 games cover extractor.k up to 4."""
    return [
        "+experiment=tiny", "rounds=1", "learner.steps=1", "learner.batch_size=2",
        "rollout.games_per_round=4", "rollout.deploy_games_per_step=1", "extractor.num_chains=1",
        "env.eval_maps=1", "rollout.max_response_tokens=16", "extractor.max_response_tokens=16",
        "tracking.progress_bars=false",
    ]


# Under pytest-xdist (`make test` runs two workers) a module is one unit of work, so its module
# fixtures (a whole run shared by its tests) run once; the modules that start network namespaces
# with fixed names and addresses form one unit together. The slowest modules are handed out first,
# so that none of them is left running alone at the end (seconds measured on a 2-core machine).
NETNS_MODULES = ("test_multinode.py", "test_multinode_run.py", "test_slurm.py")
SLOW_FIRST = ("test_organism_loop.py", *NETNS_MODULES, "test_comparisons.py", "test_resume.py", "test_sweep.py",
              "test_controls.py", "test_learning_signal.py", "test_faults.py", "test_learner.py", "test_extractor.py",
              "test_off_policy.py", "test_consolidate.py", "test_round.py", "test_ifeval.py", "test_bad_input.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a module stays
    for item in items:
        item.add_marker(pytest.mark.xdist_group("netns" if item.path.name in NETNS_MODULES else item.path.stem))
