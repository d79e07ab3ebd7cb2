"""The CLI command equivalent to a job config: `ranklens <subcommand> --flag value ... --out DIR`.

Flags are emitted for the fields whose value differs from the config class's default, in field order, so a command
rebuilds exactly the config it came from (``Config.load`` fills in the rest).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from ranklens.config import Config


def _value(value: object) -> str:
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def cli_command(subcommand: str, cfg: Config, out: str | Path | None = None, *positional: str) -> str:
    parts = ["ranklens", *subcommand.split(), *positional]
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        if value == field.default:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            parts += [flag, _value(value)]
    if out is not None:
        parts += ["--out", str(out)]
    return " ".join(shlex.quote(p) for p in parts)
