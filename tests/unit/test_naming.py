"""Machine names, object-path labels and unit names as systemd 252 makes them."""

import pytest

from machined.naming import (
    bus_label_escape,
    bus_label_unescape,
    hostname_is_valid,
    machine_object_path,
    machine_scope_name,
    path_is_normalized_absolute,
    path_is_valid_absolute,
    unit_name_escape,
)


@pytest.mark.parametrize(
    ("name", "label"),
    [
        (".host", "_2ehost"),
        ("my-vm", "my_2dvm"),
        ("fedora.local", "fedora_2elocal"),
        ("9box", "_39box"),
        ("a9", "a9"),
        ("a_b", "a_5fb"),
        ("", "_"),
        ("ü", "_c3_bc"),
    ],
)
def test_bus_label_escape_matches_sd_bus(name: str, label: str) -> None:
    assert bus_label_escape(name) == label
    assert bus_label_unescape(label) == name


def test_bus_label_unescape_keeps_malformed_escapes_literal() -> None:
    assert bus_label_unescape("a_zz") == "a_zz"
    assert bus_label_unescape("a_4") == "a_4"
    assert bus_label_unescape("_41") == "A"


@pytest.mark.parametrize(
    "name",
    ["a", "foo", "foo-bar", "foo.bar", "a.b.c", "FOO9", "9", "x" * 64, "qemu-1-vm"],
)
def test_valid_machine_names(name: str) -> None:
    assert hostname_is_valid(name)


@pytest.mark.parametrize(
    "name",
    ["", ".host", "a_b", "-a", "a-", "a..b", ".a", "a.", "a.-b", "a-.b", "x" * 65, "a b", "ä", "a/b", "self/x"],
)
def test_invalid_machine_names(name: str) -> None:
    assert not hostname_is_valid(name)


def test_unit_name_escape() -> None:
    assert unit_name_escape("my-vm") == "my\\x2dvm"
    assert unit_name_escape(".x") == "\\x2ex"
    assert unit_name_escape("a.b_c:d") == "a.b_c:d"
    assert unit_name_escape("a/b") == "a-b"


def test_paths_and_scopes() -> None:
    assert machine_object_path(".host") == "/org/freedesktop/machine1/machine/_2ehost"
    assert machine_scope_name("my-vm") == "machine-my\\x2dvm.scope"


@pytest.mark.parametrize(
    ("path", "valid", "normalized"),
    [
        ("/run/vm/control", True, True),
        ("/run/x/", True, True),
        ("/", True, True),
        ("/a//b", True, False),
        ("/a/./b", True, False),
        ("/a/../b", True, False),
        ("", False, False),
        ("relative/x", False, False),
        ("unix:/run/x", False, False),
        ("/" + "x" * 255, True, True),
        ("/" + "x" * 256, False, False),
        ("/" + "/".join(["x" * 200] * 21), False, False),  # PATH_MAX
    ],
)
def test_path_rules_of_262_json_paths(path: str, valid: bool, normalized: bool) -> None:
    """262's JSON path fields: sshPrivateKeyPath a valid absolute path, rootDirectory and controlAddress
    normalized as well."""
    assert path_is_valid_absolute(path) is valid
    assert path_is_normalized_absolute(path) is normalized
