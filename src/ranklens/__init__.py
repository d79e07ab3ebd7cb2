"""ranklens: the geometry of transformer activations and sparse dictionaries that respect it.

The notebook API (``ranklens.api``) loads lazily, so ``import ranklens`` and the command line stay fast::

    import ranklens
    ranklens.effective_rank(x); ranklens.spectrum(x); ranklens.capture(model, texts, sites)
    ranklens.train_sae(x, ...); ranklens.train_lorsa(model, layer=..., ...); ranklens.SparseAutoencoder.load(dir)
"""

from ranklens.version import __version__

__all__ = ["Lorsa", "SparseAutoencoder", "__version__", "capture", "effective_rank", "load_sae", "spectrum",
           "train_lorsa", "train_sae"]

_API = {"capture", "effective_rank", "load_sae", "train_lorsa", "train_sae"}  # and spectrum, a callable package


def __getattr__(name: str):
    if name == "spectrum":  # not imported yet: the package, which is callable (see ranklens.spectrum)
        import ranklens.spectrum

        return ranklens.spectrum
    if name in _API:
        from ranklens import api

        return getattr(api, name)
    if name == "SparseAutoencoder":
        from ranklens.dictionaries.sae import SparseAutoencoder

        return SparseAutoencoder
    if name == "Lorsa":
        from ranklens.dictionaries.lorsa import Lorsa

        return Lorsa
    raise AttributeError(f"module 'ranklens' has no attribute {name!r}")
