"""Keep freed memory inside the process, so a training step's large temporaries reuse pages instead of faulting in
fresh ones.

Why: glibc's malloc serves blocks above its mmap threshold (128 KiB, adapting up to 32 MiB) with mmap and unmaps
them on free, so every step of a CPU training loop faults its 50-600 MB temporaries (pre-activations, gradients,
casts) in again, page by page. Raising the mmap threshold (1 GiB) and the trim threshold (2 GiB) keeps freed blocks
in the heap for the next step (bench/README.md measures the effect). The cost: the process keeps its high-water RSS.

Only glibc has ``mallopt``; elsewhere (macOS, musl) this does nothing. ``RANKLENS_RETAIN_MEMORY=0`` turns it off.
The CLI calls ``retain_freed_memory`` once at start; library users may call it themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30
_TRIM_THRESHOLD = (1 << 31) - 1
ENV = "RANKLENS_RETAIN_MEMORY"


def retain_freed_memory() -> bool:
    """Tune glibc malloc to keep freed blocks (see the module docstring); True if it took effect."""
    if os.environ.get(ENV, "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
