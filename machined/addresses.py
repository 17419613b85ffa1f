"""A network namespace's addresses, filtered and ordered as systemd's local_addresses().

Deprecated addresses and those of host or nowhere scope (loopback) are left
out; IPv4 comes before IPv6, then lower scope (global before link), then lower
interface index, then the address bytes; duplicates are dropped.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

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


def read_addresses() -> list[Address]:
    """Addresses of the calling thread's network namespace, via rtnetlink."""
    from pyroute2 import IPRoute

    found = []
    with IPRoute() as ipr:
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
