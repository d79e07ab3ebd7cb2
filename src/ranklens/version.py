"""The version of ranklens (one place; the package, the CLI and run records read it)."""

__version__ = "0.1.0"
