"""Explicit nulls that 262's method handlers refuse although the interface declares the field
nullable (``?type``).

sd-varlink first checks a call against the interface description, where ``null`` is as good as a
missing optional field; then each method reads its parameters with its own dispatch table, and
a field whose table entry is not marked nullable refuses ``null`` with InvalidParameter naming
it. Measured against real 262 field by field (tests/integration262/test_nulls262.py): these are
the fields where it does so and a missing field would not have been refused. Fields that take
``null`` as "not given" (``pid`` everywhere) are not listed.
"""

from __future__ import annotations

from typing import Any

NULL_REFUSED_262: dict[str, tuple[str, ...]] = {
    "io.systemd.Machine.Unregister": ("name", "allowInteractiveAuthentication"),
    "io.systemd.Machine.Terminate": ("name", "allowInteractiveAuthentication"),
    "io.systemd.Machine.List": ("name", "allowInteractiveAuthentication", "acquireMetadata"),
    "io.systemd.Machine.MapFrom": ("name", "allowInteractiveAuthentication", "uid", "gid"),
    "io.systemd.Machine.MapTo": ("uid", "gid"),
    "io.systemd.Machine.OpenRootDirectory": ("name", "allowInteractiveAuthentication"),
    "io.systemd.UserDatabase.GetUserRecord": ("uid",),
    "io.systemd.UserDatabase.GetGroupRecord": ("gid",),
    "io.systemd.MachineImage.List": ("name", "acquireMetadata", "allowInteractiveAuthentication"),
}


def refused_null(method: str, parameters: dict[str, Any]) -> str | None:
    """The first field of *method* that 262 refuses as null in *parameters*, if any."""
    for name in NULL_REFUSED_262.get(method, ()):
        if name in parameters and parameters[name] is None:
            return name
    return None
