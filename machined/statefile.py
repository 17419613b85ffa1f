"""``/run/systemd/machines/<name>`` and ``unit:<unit>`` links: an API read directly
by libsystemd (``ps -o machine``, systemd-cgls, ``systemctl -M``, nss-mymachines).

Written as systemd-machined 252 writes them: same keys in the same order, values
C-escaped, to a temporary file renamed into place (readers watch the directory
with inotify for moved-to and deleted), mode 0644.
"""

from __future__ import annotations

import logging
import os

from machined import personality
from machined.envfile import parse_env_file
from machined.machine import Machine, MachineClass, Timestamp
from machined.naming import hostname_is_valid
from machined.process import ProcessRef

log = logging.getLogger(__name__)

HEADER = "# This is private data. Do not parse.\n"
UNIT_LINK_PREFIX = "unit:"
# Atomic writes go through ".#NAME<random>" in the same directory, as upstream names them.
TEMPORARY_PREFIX = ".#"

_C_ESCAPES = {
    "\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v",
    "\\": "\\\\", '"': '\\"', "'": "\\'",
}  # fmt: skip


def cescape(text: str) -> str:
    """systemd's cescape(): C escapes, other control and non-ASCII bytes as ``\\xNN``."""
    out = []
    for byte in text.encode("utf-8", "surrogateescape"):
        ch = chr(byte)
        if ch in _C_ESCAPES:
            out.append(_C_ESCAPES[ch])
        elif byte < 0x20 or byte >= 0x7F:
            out.append(f"\\x{byte:02x}")
        else:
            out.append(ch)
    return "".join(out)


def serialize(machine: Machine) -> str:
    """The state file text for *machine*, as the systemd-machined we behave as writes it."""
    if personality.is_262():
        return serialize_262(machine)
    lines = [HEADER, f"NAME={machine.name}\n"]
    # "SCOPE" even for non-scope units: the key name is kept for compatibility.
    if machine.unit:
        lines.append(f"SCOPE={cescape(machine.unit)}\n")
    if machine.scope_job:
        lines.append(f"SCOPE_JOB={machine.scope_job}\n")
    if machine.service:
        lines.append(f"SERVICE={cescape(machine.service)}\n")
    if machine.root_directory:
        lines.append(f"ROOT={cescape(machine.root_directory)}\n")
    if any(machine.id):
        lines.append(f"ID={machine.id.hex()}\n")
    lines += _leader_lines(machine)  # LEADER_PIDFDID= as systemd 258+ writes it; 252's readers ignore it
    if machine.machine_class in (MachineClass.CONTAINER, MachineClass.VM):
        lines.append(f"CLASS={machine.machine_class}\n")
    if machine.timestamp.is_set():
        lines.append(f"REALTIME={machine.timestamp.realtime}\nMONOTONIC={machine.timestamp.monotonic}\n")
    if machine.netif:
        lines.append("NETIF=" + " ".join(str(i) for i in machine.netif) + "\n")
    return "".join(lines)


def _leader_lines(machine: Machine) -> list[str]:
    if not machine.leader:
        return []
    lines = [f"LEADER={machine.leader}\n"]
    pidfd_id = machine.leader_ref.pidfd_id if machine.leader_ref else machine.leader_pidfd_id
    if pidfd_id:
        lines.append(f"LEADER_PIDFDID={pidfd_id}\n")
    return lines


# What makes systemd 262's env_file_fputs_assignment() double-quote a value: whitespace, what a
# shell would interpret, control characters; inside the quotes, `"\`$` get a backslash.
_NEEDS_QUOTES = frozenset(" \t\n\r\"\\`$*?['()<>|&;!")
_NEEDS_ESCAPE = frozenset('"\\`$')


def quote_262(value: str) -> str:
    if not any(c in _NEEDS_QUOTES or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return value
    return '"' + "".join("\\" + c if c in _NEEDS_ESCAPE else c for c in value) + '"'


def serialize_262(machine: Machine) -> str:
    """The state file text for *machine* as systemd-machined 262 writes it: the registering
    user, supervisor, vsock and SSH keys added, values quoted as a shell would need them."""
    lines = [HEADER, f"NAME={quote_262(machine.name)}\n", f"UID={machine.uid}\n"]
    for key, value in (("SCOPE", machine.unit), ("SCOPE_JOB", machine.scope_job), ("SERVICE", machine.service),
                       ("ROOT", machine.root_directory)):  # fmt: skip
        if value:
            lines.append(f"{key}={quote_262(value)}\n")
    if any(machine.id):
        lines.append(f"ID={machine.id.hex()}\n")
    lines += _leader_lines(machine)
    supervisor = machine.supervisor_ref
    if supervisor is not None and supervisor.pid > 0:
        lines.append(f"SUPERVISOR={supervisor.pid}\n")
        if supervisor.pidfd_id:
            lines.append(f"SUPERVISOR_PIDFDID={supervisor.pidfd_id}\n")
    if machine.machine_class in (MachineClass.CONTAINER, MachineClass.VM):
        lines.append(f"CLASS={machine.machine_class}\n")
    if machine.timestamp.is_set():
        lines.append(f"REALTIME={machine.timestamp.realtime}\nMONOTONIC={machine.timestamp.monotonic}\n")
    if machine.netif:
        lines.append("NETIF=" + quote_262("".join(f" {i}" for i in machine.netif)) + "\n")
    if machine.vsock_cid:
        lines.append(f"VSOCK_CID={machine.vsock_cid}\n")
    for key, value in (("SSH_ADDRESS", machine.ssh_address), ("SSH_PRIVATE_KEY_PATH", machine.ssh_private_key_path),
                       ("CONTROL_ADDRESS", machine.control_address)):  # fmt: skip
        if value:
            lines.append(f"{key}={quote_262(value)}\n")
    return "".join(lines)


def _int(value: str | None, default: int = 0) -> int:
    try:
        return int(value) if value else default
    except ValueError:
        return default


def _parse_plain(text: str) -> dict[str, str] | None:
    """What :func:`parse_env_file` reads from *text* when nothing in it is quoted or escaped
    (as we write state files, unless a value needs C escapes), without its character-by-character
    scan; None when *text* needs that scan."""
    if "\\" in text or "'" in text or '"' in text or "\r" in text:
        return None
    env: dict[str, str] = {}
    for line in text.split("\n"):
        line = line.lstrip(" \t")
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key = key.strip()
        if key and not key[0].isdigit() and key.replace("_", "a").isalnum():  # letters, digits, "_"
            env[key] = value.strip(" \t")
    return env


def parse(name: str, text: str) -> Machine:
    """A not-started machine from state file *text*; unknown keys are ignored.

    Raises ValueError for a file that cannot describe a machine (truncated or
    corrupt: no valid leader).
    """
    env = _parse_plain(text)
    if env is None:
        env = parse_env_file(text)
    if _int(env.get("LEADER")) <= 1:
        raise ValueError("no valid LEADER=")
    machine = Machine(name=name)
    machine.unit = env.get("SCOPE", "")
    machine.scope_job = env.get("SCOPE_JOB", "")
    machine.service = env.get("SERVICE", "")
    machine.root_directory = env.get("ROOT", "")
    try:
        raw = bytes.fromhex(env.get("ID", ""))
        machine.id = raw if len(raw) == 16 else b""
    except ValueError:
        machine.id = b""
    machine.leader = _int(env.get("LEADER"))
    machine.leader_pidfd_id = _int(env.get("LEADER_PIDFDID"))
    try:
        machine.machine_class = MachineClass(env.get("CLASS", ""))
    except ValueError:
        machine.machine_class = MachineClass.UNKNOWN
    machine.timestamp = Timestamp(_int(env.get("REALTIME")), _int(env.get("MONOTONIC")))
    netif = []
    for word in env.get("NETIF", "").split():
        index = _int(word, -1)
        if index > 0:
            netif.append(index)
    machine.netif = netif
    # Written by 262 (and by us as 262); 252 never writes them.
    machine.uid = _int(env.get("UID"))
    supervisor = _int(env.get("SUPERVISOR"))
    if supervisor > 0:
        machine.supervisor_ref = ProcessRef(supervisor, pidfd_id=_int(env.get("SUPERVISOR_PIDFDID")))
    machine.vsock_cid = _int(env.get("VSOCK_CID"))  # (none written: 0, as 262 reads it back)
    machine.ssh_address = env.get("SSH_ADDRESS", "")
    machine.ssh_private_key_path = env.get("SSH_PRIVATE_KEY_PATH", "")
    machine.control_address = env.get("CONTROL_ADDRESS", "")
    machine.subgroup = env.get("SUBGROUP", "")
    return machine


class StateDir:
    """The directory of state files, with atomic writes."""

    def __init__(self, path: str) -> None:
        self.path = path
        # Files as load_all() read them: a save with the very same text leaves the file alone
        # (restarts would rewrite every file unchanged otherwise).
        self._as_read: dict[str, str] = {}

    def ensure(self) -> None:
        os.makedirs(self.path, mode=0o755, exist_ok=True)

    def file_of(self, name: str) -> str:
        return os.path.join(self.path, name)

    def save(self, machine: Machine) -> None:
        """Write *machine*'s state file atomically and make sure its ``unit:`` link exists."""
        text = serialize(machine)
        if self._as_read.pop(machine.name, None) != text:
            self._write(machine.name, text)
        if machine.unit and not machine.subgroup:  # (262: a unit holding more than the machine has no link)
            try:
                os.symlink(machine.name, self.file_of(UNIT_LINK_PREFIX + machine.unit))
            except FileExistsError:
                pass  # an existing link is left alone, as upstream does

    def _write(self, name: str, text: str) -> None:
        self.ensure()
        fd, tmp = self._create_temporary(name)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                os.fchmod(f.fileno(), 0o644)
            os.rename(tmp, self.file_of(name))
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def _create_temporary(self, name: str) -> tuple[int, str]:
        """A new file ``.#NAME<16 random hex digits>`` beside the state files, as upstream names
        its temporaries (mode 0600 until written)."""
        while True:
            path = self.file_of(f"{TEMPORARY_PREFIX}{name}{os.urandom(8).hex()}")
            try:
                return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600), path
            except FileExistsError:
                continue

    def _remove_temporary(self, name: str) -> None:
        path = self.file_of(name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:  # a directory, or not ours to remove
            log.warning("Cannot remove stale temporary file %s: %s", path, e)
        else:
            log.info("Removed stale temporary file %s.", path)

    def remove(self, machine: Machine) -> None:
        self._as_read.pop(machine.name, None)
        paths = [self.file_of(machine.name)]
        if machine.unit and not machine.subgroup:
            paths.append(self.file_of(UNIT_LINK_PREFIX + machine.unit))
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def load_all(self) -> list[Machine]:
        """Every machine with a readable state file; a corrupt file is skipped with a warning.

        Called at start, before anything is saved: temporaries left by a writer that was
        killed mid-write are removed (upstream leaves them behind for good).
        """
        try:
            with os.scandir(self.path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            return []
        for entry in entries:
            if entry.name.startswith(TEMPORARY_PREFIX):
                self._remove_temporary(entry.name)
        machines = []
        self._as_read.clear()
        for entry in entries:
            name = entry.name
            if name.startswith(UNIT_LINK_PREFIX) or not hostname_is_valid(name):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):  # regular files only, no symlinks
                    continue
                with open(entry.path, encoding="utf-8", errors="surrogateescape") as f:
                    text = f.read()
                machines.append(parse(name, text))
            except (OSError, ValueError) as e:
                log.warning("Skipping state file %s: %s", entry.path, e)
                continue
            self._as_read[name] = text
        return machines
