"""The whole OEL loop on a Ray cluster whose nodes have their own addresses (tests/netns.py): two
rounds of the tiny experiment with the learner's ZeRO-3 ranks on two different nodes, neither of
them the driver's, and the rollout worker and the teacher on worker nodes too. The placement is
forced by the nodes' sizes, not hoped for: the head (where the driver runs) has no CPU to give,
and each worker node has room for one learner rank (1 CPU) or two half-CPU actors."""

import json
import sys

import pytest
from netns import SUBNET, ray_nodes

pytestmark = pytest.mark.e2e


def test_two_rounds_with_learner_ranks_on_two_nodes_away_from_the_driver(tmp_path, tiny_model, smallest_tiny):
    out = tmp_path / "run"
    with ray_nodes([0, 1, 1, 1], tmp_path / "ray") as cluster:
        argv = [sys.executable, "-m", "oel_ray.main", *smallest_tiny, "rounds=2", "learner.steps=2",
                f"model.path={tiny_model}", "model.build=null", f"output_dir={out}",
                f"cluster.address={cluster.address}", "cluster.nodes=4", "cluster.learner_cpus=1",
                "cluster.rollout_cpus=0.5", "cluster.teacher_cpus=0.5",
                "learner.num_ranks=2", "learner.zero_stage=3"]
        done = cluster.run(0, argv, timeout=900)
        assert done.returncode == 0, f"{done.stderr[-4000:]}\n{cluster.logs()}"
        alive = cluster.node_ids()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["steps"] == 4
    assert (out / "round_2" / "model" / "config.json").is_file()

    where = json.loads((out / "placement.json").read_text())  # the learner of round 2
    ip_of = {n["node_id"]: n["ip"] for n in [where["driver"], *where["learner"], *where["teacher"], *where["rollout"]]}
    assert all(alive.get(node) == ip and ip.startswith(f"{SUBNET}.") for node, ip in ip_of.items()), (ip_of, alive)
    driver = where["driver"]["node_id"]
    assert where["driver"]["ip"] == cluster.nodes[0].ip  # the driver runs on the head
    ranks = [n["node_id"] for n in where["learner"]]
    assert len(set(ranks)) == 2, "the learner's ranks must span two nodes"
    assert ranks[0] != driver, "rank 0 hosts the rendezvous on its own node, not the driver's"
    assert driver not in ranks + [n["node_id"] for n in where["teacher"] + where["rollout"]]
