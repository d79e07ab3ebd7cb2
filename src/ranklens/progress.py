"""One look for every progress bar: on stderr, sized to the terminal, off when a job runs quietly."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int | None, desc: str, *, unit: str = "tok", enabled: bool = True, initial: int = 0) -> tqdm:
    return tqdm(total=total, initial=initial, unit=unit, desc=desc, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)
