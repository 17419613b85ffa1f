"""Pure parsers: cgroup paths, environment files, address ordering."""

import socket

from machined.cgroup import cgroup_path_get_unit, parse_proc_cgroup
from machined.envfile import parse_env_file
from machined.inside.addresses import Address, sort_addresses


def test_unit_of_cgroup_path() -> None:
    assert cgroup_path_get_unit("/machine.slice/machine-foo.scope/payload") == "machine-foo.scope"
    assert cgroup_path_get_unit("/system.slice/systemd-nspawn@x.service") == "systemd-nspawn@x.service"
    assert cgroup_path_get_unit("/user.slice") is None
    assert cgroup_path_get_unit("/") is None
    assert cgroup_path_get_unit("/sandbox-exec") is None


def test_proc_cgroup_line_follows_the_layout() -> None:
    # More cases in test_cgroup_layout.py: systemd tracks units in cgroup2 unless legacy.
    text = "9:name=systemd:/system.slice/a.service\n4:memory:/x\n0::/other\n"
    assert parse_proc_cgroup(text, "hybrid") == "/other"
    assert parse_proc_cgroup(text, "legacy") == "/system.slice/a.service"
    assert parse_proc_cgroup("0::/init.scope\n", "unified") == "/init.scope"
    assert parse_proc_cgroup("", "unified") is None


def test_env_file_quoting_and_comments() -> None:
    text = '# c\nNAME="Debian GNU/Linux"\nID=debian\nX=\'a b\'\nBAD LINE\nEMPTY=\nESC="a\\"b"\n'
    assert parse_env_file(text) == {
        "NAME": "Debian GNU/Linux",
        "ID": "debian",
        "X": "a b",
        "EMPTY": "",
        "ESC": 'a"b',
    }


def test_addresses_are_ordered_and_filtered_like_local_addresses() -> None:
    v4 = socket.inet_pton(socket.AF_INET, "192.0.2.2")
    v4b = socket.inet_pton(socket.AF_INET, "10.0.0.1")
    lo = socket.inet_pton(socket.AF_INET, "127.0.0.1")
    v6g = socket.inet_pton(socket.AF_INET6, "fd00::2")
    v6l = socket.inet_pton(socket.AF_INET6, "fe80::1")
    got = sort_addresses(
        [
            Address(socket.AF_INET6, 253, 4, v6l),
            Address(socket.AF_INET6, 0, 4, v6g),
            Address(socket.AF_INET, 254, 1, lo),
            Address(socket.AF_INET, 0, 4, v4),
            Address(socket.AF_INET, 0, 3, v4b),
            Address(socket.AF_INET, 0, 4, v4),
        ]
    )
    assert [a.address for a in got] == [v4b, v4, v6g, v6l]
