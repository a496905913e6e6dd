"""Network-interface settings checked on every host before any collective starts.

Which interface carries the traffic between hosts is chosen by the launcher's settings:

| setting                                          | carries                          | set by                                   |
|--------------------------------------------------|----------------------------------|------------------------------------------|
| `horovodrun --network-interface IF`              | Gloo (HOROVOD_GLOO_IFACE) + NCCL | horovodrun, on every rank                |
| `mpirun --mca btl_tcp_if_include IF`             | MPI's TCP byte transfer          | OMPI_MCA_btl_tcp_if_include on each rank |
| `mpirun --mca oob_tcp_if_include IF`             | mpirun <-> orted control         | checked by mpirun itself                 |
| `NCCL_SOCKET_IFNAME=IF` (GPU)                    | NCCL's bootstrap and sockets     | the environment                          |

Left unset, each picks the non-loopback interfaces it finds, which is right when a host has one
(a Kubernetes pod's eth0). A name that does not exist on a host used to surface as a KeyError,
a wall of MPI text after the first collective, or a silent fallback; here it is one error line
naming the host, the variable and the interfaces that host does have.
"""

from __future__ import annotations

import ipaddress
import os
import socket

# Environment variable -> how its value lists interfaces (exact names, or NCCL's prefixes).
SETTINGS = {
    "HOROVOD_GLOO_IFACE": "exact",
    "OMPI_MCA_btl_tcp_if_include": "exact",
    "OMPI_MCA_oob_tcp_if_include": "exact",
    "NCCL_SOCKET_IFNAME": "nccl",
}


class InterfaceError(RuntimeError):
    """A launcher setting names a network interface this host does not have."""


def host_interfaces() -> list[str]:
    return sorted(name for _, name in socket.if_nameindex())


def _is_subnet(item: str) -> bool:
    try:
        ipaddress.ip_network(item, strict=False)
    except ValueError:
        return False
    return "/" in item


def _matches(item: str, style: str, present: list[str]) -> bool:
    if style == "nccl":
        # NCCL: a leading '^' excludes (nothing to check), '=' asks for an exact name, else a prefix.
        if item.startswith("^"):
            return True
        if item.startswith("="):
            return item[1:] in present
        return any(name.startswith(item) for name in present)
    return item in present


def check(environ=None, present: list[str] | None = None, host: str | None = None) -> None:
    """Raises InterfaceError when a setting lists interfaces of which this host has none."""
    environ = os.environ if environ is None else environ
    present = host_interfaces() if present is None else present
    host = host or socket.gethostname()
    for var, style in SETTINGS.items():
        value = environ.get(var, "").strip()
        if not value:
            continue
        items = [i.strip() for i in value.split(",") if i.strip()]
        names = [i for i in items if not _is_subnet(i)]  # Open MPI also takes subnets (10.0.0.0/8)
        # Open MPI drops the whole list when one name is unknown; NCCL uses whichever matches.
        missing = [i for i in names if not _matches(i, style, present)]
        if missing and (style == "exact" or len(missing) == len(items)):
            raise InterfaceError(
                f"{var}={value}: no network interface {', '.join(missing)} on host {host} (it has: "
                f"{', '.join(present)}); name one that every host has (horovodrun --network-interface IF, "
                "mpirun --mca btl_tcp_if_include IF), or leave it unset to use every non-loopback interface")
