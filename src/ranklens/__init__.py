"""ranklens: the geometry of transformer activations and sparse dictionaries that respect it."""

__version__ = "0.1.0"
