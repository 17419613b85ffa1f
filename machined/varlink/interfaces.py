"""The varlink interfaces machined serves, as systemd-machined 262 describes them: the same
symbols, fields, types and order as its ``org.varlink.service.GetInterfaceDescription``
(checked against a live 262 in tests/integration262). GetInterfaceDescription answers
262's own text, comments included (:func:`machined.varlink.idl.stored_description`).

Register takes the fields newer clients send (``supervisor``, ``supervisorProcessId``,
``controlAddress``): 262's nspawn and vmspawn register only over varlink, and a field we did
not declare would fail their registration with InvalidParameter.
"""

from __future__ import annotations

from machined.varlink.idl import Enum, Error, Field, Interface, Method, Struct, TypeDef, opt, req

# What org.varlink.service.GetInfo says about the daemon on each of its sockets (262's names
# systemd; these are ours, see README "What machined says about itself").
VENDOR = "machined"
PRODUCT = "machined"
URL = "https://pypi.org/project/machined/"

# io.systemd.UserDatabase as 262 declares it (/run/systemd/userdb/io.systemd.Machine; 252
# serves no declaration there, and the lookups check their parameters themselves).
_RECORD = (req("record", "object"), opt("incomplete", "bool"))
IO_SYSTEMD_USER_DATABASE = Interface(
    "io.systemd.UserDatabase",
    [
        Method("GetUserRecord", (
            opt("uid", "int"), opt("userName", "string"), opt("fuzzyNames", "string", array=True),
            opt("dispositionMask", "string", array=True), opt("uidMin", "int"), opt("uidMax", "int"),
            opt("uuid", "string"), req("service", "string"),
        ), _RECORD, more="supports"),
        Method("GetGroupRecord", (
            opt("gid", "int"), opt("groupName", "string"), opt("fuzzyNames", "string", array=True),
            opt("dispositionMask", "string", array=True), opt("gidMin", "int"), opt("gidMax", "int"),
            opt("uuid", "string"), req("service", "string"),
        ), _RECORD, more="supports"),
        Method("GetMemberships", (opt("userName", "string"), opt("groupName", "string"), req("service", "string")),
               (req("userName", "string"), req("groupName", "string")), more="supports"),
        *(Error(name) for name in (
            "NoRecordFound", "BadService", "ServiceNotAvailable", "ConflictingRecordFound", "NonMatchingRecordFound",
            "EnumerationNotSupported",
        )),
    ],
)  # fmt: skip

ORG_VARLINK_SERVICE = Interface(
    "org.varlink.service",
    [
        Method("GetInfo", (), (
            req("vendor", "string"), req("product", "string"), req("version", "string"), req("url", "string"),
            req("interfaces", "string", array=True),
        )),
        Method("GetInterfaceDescription", (req("interface", "string"),), (req("description", "string"),)),
        Error("InterfaceNotFound", (req("interface", "string"),)),
        Error("MethodNotFound", (req("method", "string"),)),
        Error("MethodNotImplemented", (req("method", "string"),)),
        Error("InvalidParameter", (req("parameter", "string"),)),
        Error("PermissionDenied"),
        Error("ExpectedMore"),
    ],
)  # fmt: skip

# sd-varlink's own errors: three that never cross the wire, and the errno a method failed with.
IO_SYSTEMD = Interface(
    "io.systemd",
    [
        Error("Disconnected"),
        Error("TimedOut"),
        Error("Protocol"),
        Error("System", (opt("origin", "string"), opt("errnoName", "string"), opt("errno", "int"))),
    ],
)

_POLKIT = opt("allowInteractiveAuthentication", "bool")

IO_SYSTEMD_SERVICE = Interface(
    "io.systemd.service",
    [
        Method("Ping"),
        Method("Reload", (_POLKIT,)),
        Method("SetLogLevel", (opt("level", "int"),)),
        Method("GetLogLevel", (), (req("level", "int"),)),
        Method("GetEnvironment", (), (opt("environment", "string", array=True),)),
        Error("InconsistentEnvironment"),
    ],
)

_LOOKUP = (opt("name", "string"), opt("pid", "ProcessId"), _POLKIT)
_ACQUIRE_METADATA = TypeDef("AcquireMetadata", Enum(("no", "yes", "graceful")))

IO_SYSTEMD_MACHINE = Interface(
    "io.systemd.Machine",
    [
        TypeDef("MachineClass", Enum(("container", "vm", "host"))),
        TypeDef("KillWhom", Enum(("leader", "supervisor", "all"))),
        _ACQUIRE_METADATA,
        TypeDef("MachineOpenMode", Enum(("tty", "login", "shell"))),
        TypeDef("ProcessId", Struct((req("pid", "int"), opt("pidfdId", "int"), opt("bootId", "string")))),
        TypeDef("Timestamp", Struct((opt("realtime", "int"), opt("monotonic", "int")))),
        TypeDef("Address", Struct((opt("ifindex", "int"), req("family", "int"), Field("address", "int", array=True)))),
        Method("Register", (
            req("name", "string"), opt("id", "string"), opt("service", "string"), req("class", "MachineClass"),
            opt("leader", "int"), opt("leaderProcessId", "ProcessId"), opt("supervisor", "int"),
            opt("supervisorProcessId", "ProcessId"), opt("rootDirectory", "string"),
            opt("ifIndices", "int", array=True),
            opt("vSockCid", "int"), opt("sshAddress", "string"), opt("sshPrivateKeyPath", "string"),
            opt("controlAddress", "string"), opt("allocateUnit", "bool"), _POLKIT,
        )),
        Method("Unregister", _LOOKUP),
        Method("Terminate", _LOOKUP),
        Method("Kill", (*_LOOKUP, opt("whom", "KillWhom"), req("signal", "int"))),
        Method("List", (*_LOOKUP, opt("acquireMetadata", "AcquireMetadata")), (
            req("name", "string"), opt("id", "string"), opt("service", "string"), req("class", "MachineClass"),
            opt("leader", "ProcessId"), opt("supervisor", "ProcessId"), opt("rootDirectory", "string"),
            opt("unit", "string"), opt("timestamp", "Timestamp"), opt("vSockCid", "int"), opt("sshAddress", "string"),
            opt("sshPrivateKeyPath", "string"), opt("controlAddress", "string"),
            opt("addresses", "Address", array=True), opt("OSRelease", "string", array=True), opt("UIDShift", "int"),
            opt("subgroup", "string"), opt("UID", "int"),
        ), more="supports"),
        Method("Open", (
            *_LOOKUP, req("mode", "MachineOpenMode"), opt("user", "string"), opt("path", "string"),
            opt("args", "string", array=True), opt("environment", "string", array=True),
        ), (req("ptyFileDescriptor", "int"), req("ptyPath", "string"))),
        Method("MapFrom", (*_LOOKUP, opt("uid", "int"), opt("gid", "int")), (opt("uid", "int"), opt("gid", "int"))),
        Method("MapTo", (opt("uid", "int"), opt("gid", "int")),
               (opt("uid", "int"), opt("gid", "int"), opt("machineName", "string"))),
        Method("BindMount", (*_LOOKUP, req("source", "string"), opt("destination", "string"), opt("readOnly", "bool"),
                             opt("mkdir", "bool"))),
        Method("CopyFrom", (*_LOOKUP, req("source", "string"), opt("destination", "string"), opt("replace", "bool"))),
        Method("CopyTo", (*_LOOKUP, req("source", "string"), opt("destination", "string"), opt("replace", "bool"))),
        Method("OpenRootDirectory", _LOOKUP, (req("fileDescriptor", "int"),)),
        *(Error(name) for name in (
            "NoSuchMachine", "MachineExists", "NoPrivateNetworking", "NoOSReleaseInformation", "NoUIDShift",
            "NotAvailable", "NotSupported", "NoIPC", "NoSuchUser", "NoSuchGroup", "UserInHostRange",
            "GroupInHostRange",
        )),
    ],
)  # fmt: skip

IO_SYSTEMD_MACHINE_IMAGE = Interface(
    "io.systemd.MachineImage",
    [
        _ACQUIRE_METADATA,
        TypeDef("CleanPoolMode", Enum(("all", "hidden"))),
        Method("List", (opt("name", "string"), opt("acquireMetadata", "AcquireMetadata"), _POLKIT), (
            req("name", "string"), opt("path", "string"), req("type", "string"), req("class", "string"),
            req("readOnly", "bool"), opt("creationTimestamp", "int"), opt("modificationTimestamp", "int"),
            opt("usage", "int"), opt("usageExclusive", "int"), opt("limit", "int"), opt("limitExclusive", "int"),
            opt("hostname", "string"), opt("machineId", "string"), opt("machineInfo", "string", array=True),
            opt("OSRelease", "string", array=True),
        ), more="supports"),
        Method("Update", (req("name", "string"), _POLKIT, opt("newName", "string"), opt("readOnly", "bool"),
                          opt("limit", "int"))),
        Method("Clone", (req("name", "string"), _POLKIT, req("newName", "string"), opt("readOnly", "bool"))),
        Method("Remove", (req("name", "string"), _POLKIT)),
        Method("SetPoolLimit", (_POLKIT, req("limit", "int"))),
        Method("CleanPool", (_POLKIT, req("mode", "CleanPoolMode")),
               (req("name", "string"), opt("usageExclusive", "int")), more="requires"),
        Error("NoSuchImage"),
        Error("TooManyOperations"),
        Error("NotSupported"),
    ],
)  # fmt: skip
