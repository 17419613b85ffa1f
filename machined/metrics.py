"""Metrics for Prometheus, with the official client: every host exports, Prometheus collects.

Off by default; imported only when ``--metrics-listen`` or ``--metrics-textfile`` asks
for it, so that a daemon without metrics never loads ``prometheus_client``.

Everything lives in a private :class:`CollectorRegistry` owned by :class:`Metrics`:

* Per machine, read when scraped (never on a timer on the event loop), by
  :class:`MachineCollector` from the machine's cgroup (:mod:`machined.cgroupstats`):
  ``machined_machine_info`` and CPU, memory (current, peak), tasks and IO bytes.
* The daemon's own counters that the core keeps as plain integers, read when scraped
  by :class:`DaemonCollector`: children and operations running, GC passes.
* Events pushed by thin hooks: method calls (the dispatcher reports interface,
  member, result and latency), registrations and removals (the manager's announcements).
* The process (RSS, CPU, descriptors) and Python runtime, from ``prometheus_client``'s
  own collectors.

Collection runs outside the event loop: in the HTTP server's thread
(:func:`prometheus_client.start_http_server`) or in the textfile writer's thread,
which rewrites the file atomically (:func:`prometheus_client.write_to_textfile`)
every *interval* seconds for node_exporter's textfile collector. It only reads the
manager's state (plain attribute reads; the registry hands out a copied list).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
    write_to_textfile,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from machined import cgroup
from machined.cgroupstats import CgroupReader, fallback_paths, read_proc_cgroup, unit_paths
from machined.limits import FairLimiter
from machined.machine import Machine, MachineClass
from machined.manager import MachineManager

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 15.0
OTHER = "other"  # interface and method label of calls to members that do not exist
OK = "ok"  # result label of calls answered without an error
# Lookups take tens of microseconds, calls that wait for systemd or a child milliseconds to seconds.
CALL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 25.0)  # fmt: skip
MACHINE_LABELS = ["name", "class", "service"]


class MachineCollector(Collector):
    """Per-machine samples, read from cgroupfs when scraped.

    The ``.host`` pseudo-machine appears in ``machined_machine_info`` only: its "cgroup"
    is the whole system, which node_exporter reports already.
    """

    def __init__(self, manager: MachineManager, reader: CgroupReader) -> None:
        self.manager = manager
        self.reader = reader
        self._lock = threading.Lock()
        # (name, unit, leader) → the unit's path in each hierarchy, found from its leader once.
        self._paths: dict[tuple[str, str, int], dict[str, str]] = {}

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration; samples vary with the machines

    def collect(self) -> Iterator[Metric]:
        with self._lock:  # one collection at a time (HTTP threads, textfile writer)
            yield from self._collect()

    def _collect(self) -> list[Metric]:
        started = time.perf_counter()
        info = GaugeMetricFamily(
            "machined_machine_info",
            "Registered machines (value 1), with their state and unit.",
            labels=[*MACHINE_LABELS, "state", "unit"],
        )
        cpu = CounterMetricFamily(
            "machined_machine_cpu_seconds", "CPU time used by the machine's cgroup.", labels=MACHINE_LABELS
        )
        memory = GaugeMetricFamily(
            "machined_machine_memory_bytes", "Memory charged to the machine's cgroup.", labels=MACHINE_LABELS
        )
        peak = GaugeMetricFamily(
            "machined_machine_memory_peak_bytes",
            "Highest memory use of the machine's cgroup (cgroup v1, or v2 on kernel 5.19 and later).",
            labels=MACHINE_LABELS,
        )
        tasks = GaugeMetricFamily(
            "machined_machine_tasks", "Tasks (threads) in the machine's cgroup.", labels=MACHINE_LABELS
        )
        io_read = CounterMetricFamily(
            "machined_machine_io_read_bytes", "Bytes read from block devices by the machine's cgroup.",
            labels=MACHINE_LABELS,
        )  # fmt: skip
        io_write = CounterMetricFamily(
            "machined_machine_io_write_bytes", "Bytes written to block devices by the machine's cgroup.",
            labels=MACHINE_LABELS,
        )  # fmt: skip
        seen: set[tuple[str, str, int]] = set()
        for machine in self.manager.machines():
            name, unit, leader = machine.name, machine.unit, machine.leader
            labels = [name, str(machine.machine_class), machine.service]
            info.add_metric([*labels, str(machine.state), unit], 1)
            if machine.machine_class is MachineClass.HOST or not unit:
                continue
            key = (name, unit, leader)
            seen.add(key)
            stats = self.reader.read(self._unit_paths(key))
            if stats.cpu_seconds is not None:
                cpu.add_metric(labels, stats.cpu_seconds)
            if stats.memory_bytes is not None:
                memory.add_metric(labels, stats.memory_bytes)
            if stats.memory_peak_bytes is not None:
                peak.add_metric(labels, stats.memory_peak_bytes)
            if stats.tasks is not None:
                tasks.add_metric(labels, stats.tasks)
            if stats.io_read_bytes is not None:
                io_read.add_metric(labels, stats.io_read_bytes)
            if stats.io_write_bytes is not None:
                io_write.add_metric(labels, stats.io_write_bytes)
        for gone in self._paths.keys() - seen:
            del self._paths[gone]
        took = GaugeMetricFamily(
            "machined_machine_collect_seconds",
            "How long reading the machines' cgroups took for this scrape.",
            value=time.perf_counter() - started,
        )
        return [info, cpu, memory, peak, tasks, io_read, io_write, took]

    def _unit_paths(self, key: tuple[str, str, int]) -> dict[str, str]:
        paths = self._paths.get(key)
        if paths is not None:
            return paths
        _, unit, leader = key
        text = read_proc_cgroup(leader)
        paths = unit_paths(text, unit) if text is not None else {}
        if not paths:
            return fallback_paths(unit)  # leader gone (or not in its unit): ask again next time
        self._paths[key] = paths
        return paths


class DaemonCollector(Collector):
    """The daemon's own state, read from the counters the core keeps, when scraped."""

    def __init__(self, manager: MachineManager, children: FairLimiter) -> None:
        self.manager = manager
        self.children = children

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "machined_children_running", "Worker child processes running.", value=self.children.running
        )
        yield GaugeMetricFamily(
            "machined_children_waiting", "Requests waiting for a worker child slot.", value=self._waiting()
        )
        yield GaugeMetricFamily(
            "machined_operations_running",
            "Long-running operations (copies, image removal and cloning) in flight.",
            value=self.manager.operations.running,
        )
        yield CounterMetricFamily(
            "machined_gc_passes", "Garbage collection passes over the machines.", value=self.manager.gc_passes
        )
        yield GaugeMetricFamily(
            "machined_machines", "Registered machines, .host included.", value=len(self.manager.registry)
        )
        if self.manager.external is not None:  # --register-oci
            counts = {"podman": 0, "docker": 0}
            for machine in self.manager.machines():
                if machine.runtime in counts:
                    counts[machine.runtime] += 1
            oci = GaugeMetricFamily("machined_oci_machines", "Machines of podman's and docker's containers.",
                                    labels=["runtime"])  # fmt: skip
            for runtime, count in counts.items():
                oci.add_metric([runtime], count)
            yield oci

    def _waiting(self) -> int:
        for _ in range(3):
            try:
                return self.children.waiting()
            except RuntimeError:  # the event loop changed the queues while we counted
                continue
        return 0


class Metrics:
    """The daemon's registry of metrics, its hooks, and the ways out (HTTP, textfile)."""

    def __init__(
        self,
        manager: MachineManager,
        children: FairLimiter,
        known_methods: Iterable[tuple[str, str]] = (),
        reader: CgroupReader | None = None,
    ) -> None:
        """*known_methods*: the (interface, method) pairs calls may be labelled with;
        *reader*: where machines' cgroups are read (default: this system's layout)."""
        # no *_created series: half the samples, no use here (prometheus_client leaves the function unannotated)
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=False)
        self._known = frozenset(known_methods)
        self._known_members = frozenset(member for _, member in self._known)
        self.calls = Counter(
            "machined_calls", "Method calls answered, by interface, method and result (ok or the error name).",
            ["interface", "method", "result"], registry=self.registry,
        )  # fmt: skip
        self.call_duration = Histogram(
            "machined_call_duration_seconds", "Time from a method call's arrival to its reply.",
            ["interface", "method"], buckets=CALL_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.registrations = Counter(
            "machined_registrations", "Machines registered (CreateMachine, RegisterMachine and their variants).",
            ["class"], registry=self.registry,
        )  # fmt: skip
        self.removals = Counter(
            "machined_removals", "Machines removed (terminated, unregistered, gone).", ["class"], registry=self.registry
        )
        for cls in (MachineClass.CONTAINER, MachineClass.VM):
            self.registrations.labels(str(cls))
            self.removals.labels(str(cls))
        self.registry.register(DaemonCollector(manager, children))
        self.machine_collector = MachineCollector(manager, reader or CgroupReader(cgroup.cgroup_layout()))
        self.registry.register(self.machine_collector)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._server: Any = None
        self._server_thread: threading.Thread | None = None
        self._textfile_thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ----- hooks (called on the event loop) ----------------------------------------------

    def observe_call(self, interface: str | None, member: str | None, result: str | None, seconds: float) -> None:
        """One method call answered: *result* is the error name, None for a method return."""
        key = (interface or "", member or "", result or OK)
        children = self._children.get(key)
        if children is None:
            children = self._children_for(*key)
        children[0].inc()
        children[1].observe(seconds)

    def _children_for(self, interface: str, member: str, result: str) -> tuple[Any, Any]:
        # Only members that exist become labels: anybody can send any name, and each new
        # label set is a series kept for good.
        known = (interface, member) in self._known if interface else member in self._known_members
        if not known:
            interface = member = OTHER
        children = (self.calls.labels(interface, member, result), self.call_duration.labels(interface, member))
        if known:
            self._children[(interface, member, result)] = children
        return children

    def announced(self, signal_name: str, machine: Machine) -> None:
        """The manager's MachineNew / MachineRemoved."""
        if signal_name == "MachineNew":
            self.registrations.labels(str(machine.machine_class)).inc()
        elif signal_name == "MachineRemoved":
            self.removals.labels(str(machine.machine_class)).inc()

    # ----- ways out ----------------------------------------------------------------------

    def serve(self, host: str, port: int) -> None:
        """Answer scrapes over HTTP on *host*:*port*, in threads of the client library."""
        self._server, self._server_thread = start_http_server(port, host, registry=self.registry)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server is not None else 0

    def start_textfile(self, path: str, interval: float = DEFAULT_INTERVAL) -> None:
        """Write *path* now and every *interval* seconds (atomically: temporary file, rename)."""
        self.write_textfile(path)  # the first write fails loudly (bad directory…)
        self._textfile_thread = threading.Thread(
            target=self._textfile_loop, args=(path, interval), name="metrics-textfile", daemon=True
        )
        self._textfile_thread.start()

    def write_textfile(self, path: str) -> None:
        write_to_textfile(path, self.registry)

    def _textfile_loop(self, path: str, interval: float) -> None:
        failing = False
        while not self._stop.wait(interval):
            try:
                self.write_textfile(path)
            except Exception as e:  # the writer never dies: the next interval tries again
                if not failing:
                    log.warning("Failed to write metrics to %s: %s", path, e, exc_info=not isinstance(e, OSError))
                failing = True
            else:
                if failing:
                    log.info("Writing metrics to %s again.", path)
                failing = False

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for thread in (self._server_thread, self._textfile_thread):
            if thread is not None:
                thread.join(timeout=5)
        self._server_thread = self._textfile_thread = None
