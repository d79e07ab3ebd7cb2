"""The spectrum of activation sites (paper Section 4): the `ranklens spectrum` job, its statistics and figures.

The package is also the notebook function ``ranklens.spectrum(x)`` (``ranklens.spectrum.stats.spectrum_of``): a package and a
function cannot share the name ``ranklens.spectrum`` otherwise, so the module is made callable.
"""

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, x):
        from ranklens.spectrum.stats import spectrum_of

        return spectrum_of(x)


sys.modules[__name__].__class__ = _CallableModule
