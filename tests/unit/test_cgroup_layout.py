"""Which /proc/PID/cgroup line holds a process's unit: decided by the layout, as systemd does.

The layout comes from the file system types at /sys/fs/cgroup (systemd's
cg_unified_cached()), never from the lines /proc/PID/cgroup happens to list.
"""

import pytest

from machined.cgroup import (
    CGROUP2_SUPER_MAGIC,
    CGROUP_SUPER_MAGIC,
    HYBRID,
    LEGACY,
    SYSFS_MAGIC,
    TMPFS_MAGIC,
    UNIFIED,
    CgroupLayoutError,
    cgroup_layout,
    detect_layout,
    fs_type,
    layout_from_fs_types,
    parse_proc_cgroup,
)

# A hybrid host right after PID 1 moved the process into a new scope: the cgroup2
# line (where systemd tracks units) is current, the name=systemd copy still old.
HYBRID_STALE = (
    "9:name=systemd:/system.slice/caller.scope\n4:memory:/system.slice/caller.scope\n0::/machine.slice/new.scope\n"
)
# A pure cgroup2 system where some container manager mounted a name=systemd hierarchy:
# the kernel lists it, but nothing moves processes in it.
UNIFIED_WITH_NAME_SYSTEMD = "1:name=systemd:/\n0::/machine.slice/machine-a.scope/payload\n"
# Legacy: name=systemd tracks units; the kernel still lists the (unused) cgroup2 root.
LEGACY_TEXT = "5:cpu,cpuacct:/\n1:name=systemd:/system.slice/a.service\n0::/\n"


def test_hybrid_reads_the_cgroup2_line_not_a_stale_name_systemd_line() -> None:
    assert parse_proc_cgroup(HYBRID_STALE, HYBRID) == "/machine.slice/new.scope"


def test_unified_ignores_a_name_systemd_line() -> None:
    assert parse_proc_cgroup(UNIFIED_WITH_NAME_SYSTEMD, UNIFIED) == "/machine.slice/machine-a.scope/payload"


def test_legacy_reads_name_systemd() -> None:
    assert parse_proc_cgroup(LEGACY_TEXT, LEGACY) == "/system.slice/a.service"
    # name=systemd may share a line with other controllers' names
    assert parse_proc_cgroup("3:cpu,name=systemd:/x.service\n0::/\n", LEGACY) == "/x.service"
    assert parse_proc_cgroup("3:name=systemdfoo:/x.service\n", LEGACY) is None


def test_missing_lines_and_zombie_suffix() -> None:
    assert parse_proc_cgroup("", UNIFIED) is None
    assert parse_proc_cgroup("1:name=systemd:/a.service\n", HYBRID) is None
    assert parse_proc_cgroup("0::/\n", LEGACY) is None
    assert parse_proc_cgroup("0::/system.slice/a.service (deleted)\n", UNIFIED) == "/system.slice/a.service"


@pytest.mark.parametrize(
    ("root", "unified", "systemd", "layout"),
    [
        (CGROUP2_SUPER_MAGIC, None, None, UNIFIED),
        # cgroup2 at /sys/fs/cgroup wins whatever else exists below it
        (CGROUP2_SUPER_MAGIC, CGROUP2_SUPER_MAGIC, CGROUP_SUPER_MAGIC, UNIFIED),
        (TMPFS_MAGIC, CGROUP2_SUPER_MAGIC, CGROUP_SUPER_MAGIC, HYBRID),
        (TMPFS_MAGIC, None, CGROUP2_SUPER_MAGIC, HYBRID),  # systemd 232's hybrid variant
        (TMPFS_MAGIC, None, CGROUP_SUPER_MAGIC, LEGACY),
        (TMPFS_MAGIC, TMPFS_MAGIC, CGROUP_SUPER_MAGIC, LEGACY),
    ],
)
def test_layout_from_file_system_types(root: int, unified: int | None, systemd: int | None, layout: str) -> None:
    assert layout_from_fs_types(root, unified, systemd) == layout


@pytest.mark.parametrize(
    ("root", "systemd"), [(SYSFS_MAGIC, None), (None, None), (TMPFS_MAGIC, None), (0x9123683E, None)]
)
def test_unrecognised_layouts_are_errors(root: int | None, systemd: int | None) -> None:
    with pytest.raises(CgroupLayoutError):
        layout_from_fs_types(root, None, systemd)


def test_detection_on_this_machine_matches_its_mounts() -> None:
    """statfs through ctypes agrees with the types /proc/self/mountinfo names."""
    types = {}
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            types[fields[4]] = fields[fields.index("-") + 1]  # the last mount on a point is on top
    root = types.get("/sys/fs/cgroup")
    if root is None:
        pytest.skip("nothing mounted at /sys/fs/cgroup")
    expected = {"cgroup2": UNIFIED}.get(root)
    if root == "tmpfs":
        if types.get("/sys/fs/cgroup/unified") == "cgroup2" or types.get("/sys/fs/cgroup/systemd") == "cgroup2":
            expected = HYBRID
        else:
            expected = LEGACY
    assert fs_type("/sys/fs/cgroup") == (CGROUP2_SUPER_MAGIC if root == "cgroup2" else TMPFS_MAGIC)
    assert fs_type("/sys/fs/cgroup/does-not-exist") is None
    assert detect_layout() == expected
    assert cgroup_layout() == expected


def test_detection_of_a_directory_that_is_no_cgroup_mount(tmp_path) -> None:
    with pytest.raises(CgroupLayoutError):
        detect_layout(str(tmp_path))  # whatever tmp_path is on, it is not tmpfs-with-cgroups
