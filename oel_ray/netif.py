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
import socket
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
