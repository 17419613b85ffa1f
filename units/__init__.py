"""Installed as the package ``machined.data.units`` (pyproject.toml); see machined/data."""
