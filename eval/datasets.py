"""Named datasets for evaluation: the shared research data (read in place, never copied) and the demo catalog."""

from __future__ import annotations

import os
from pathlib import Path

from retrieval.types import Interaction, Item

# Research data lives outside the repository (licence terms forbid copying it in); see ../shared/data/README.md.
SHARED = {"ml-100k": "ml-100k", "office": "amazon-office-2014-5core"}


def shared_data_dir() -> Path:
    """$SHOPREC_SHARED_DATA, else ../shared/data next to the repository root."""
    env = os.environ.get("SHOPREC_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def resolve(name_or_path: str) -> Path | None:
    """A dataset folder for a short name (ml-100k, office) or a path; None for the built-in demo catalog."""
    if name_or_path == "demo":
        return None
    if name_or_path in SHARED:
        path = shared_data_dir() / SHARED[name_or_path]
    else:
        path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(
            f"dataset {name_or_path!r} not found at {path}. Fix: pass a folder in a supported format "
            f"(generic JSONL/CSV, MovieLens, LC-Rec JSON), 'demo', or one of {', '.join(SHARED)} with "
            f"../shared/data present (or $SHOPREC_SHARED_DATA set)."
        )
    return path


def load(name_or_path: str, *, seed: int = 0) -> tuple[str, list[Item], list[Interaction]]:
    """(name, items, interactions) for a named dataset, a folder, or 'demo'."""
    path = resolve(name_or_path)
    if path is None:
        from retrieval.synthetic import SyntheticConfig, generate

        data = generate(SyntheticConfig(seed=seed))
        return "demo", list(data.items), list(data.interactions)
    from retrieval.loaders import load_dataset

    ds = load_dataset(path)
    return name_or_path, ds.items, ds.interactions
