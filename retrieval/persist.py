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

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from retrieval.catalog import Catalog


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Write a directory atomically: yields a fresh temp dir next to `target`; on success it replaces `target`.

    On any exception the temp dir is removed and an existing `target` is left untouched. A directory cannot be
    renamed over a non-empty one, so the swap is three renames under the lock file `.<name>.lock`: the finished
    temp dir becomes `.<name>.new-*` (its name says it is complete), the old `target` goes aside to
    `.<name>.old-*`, the new one moves in. A process killed anywhere in between leaves a state that
    `recover_directory` completes at the next load or build (the complete new version wins, else the old one
    comes back). Temp dirs of killed builds are removed at the next build: a build holds an flock on its temp
    dir, so one that can be locked belongs to a dead process, and another process's build in progress is kept.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; choose another index directory")
    with _swap_lock(target):
        _recover(target)
        remove_orphan_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    held = _hold(tmp)  # released by the OS if this process dies: that is how a later build knows it is orphaned
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the index should be readable like any other output
        yield tmp
        _fsync_tree(tmp)
        with _swap_lock(target):
            ready = _unused_name(target, "new")
            os.rename(tmp, ready)
            if target.exists():
                old = _unused_name(target, "old")
                os.rename(target, old)
                os.rename(ready, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(ready, target)
            _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(held)


def recover_directory(target: str | Path) -> str | None:
    """Finish or undo a swap of `atomic_directory` that a killed process left half done.

    Returns "promoted" (a complete new version moved in), "restored" (the previous version moved back), or None
    when there was nothing to do. Cheap when there is nothing to do: no lock is taken, nothing is written.
    """
    target = Path(target)
    if not target.parent.is_dir() or not _leftovers(target):
        return None
    with _swap_lock(target):
        return _recover(target)


def remove_orphan_temps(target: str | Path) -> list[Path]:
    """Remove the temp dirs of `atomic_directory` builds whose process died; returns what was removed."""
    target = Path(target)
    removed = []
    for d in target.parent.glob(f".{target.name}.????????.tmp"):  # mkdtemp's 8 random characters
        if not d.is_dir():
            continue
        try:
            fd = os.open(d, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # another process is writing it right now
        finally:
            os.close(fd)  # closing drops the lock we may have taken
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _leftovers(target: Path) -> list[Path]:
    return [*target.parent.glob(f".{target.name}.new-*"), *target.parent.glob(f".{target.name}.old-*")]


def _recover(target: Path) -> str | None:
    """`recover_directory`'s work; the caller holds the swap lock."""
    by_age = lambda paths: sorted(paths, key=lambda p: p.stat().st_mtime_ns)  # noqa: E731
    news = by_age(d for d in target.parent.glob(f".{target.name}.new-*") if d.is_dir())
    olds = by_age(d for d in target.parent.glob(f".{target.name}.old-*") if d.is_dir())
    action = None
    if news:  # a fully written version was about to move in: finish the swap
        if target.exists():
            aside = _unused_name(target, "old")
            os.rename(target, aside)
            olds.append(aside)
        os.rename(news[-1], target)
        for d in news[:-1]:
            shutil.rmtree(d, ignore_errors=True)
        action = "promoted"
    elif not target.exists() and olds:  # killed after moving the old version aside: bring it back
        os.rename(olds.pop(), target)
        action = "restored"
    if target.exists():
        for d in olds:
            shutil.rmtree(d, ignore_errors=True)
    if action:
        _fsync_dir(target.parent)
    return action


def _unused_name(target: Path, tag: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f".{target.name}.{tag}-", dir=target.parent))
    path.rmdir()  # only the unique name is wanted; rename needs it free
    return path


def _hold(directory: Path) -> int:
    fd = os.open(directory, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


@contextmanager
def _swap_lock(target: Path) -> Iterator[None]:
    """An exclusive flock on `.<name>.lock` beside `target`: one swap or recovery of it at a time, across
    processes. The lock file is removed on release (no litter); a waiter that then holds a removed file's lock
    sees that the path no longer names its file and locks again. (Not the parent folder itself: a build's temp
    folder, flocked by its builder, is the parent of the sub-folders its signals save atomically.)"""
    path = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding it: nobody can lock this file and believe it current
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def catalog_ids_fingerprint(catalog: Catalog) -> str:
    """sha256 of the catalog's item ids in row order (not their texts): a saved model indexed by catalog row is only
    valid for a catalog with these ids in this order (`retrieval.index.catalog_text_fingerprint` covers the texts)."""
    h = hashlib.sha256()
    for item_id in catalog.ids:
        h.update(item_id.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


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
