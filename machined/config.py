"""machined's configuration file: ``/etc/machined/machined.conf`` (another with ``--config``).

INI, one section ``[Machined]``::

    [Machined]
    RegisterOCI=yes

A missing file is the defaults; the command line wins over the file. Booleans as systemd reads
them (yes/no, true/false, on/off, 1/0). As systemd treats its own files: an unknown section or
key, a value that is not a boolean, or a file that cannot be parsed is logged and ignored (the
defaults stand), so that a typo never keeps machines from being registered. Only a file named
with ``--config`` that cannot be opened stops the daemon.
"""

from __future__ import annotations

import configparser
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

CONFIG_FILE = "/etc/machined/machined.conf"
SECTION = "Machined"
_TRUE = {"1", "yes", "y", "true", "t", "on"}
_FALSE = {"0", "no", "n", "false", "f", "off"}


class ConfigError(Exception):
    """The configuration file cannot be used; the message says why and where."""


@dataclass(frozen=True)
class Config:
    register_oci: bool = False


def parse_bool(value: str) -> bool | None:
    value = value.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return None


def load(path: str = CONFIG_FILE, required: bool = False) -> Config:
    """The configuration in *path*; the defaults if it does not exist (an error if *required*)."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f, source=path)
    except OSError as e:
        if required:
            raise ConfigError(f"{path}: {e.strerror or e}") from None
        if not isinstance(e, FileNotFoundError):
            log.warning("Cannot read %s, ignoring it: %s", path, e)
        return Config()
    except (UnicodeDecodeError, configparser.Error) as e:
        log.warning("Cannot parse %s, ignoring it: %s", path, str(e).replace("\n", " "))
        return Config()
    register_oci = False
    for section in parser.sections():
        if section != SECTION:
            log.warning("%s: unknown section [%s], ignored.", path, section)
            continue
        for key, value in parser.items(section):
            if key == "RegisterOCI":
                parsed = parse_bool(value)
                if parsed is None:
                    log.warning("%s: RegisterOCI=%r is not a boolean, ignoring.", path, value)
                else:
                    register_oci = parsed
            else:
                log.warning("%s: unknown key %r in [%s], ignored.", path, key, section)
    return Config(register_oci=register_oci)
