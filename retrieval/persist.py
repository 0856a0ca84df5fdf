"""Files that matter, written and read safely: the one place for atomic writes and for parsing users' JSON/TOML.

Atomic: every write goes to a temp file (or folder) beside its target and is renamed into place, so a reader or a
crash never sees half a file. Parsing: absurdly nested input (100k `[`) makes Python's parsers raise
RecursionError, which no caller expects; here it is the format's own decode error, so every handler that names
the file and line for bad JSON/TOML names it for this too.

Also the catalog-identity check of the trainable retrievers: a model stores the catalog's item ids in row order
next to its weights, because its vectors and matrices are indexed by catalog row: loading it against a catalog in
another order would silently score the wrong items.
"""

from __future__ import annotations

import json
import os
import tempfile
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from retrieval.catalog import Catalog


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` through a temp file in the same folder and `os.replace`: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write` of UTF-8 text."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: Path, data: Any, *, indent: int | None = 2, sort_keys: bool = False, **kwargs: Any) -> None:
    """`atomic_write` of `json.dumps(data, ...)` plus a final newline (kwargs go to json.dumps, e.g. `default`)."""
    atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys, **kwargs) + "\n")


def parse_json(text: str | bytes) -> Any:
    """`json.loads`, with nesting too deep for the parser reported as a `json.JSONDecodeError` (a ValueError)."""
    try:
        return json.loads(text)
    except RecursionError:
        doc = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        raise json.JSONDecodeError("nested too deeply to parse", doc, 0) from None


def parse_toml(text: str) -> dict[str, Any]:
    """`tomllib.loads`, with nesting too deep for the parser reported as a `tomllib.TOMLDecodeError`."""
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise tomllib.TOMLDecodeError("nested too deeply to parse") from None


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """A JSON file holding an object; a ValueError naming the file and `fix` for anything else."""
    try:
        data = parse_json(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}). Fix: {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(data).__name__}. Fix: {fix}")
    return data


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
