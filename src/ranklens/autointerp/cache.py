"""A request/response cache on disk: one JSON file per request, named by the hash of the full request.

The key is the SHA-256 of the request body as sent (model, messages, temperature, seed, max tokens, ...) in
canonical JSON, so any change to a prompt or a setting is a new entry and an unchanged rerun sends nothing. The
endpoint's address is not part of the key: the same model behind another port or host answers the same request
(a killed server restarted elsewhere resumes from the cache). Entries are written atomically (temporary name, then
rename), so a run killed mid-write leaves either the whole entry or none, and threads never see half a file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ranklens.io import atomic_write_json


def request_key(request: dict[str, Any]) -> str:
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class DiskCache:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, request: dict[str, Any]) -> dict[str, Any] | None:
        path = self._path(request_key(request))
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None  # unreadable: asked again and overwritten
        # A hash collision is astronomically unlikely; comparing the stored request costs nothing and rules it out.
        return entry["response"] if entry.get("request") == request else None

    def put(self, request: dict[str, Any], response: dict[str, Any]) -> None:
        atomic_write_json(self._path(request_key(request)), {"request": request, "response": response})

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob("*/*.json")) if self.directory.is_dir() else 0
