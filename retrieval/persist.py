"""Small persistence helpers shared by the trainable retrievers: atomic writes and the catalog-identity check.

A model stores the catalog's item ids in row order next to its weights, because its vectors and matrices are
indexed by catalog row: loading it against a catalog in another order would silently score the wrong items.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from retrieval.catalog import Catalog


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` through a temp file in the same folder and `os.replace`: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_item_ids(saved: Sequence[str], catalog: Catalog, what: str, source: Path) -> None:
    """Raise a ValueError naming the first difference when `saved` is not the catalog's id list, in order."""
    current = catalog.ids
    if list(saved) == current:
        return
    if len(saved) != len(current):
        detail = f"the model has {len(saved)} items, the catalog {len(current)}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(saved, current, strict=True)) if a != b)
        detail = f"first difference at row {i}: model item {saved[i]!r}, catalog item {current[i]!r}"
    raise ValueError(
        f"the {what} model in {source} was built for a different catalog ({detail}); "
        f"refit it on this catalog (fit + save) or load the catalog it was built with."
    )
