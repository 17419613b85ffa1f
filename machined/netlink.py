"""The calling thread's network namespace's addresses, straight from rtnetlink.

One RTM_GETADDR dump on a NETLINK_ROUTE socket: the same addresses, filtered and
ordered the same way (:func:`machined.addresses.sort_addresses`), as
:func:`machined.addresses.read_addresses`, without pyroute2 (whose import alone
takes longer than the whole look inside a container should).
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from machined.addresses import IFA_F_DEPRECATED, Address, sort_addresses

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


def _align(n: int) -> int:
    return (n + 3) & ~3


def _address(data: bytes, start: int, end: int) -> Address | None:
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
    if not raw:
        return None
    return Address(family, scope, index, raw)


def dump_addresses() -> list[Address]:
    """The addresses systemd's local_addresses() reports, in its order."""
    found: list[Address] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        seq = 1
        request = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(request), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
        sock.send(header + request)
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
