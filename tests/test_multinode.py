"""Several Ray nodes with their own addresses on one machine (tests/netns.py): the cluster path as a
real multi-node cluster meets it. The hostname resolves to an address no namespace holds and no
namespace has a default route, so gloo, vLLM and Ray must each use the node's own Ray IP.

Drivers run inside the head's namespace (`cluster.run(0, ...)`), as `python -m oel_ray.main` runs on
the head node under launch/slurm; nodes 1 and 2 carry the work (the head has no CPUs to give)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import textwrap

import pytest
from netns import NetnsCluster, ray_nodes

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    env = {
        # Results above 1 kB go through the object store of the node that made them, as real games'
        # batches do (Ray inlines results under 100 kB; the tiny model's are smaller).
        "RAY_max_direct_call_object_size": "1000",
        # A dead node is declared dead after ~3-6 s instead of ~15-30 s: the fault tests wait less.
        "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
        "RAY_health_check_failure_threshold": "3",
    }
    with ray_nodes([0, 1, 1], tmp_path_factory.mktemp("netns"), env=env) as nodes:
        yield nodes


def driver(cluster: NetnsCluster, code: str, timeout: float = 300) -> dict:
    """Run `code` as a Ray driver on the head (`ray` connected, `ips` = node id -> IP); it prints
    one JSON line last, returned here."""
    script = (f"import json, sys, ray\nray.init(address={cluster.address!r}, log_to_driver=False)\n"
              "ips = {n['NodeID']: n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']}\n"
              + textwrap.dedent(code))
    done = cluster.run(0, [sys.executable, "-c", script], timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_node_has_its_own_address(cluster):
    ips = cluster.node_ids()
    assert len(ips) == 3
    assert sorted(ips.values()) == sorted(n.ip for n in cluster.nodes)  # three distinct addresses
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network("198.18.0.0/24") for ip in ips.values())


# Two ranks on nodes 1 and 2: the learner's DeepSpeed group (torch.distributed over gloo, set up
# from MASTER_ADDR/PORT as Learner.__init__ does) and the weight-sync Channel, each with rank 0
# hosting the rendezvous on its own node IP and a port free there.
GLOO_RANKS = """
import socket
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

@ray.remote(num_cpus=0)
class Rank:
    def address(self):
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def join(self, rank, addr, port, channel_port):
        import datetime, os, torch
        import torch.distributed as dist
        from oel_ray.netif import use_node_ip
        from oel_ray.weight_sync import Channel

        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
        use_node_ip()  # what Learner.__init__ does before deepspeed.init_distributed
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        total = torch.tensor([rank + 1.0])
        dist.all_reduce(total)
        channel = Channel("gloo", addr, channel_port, rank, 2, timeout_s=60)
        sent = torch.arange(4.0) if rank == 0 else torch.zeros(4)
        channel.broadcast(sent)
        return {"node": ray.get_runtime_context().get_node_id(), "all_reduce": total.item(),
                "broadcast": sent.tolist(), "ifname": os.environ["GLOO_SOCKET_IFNAME"]}

head = ray.get_runtime_context().get_node_id()
workers = sorted(n for n in ips if n != head)
ranks = [Rank.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote() for n in workers]
addr, port = ray.get(ranks[0].address.remote())
_, channel_port = ray.get(ranks[0].address.remote())
out = ray.get([r.join.remote(i, addr, port, channel_port) for i, r in enumerate(ranks)], timeout=120)
print(json.dumps({"ranks": out, "ips": ips, "workers": workers, "addr": addr}))
"""


def test_gloo_groups_span_two_nodes_on_the_node_ips(cluster):
    got = driver(cluster, GLOO_RANKS)
    ranks, ips = got["ranks"], got["ips"]
    assert [r["node"] for r in ranks] == got["workers"]  # one rank per worker node, not the head
    assert got["addr"] == ips[ranks[0]["node"]] != cluster.nodes[0].ip  # rank 0 hosts on its own IP
    assert [r["all_reduce"] for r in ranks] == [3.0, 3.0]
    assert [r["broadcast"] for r in ranks] == [[0.0, 1.0, 2.0, 3.0]] * 2
    assert [r["ifname"] for r in ranks] == ["eth0", "eth0"]  # the namespace's own interface



# Two rollout workers, one per worker node (1 CPU each; only nodes 1 and 2 have CPUs), play GAMES
# games with RolloutGroup.play. The driver prints "ended N" as games come back. With "finished" it
# first waits until the worker on node 2 has played all its games (a call queued behind its play
# returns) while it holds back from fetching them, so that they are still in node 2's object store
# when the test kills that node.
GAMES = 48
COLLECT = """
from oel_ray.config import EnvConfig, ModelConfig
from oel_ray.types import Sampling
from oel_ray.games import train_specs
from oel_ray.rollout import RolloutGroup

model, games, wait_for = sys.argv[1], int(sys.argv[2]), sys.argv[3]
group = RolloutGroup(ModelConfig(path=model, build=None, max_model_len=2048), num_workers=2, seed=0,
                     max_logprobs=1, kv_cache_gib=0.5, gpu_memory_utilization=0.5, num_cpus=1, num_gpus=0)
workers = [ips[node] for node, _ in ray.get([w.placement.remote() for w in group.workers])]
on_node_2 = group.workers[workers.index("198.18.0.3")]
specs = train_specs(EnvConfig(id="Sokoban-v0", kwargs={"dim_room": [6, 6], "num_boxes": 1}), 0, games)
streamed = []

def on_games(ended):
    streamed.extend(t.seed for t in ended)
    print("ended", len(streamed), flush=True)
    if wait_for == "finished" and len(streamed) == len(ended):  # the first delivery
        ray.get(on_node_2.ready.remote())  # queued behind its play: returns once that has ended
        print("finished", flush=True)
        sys.stdin.readline()  # the test kills node 2 now

played = group.play(specs, Sampling(max_tokens=64, temperature=1.0, seed=7), 5, 0, on_games=on_games)
print("result", json.dumps({"workers": workers, "specs": [s.seed for s in specs], "played": [t.seed for t in played],
                  "streamed": streamed, "lost": group.lost}))
group.shutdown()
"""


@pytest.fixture
def all_nodes(cluster):
    """The cluster with every node up: a test before may have killed one."""
    for i, node in enumerate(cluster.nodes):
        if i and (node.process is None or node.process.poll() is not None):
            cluster.restart(i)
    return cluster


@pytest.mark.parametrize("kill_when", ["ended", "finished"])
def test_collection_survives_a_dead_node(all_nodes, tiny_model, kill_when):
    """Node 2's raylet is SIGKILLed while games are being played ("ended": once the first games
    are back), or after its worker played all its games but before the driver fetched them
    ("finished"): every game comes back exactly once, in spec order, the lost ones replayed on
    node 1."""
    cluster = all_nodes
    script = (f"import json, sys, ray\nray.init(address={cluster.address!r}, log_to_driver=False)\n"
              "ips = {n['NodeID']: n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']}\n" + COLLECT)
    proc = cluster.popen(0, [sys.executable, "-c", script, tiny_model, str(GAMES), kill_when], text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines, killed = [], False
        for line in proc.stdout:
            lines.append(line)
            if not killed and line.split()[:1] == [kill_when]:
                cluster.kill_raylet(2)
                killed = True
                if kill_when == "finished":
                    proc.stdin.write("go\n")  # the driver fetches node 2's games now
                    proc.stdin.flush()
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 0, "".join(lines)[-3000:] + err[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    got = json.loads(next(line for line in lines if line.startswith("result "))[len("result "):])  # Ray's
    # notices about the dead node can follow it
    assert sorted(got["workers"]) == ["198.18.0.2", "198.18.0.3"]  # one worker per worker node
    assert got["lost"] == 1  # the death met the collection: node 2 still owed games
    assert got["played"] == got["specs"] and len(got["played"]) == GAMES  # exact, in spec order
    assert sorted(got["streamed"]) == sorted(got["specs"])  # each game delivered once
