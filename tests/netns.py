"""A multi-node Ray cluster on one machine: every node a network namespace with its own address.

    with ray_nodes([1, 2, 2], tmp_path) as cluster:      # head + 2 workers, --num-cpus each
        cluster.run(0, [sys.executable, "driver.py", cluster.address])

Layout: a hub namespace holds a Linux bridge; node i is namespace `<tag>n<i>` with `eth0` (the
peer of a veth whose other end is on the bridge) at 198.18.0.<i+1>/24 and `lo` up. 198.18.0.0/24
is reserved for benchmarking, and nothing here has a route off the machine: the namespaces only
reach each other. Nothing changes in the machine's own network namespace, unless
`namespaces(host_link=True)` adds it to the bridge at 198.18.0.254 (the Slurm test's controller
lives there; the route it adds covers 198.18.0.0/24 only). Names carry this
process's pid, so parallel runs never meet, and a run killed before its teardown is cleaned up by
the next one (its namespaces name a pid that is gone).

Ray starts the way launch/slurm starts it: the head with oel_ray.sbatch's flags and port block,
each worker through launch/slurm/ray_worker.sh (`ray start --block --address=HEAD`), all with
RAY_AUTH_MODE=disabled, usage stats off and a short per-node --temp-dir (Ray's unix sockets live
under it, and their paths are capped at 107 bytes). The hostname still resolves to the machine's
own address, which no namespace holds: the trap real clusters set for gloo and vLLM.

Teardown always runs: SIGTERM to every node's `ray start --block` (Ray stops its own processes),
then SIGKILL to whatever still runs inside a node's namespace (vLLM's engine processes included),
then the namespaces go, and with them the veths and the bridge.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKER_SCRIPT = REPO / "launch" / "slurm" / "ray_worker.sh"
SUBNET = "198.18.0"
HOST_IP = f"{SUBNET}.254"  # this machine's own end of the bridge, when namespaces(host_link=True)
PORT = 20000  # the head's port block (as oel_ray.sbatch's): its namespace is private, so never taken
PREFIX = "oel"  # namespaces: oel<pid>x<k>{h,n<i>}; Ray temp dirs: /tmp/oel<pid>x<k>n0[_n<i>]
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
RAY_CLI = [sys.executable, "-c", 'import sys; from ray.scripts.scripts import main; sys.argv[0] = "ray"; main()']
START_TIMEOUT_S = 180.0
_runs = itertools.count()


@dataclass
class Node:
    namespace: str
    ip: str
    cpus: int
    temp_dir: Path  # Ray's --temp-dir on this node
    log: Path  # the node's `ray start` output
    process: Optional[subprocess.Popen] = field(default=None, repr=False)  # `ray start --block` (or its wrapper)


@dataclass
class NetnsCluster:
    address: str  # "198.18.0.1:<port>": the head's GCS
    nodes: list[Node]
    ray_env: dict = field(default_factory=dict)  # extra environment of every node's `ray start`

    def _argv(self, i: int, argv: list) -> list[str]:
        return [*enter(self.nodes[i].namespace), *map(str, argv)]

    def _env(self, env: Optional[dict]) -> dict:
        base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never the caller's cluster
        return {**base, **RAY_ENV, **(env or {})}

    def run(self, i: int, argv: list, env: Optional[dict] = None, timeout: float = 600,
            **kw) -> subprocess.CompletedProcess:
        """`argv` inside node i's namespace, in the repository, output captured as text by default."""
        kw = {"capture_output": True, "text": True, **kw}
        return subprocess.run(self._argv(i, argv), cwd=REPO, env=self._env(env), timeout=timeout, **kw)

    def popen(self, i: int, argv: list, env: Optional[dict] = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self._argv(i, argv), cwd=REPO, env=self._env(env), **kw)

    def node_ids(self) -> dict[str, str]:
        """Ray node id -> node IP of every live node, as a driver on the head sees them."""
        return json.loads(self._query("print(json.dumps({n['NodeID']: n['NodeManagerAddress'] "
                                      "for n in ray.nodes() if n['Alive']}))"))

    def wait_alive(self, timeout: float = START_TIMEOUT_S) -> dict[str, str]:
        """Wait until exactly one live Ray node per namespace is up (a killed node's old entry no
        longer counts as alive); returns node_ids()."""
        want = sorted(n.ip for n in self.nodes)
        return json.loads(self._query(
            f"deadline, want = time.time() + {timeout}, {want!r}\n"
            "alive = lambda: {n['NodeID']: n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']}\n"
            "while sorted(alive().values()) != want:\n"
            "    assert time.time() < deadline, f'live nodes {sorted(alive().values())}, want {want}'\n"
            "    time.sleep(0.5)\n"
            "print(json.dumps(alive()))",
            timeout=timeout + 60))

    def restart(self, i: int) -> None:
        """Stop worker node i's Ray, whatever is left of it (e.g. after kill_raylet), and start it
        again; returns once the cluster has all its nodes."""
        if i == 0:
            raise ValueError("restart: the head holds the cluster's state; start a new cluster instead")
        node = self.nodes[i]
        if node.process is not None and node.process.poll() is None:
            _signal_group(node.process, signal.SIGTERM)
            try:
                node.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal_group(node.process, signal.SIGKILL)
        _kill_processes(node.namespace)
        shutil.rmtree(node.temp_dir, ignore_errors=True)
        _start_worker(self, i)
        self.wait_alive()

    def _query(self, code: str, timeout: float = 120) -> str:
        script = f"import json, time, ray\nray.init(address={self.address!r}, log_to_driver=False)\n{code}\n"
        done = self.run(0, [sys.executable, "-c", script], timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"query on the head failed:\n{done.stderr[-3000:]}\n{self.logs()}")
        # the last JSON line: Ray may print notices (say, of a dead node's raylet) after it
        return next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{"))

    def raylet_pid(self, i: int) -> int:
        """Node i's raylet: the one process named raylet whose socket paths lie under its temp dir."""
        temp = f"{self.nodes[i].temp_dir}/"
        for pid in namespace_pids(self.nodes[i].namespace):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"/raylet") and any(temp.encode() in a for a in argv):
                return pid
        raise LookupError(f"no raylet of node {i} ({self.nodes[i].namespace}) is running")

    def kill_raylet(self, i: int) -> None:
        """SIGKILL node i's raylet: the node dies as a whole machine would, seen from Ray."""
        os.kill(self.raylet_pid(i), signal.SIGKILL)

    def logs(self) -> str:
        """The tail of every node's `ray start` output, for failure messages."""
        return "\n".join(f"--- node {i} ({n.ip}) ---\n{_tail(n.log)}" for i, n in enumerate(self.nodes))


@contextmanager
def ray_nodes(cpus: list[int], tmp: Path, env: Optional[dict] = None) -> Iterator[NetnsCluster]:
    """A Ray head (cpus[0] CPUs) and one worker per further entry, each node in its own namespace.
    `env`: extra environment for every node's `ray start` (e.g. RAY_* system settings)."""
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    with namespaces(len(cpus)) as spaces:
        head_temp = Path(f"/tmp/{spaces[0][0]}")  # workers: <head_temp>_n<i> (ray_worker.sh's naming)
        nodes = [Node(name, ip, c, Path(f"{head_temp}_n{i}" if i else head_temp), tmp / f"ray_n{i}.log")
                 for i, ((name, ip), c) in enumerate(zip(spaces, cpus))]
        cluster = NetnsCluster(f"{nodes[0].ip}:{PORT}", nodes, dict(env or {}))
        try:
            _start_head(cluster)
            for i in range(1, len(nodes)):
                _start_worker(cluster, i)
            cluster.wait_alive()
            yield cluster
        finally:
            _teardown(nodes)


@contextmanager
def namespaces(count: int, host_link: bool = False) -> Iterator[list[tuple[str, str]]]:
    """`count` namespaces on one bridge, as (name, IP) with IPs 198.18.0.1 up. With `host_link`
    this machine's own namespace joins the bridge too, at HOST_IP, for daemons that stay outside
    (a Slurm controller) and for the tools that talk to them. Everything inside the namespaces is
    killed and the namespaces deleted on the way out."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (ip netns add)")
    if not 1 <= count <= 250:
        raise ValueError(f"{count} namespaces, want 1 to 250")
    _clean_leftovers()
    tag = f"{PREFIX}{os.getpid()}x{next(_runs)}"
    hub = f"{tag}h"
    spaces = [(f"{tag}n{i}", f"{SUBNET}.{i + 1}") for i in range(count)]
    made: list[str] = []
    try:
        _netns_add(hub, first=True)
        made.append(hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        for i, (name, ip) in enumerate(spaces):
            _netns_add(name)
            made.append(name)
            _ip("link", "add", "name", f"p{i}", "netns", hub, "type", "veth", "peer", "name", "eth0", "netns", name)
            _ip("-n", hub, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", name, "addr", "add", f"{ip}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "link", "set", "lo", "up")
        if host_link:  # the host end is deleted with its peer, when the hub namespace goes
            _ip("link", "add", "name", f"{tag}v", "type", "veth", "peer", "name", "host", "netns", hub)
            _ip("-n", hub, "link", "set", "host", "master", "br0", "up")
            _ip("addr", "add", f"{HOST_IP}/24", "dev", f"{tag}v")
            _ip("link", "set", f"{tag}v", "up")
        yield spaces
    finally:
        for name in reversed(made):
            _kill_namespace(name)


def enter(namespace: str) -> list[str]:
    """A command prefix that runs a command in the namespace's network, and nothing else of its own:
    `ip netns exec` would also mount a fresh /sys without /sys/fs/cgroup, which slurmd refuses to
    start without and which leaves Ray's memory monitor blind."""
    return ["nsenter", f"--net=/run/netns/{namespace}"]


def namespace_pids(namespace: str) -> list[int]:
    """Every process inside a network namespace (Ray's daemons, its workers, their children)."""
    done = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()]


# ----------------------------------------------------------------------------- set-up and teardown

def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _netns_add(name: str, first: bool = False) -> None:
    done = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if done.returncode != 0:
        if first and ("permitted" in done.stderr or "denied" in done.stderr):
            pytest.skip(f"`ip netns add` is not permitted here: {done.stderr.strip()}")
        raise RuntimeError(f"ip netns add {name}: {done.stderr.strip()}")


def _head_ports() -> list[str]:
    """oel_ray.sbatch's port block: every port Ray's head listens on, from PORT up."""
    names = ["port", "ray-client-server-port", "dashboard-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
             "object-manager-port", "node-manager-port"]
    return [f"--{name}={PORT + k}" for k, name in enumerate(names)]


def _start_head(cluster: NetnsCluster) -> None:
    head = cluster.nodes[0]
    argv = [*RAY_CLI, "start", "--head", "--block", f"--node-ip-address={head.ip}", *_head_ports(),
            f"--num-cpus={head.cpus}", f"--temp-dir={head.temp_dir}", "--include-dashboard=false",
            "--disable-usage-stats"]
    _launch(cluster, 0, argv, cluster.ray_env)
    deadline = time.time() + START_TIMEOUT_S
    while not (head.temp_dir / "ray_current_cluster").is_file():  # as the sbatch script waits
        if head.process.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the Ray head did not start:\n{_tail(head.log)}")
        time.sleep(0.3)


def _start_worker(cluster: NetnsCluster, i: int) -> None:
    node = cluster.nodes[i]
    # ray_worker.sh names the temp dir <prefix>_<SLURMD_NODENAME> and removes it when Ray stops.
    argv = ["bash", WORKER_SCRIPT, cluster.nodes[0].temp_dir, *RAY_CLI, "start", "--block",
            f"--address={cluster.address}", f"--num-cpus={node.cpus}", "--disable-usage-stats"]
    _launch(cluster, i, argv, {**cluster.ray_env, "SLURMD_NODENAME": f"n{i}"})


def _launch(cluster: NetnsCluster, i: int, argv: list, env: Optional[dict] = None) -> None:
    node = cluster.nodes[i]
    with open(node.log, "ab") as log:  # a restarted node's output follows its earlier run's
        node.process = cluster.popen(i, argv, env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)


def _teardown(nodes: list[Node]) -> None:
    # A few seconds of SIGTERM for Ray to stop its own processes (workers drain in under one; a
    # head drains for up to 30 s, which a throwaway cluster need not wait for), then SIGKILL to
    # everything left in the namespaces (namespaces() does that next), as `ray stop --force` would.
    running = [n.process for n in nodes if n.process is not None and n.process.poll() is None]
    for proc in running:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.time() + 5
    for proc in running:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
    for node in nodes:
        _kill_processes(node.namespace)
        shutil.rmtree(node.temp_dir, ignore_errors=True)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _kill_processes(namespace: str) -> None:
    """SIGKILL everything inside the namespace, until nothing is left (children may still fork)."""
    deadline = time.time() + 30
    while (pids := namespace_pids(namespace)) and time.time() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def _kill_namespace(name: str) -> None:
    """Everything inside the namespace, then the namespace (its veth ends go with it)."""
    _kill_processes(name)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _clean_leftovers() -> None:
    """Namespaces and temp dirs of earlier runs that died before their teardown (their pid is gone)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for name in listed:
        left = re.fullmatch(rf"({PREFIX}(\d+)x\d+)(h|n\d+)", name)
        if left and not Path(f"/proc/{left[2]}").exists():
            _kill_namespace(name)
            for temp in Path("/tmp").glob(f"{left[1]}n*"):
                shutil.rmtree(temp, ignore_errors=True)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no output)"
