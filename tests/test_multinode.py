"""Several Ray nodes with their own addresses on one machine (tests/netns.py): the cluster path as a
real multi-node cluster meets it. The hostname resolves to an address no namespace holds and no
namespace has a default route, so gloo, vLLM and Ray must each use the node's own Ray IP.

Drivers run inside the head's namespace (`cluster.run(0, ...)`), as `python -m oel_ray.main` runs on
the head node under launch/slurm; nodes 1 and 2 carry the work (the head has no CPUs to give)."""

from __future__ import annotations

import ipaddress
import json
import signal
import sys
import textwrap
import time

import pytest

from netns import NetnsCluster, ray_nodes

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ray_nodes([0, 1, 1], tmp_path_factory.mktemp("netns")) as nodes:
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
