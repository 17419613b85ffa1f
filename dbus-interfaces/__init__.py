"""Installed as the package ``machined.data.interfaces`` (pyproject.toml); see machined/data."""
