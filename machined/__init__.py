"""machined: a wire-compatible replacement for systemd-machined."""

__version__ = "0.1.0"
