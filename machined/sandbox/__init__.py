"""A real systemd booted as PID 1 in fresh namespaces, for trying and testing machined."""

from machined.sandbox.core import Sandbox, SandboxError

__all__ = ["Sandbox", "SandboxError"]
