"""Interface definitions read from ``dbus-interfaces/*.xml`` and Introspect output.

The XML files are the single source of truth: they are served verbatim (in
sd-bus's layout) and give each method's input signature, which the dispatcher
checks before a handler runs. They are package data (:mod:`machined.data`), so
an installed wheel reads its own copies, an editable install the checkout's.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import cache

from dbus_fast.signature import SignatureTree, SignatureType, get_signature_tree

from machined import personality
from machined.data import interface_text

DOCTYPE = (
    '<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"\n'
    '"https://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">\n'
)

# What sd-bus puts in front of every object's own interfaces.
STANDARD_INTERFACES_XML = """\
 <interface name="org.freedesktop.DBus.Peer">
  <method name="Ping"/>
  <method name="GetMachineId">
   <arg type="s" name="machine_uuid" direction="out"/>
  </method>
 </interface>
 <interface name="org.freedesktop.DBus.Introspectable">
  <method name="Introspect">
   <arg name="xml_data" type="s" direction="out"/>
  </method>
 </interface>
 <interface name="org.freedesktop.DBus.Properties">
  <method name="Get">
   <arg name="interface_name" direction="in" type="s"/>
   <arg name="property_name" direction="in" type="s"/>
   <arg name="value" direction="out" type="v"/>
  </method>
  <method name="GetAll">
   <arg name="interface_name" direction="in" type="s"/>
   <arg name="props" direction="out" type="a{sv}"/>
  </method>
  <method name="Set">
   <arg name="interface_name" direction="in" type="s"/>
   <arg name="property_name" direction="in" type="s"/>
   <arg name="value" direction="in" type="v"/>
  </method>
  <signal name="PropertiesChanged">
   <arg type="s" name="interface_name"/>
   <arg type="a{sv}" name="changed_properties"/>
   <arg type="as" name="invalidated_properties"/>
  </signal>
 </interface>
"""


@dataclass(frozen=True)
class Method:
    name: str
    in_signature: str
    out_signature: str
    privileged: bool = False  # sd-bus lets only root call it
    # The out-signature parsed once, for every reply.
    out_tree: SignatureTree = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_tree", get_signature_tree(self.out_signature))


@dataclass(frozen=True)
class Property:
    name: str
    signature: str
    writable: bool
    # The signature's single complete type, parsed once: values are wrapped without re-parsing.
    type: SignatureType = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", get_signature_tree(self.signature).types[0])


@dataclass(frozen=True)
class Interface:
    """One interface as served: its XML block and its members."""

    name: str
    xml: str
    methods: dict[str, Method] = field(default_factory=dict)
    properties: dict[str, Property] = field(default_factory=dict)
    signals: dict[str, str] = field(default_factory=dict)


def _signature(element: ET.Element, direction: str | None) -> str:
    return "".join(
        arg.get("type", "")
        for arg in element.findall("arg")
        if direction is None or arg.get("direction", "in") == direction
    )


# Interfaces that systemd-machined 262 serves otherwise than 252: ``dbus-interfaces/262/<name>.xml``.
# (The Image interface is the same in both.)
INTERFACES_262 = frozenset({"org.freedesktop.machine1.Manager", "org.freedesktop.machine1.Machine"})


def load_interface(name: str) -> Interface:
    """The interface *name* as the current personality serves it: ``dbus-interfaces/<name>.xml``
    (252), or ``dbus-interfaces/262/<name>.xml`` under 262."""
    return _load_interface(name, personality.current())


@cache
def _load_interface(name: str, version: str) -> Interface:
    folder = "262/" if version == personality.V262 and name in INTERFACES_262 else ""
    text = interface_text(f"{folder}{name}.xml")
    match = re.search(r'^ <interface name="[^"]+">\n.*?^ </interface>\n', text, re.S | re.M)
    if match is None:
        raise ValueError(f"{name}.xml has no interface block")
    element = ET.fromstring(match.group(0))
    methods = {
        m.get("name", ""): Method(
            m.get("name", ""),
            _signature(m, "in"),
            _signature(m, "out"),
            any(
                a.get("name") == "org.freedesktop.systemd1.Privileged" and a.get("value") == "true"
                for a in m.findall("annotation")
            ),
        )
        for m in element.findall("method")
    }
    properties = {
        p.get("name", ""): Property(p.get("name", ""), p.get("type", ""), p.get("access") == "readwrite")
        for p in element.findall("property")
    }
    signals = {s.get("name", ""): _signature(s, None) for s in element.findall("signal")}
    return Interface(name, match.group(0), methods, properties, signals)


def introspect_xml(interfaces: list[Interface], children: list[str]) -> str:
    """Introspect output for an object with *interfaces* and child nodes *children*."""
    parts = [DOCTYPE, "<node>\n", STANDARD_INTERFACES_XML]
    parts.extend(i.xml for i in interfaces)
    parts.extend(f' <node name="{c}"/>\n' for c in children)
    parts.append("</node>\n")
    return "".join(parts)
