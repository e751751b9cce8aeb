"""Where each role's actors run: one Ray placement group per role.

A role (the rollout workers, the teacher actors, the learner ranks) asks for `count` bundles of
{CPU: cpus, GPU: gpus}, one per actor, and Ray reserves them all before any actor starts: a role
that cannot fit fails here, in one line, instead of as actors pending forever. PACK puts bundles
on as few nodes as they fit on (learner ranks share a node's fast links); where a node is full
the rest spill to the next. Actor i then starts inside bundle i, so `node_of(i)` is its node.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from typing import Optional

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

log = logging.getLogger("oel_ray")

# How long a role waits for the cluster to find room for all its actors before the run stops.
PLACEMENT_TIMEOUT_S = 300.0


@dataclass
class RolePlacement:
    """`count` bundles of {CPU: cpus, GPU: gpus}, reserved together for one role."""

    role: str
    count: int
    cpus: float
    gpus: float
    group: Optional[PlacementGroup] = None

    def reserve(self, timeout_s: float = PLACEMENT_TIMEOUT_S) -> "RolePlacement":
        bundle = {"CPU": float(self.cpus)} | ({"GPU": float(self.gpus)} if self.gpus else {})
        self.group = placement_group([dict(bundle) for _ in range(self.count)], strategy="PACK",
                                     name=f"oel_ray {self.role} {uuid.uuid4().hex[:8]}")
        ready, _ = ray.wait([self.group.ready()], timeout=timeout_s)
        if not ready:
            self.release()
            raise RuntimeError(
                f"the cluster has no room for the {self.role}: {self.count} x {bundle} within {timeout_s:g}s "
                f"(free now: {_free_resources()}); lower cluster.*_cpus / *_gpus or add nodes")
        return self

    def options(self, i: int) -> dict:
        """`.options(...)` that start an actor inside bundle i with that bundle's resources."""
        return dict(num_cpus=self.cpus, num_gpus=self.gpus,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=i))

    def address(self, i: int = 0) -> tuple[str, int]:
        """The IP of bundle i's node and a port free there: where rank 0 hosts a rendezvous."""
        strategy = PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=i)
        return ray.get(_node_address.options(num_cpus=0, scheduling_strategy=strategy).remote())

    def nodes(self) -> list[dict]:
        """Per bundle (so per actor, in rank order), the Ray node id and IP it was placed on."""
        bundles = ray.util.placement_group_table(self.group)["bundles_to_node_id"]
        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        return [{"node_id": bundles[i], "ip": ips.get(bundles[i])} for i in range(self.count)]

    def release(self) -> None:
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None


@ray.remote
def _node_address() -> tuple[str, int]:
    from oel_ray.netif import free_port

    return ray.util.get_node_ip_address(), free_port()


def _free_resources() -> dict:
    free = ray.available_resources()
    return {k: round(v, 2) for k, v in free.items() if k in ("CPU", "GPU")}


def driver_node() -> dict:
    node = ray.get_runtime_context().get_node_id()
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    return {"node_id": node, "ip": ips.get(node)}


# ----------------------------------------------------------------------------- CPU cores

def core_slices(placements: list[tuple[str, list[int]]]) -> list[list[int]]:
    """The cores each worker binds to, from each worker's (node id, usable cores).

    Workers on one node split its cores into disjoint contiguous slices (the first ones take the
    remainder); with more workers than cores, they take one core each, round robin.
    """
    on_node: dict[str, list[int]] = {}
    for index, (node, _) in enumerate(placements):
        on_node.setdefault(node, []).append(index)
    slices: list[list[int]] = [[] for _ in placements]
    for node, members in on_node.items():
        cores = sorted(placements[members[0]][1])
        if len(members) > len(cores):
            for rank, index in enumerate(members):
                slices[index] = [cores[rank % len(cores)]]
            continue
        size, extra = divmod(len(cores), len(members))
        start = 0
        for rank, index in enumerate(members):
            end = start + size + (rank < extra)
            slices[index] = cores[start:end]
            start = end
    return slices


def bind_to_cores(cores: list[int]) -> None:
    """Run this process's engine on `cores` only, one OpenMP thread per core.

    The engine runs in-process (uniproc executor), where vLLM does no thread binding of its own
    (VLLM_CPU_OMP_THREADS_BIND is applied only by its multiprocessing executor), and Ray caps
    OMP_NUM_THREADS at 1 for fractional-CPU actors. Call before torch is first used: OpenMP reads
    OMP_NUM_THREADS when it loads, and its pool threads inherit the affinity of the thread that
    starts them (Ray runs a synchronous actor's methods on the main thread).
    """
    os.environ["OMP_NUM_THREADS"] = str(len(cores))
    os.sched_setaffinity(0, cores)
    import torch

    torch.set_num_threads(len(cores))
