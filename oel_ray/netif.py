"""Which network interface a process's collectives and vLLM use: the one holding its Ray node IP.

Left alone, gloo binds the address the hostname resolves to, and vLLM takes the source address of
a route toward a public IP. On clusters (and in tests/netns.py's namespaces) the hostname often
resolves to an address other nodes cannot reach, or one this node does not even hold, and a node
may have no default route: ranks then wait on each other until the timeout, or vLLM binds a wrong
address. Ray's node IP is the address the other nodes already reach this one at, so every
cross-node socket goes there. Variables the user has set are left as they are.
"""

from __future__ import annotations

import logging
import os
import random
import socket
from pathlib import Path
from typing import Optional

log = logging.getLogger("oel_ray")


def interface_of(ip: str) -> Optional[str]:
    """The name of the local interface that holds `ip`, or None."""
    import psutil  # comes with Ray

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)):
            return name
    return None


def use_node_ip() -> str:
    """Point gloo, NCCL's bootstrap and vLLM at this process's Ray node IP (call before they start
    their groups or engines); returns that IP."""
    import ray

    ip = ray.util.get_node_ip_address()
    os.environ.setdefault("VLLM_HOST_IP", ip)
    name = interface_of(ip)
    if name is None:  # e.g. an address behind NAT: nothing better to offer than the defaults
        log.debug("no local interface holds the node IP %s; gloo and NCCL choose their own", ip)
        return ip
    os.environ.setdefault("GLOO_SOCKET_IFNAME", name)
    os.environ.setdefault("NCCL_SOCKET_IFNAME", name)
    return ip


# Ports a rendezvous picks now and binds moments later. One picked by binding port 0 comes from the
# kernel's ephemeral range, where any process's next outgoing connection (Ray's workers open many)
# may take it in between: the learner's rank 0 once failed in CI on EADDRINUSE. Below that range
# and above Ray's worker ports (10002-19999 by default) only a deliberate bind can collide.
RENDEZVOUS_PORTS_FROM = 20000
_ports = random.Random()  # seeded from the OS: independent of any seed a run sets


def ephemeral_ports_from() -> int:
    """The first port of the kernel's ephemeral range (Linux default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "") -> int:
    """A port free on `host` now, outside the ephemeral range where it can be (see above)."""
    top = ephemeral_ports_from()
    for _ in range(64 if top > RENDEZVOUS_PORTS_FROM else 0):
        port = _ports.randrange(RENDEZVOUS_PORTS_FROM, top)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room below the ephemeral range: the kernel's choice
        s.bind((host, 0))
        return s.getsockname()[1]
