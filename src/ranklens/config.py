"""Typed configs: pydantic models that reject unknown keys, loadable from YAML and overridable from the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ranklens.errors import RanklensError

C = TypeVar("C", bound="Config")


class Config(BaseModel):
    """Base of every job config: unknown keys are an error, never silently dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def build(cls: type[C], values: dict[str, Any], source: str = "arguments") -> C:
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise RanklensError(f"bad config in {source}: {where}: {first['msg']} (got {first.get('input')!r})") from err

    @classmethod
    def load(cls: type[C], path: str | Path | None = None, **overrides: Any) -> C:
        """Values from a YAML file (if given), then the non-None overrides (the CLI's flags) on top."""
        values: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise RanklensError(f"config file {str(path)!r} does not exist")
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise RanklensError(f"config file {str(path)!r} must hold a mapping, got {type(loaded).__name__}")
            values.update(loaded)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.build(values, source=str(path) if path else "arguments")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
