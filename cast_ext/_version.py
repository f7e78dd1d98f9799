"""The package version, and the source revision the code runs from (recorded with results)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

__version__ = "0.1.0"


def git_sha() -> str:
    """The short commit of the checkout this package runs from: ``CAST_EXT_GIT_SHA`` if set (for
    copies without ``.git``, such as the GPU machine's), else ``git rev-parse``, else
    ``"unknown"`` (an installed wheel)."""
    if os.environ.get("CAST_EXT_GIT_SHA"):
        return os.environ["CAST_EXT_GIT_SHA"]
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return "unknown"
    cmd = ["git", "rev-parse", "--short", "HEAD"]
    try:
        out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.strip()
