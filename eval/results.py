"""Result files and their provenance: the code version (git commit), the machine, and the atomic JSON writer."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.persist import atomic_write_json


def code_version() -> str:
    """The git commit of the code (with '+dirty' when tracked files differ); outside a checkout (a copy exported
    with `git archive` so that edits cannot reach a long run), $SHOPREC_CODE_VERSION, else 'unknown'."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return os.environ.get("SHOPREC_CODE_VERSION", "unknown")
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return info


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Atomic write (a crash never leaves half a result)."""
    atomic_write_json(path, data, indent=1, sort_keys=True, default=_json_default)


def _json_default(x: object) -> object:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
