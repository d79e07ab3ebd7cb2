"""ranklens: the geometry of transformer activations and sparse dictionaries that respect it."""

from ranklens.version import __version__

__all__ = ["__version__"]
