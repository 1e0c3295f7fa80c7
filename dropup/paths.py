"""Where things are, and what produced them: the project root, config paths resolved against it, and the provenance
(git commit, library versions) a run records. The bottom layer: it imports nothing of the project, so the trainer,
the data package and the tools can all use it."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def project_path(path) -> Path:
    """Relative paths in configs are relative to the project root, wherever run.py is launched from."""
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "lightning", "hydra-core", "transformers", "tokenizers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
