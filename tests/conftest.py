"""Shared fixtures: the embedded tiny model (from the cache `make run` uses) and one local Ray cluster."""

import os

import pytest
from built_models import composed_model_path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private test cluster on loopback
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """The tiny model where `make run EXPERIMENT=tiny` keeps it (conf/model/tiny.yaml's path): built
    there once (half a minute), then reused by every session while its version stands. Tests read it
    and copy it, never write into it."""
    from oel_ray.embedded import build_tiny_model

    return str(build_tiny_model(composed_model_path("tiny")))


@pytest.fixture(scope="session")
def ray_cluster():
    """6 logical CPUs on a 2-core machine: actors ask for fractions and mostly wait on each other. A
    test's roles fit in 4; the other 2 leave room for the roles a `warm_run` keeps for the next one
    (idle in between), so no test has to stop them first."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield ray
    from oel_ray import session

    session.release_kept_roles()
    ray.shutdown()


def placement_groups_held_here() -> set[str]:
    """The placement groups this process created (a group's id ends in its job's id) and still holds."""
    import ray

    job = ray.get_runtime_context().get_job_id()
    return {pg for pg, info in ray.util.placement_group_table().items()
            if pg.endswith(job) and info["state"] != "REMOVED"}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if call.when == "call":
        item.call_passed = report.passed
    return report


def remove_placement_groups(ids: set[str]) -> None:
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for pg in ids:
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg))))


def kept_placement_groups() -> set[str]:
    from oel_ray import session

    return {role.placement.group.id.hex() for role in session.kept_roles()}


@pytest.fixture(scope="module", autouse=True)
def roles_stop_with_their_module():
    """The same for a module's fixtures: roles a module fixture started and did not stop are removed
    once the module is done, and its last test errs, naming them (three such fixtures once held half
    the session cluster's CPUs to its end). Whichever of its tests joins the cluster first."""
    import ray

    before = placement_groups_held_here() if ray.is_initialized() else set()
    yield
    if not ray.is_initialized():
        return
    left = placement_groups_held_here() - before - kept_placement_groups()
    remove_placement_groups(left)
    if left:
        pytest.fail(f"the module's fixtures left {len(left)} placement group(s) running: stop their roles")


@pytest.fixture(autouse=True)
def roles_stop_with_their_test(request):
    """Roles a test started and did not stop hold the session cluster's CPUs, and every later test
    that needs them waits out the placement timeout (one failed test cost a run 25 minutes and 12
    failures more). After each test on the session cluster, the placement groups it left are removed
    (their actors with them); a test that passed and left some fails here, naming them. The roles a
    `warm_run` keeps for the next one are the exception."""
    if "ray_cluster" not in request.fixturenames:
        yield
        return
    before = placement_groups_held_here()
    yield
    left = placement_groups_held_here() - before - kept_placement_groups()
    remove_placement_groups(left)
    if left and getattr(request.node, "call_passed", False):
        pytest.fail(f"the test left {len(left)} placement group(s) running: stop its roles (shutdown())")


@pytest.fixture(scope="session")
def joins_session_cluster(ray_cluster) -> list[str]:
    """Overrides that make a run join the session's Ray cluster (cluster.address, as a run on a
    Slurm allocation joins its job's) instead of starting and stopping a private one: about 6 s of a
    smallest run's 36. Only for runs whose test neither kills nor inspects the cluster's processes
    (a run's actors then belong to the cluster's raylet, not to the run's process tree) and that need
    no more than the 4 logical CPUs a test has."""
    return [f"cluster.address={ray_cluster.get_runtime_context().gcs_address}"]


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


@pytest.fixture(scope="session")
def warm_run(ray_cluster, joins_session_cluster):
    """run(argv, cwd=None) -> CompletedProcess: `python -m oel_ray.main *argv` on the session cluster,
    in this process, its roles left running when it ends: the next test's warm run takes them over
    where it would build them alike (session.take_kept_roles: the vLLM workers and the teacher as
    they are, the learner's ranks reloaded at the start model), as the jobs of a sweep do, sparing
    the roles' start (about 11 s of a smallest run's 15 on 2 cores) and the interpreter's. Actors'
    output does not reach the run's stderr here: a test that reads it runs the command itself."""
    from entry_point import main_in_process

    def run(argv: list[str], cwd=None):
        return main_in_process([*argv, *joins_session_cluster], cwd=cwd, keep_roles=True)
    return run
