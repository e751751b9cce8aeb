"""Shared fixtures: the embedded tiny model (built once per session) and one local Ray cluster."""

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private test cluster on loopback
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from oel_ray.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-qwen3"))


@pytest.fixture(scope="session")
def ray_cluster():
    """4 logical CPUs on a 2-core machine: actors ask for fractions and mostly wait on each other."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
