"""A network namespace's addresses, filtered and ordered as systemd's local_addresses().

Read with one RTM_GETADDR dump on a NETLINK_ROUTE socket and parsed with :mod:`struct`
(``struct nlmsghdr``, ``struct ifaddrmsg`` and the three attributes used): pyroute2 would
cost the daemon ~25 MiB and ~0.2 s to import, more than the whole daemon otherwise weighs,
for a parser of some 60 lines (see README, "Looks inside machines").

Deprecated addresses and those of host or nowhere scope (loopback) are left
out; IPv4 comes before IPv6, then lower scope (global before link), then lower
interface index, then the address bytes; duplicates are dropped.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

IFA_F_DEPRECATED = 0x20
RT_SCOPE_HOST = 254
RT_SCOPE_NOWHERE = 255
NETLINK_ROUTE = 0
RTM_NEWADDR = 20
RTM_GETADDR = 22
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_FLAGS = 8
NLA_TYPE_MASK = 0x3FFF

_NLMSGHDR = struct.Struct("=IHHII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")


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


def _align(n: int) -> int:
    return (n + 3) & ~3


def _address(data: bytes, start: int, end: int) -> Address | None:
    """One RTM_NEWADDR's address (``struct ifaddrmsg`` and its attributes); None if it is left out."""
    family, _, ifa_flags, scope, index = _IFADDRMSG.unpack_from(data, start)
    attrs: dict[int, bytes] = {}
    offset = start + _IFADDRMSG.size
    while offset + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > end:
            break
        attrs.setdefault(kind & NLA_TYPE_MASK, data[offset + _RTATTR.size : offset + length])
        offset += _align(length)
    extended = attrs.get(IFA_FLAGS)
    flags = (_U32.unpack(extended[:4])[0] if extended and len(extended) >= 4 else 0) or ifa_flags
    if flags & IFA_F_DEPRECATED:
        return None
    raw = (attrs.get(IFA_LOCAL) if family == socket.AF_INET else None) or attrs.get(IFA_ADDRESS)
    if not raw or len(raw) != (4 if family == socket.AF_INET else 16):
        return None
    return Address(family, scope, index, raw)


def netlink_socket() -> socket.socket:
    """A NETLINK_ROUTE socket of the calling thread's network namespace."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        sock.bind((0, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def read_addresses(sock: socket.socket | None = None, timeout: float | None = None) -> list[Address]:
    """The addresses of *sock*'s network namespace (a NETLINK_ROUTE socket, which stays in the
    namespace it was created in; by default one of the calling thread's): one RTM_GETADDR dump,
    filtered and ordered as systemd's local_addresses()."""
    if sock is None:
        with netlink_socket() as own:
            return read_addresses(own, timeout)
    sock.settimeout(timeout)
    found: list[Address] = []
    seq = 1
    request = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(request), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + request)
    while True:
        data = sock.recv(1 << 17)
        if not data:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, kind, _, msg_seq, _ = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size or offset + length > len(data):
                raise OSError(errno.EBADMSG, os.strerror(errno.EBADMSG))
            body = offset + _NLMSGHDR.size
            if msg_seq == seq:
                if kind == NLMSG_DONE:
                    return sort_addresses(found)
                if kind == NLMSG_ERROR:
                    code = -_I32.unpack_from(data, body)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                elif kind == RTM_NEWADDR and body + _IFADDRMSG.size <= offset + length:
                    address = _address(data, body, offset + length)
                    if address is not None:
                        found.append(address)
            offset += _align(length)
