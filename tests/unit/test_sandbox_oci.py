"""The sandbox's options for the OCI tests: machined's extra arguments and the runtimes' files."""

from __future__ import annotations

import json
import sys

import pytest

from machined.sandbox import oci
from machined.sandbox.core import Sandbox, SandboxError, our_unit_text


def test_machined_args_go_onto_execstart() -> None:
    text = our_unit_text(sys.executable, ["--register-oci", "--metrics-interval", "0.1"])
    lines = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    assert lines == [f"ExecStart={sys.executable} -m machined --register-oci --metrics-interval 0.1"]
    assert [line for line in our_unit_text(sys.executable).splitlines() if line.startswith("ExecStart=")] == [
        f"ExecStart={sys.executable} -m machined"
    ]


@pytest.mark.parametrize("arg", ["two words", "$HOME", "%h", "a;b", "", "new\nline"])
def test_machined_args_that_a_unit_would_reinterpret_are_refused(arg: str) -> None:
    with pytest.raises(SandboxError):
        our_unit_text(sys.executable, [arg])


def test_machined_args_are_for_ours_only() -> None:
    with pytest.raises(SandboxError, match="impl='ours'"):
        Sandbox("real", machined_args=["--register-oci"])
    assert Sandbox("ours", oci=True).oci and not Sandbox("ours").oci


def test_runtime_configuration() -> None:
    files = {f["path"]: f["content"] for f in oci.config_files()}
    assert set(files) == {"/etc/containers/storage.conf", "/etc/containers/containers.conf", "/etc/docker/daemon.json"}
    daemon = json.loads(files["/etc/docker/daemon.json"])
    assert daemon["exec-opts"] == ["native.cgroupdriver=systemd"]
    assert daemon["data-root"] == "/var/lib/docker" and daemon["iptables"] is False and daemon["bridge"] == "none"
    assert daemon["storage-driver"] == ("overlay2" if oci.overlay_supported() else "vfs")
    assert 'cgroup_manager = "systemd"' in files["/etc/containers/containers.conf"]
    assert 'runtime = "runc"' in files["/etc/containers/containers.conf"]
    assert 'graphroot = "/var/lib/containers/storage"' in files["/etc/containers/storage.conf"]
    assert [t["path"] for t in oci.storage_tmpfs()] == list(oci.STORAGE_DIRS)
