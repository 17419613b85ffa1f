"""Property-based tests (hypothesis) of the pure rules against upstream's definitions."""

from __future__ import annotations

import re
import string

from hypothesis import given, settings
from hypothesis import strategies as st

from machined.envfile import parse_env_file
from machined.machine import Machine, MachineClass, Timestamp
from machined.naming import bus_label_escape, bus_label_unescape, hostname_is_valid, unit_name_escape
from machined.statefile import cescape, parse, serialize

# hostname_is_valid(name, 0) as systemd 252 defines it, written as a regular expression.
LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
HOSTNAME = re.compile(rf"{LABEL}(\.{LABEL})*")

name_chars = st.sampled_from(string.ascii_letters + string.digits + "-._/ \x00é")


@given(st.text(name_chars, max_size=70))
def test_hostname_validation_matches_the_ldh_rules(name: str) -> None:
    expected = bool(HOSTNAME.fullmatch(name)) and len(name.encode()) <= 64
    assert hostname_is_valid(name) == expected


@given(st.text(max_size=40))
def test_bus_label_escape_round_trips_and_is_a_valid_path_element(label: str) -> None:
    escaped = bus_label_escape(label)
    assert re.fullmatch(r"[A-Za-z0-9_]+", escaped)
    assert not escaped[0].isdigit()
    assert bus_label_unescape(escaped) == label


@given(st.text(string.ascii_letters + string.digits + "-.", min_size=1, max_size=64))
def test_unit_name_escape_keeps_only_unit_name_characters(name: str) -> None:
    escaped = unit_name_escape(name)
    assert re.fullmatch(r"[A-Za-z0-9:_.\\]+", escaped)
    assert "-" not in escaped and not escaped.startswith(".")


printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)


@settings(max_examples=300)
@given(
    name=st.from_regex(HOSTNAME, fullmatch=True).filter(lambda n: len(n) <= 64),
    service=printable,
    root=printable.map(lambda p: "/" + p),
    leader=st.integers(2, 2**22),
    cls=st.sampled_from([MachineClass.CONTAINER, MachineClass.VM]),
    netif=st.lists(st.integers(1, 2**31 - 1), max_size=4),
    ident=st.one_of(st.just(b""), st.binary(min_size=16, max_size=16)),
    realtime=st.integers(1, 2**62),
)
def test_state_files_round_trip(name, service, root, leader, cls, netif, ident, realtime) -> None:  # type: ignore[no-untyped-def]
    m = Machine(name=name, id=ident, service=service, machine_class=cls, leader=leader, root_directory=root,
                netif=netif, unit=f"machine-{name}.scope", timestamp=Timestamp(realtime, 7))  # fmt: skip
    back = parse(name, serialize(m))
    # Unquoted values lose their outer blanks when read back, for systemd's reader as for ours.
    assert (back.service, back.root_directory, back.unit) == (service.strip(" "), root.rstrip(" "), m.unit)
    assert (back.leader, back.machine_class, back.netif) == (leader, cls, netif)
    assert back.id_bytes == m.id_bytes
    assert (back.timestamp.realtime, back.timestamp.monotonic) == (realtime, 7)


@given(printable)
def test_cescaped_ascii_values_read_back_unchanged(value: str) -> None:
    assert parse_env_file(f"K={cescape(value)}\n").get("K", "") == value.strip(" ")
