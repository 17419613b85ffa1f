"""A network namespace's addresses, filtered and ordered as systemd's local_addresses().

Deprecated addresses and those of host or nowhere scope (loopback) are left
out; IPv4 comes before IPv6, then lower scope (global before link), then lower
interface index, then the address bytes; duplicates are dropped.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

IFA_F_DEPRECATED = 0x20
RT_SCOPE_HOST = 254
RT_SCOPE_NOWHERE = 255


@dataclass(frozen=True, order=True)
class Address:
    family: int
    scope: int
    ifindex: int
    address: bytes


def sort_addresses(addresses: list[Address]) -> list[Address]:
    def key(a: Address) -> tuple[int, int, int, bytes]:
        return (0 if a.family == socket.AF_INET else 1, a.scope, a.ifindex, a.address)

    kept = [
        a
        for a in addresses
        if a.scope not in (RT_SCOPE_HOST, RT_SCOPE_NOWHERE) and a.family in (socket.AF_INET, socket.AF_INET6)
    ]
    return list(dict.fromkeys(sorted(kept, key=key)))


def read_addresses(ipr: Any = None) -> list[Address]:
    """Addresses of a network namespace, via rtnetlink (pyroute2): those of *ipr*'s, an open
    ``IPRoute`` (its socket stays in the namespace it was opened in), else the calling thread's.

    Run in children only (the fork server preloads pyroute2, see :func:`warm_up`): importing it
    costs ~13 MiB and ~0.2 s, which the daemon itself does not pay.
    """
    if ipr is None:
        from pyroute2 import IPRoute

        with IPRoute() as own:
            return read_addresses(own)
    found = []
    for msg in ipr.get_addr():
        flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
        if flags & IFA_F_DEPRECATED:
            continue
        family = msg["family"]
        text = msg.get_attr("IFA_LOCAL") if family == socket.AF_INET else None
        text = text or msg.get_attr("IFA_ADDRESS")
        if not text:
            continue
        found.append(Address(family, msg["scope"], msg["index"], socket.inet_pton(family, text)))
    return sort_addresses(found)


def to_rows(addresses: list[Address]) -> list[list[int | str]]:
    """Addresses as a child reports them to the daemon: [family, address hex, ifindex]."""
    return [[a.family, a.address.hex(), a.ifindex] for a in addresses]


def from_rows(rows: Any) -> list[Address]:
    """The inverse of :func:`to_rows`."""
    assert isinstance(rows, list)
    return [Address(int(row[0]), 0, int(row[2]), bytes.fromhex(str(row[1]))) for row in rows]


def host_addresses() -> list[list[int | str]]:
    """In a child of the host's network namespace: the host's addresses (``.host``)."""
    return to_rows(read_addresses())


def warm_up() -> None:
    """In the fork server, before any child enters a container: import pyroute2 and open one
    socket, so that everything it loads lazily is loaded (a container's root need not hold it)."""
    read_addresses()
