"""Addresses straight from rtnetlink: the same as pyroute2 reports, filtered and ordered as systemd does."""

from __future__ import annotations

import socket
import struct

from machined import netlink
from machined.addresses import Address, read_addresses


def test_the_same_addresses_as_through_pyroute2() -> None:
    assert netlink.dump_addresses() == read_addresses()


def _message(family: int, flags: int, scope: int, index: int, attrs: list[tuple[int, bytes]]) -> bytes:
    body = struct.pack("=BBBBI", family, 24, flags, scope, index)
    for kind, payload in attrs:
        length = 4 + len(payload)
        body += struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)
    return body


def test_local_before_peer_address_and_extended_flags() -> None:
    v4 = _message(socket.AF_INET, 0, 0, 3, [(netlink.IFA_ADDRESS, bytes([10, 0, 0, 2])),
                                            (netlink.IFA_LOCAL, bytes([10, 0, 0, 1]))])  # fmt: skip
    assert netlink._address(v4, 0, len(v4)) == Address(socket.AF_INET, 0, 3, bytes([10, 0, 0, 1]))
    deprecated = _message(socket.AF_INET6, 0, 0, 3, [(netlink.IFA_ADDRESS, bytes(16)),
                                                     (netlink.IFA_FLAGS, struct.pack("=I", 0x20))])  # fmt: skip
    assert netlink._address(deprecated, 0, len(deprecated)) is None
    no_address = _message(socket.AF_INET, 0, 0, 3, [])
    assert netlink._address(no_address, 0, len(no_address)) is None
