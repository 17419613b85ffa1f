"""The varlink interfaces machined serves, as systemd 262 declares them (names, types, order).

Field and symbol comments are left out: descriptions are the same interfaces without
upstream's prose. Register also takes the fields newer clients send (``supervisor``,
``supervisorProcessId``, ``controlAddress``): 262's nspawn and vmspawn register only over
varlink, and a field we did not declare would fail their registration with InvalidParameter.
"""

from __future__ import annotations

from machined.varlink.idl import (
    Enum,
    Error,
    Field,
    Interface,
    Method,
    Struct,
    TypeDef,
    opt,
    req,
)

ORG_VARLINK_SERVICE = Interface(
    "org.varlink.service",
    [
        Method(
            "GetInfo",
            (),
            (
                req("vendor", "string"),
                req("product", "string"),
                req("version", "string"),
                req("url", "string"),
                req("interfaces", "string", array=True),
            ),
        ),  # fmt: skip
        Method(
            "GetInterfaceDescription",
            (req("interface", "string"),),
            (req("description", "string"),),
        ),
        Error("InterfaceNotFound", (req("interface", "string"),)),
        Error("MethodNotFound", (req("method", "string"),)),
        Error("MethodNotImplemented", (req("method", "string"),)),
        Error("InvalidParameter", (req("parameter", "string"),)),
        Error("PermissionDenied"),
        Error("ExpectedMore"),
    ],
)

IO_SYSTEMD_SERVICE = Interface(
    "io.systemd.service",
    [
        Method("Ping"),
        Method("Reload"),
        Method("SetLogLevel", (opt("level", "int"),)),
        Method("GetEnvironment", (), (req("environment", "string", array=True),)),
    ],
)

_POLKIT = opt("allowInteractiveAuthentication", "bool")
_LOOKUP = (opt("name", "string"), opt("pid", "ProcessId"), _POLKIT)

IO_SYSTEMD_MACHINE = Interface(
    "io.systemd.Machine",
    [
        TypeDef(
            "ProcessId",
            Struct((req("pid", "int"), opt("pidfdId", "int"), opt("bootId", "int"))),
        ),
        TypeDef("Timestamp", Struct((opt("realtime", "int"), opt("monotonic", "int")))),
        TypeDef("AcquireMetadata", Enum(("no", "yes", "graceful"))),
        TypeDef(
            "Address",
            Struct(
                (
                    opt("ifindex", "int"),
                    req("family", "int"),
                    Field("address", "int", array=True),
                )
            ),
        ),
        Method(
            "Register",
            (
                req("name", "string"),
                opt("id", "string"),
                opt("service", "string"),
                req("class", "string"),
                opt("leader", "int"),
                opt("leaderProcessId", "ProcessId"),
                opt("supervisor", "int"),
                opt("supervisorProcessId", "ProcessId"),
                opt("rootDirectory", "string"),
                opt("ifIndices", "int", array=True),
                opt("vSockCid", "int"),
                opt("sshAddress", "string"),
                opt("sshPrivateKeyPath", "string"),
                opt("controlAddress", "string"),
                opt("allocateUnit", "bool"),
                _POLKIT,
            ),
        ),  # fmt: skip
        Method("Unregister", _LOOKUP),
        Method("Terminate", _LOOKUP),
        Method("Kill", (*_LOOKUP, opt("whom", "string"), req("signal", "int"))),
        Method(
            "List",
            (*_LOOKUP, opt("acquireMetadata", "AcquireMetadata")),
            (
                req("name", "string"),
                opt("id", "string"),
                opt("service", "string"),
                req("class", "string"),
                opt("leader", "ProcessId"),
                opt("supervisor", "ProcessId"),
                opt("rootDirectory", "string"),
                opt("unit", "string"),
                opt("subgroup", "string"),
                opt("timestamp", "Timestamp"),
                opt("vSockCid", "int"),
                opt("sshAddress", "string"),
                opt("sshPrivateKeyPath", "string"),
                opt("controlAddress", "string"),
                opt("addresses", "Address", array=True),
                opt("OSRelease", "string", array=True),
                opt("UIDShift", "int"),
                opt("UID", "int"),
            ),
            more="supports",
        ),  # fmt: skip
        TypeDef("MachineOpenMode", Enum(("tty", "login", "shell"))),
        Method(
            "Open",
            (
                *_LOOKUP,
                req("mode", "MachineOpenMode"),
                opt("user", "string"),
                opt("path", "string"),
                opt("args", "string", array=True),
                opt("environment", "string", array=True),
            ),
            (req("ptyFileDescriptor", "int"), req("ptyPath", "string")),
        ),  # fmt: skip
        Method(
            "MapFrom",
            (*_LOOKUP, opt("uid", "int"), opt("gid", "int")),
            (opt("uid", "int"), opt("gid", "int")),
        ),
        Method(
            "MapTo",
            (opt("uid", "int"), opt("gid", "int")),
            (opt("uid", "int"), opt("gid", "int"), opt("machineName", "string")),
        ),  # fmt: skip
        Method(
            "BindMount",
            (
                *_LOOKUP,
                req("source", "string"),
                opt("destination", "string"),
                opt("readOnly", "bool"),
                opt("mkdir", "bool"),
            ),
        ),  # fmt: skip
        Method(
            "CopyFrom",
            (
                *_LOOKUP,
                req("source", "string"),
                opt("destination", "string"),
                opt("replace", "bool"),
            ),
        ),
        Method(
            "CopyTo",
            (
                *_LOOKUP,
                req("source", "string"),
                opt("destination", "string"),
                opt("replace", "bool"),
            ),
        ),
        Method("OpenRootDirectory", _LOOKUP, (req("fileDescriptor", "int"),)),
        *(
            Error(name)
            for name in (
                "NoSuchMachine",
                "MachineExists",
                "NoPrivateNetworking",
                "NoOSReleaseInformation",
                "NoUIDShift",
                "NotAvailable",
                "NotSupported",
                "NoIPC",
                "NoSuchUser",
                "NoSuchGroup",
                "UserInHostRange",
                "GroupInHostRange",
            )
        ),  # fmt: skip
    ],
)

_IMAGE_LOOKUP = (req("name", "string"), _POLKIT)

IO_SYSTEMD_MACHINE_IMAGE = Interface(
    "io.systemd.MachineImage",
    [
        TypeDef("AcquireMetadata", Enum(("no", "yes", "graceful"))),
        Method(
            "List",
            (opt("name", "string"), opt("acquireMetadata", "AcquireMetadata"), _POLKIT),
            (
                req("name", "string"),
                opt("path", "string"),
                req("type", "string"),
                req("class", "string"),
                req("readOnly", "bool"),
                opt("creationTimestamp", "int"),
                opt("modificationTimestamp", "int"),
                opt("usage", "int"),
                opt("usageExclusive", "int"),
                opt("limit", "int"),
                opt("limitExclusive", "int"),
                opt("hostname", "string"),
                opt("machineId", "string"),
                opt("machineInfo", "string", array=True),
                opt("OSRelease", "string", array=True),
            ),
            more="supports",
        ),
        Method(
            "Update",
            (req("name", "string"), opt("newName", "string"), opt("readOnly", "bool"), opt("limit", "int"), _POLKIT),
        ),
        Method("Clone", (*_IMAGE_LOOKUP, req("newName", "string"), opt("readOnly", "bool"))),
        Method("Remove", _IMAGE_LOOKUP),
        Method("SetPoolLimit", (req("limit", "int"), _POLKIT)),
        Method(
            "CleanPool",
            (req("mode", "string"), _POLKIT),
            (req("name", "string"), opt("usageExclusive", "int")),
            more="requires",
        ),
        Error("NoSuchImage"),
        Error("TooManyOperations"),
        Error("NotSupported"),
    ],
)
