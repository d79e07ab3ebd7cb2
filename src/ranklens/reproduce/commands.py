"""The CLI command equivalent to a job config: `ranklens <subcommand> --flag value ... --out DIR`.

Flags are emitted for the fields whose value differs from `base` (the config the command line starts from: the class
defaults, or for `reproduce` the preset's values), in field order, so a command rebuilds exactly the config it came
from.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from ranklens.config import Config


def _value(value: object) -> str:
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def cli_command(subcommand: str, cfg: Config, out: str | Path | None = None, *positional: str,
                base: Config | None = None) -> str:
    base = base if base is not None else type(cfg)()
    parts = ["ranklens", *subcommand.split(), *positional]
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if value == getattr(base, name) and name != "preset" and not (name == "paper" and value != "collapse"):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            parts += [flag, _value(value)]
    if out is not None:
        parts += ["--out", str(out)]
    return " ".join(shlex.quote(p) for p in parts)
