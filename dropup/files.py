"""Small file helpers shared by the run recorder and corpus preparation (no torch import: preparation's workers
start from modules that use them)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomic(path: Path, obj) -> None:
    """JSON written under a temporary name and renamed: readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def read_json(path: Path):
    """The file's JSON, or None when there is no such file."""
    return json.loads(path.read_text()) if path.is_file() else None
