"""Weight sync learner -> rollout workers after every optimizer step, behind one interface.

`WeightSync.sync(version)` puts the learner's current weights into every rollout engine, in place,
and returns the seconds it took. Two transports (`learner.weight_sync`):

- object_store: rank 0's state_dict goes into Ray's object store once and every worker loads that
  one copy (read zero-copy on its node). Any machine; the weights pass through host memory.
- nccl: one NCCL group between learner rank 0 and every vLLM worker, opened once. Each sync the
  learner broadcasts the weights from GPU memory, packed into buckets of about `bucket_mb`
  (one NCCL call per bucket, not per tensor), and each worker streams what it receives straight
  into the engine's reload, so vLLM's post-load processing runs once per sync and no worker holds
  a second full copy of the model. GPUs only: learner rank 0 and each worker on a GPU of its own
  (one GPU per engine, as RolloutGroup places them).

A rollout worker that dies leaves the collective group: each sync first asks the workers whether
they live (one round trip) and reopens the group over the live ones when one is gone, so the sync
never waits on a dead member. A worker that dies *during* a sync makes every other member fail at
once (on gloo a member whose broadcast fails closes its end, which fails its peers in turn); the
group is then reopened without it and the sync done again. On NCCL a broadcast cannot fail that
way: a worker dying in the middle of a sync stalls it until `cluster.timeout_s`, and the run stops
in one line and resumes when rerun.

The collective transport is written once for any process group that can broadcast; on CPU it runs
over gloo with the same packing and streaming code, which is how the CPU tests exercise it (the
NCCL calls themselves run only on a GPU cluster).
"""

from __future__ import annotations

import datetime
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator

import ray
import torch

from oel_ray.config import AUTO, GLOO, NCCL, OBJECT_STORE, WEIGHT_SYNCS
from oel_ray.netif import use_node_ip



@dataclass(frozen=True)
class TensorMeta:
    """What a receiver needs to allocate one tensor before it arrives."""

    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.torch_dtype.itemsize

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> "TensorMeta":
        return cls(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))


def buckets(metas: list[TensorMeta], bucket_bytes: int) -> list[list[TensorMeta]]:
    """Consecutive runs of one dtype of at most `bucket_bytes` each (a larger tensor goes alone).
    Sender and receivers compute the same plan from the same metas: it is never sent."""
    out: list[list[TensorMeta]] = []
    size = 0
    for meta in metas:
        if out and out[-1][0].dtype == meta.dtype and size + meta.nbytes <= bucket_bytes:
            out[-1].append(meta)
            size += meta.nbytes
        else:
            out.append([meta])
            size = meta.nbytes
    return out


# ----------------------------------------------------------------------------- the wire

class Channel:
    """One member of a broadcast group outside every other process group (DeepSpeed's and vLLM's
    own groups are untouched). Rank 0 sends; ranks 1.. receive. Every member must construct it at
    the same time: rank 0 hosts the rendezvous store at (address, port)."""

    def __init__(self, backend: str, address: str, port: int, rank: int, world_size: int, timeout_s: float):
        self.backend, self.rank = backend, rank
        use_node_ip()  # the group's sockets on the interface other nodes reach, not the hostname's
        if backend == NCCL:
            # vLLM's stateless group + its NCCL wrapper: the pattern vLLM's own RL weight transfer
            # uses (vllm.distributed.weight_transfer.nccl_common), and it works in a process whose
            # torch.distributed is already initialised (the learner's DeepSpeed group).
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
            from vllm.distributed.utils import StatelessProcessGroup

            self.device = torch.device("cuda", torch.cuda.current_device())
            group = StatelessProcessGroup.create(host=address, port=port, rank=rank, world_size=world_size,
                                                 store_timeout=int(timeout_s))
            self._comm = PyNcclCommunicator(group, device=self.device)
        elif backend == GLOO:
            from torch.distributed import ProcessGroupGloo, TCPStore

            self.device = torch.device("cpu")
            timeout = datetime.timedelta(seconds=timeout_s)
            store = TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout)
            self._comm = ProcessGroupGloo(store, rank, world_size, timeout)
        else:
            raise ValueError(f"channel backend {backend!r} is not one of nccl, gloo")

    def broadcast(self, tensor: torch.Tensor) -> None:
        if self.backend == NCCL:
            self._comm.broadcast(tensor, src=0, stream=torch.cuda.current_stream())
        else:
            self._comm.broadcast(tensor, 0).wait()

    def synchronize(self) -> None:
        if self.backend == NCCL:
            torch.cuda.current_stream().synchronize()

    def close(self) -> None:
        """Leave the group (again: a no-op). On gloo the peers' pending and later broadcasts then fail
        at once with "Connection closed by peer", not at the group's timeout."""
        if self._comm is not None and self.backend == NCCL:
            self._comm.destroy()
        self._comm = None


def send(channel: Channel, weights: dict[str, torch.Tensor], metas: list[TensorMeta], bucket_bytes: int) -> None:
    """Rank 0: broadcast `weights` in the order and packing of `metas`. On any failure this end
    closes, so no receiver waits for a bucket that will not come."""
    try:
        for bucket in buckets(metas, bucket_bytes):
            tensors = [weights[m.name] for m in bucket]
            for m, t in zip(bucket, tensors):
                if TensorMeta.of(m.name, t) != m:  # a mismatch would hang the receivers or load garbage
                    raise ValueError(f"weight {m.name}: {TensorMeta.of(m.name, t)} differs from the announced {m}")
            flat = torch.cat([t.detach().reshape(-1) for t in tensors]).to(channel.device)
            channel.broadcast(flat)
        channel.synchronize()
    except Exception:
        channel.close()
        raise


def receive(channel: Channel, metas: list[TensorMeta], bucket_bytes: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Ranks 1..: (name, tensor) in the order of `metas`, one bucket received at a time as the
    consumer asks for it. Each bucket has its own buffer: tensors already handed out stay valid.
    A failed broadcast closes this end: the members that receive through this one (gloo broadcasts
    along a tree) then fail at once too."""
    for bucket in buckets(metas, bucket_bytes):
        flat = torch.empty(sum(m.numel for m in bucket), dtype=bucket[0].torch_dtype, device=channel.device)
        try:
            channel.broadcast(flat)
        except Exception:
            channel.close()
            raise
        offset = 0
        for m in bucket:
            yield m.name, flat[offset:offset + m.numel].view(m.shape)
            offset += m.numel


# ----------------------------------------------------------------------------- the interface

class WeightSync(ABC):
    transport: str
    learner: object  # the LearnerGroup it reads from
    workers: object  # the RolloutGroup it writes to

    @abstractmethod
    def sync(self, version: int) -> float:
        """Load the learner's current weights into every rollout engine; returns seconds."""

    def close(self) -> None:
        """Release the transport (the actors keep running)."""


class ObjectStoreSync(WeightSync):
    transport = OBJECT_STORE

    def __init__(self, learner, workers):
        self.learner, self.workers = learner, workers

    def sync(self, version: int) -> float:
        start = time.perf_counter()
        self.workers.load_weights(self.learner.state_dict_ref(), version=version)
        return time.perf_counter() - start


class CollectiveSync(WeightSync):
    """Learner rank 0 broadcasts to the live workers over one group, opened at construction and
    reopened without a worker that died (see the module's docstring)."""

    def __init__(self, learner, workers, *, backend: str, bucket_mb: float, timeout_s: float):
        self.learner, self.workers, self.timeout_s = learner, workers, timeout_s
        self.transport = backend
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))
        self.metas: list[TensorMeta] = ray.get(learner.ranks[0].weight_metas.remote())
        self.members: list = []  # the workers the open group was built with, rank 1.. in order
        self._open()

    def sync(self, version: int) -> float:
        start = time.perf_counter()
        if self.workers.alive() != self.members:  # a worker died since the group was opened
            self._open()
        while self._lost_a_worker(version):  # each pass drops one or more; none left raises
            self._open()
        return time.perf_counter() - start

    def close(self) -> None:
        self._call([(self.learner.ranks[0], "close_weight_channel", ())]
                   + [(w, "close_weight_channel", ()) for w in self.members], "close the weight-sync group")
        self.members = []

    def _open(self) -> None:
        """A new group of rank 0 and the live workers (every member leaves its old group first)."""
        self.close()
        rank0, b, t = self.learner.ranks[0], self.transport, self.timeout_s
        joined = False
        while not joined:  # again without a worker that died while joining
            members = list(self.workers.alive())
            address, port = ray.get(rank0.weight_channel_address.remote())
            world = 1 + len(members)
            joined = not self._call([(rank0, "open_weight_channel", (b, address, port, world, t))]
                                    + [(w, "open_weight_channel", (b, address, port, 1 + i, world, t))
                                       for i, w in enumerate(members)], "open the weight-sync group")
        self.members = members

    def _lost_a_worker(self, version: int) -> bool:
        """One broadcast of the weights to the members; True if a worker died during it (it is
        dropped from the group; the others' failures are the consequence, not an error).
        Every learner rank takes part (ZeRO-3 gathers the full weights collectively); the workers
        receive concurrently: all of them meet inside the same broadcasts."""
        return self._call([(r, "send_weights", (self.bucket_bytes,)) for r in self.learner.ranks]
                          + [(w, "receive_weights", (self.metas, self.bucket_bytes, version)) for w in self.members],
                          "sync weights")

    def _call(self, calls: list[tuple], what: str) -> bool:
        """Run (actor, method, args) calls at once and wait for all of them; True if a rollout
        worker among them died (the rollout group then drops it). Any other failure is raised,
        unless a worker's death explains it; a learner rank that dies is raised as it is."""
        refs = {getattr(actor, method).remote(*args): actor for actor, method, args in calls}
        deadline, pending = time.monotonic() + self.timeout_s, list(refs)
        died, failed = False, None
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"weight sync ({self.transport}): could not {what} within cluster.timeout_s="
                                   f"{self.timeout_s:g}s; a learner rank or rollout worker is stuck or gone")
            try:
                ray.get(ready[0])
            except ray.exceptions.RayActorError:
                if refs[ready[0]] in self.learner.ranks:
                    raise  # the run stops (and resumes from its saved state)
                died = True
            except Exception as err:  # e.g. gloo's "Connection closed by peer" after a worker died
                failed = failed or err
        if died:
            self.workers.alive()  # drops the dead
        elif failed is not None:
            raise failed
        return died


def resolve(kind: str, use_gpu: bool) -> str:
    """The transport `kind` ("auto" | "object_store" | "nccl") means on this cluster."""
    if kind not in WEIGHT_SYNCS:
        raise ValueError(f"learner.weight_sync {kind!r} is not one of {', '.join(WEIGHT_SYNCS)}")
    if kind == AUTO:
        return NCCL if use_gpu else OBJECT_STORE
    return kind


def make_weight_sync(kind: str, learner, workers, *, use_gpu: bool, bucket_mb: float = 256.0,
                     timeout_s: float = 1800.0) -> WeightSync:
    """`learner`: a LearnerGroup; `workers`: a RolloutGroup. "gloo" (CPU, tests) runs the nccl
    transport's code over gloo."""
    transport = kind if kind == GLOO else resolve(kind, use_gpu)
    if transport == OBJECT_STORE:
        return ObjectStoreSync(learner, workers)
    return CollectiveSync(learner, workers, backend=transport, bucket_mb=bucket_mb, timeout_s=timeout_s)


def for_roles(roles, cfg) -> WeightSync:
    """The sync of these roles, built on first use from the config and kept on `roles.sync`, so
    a group is opened once, not once per step; rebuilt when the learner or the workers were
    replaced (a new LearnerGroup per round)."""
    current = roles.sync
    if current is not None and (current.learner is not roles.learner or current.workers is not roles.workers):
        roles.sync = None  # the workers close their end of the old group when they join the new one
    if roles.sync is None:
        roles.sync = make_weight_sync(cfg.learner.weight_sync, roles.learner, roles.workers,
                                      use_gpu=cfg.cluster.use_gpu, bucket_mb=cfg.learner.sync_bucket_mb,
                                      timeout_s=cfg.cluster.timeout_s)
    return roles.sync
