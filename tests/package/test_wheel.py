"""The project as a user installs it: sdist → wheel → fresh virtualenv → running daemon.

Needs no root. A copy of the checkout is built with ``python -m build`` (an sdist,
then the wheel from that sdist); the wheel is installed with its real
dependencies (PyPI, or pip's cache) into a fresh virtualenv that cannot see the
checkout; the venv's ``machined`` console script then runs against a private
dbus-daemon whose system-bus-like policy includes the *installed* bus policy.
Everything lives in one temporary directory under /var/tmp, removed at the end.
About 25 s with pip's cache warm; the first run downloads the dependencies.
"""

from __future__ import annotations

import asyncio
import configparser
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

REPO = Path(__file__).resolve().parents[2]
DEST = "org.freedesktop.machine1"
MANAGER_PATH = "/org/freedesktop/machine1"
MANAGER = "org.freedesktop.machine1.Manager"

# What `machined install` (and the README's manual steps) put on a host, and what the
# daemon reads at run time: all of it must be in the wheel.
REQUIRED_DATA = [
    "units/machined.service",
    "units/machined-user.service",  # the per-user instance (262's systemd-machined --user)
    "units/machined-user.socket",
    "dbus-interfaces/org.freedesktop.machine1.conf",
    "dbus-interfaces/org.freedesktop.machine1.service",
    "dbus-interfaces/org.freedesktop.machine1.policy",
    "dbus-interfaces/org.freedesktop.machine1.Manager.xml",
    "dbus-interfaces/org.freedesktop.machine1.Machine.xml",
    "dbus-interfaces/org.freedesktop.machine1.Image.xml",
    "dbus-interfaces/org.freedesktop.LogControl1.xml",
    "dbus-interfaces/262/org.freedesktop.machine1.Manager.xml",
    "dbus-interfaces/262/org.freedesktop.machine1.Machine.xml",
]
# Where the installed package exposes them (importlib.resources), by checkout folder.
DATA_PACKAGES = {"dbus-interfaces": "machined.data.interfaces", "units": "machined.data.units"}

# Not part of a fresh clone: never copied into the build tree.
IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".run",
    ".pytest_cache", ".hypothesis", ".ci-test.log", "tests", "bench",
)  # fmt: skip

pytestmark = [
    pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="dbus-daemon not installed"),
    pytest.mark.timeout(600),  # a cold pip cache compiles systemd-python
]


def checkout_data_files() -> list[str]:
    """Every data file of the checkout's data folders, as 'folder/name' (not their __init__.py)."""
    return sorted(
        f"{folder}/{p.relative_to(REPO / folder)}"
        for folder in DATA_PACKAGES
        for p in (REPO / folder).rglob("*")
        if p.is_file() and p.name != "__init__.py" and "__pycache__" not in p.parts
    )


@dataclass
class Installed:
    root: Path  # the temporary directory holding everything below
    sdist: Path
    wheel: Path
    venv: Path
    env: dict[str, str]  # for commands run from the venv: no checkout, no notify socket
    timings: dict[str, float]

    def python(self, code: str) -> str:
        r = subprocess.run(
            [str(self.venv / "bin" / "python"), "-c", code],
            cwd=self.root, env=self.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, f"installed python failed:\n{r.stdout}\n{r.stderr}"
        return r.stdout


def run(argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> None:
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(argv)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    try:
        import build  # noqa: F401
    except ImportError:
        pytest.fail("python -m build is missing: install the test extra (pip install -e '.[test]')")
    base = "/var/tmp" if os.path.isdir("/var/tmp") else None
    with tempfile.TemporaryDirectory(prefix="machined-wheel-test-", dir=base) as tmp:
        root = Path(tmp)
        (root / "tmp").mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env.update(TMPDIR=str(root / "tmp"), PIP_DISABLE_PIP_VERSION_CHECK="1")
        timings: dict[str, float] = {}

        t0 = time.monotonic()
        src = root / "src"
        shutil.copytree(REPO, src, ignore=IGNORE, symlinks=True)
        run([sys.executable, "-m", "build", "--outdir", str(root / "dist"), str(src)], env, root, 600)
        timings["build"] = time.monotonic() - t0
        (sdist,) = (root / "dist").glob("machined-*.tar.gz")
        (wheel,) = (root / "dist").glob("machined-*.whl")

        t0 = time.monotonic()
        venv = root / "venv"
        # The base interpreter, not this virtualenv's site-packages (which holds the editable install).
        run([sys.executable, "-m", "venv", str(venv)], env, root, 120)
        run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], env, root, 600)
        timings["venv+install"] = time.monotonic() - t0

        run_env = {k: v for k, v in env.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "INVOCATION_ID")}
        yield Installed(root, sdist, wheel, venv, run_env, timings)
        print(f"wheel test timings: {', '.join(f'{k} {v:.1f}s' for k, v in timings.items())}")


def test_wheel_declares_both_console_scripts(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as whl:
        (name,) = [n for n in whl.namelist() if n.endswith(".dist-info/entry_points.txt")]
        entry_points = configparser.ConfigParser()
        entry_points.read_string(whl.read(name).decode())
    assert dict(entry_points["console_scripts"]) == {
        "machined": "machined.cli:main",
        "machined-sandbox": "machined.sandbox.cli:main",
    }
    for script in ("machined", "machined-sandbox"):
        assert (installed.venv / "bin" / script).is_file()
    r = subprocess.run(
        [str(installed.venv / "bin" / "machined"), "--version"],
        cwd=installed.root, env=installed.env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert (r.returncode, r.stdout.strip()) == (0, "machined 0.1.0"), r.stderr
    r = subprocess.run(
        [str(installed.venv / "bin" / "machined-sandbox"), "--help"],
        cwd=installed.root, env=installed.env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr


def test_sdist_and_wheel_carry_the_data_files(installed: Installed) -> None:
    files = checkout_data_files()
    assert set(REQUIRED_DATA) <= set(files)
    with tarfile.open(installed.sdist) as sdist:
        in_sdist = {m.name.split("/", 1)[1] for m in sdist.getmembers() if m.isfile()}
    assert set(files) <= in_sdist, "the sdist lacks the repository's data folders"
    with zipfile.ZipFile(installed.wheel) as whl:
        names = set(whl.namelist())
    wanted = {f"{DATA_PACKAGES[f.split('/')[0]].replace('.', '/')}/{f.split('/', 1)[1]}" for f in files}
    assert wanted <= names, f"missing from the wheel: {sorted(wanted - names)}"
    # pyproject.toml lists the packages (mapped ones cannot be found): none may be forgotten.
    modules = {str(p.relative_to(REPO)) for p in (REPO / "machined").rglob("*.py")}
    assert modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"


def test_installed_package_has_every_data_file_byte_for_byte(installed: Installed) -> None:
    """Found twice: through the installed distribution's file list, and as the code reads them."""
    probe = f"""
import json, importlib.metadata, importlib.resources, machined
dist = importlib.metadata.distribution("machined")
recorded = {{str(f): str(f.locate()) for f in dist.files}}
packages = {DATA_PACKAGES!r}
resources = {{}}
def walk(folder, entry):
    for child in entry.iterdir():
        if child.is_dir() and child.name != "__pycache__":
            walk(folder + "/" + child.name, child)
        elif child.is_file() and not child.name.startswith("__"):
            with importlib.resources.as_file(child) as path:
                resources[folder + "/" + child.name] = str(path)
for folder, package in packages.items():
    walk(folder, importlib.resources.files(package))
print(json.dumps({{"machined": machined.__file__, "recorded": recorded, "resources": resources}}))
"""
    found = json.loads(installed.python(probe))
    site = str(installed.venv)
    assert found["machined"].startswith(site + "/"), f"the venv imports machined from {found['machined']}"
    files = checkout_data_files()
    assert set(REQUIRED_DATA) <= set(files)
    for rel in files:
        folder, name = rel.split("/", 1)  # (name: 262/... for the files of the 262 personality)
        package_dir = DATA_PACKAGES[folder].replace(".", "/")
        recorded = found["recorded"].get(f"{package_dir}/{name}")
        assert recorded, f"{rel} is not in the installed distribution's RECORD"
        via_resources = found["resources"].get(rel)
        assert via_resources, f"{rel} is not readable through importlib.resources({DATA_PACKAGES[folder]})"
        for installed_path in (recorded, via_resources):
            assert installed_path.startswith(site + "/"), f"{rel} resolves outside the venv: {installed_path}"
            same = Path(installed_path).read_bytes() == (REPO / rel).read_bytes()
            assert same, f"{installed_path} differs from {rel}"
    extra = set(found["resources"]) - set(files)
    assert not extra, f"installed data files that are not in the checkout: {sorted(extra)}"


def bus_config(socket: Path, policy: Path | None) -> str:
    """Like the system bus: nobody may own a name unless a policy says so; the installed
    machine1 policy is included, so it alone lets root own org.freedesktop.machine1."""
    grant = ""
    if os.geteuid() != 0 or policy is None:
        # The installed policy lets only root in (or is missing, which another test reports):
        # let this user stand in, so that the daemon's own behaviour is still tested.
        user = pwd.getpwuid(os.geteuid()).pw_name
        grant = f'<policy user="{user}"><allow own="{DEST}"/><allow send_destination="{DEST}"/></policy>'
    include = f"<include>{policy}</include>" if policy is not None else ""
    return f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
  {include}
  {grant}
</busconfig>
"""


async def bus_call(
    address: str, path: str, iface: str, member: str, dest: str = DEST, sig: str = "", body: list | None = None
) -> Message:
    bus = await MessageBus(bus_address=address).connect()
    try:
        reply = await bus.call(
            Message(destination=dest, path=path, interface=iface, member=member, signature=sig, body=body or [])
        )
        assert reply is not None
        return reply
    finally:
        bus.disconnect()


def name_owner(address: str) -> str | None:
    dbus = "org.freedesktop.DBus"
    reply = asyncio.run(bus_call(address, "/org/freedesktop/DBus", dbus, "GetNameOwner", dbus, "s", [DEST]))
    return reply.body[0] if reply.message_type is MessageType.METHOD_RETURN else None


@dataclass
class PrivateBus:
    address: str
    installed_policy: Path | None  # the installed org.freedesktop.machine1.conf it includes


@pytest.fixture
def private_bus(installed: Installed) -> Iterator[PrivateBus]:
    located = installed.python(
        "import importlib.metadata as m\n"
        "print(*[f.locate() for f in m.distribution('machined').files "
        "if str(f).endswith('/interfaces/org.freedesktop.machine1.conf')])"
    ).split()
    policy = Path(located[0]) if len(located) == 1 else None
    busdir = Path(tempfile.mkdtemp(prefix="bus-", dir=installed.root))
    socket = busdir / "socket"
    (busdir / "bus.conf").write_text(bus_config(socket, policy))
    proc = subprocess.Popen(
        ["dbus-daemon", f"--config-file={busdir / 'bus.conf'}", "--nofork", "--nopidfile"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not socket.exists():
            if proc.poll() is not None:
                pytest.fail(f"dbus-daemon exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
            assert time.monotonic() < deadline, "dbus-daemon did not listen"
            time.sleep(0.02)
        yield PrivateBus(f"unix:path={socket}", policy)
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_installed_daemon_takes_the_name_and_answers(installed: Installed, private_bus: PrivateBus) -> None:
    bus = private_bus.address
    state = installed.root / "machines"
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [str(installed.venv / "bin" / "machined"), "--bus-address", bus, "--state-dir", str(state),
         "--userdb-socket", str(installed.root / "userdb.sock")],
        cwd=installed.root, env=installed.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while name_owner(bus) is None:
            if proc.poll() is not None:
                _, err = proc.communicate()
                pytest.fail(f"the installed machined exited with {proc.returncode}:\n{err}")
            assert time.monotonic() < deadline, "the installed machined did not take org.freedesktop.machine1"
            time.sleep(0.05)
        installed.timings["daemon start"] = time.monotonic() - t0

        for path, iface in ((MANAGER_PATH, MANAGER), ("/org/freedesktop/LogControl1", "org.freedesktop.LogControl1")):
            reply = asyncio.run(bus_call(bus, path, "org.freedesktop.DBus.Introspectable", "Introspect"))
            assert reply.message_type is MessageType.METHOD_RETURN, reply.body
            xml = reply.body[0]
            assert xml.startswith('<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"')
            checkout_xml = (REPO / "dbus-interfaces" / f"{iface}.xml").read_text(encoding="utf-8")
            block = re.search(r'^ <interface name="[^"]+">\n.*?^ </interface>\n', checkout_xml, re.S | re.M)
            assert block is not None
            assert block.group(0) in xml, f"Introspect of {path} does not serve the {iface} interface XML"

        reply = asyncio.run(bus_call(bus, MANAGER_PATH, MANAGER, "ListMachines"))
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body
        assert reply.body == [[(".host", "host", "", "/org/freedesktop/machine1/machine/_2ehost")]]
        assert state.is_dir()
    finally:
        if proc.poll() is None:
            proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    assert private_bus.installed_policy is not None, "the installed package has no bus policy to include"
    assert os.geteuid() != 0 or private_bus.installed_policy.is_relative_to(installed.venv)
